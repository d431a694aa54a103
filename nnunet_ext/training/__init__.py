"""Shared trainer machinery: mixins that trainers in ``nnunet_ext.trainers`` combine.

Kept outside ``trainers/`` because nnU-Net imports every module of that folder as a top-level
module when it looks a trainer up (DESIGN.md); only trainer classes live there.
"""
from nnunet_ext.training.architecture_mixins import LFAMArchitectureMixin
from nnunet_ext.training.deep_supervision import StrictDeepSupervisionWrapper, nnunet_deep_supervision_weights
from nnunet_ext.training.loss_mixins import DeepSupervisedLossMixin, GODCLossMixin, GODCOnlyLossMixin
from nnunet_ext.training.schedule import TrainingLengthFromEnvMixin

__all__ = ["StrictDeepSupervisionWrapper", "nnunet_deep_supervision_weights", "DeepSupervisedLossMixin",
           "GODCLossMixin", "GODCOnlyLossMixin", "TrainingLengthFromEnvMixin", "LFAMArchitectureMixin"]
