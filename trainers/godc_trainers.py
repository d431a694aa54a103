"""GODC trainers (gradient-optimized Dice loss, Eq. 8 of the GODC/LFAM paper)."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.trainer_base import LengthAndChecksMixin
from nnunet_ext.training import GODCLossMixin, GODCOnlyLossMixin


class nnUNetTrainerGODC(LengthAndChecksMixin, GODCLossMixin, nnUNetTrainer):
    """GODC + cross-entropy: nnU-Net's Dice+CE with Dice replaced by GODC (drop-in)."""


class nnUNetTrainerGODCOnly(LengthAndChecksMixin, GODCOnlyLossMixin, nnUNetTrainer):
    """GODC alone, no cross-entropy (the paper's training loss); false positives on background-only
    patches are pushed down through the union weight (``GODCLoss(empty_gradient=True)``)."""


class nnUNetTrainerGODCSquared(LengthAndChecksMixin, GODCLossMixin, nnUNetTrainer):
    """GODC + cross-entropy with the squared union weight, the paper's aggressive variant."""

    godc_exponent = 2.0
