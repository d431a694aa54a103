"""Network building blocks (deformable convolution, LFAM, attention gate, IFE selectors). Depend on torch only."""
from nnunet_ext.nn.attention_gate import AttentionGate
from nnunet_ext.nn.deformable_conv import DeformableConv, deform_conv, deform_conv_output_size
from nnunet_ext.nn.lateral_alignment import LateralFeatureAlignment

__all__ = ["AttentionGate", "DeformableConv", "deform_conv", "deform_conv_output_size", "LateralFeatureAlignment"]
