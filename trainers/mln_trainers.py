"""Multi-level structural network trainer (MLN, Section 3 and Eq. 13 of the multi-level structural loss
paper): the plans' U-Net with region, boundary and pixel branches fused by saliency guidance."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.trainer_base import LengthAndChecksMixin
from nnunet_ext.training.loss_mixins import DiceCELossMixin
from nnunet_ext.training.mln_mixins import MLNArchitectureMixin, MLNLossMixin
from nnunet_ext.training.recipes import MLN_RECIPE, PaperRecipeMixin


class nnUNetTrainerMLN(LengthAndChecksMixin, MLNLossMixin, DiceCELossMixin, MLNArchitectureMixin,
                       nnUNetTrainer):
    """MLN: the plans' U-Net + boundary, pixel (point attention) and fusion heads; Eq. 13 loss; predicts the fusion.

    The prediction is the region branch's until the fusion trains (gamma > 0). Region term Dice+CE; alpha from 0
    by 0.2 per epoch to 1 (the paper's MLL ramp, see :class:`~nnunet_ext.losses.mln.MLNSchedule`), beta = gamma = 0
    for the first 12 epochs, then 1 (Section 4.1.1)."""


class nnUNetTrainerMLNPaperRecipe(LengthAndChecksMixin, PaperRecipeMixin, MLNLossMixin, DiceCELossMixin,
                                  MLNArchitectureMixin, nnUNetTrainer):
    """MLN with Dice region and fusion terms, trained with the paper's recipe (Section 4): Adam 1e-5, halved
    every 2 epochs after 8, reset at epoch 12; 25 epochs, batch 1, no augmentation."""

    dice_ce_weight_ce = 0.0
    paper_recipe = MLN_RECIPE
