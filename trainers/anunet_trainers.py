"""ANU-Net and UNet++ trainers (attention nested U-Net paper, Section 3): nested decoders on the plans'
topology, full-resolution deep-supervision heads with equal weights, pruned prediction
(``NNUNET_EXT_ANUNET_PRUNE_LEVEL`` or ``nnunet-ext prune``)."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.trainer_base import LengthAndChecksMixin
from nnunet_ext.training.anunet_mixins import UNET_PLUS_PLUS, HybridLossMixin, NestedUNetArchitectureMixin
from nnunet_ext.training.loss_mixins import DiceCELossMixin, GODCLossMixin
from nnunet_ext.training.paper_networks import PaperANUNetArchitectureMixin


class nnUNetTrainerANUNet(LengthAndChecksMixin, NestedUNetArchitectureMixin, HybridLossMixin, nnUNetTrainer):
    """ANU-Net (nested decoder + attention gates, heads on X_0,1..X_0,L) with the hybrid loss of Eq. 8."""


class nnUNetTrainerANUNetDiceCE(LengthAndChecksMixin, NestedUNetArchitectureMixin, DiceCELossMixin,
                                nnUNetTrainer):
    """ANU-Net with nnU-Net's Dice+CE on every head instead of the hybrid loss."""


class nnUNetTrainerANUNetGODC(LengthAndChecksMixin, NestedUNetArchitectureMixin, GODCLossMixin, nnUNetTrainer):
    """ANU-Net with GODC + CE on every head."""


class nnUNetTrainerUNetPlusPlus(LengthAndChecksMixin, NestedUNetArchitectureMixin, HybridLossMixin,
                                nnUNetTrainer):
    """UNet++ (ANU-Net without attention gates, the paper's ablation) with the hybrid loss of Eq. 8."""

    nested_network = UNET_PLUS_PLUS


class nnUNetTrainerANUNetPaper(LengthAndChecksMixin, PaperANUNetArchitectureMixin, HybridLossMixin,
                               nnUNetTrainer):
    """The ANU-Net paper's own network (32..512 features, 4 max-poolings; Table 6's 8.95 M parameters for one
    class) with the hybrid loss of Eq. 8, on any plans whose patch is a multiple of 16; nnU-Net's
    InstanceNorm where the paper has BatchNorm (``anunet_paper_norm = 'batch'``: the paper's)."""
