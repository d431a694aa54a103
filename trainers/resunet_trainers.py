"""Pre-activation residual U-Net trainers (Zhang et al.'s ResUNet, the ResUNet liver paper's network and
the GODC/LFAM paper's "Residual U-Net" baseline), alone and with GODC / LFAM by composition."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.trainer_base import LengthAndChecksMixin
from nnunet_ext.training.loss_mixins import DiceCELossMixin, GODCLossMixin
from nnunet_ext.training.recipes import RESUNET_RECIPE, PaperRecipeMixin
from nnunet_ext.training.paper_networks import PaperResUNetArchitectureMixin
from nnunet_ext.training.resunet_mixins import ResUNetArchitectureMixin, ResUNetLFAMArchitectureMixin


class nnUNetTrainerResUNet(LengthAndChecksMixin, ResUNetArchitectureMixin, nnUNetTrainer):
    """Pre-activation residual U-Net on the plans' topology; nnU-Net's Dice+CE loss."""


class nnUNetTrainerResUNetGODC(LengthAndChecksMixin, GODCLossMixin, ResUNetArchitectureMixin, nnUNetTrainer):
    """Pre-activation residual U-Net with GODC + CE (the GODC paper's "Residual U-Net + GODC" row)."""


class nnUNetTrainerResUNetGODCLFAM(LengthAndChecksMixin, GODCLossMixin, ResUNetLFAMArchitectureMixin,
                                   nnUNetTrainer):
    """Pre-activation residual U-Net with LFAM on every skip and GODC + CE."""


class nnUNetTrainerResUNetPaper(LengthAndChecksMixin, PaperResUNetArchitectureMixin, nnUNetTrainer):
    """Zhang et al.'s residual U-Net as the ResUNet paper builds it (64/128/256 + 512 bridge, BatchNorm, one
    unit per level) on any plans whose patch is a multiple of 8; nnU-Net's Dice+CE loss."""


class nnUNetTrainerResUNetPaperRecipe(LengthAndChecksMixin, PaperRecipeMixin, PaperResUNetArchitectureMixin,
                                      DiceCELossMixin, nnUNetTrainer):
    """The ResUNet paper's network, loss (soft Dice alone) and augmentation (rotation, left-right flips,
    noise); the paper gives no optimiser or schedule, so they are nnU-Net's."""

    dice_ce_weight_ce = 0.0
    paper_recipe = RESUNET_RECIPE
