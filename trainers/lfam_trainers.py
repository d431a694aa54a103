"""LFAM trainers (lateral feature alignment, GODC/LFAM paper Fig. 2), alone and with GODC."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.trainer_base import LengthAndChecksMixin
from nnunet_ext.training import GODCLossMixin, GODCOnlyLossMixin, LFAMArchitectureMixin
from nnunet_ext.training.recipes import GODC_LFAM_RECIPE, PaperRecipeMixin


class nnUNetTrainerLFAM(LengthAndChecksMixin, LFAMArchitectureMixin, nnUNetTrainer):
    """nnU-Net's U-Net with deformable-convolution alignment (LFAM) on every skip; Dice+CE loss."""


class nnUNetTrainerGODCLFAM(LengthAndChecksMixin, GODCLossMixin, LFAMArchitectureMixin, nnUNetTrainer):
    """GODC + CE loss and LFAM on every skip: the paper's full method."""


class nnUNetTrainerLFAMResEnc(LengthAndChecksMixin, LFAMArchitectureMixin, nnUNetTrainer):
    """Residual-encoder U-Net (nnU-Net ResEnc blocks) with LFAM on every skip; Dice+CE loss."""

    use_residual_encoder = True


class nnUNetTrainerLFAMShared(LengthAndChecksMixin, LFAMArchitectureMixin, nnUNetTrainer):
    """LFAM with one deformable kernel bank shared by all levels (the paper's "Conv. shared" ablation)."""

    lfam_shared = True


class nnUNetTrainerGODCLFAMPaperRecipe(LengthAndChecksMixin, PaperRecipeMixin, GODCOnlyLossMixin,
                                       LFAMArchitectureMixin, nnUNetTrainer):
    """GODC alone and LFAM trained with the GODC/LFAM paper's recipe (Section III.C): Adam 2e-4 constant,
    1000 epochs, batch 2, scaling 0.7-1.3, 90-degree rotations, no other augmentation."""

    paper_recipe = GODC_LFAM_RECIPE
