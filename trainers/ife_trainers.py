"""Instructive feature enhancement trainers (IFE paper, Section 2): the plans' U-Net with curvature-
or entropy-selected channels concatenated to the skips of encoder stages 1 and 2; alone and with GODC."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.trainer_base import LengthAndChecksMixin
from nnunet_ext.training import GODCLossMixin, IFEArchitectureMixin
from nnunet_ext.training.recipes import IFE_RECIPE, PaperRecipeMixin


class nnUNetTrainerIFECurvature(LengthAndChecksMixin, IFEArchitectureMixin, nnUNetTrainer):
    """IFE by mean curvature (Eq. 1) on the skips of stages 1 and 2, r = 0.75 / 0.5 (Table 2's best); Dice+CE."""

    ife_score = 'curvature'
    ife_ratios = (0.75, 0.5)


class nnUNetTrainerIFEEntropy(LengthAndChecksMixin, IFEArchitectureMixin, nnUNetTrainer):
    """IFE by 2D information entropy (Eq. 2, Algorithm 1) on the skips of stages 1 and 2, r = 0.5 / 0.5; Dice+CE."""

    ife_score = 'entropy'
    ife_ratios = (0.5, 0.5)


class nnUNetTrainerGODCIFECurvature(LengthAndChecksMixin, GODCLossMixin, IFEArchitectureMixin, nnUNetTrainer):
    """GODC + CE loss and curvature IFE (as nnUNetTrainerIFECurvature)."""

    ife_score = 'curvature'
    ife_ratios = (0.75, 0.5)


class nnUNetTrainerGODCIFEEntropy(LengthAndChecksMixin, GODCLossMixin, IFEArchitectureMixin, nnUNetTrainer):
    """GODC + CE loss and entropy IFE (as nnUNetTrainerIFEEntropy)."""

    ife_score = 'entropy'
    ife_ratios = (0.5, 0.5)


class nnUNetTrainerIFECurvaturePaperRecipe(LengthAndChecksMixin, PaperRecipeMixin, IFEArchitectureMixin,
                                           nnUNetTrainer):
    """Curvature IFE (as nnUNetTrainerIFECurvature) trained with the IFE paper's recipe: Adam 1e-4, x0.1 every
    50 epochs, 100 epochs, batch 32, random resizing to 224..384 for a 224 test size; Dice+CE."""

    ife_score = 'curvature'
    ife_ratios = (0.75, 0.5)
    paper_recipe = IFE_RECIPE


class nnUNetTrainerIFEEntropyPaperRecipe(LengthAndChecksMixin, PaperRecipeMixin, IFEArchitectureMixin,
                                         nnUNetTrainer):
    """Entropy IFE (as nnUNetTrainerIFEEntropy) trained with the IFE paper's recipe (as
    nnUNetTrainerIFECurvaturePaperRecipe)."""

    ife_score = 'entropy'
    ife_ratios = (0.5, 0.5)
    paper_recipe = IFE_RECIPE
