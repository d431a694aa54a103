"""LFAM trainers (lateral feature alignment, GODC/LFAM paper Fig. 2), alone and with GODC."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.training import GODCLossMixin, LFAMArchitectureMixin, TrainingLengthFromEnvMixin


class nnUNetTrainerLFAM(TrainingLengthFromEnvMixin, LFAMArchitectureMixin, nnUNetTrainer):
    """nnU-Net's U-Net with deformable-convolution alignment (LFAM) on every skip; Dice+CE loss."""


class nnUNetTrainerGODCLFAM(TrainingLengthFromEnvMixin, GODCLossMixin, LFAMArchitectureMixin, nnUNetTrainer):
    """GODC + CE loss and LFAM on every skip: the paper's full method."""


class nnUNetTrainerLFAMResEnc(TrainingLengthFromEnvMixin, LFAMArchitectureMixin, nnUNetTrainer):
    """Residual-encoder U-Net (nnU-Net ResEnc blocks) with LFAM on every skip; Dice+CE loss."""

    use_residual_encoder = True


class nnUNetTrainerLFAMShared(TrainingLengthFromEnvMixin, LFAMArchitectureMixin, nnUNetTrainer):
    """LFAM with one deformable kernel bank shared by all levels (the paper's "Conv. shared" ablation)."""

    lfam_shared = True
