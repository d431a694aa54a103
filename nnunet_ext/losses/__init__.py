"""Loss functions of the papers. Depend on torch (and scipy for distance maps) only: usable without nnU-Net."""
from nnunet_ext.losses.boundary import BoundaryLoss
from nnunet_ext.losses.godc import GODCLoss
from nnunet_ext.losses.hybrid import HybridLoss
from nnunet_ext.losses.schedules import KervadecRebalanceSchedule, PaperSchedule, TermWeights
from nnunet_ext.losses.signed_distance import signed_distance_map, signed_distance_maps
from nnunet_ext.losses.structural import StructuralLoss
from nnunet_ext.losses.uncertain_points import UncertainPointLoss

__all__ = ["GODCLoss", "HybridLoss", "BoundaryLoss", "UncertainPointLoss", "StructuralLoss", "signed_distance_map",
           "signed_distance_maps", "PaperSchedule", "KervadecRebalanceSchedule", "TermWeights"]
