"""Loss functions of the papers. Depend on torch only (usable without nnU-Net)."""
from nnunet_ext.losses.godc import GODCLoss

__all__ = ["GODCLoss"]
