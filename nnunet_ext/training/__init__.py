"""Shared trainer machinery: mixins that trainers in ``nnunet_ext.trainers`` combine.

Kept outside ``trainers/`` because nnU-Net imports every module of that folder as a top-level
module when it looks a trainer up (docs/architecture.md); only trainer classes live there.
"""
from nnunet_ext.training.architecture_mixins import IFEArchitectureMixin, LFAMArchitectureMixin, PlansUNetVariantMixin
from nnunet_ext.training.composition import CompositionError, TrainerMixin
from nnunet_ext.training.deep_supervision import (DeepSupervisionHeadsMixin, StrictDeepSupervisionWrapper,
                                                  nnunet_deep_supervision_weights)
from nnunet_ext.training.loss_mixins import DeepSupervisedLossMixin, DiceCELossMixin, GODCLossMixin, GODCOnlyLossMixin
from nnunet_ext.training.schedule import TrainingLengthFromEnvMixin
from nnunet_ext.training.slice_stack_check import SliceStackCheckMixin
from nnunet_ext.training.structural_mixins import StructuralLossMixin, StructuralTrainingMixin

__all__ = ["CompositionError", "TrainerMixin", "DeepSupervisionHeadsMixin", "StrictDeepSupervisionWrapper",
           "nnunet_deep_supervision_weights", "DeepSupervisedLossMixin", "DiceCELossMixin", "GODCLossMixin",
           "GODCOnlyLossMixin", "TrainingLengthFromEnvMixin", "SliceStackCheckMixin", "LFAMArchitectureMixin",
           "IFEArchitectureMixin", "PlansUNetVariantMixin", "StructuralLossMixin", "StructuralTrainingMixin"]
