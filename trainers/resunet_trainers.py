"""Pre-activation residual U-Net trainers (Zhang et al.'s ResUNet, the ResUNet liver paper's network and
the GODC/LFAM paper's "Residual U-Net" baseline), alone and with GODC / LFAM by composition."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.training.loss_mixins import GODCLossMixin
from nnunet_ext.training.resunet_mixins import ResUNetArchitectureMixin, ResUNetLFAMArchitectureMixin
from nnunet_ext.training.schedule import TrainingLengthFromEnvMixin


class nnUNetTrainerResUNet(TrainingLengthFromEnvMixin, ResUNetArchitectureMixin, nnUNetTrainer):
    """Pre-activation residual U-Net on the plans' topology; nnU-Net's Dice+CE loss."""


class nnUNetTrainerResUNetGODC(TrainingLengthFromEnvMixin, GODCLossMixin, ResUNetArchitectureMixin, nnUNetTrainer):
    """Pre-activation residual U-Net with GODC + CE (the GODC paper's "Residual U-Net + GODC" row)."""


class nnUNetTrainerResUNetGODCLFAM(TrainingLengthFromEnvMixin, GODCLossMixin, ResUNetLFAMArchitectureMixin,
                                   nnUNetTrainer):
    """Pre-activation residual U-Net with LFAM on every skip and GODC + CE."""
