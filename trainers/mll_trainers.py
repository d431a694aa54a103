"""Multi-level structural loss trainers (region + boundary + uncertain-point terms, Eq. 11 of the
multi-level structural loss paper) and their ablations; GODC as the region term by composition."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.trainer_base import LengthAndChecksMixin
from nnunet_ext.training import DiceCELossMixin, GODCLossMixin, StructuralLossMixin
from nnunet_ext.training.recipes import MLL_RECIPE, PaperRecipeMixin


class nnUNetTrainerMLL(LengthAndChecksMixin, StructuralLossMixin, DiceCELossMixin, nnUNetTrainer):
    """nnU-Net's Dice+CE + alpha * boundary loss + beta * uncertain-point CE, the paper's schedules."""


class nnUNetTrainerMLLGODC(LengthAndChecksMixin, StructuralLossMixin, GODCLossMixin, nnUNetTrainer):
    """The multi-level structural loss with GODC + CE as the region term."""


class nnUNetTrainerRegionBoundary(LengthAndChecksMixin, StructuralLossMixin, DiceCELossMixin, nnUNetTrainer):
    """Ablation: Dice+CE + alpha * boundary loss (no point term)."""

    mll_point_term = False


class nnUNetTrainerRegionPoint(LengthAndChecksMixin, StructuralLossMixin, DiceCELossMixin, nnUNetTrainer):
    """Ablation: Dice+CE + beta * uncertain-point CE (no boundary term)."""

    mll_boundary_term = False


class nnUNetTrainerMLLPaperRecipe(LengthAndChecksMixin, PaperRecipeMixin, StructuralLossMixin, DiceCELossMixin,
                                  nnUNetTrainer):
    """The multi-level structural loss with Dice as its region term, trained with the paper's recipe
    (Section 4): Adam 1e-5, halved every 2 epochs after 8, reset at epoch 12; 20 epochs, batch 1, no
    augmentation."""

    dice_ce_weight_ce = 0.0
    paper_recipe = MLL_RECIPE
