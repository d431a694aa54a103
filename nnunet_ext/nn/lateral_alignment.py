"""Lateral feature alignment module (LFAM) of the GODC/LFAM paper
(``shared/papers/godc_lfam_gradient_optimized_dice.md``, Section II, Fig. 2).

Down-sampling, padding and up-sampling shift decoder features against the encoder features they
are fused with. LFAM resamples the encoder skip with a deformable convolution (Dai et al. 2017;
modulated, Zhu et al. 2019) before the fusion, the sampling offsets being predicted from both
features, so that the skip is aligned with the up-sampled decoder feature.

Our reading (the paper shows only the figure): offsets (and the DCNv2 modulation mask) come from
one convolution over ``cat(skip, up)``, zero-initialised so that training starts from the regular
sampling grid with a mask of ``sigmoid(0) = 0.5`` (the DCNv2 initialisation); the skip feature is
the one resampled; the aligned skip replaces the skip in the decoder's concatenation.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from nnunet_ext.nn.deformable_conv import DeformableConv

IntOrTuple = Union[int, Sequence[int]]


def _conv_dim(conv_op: Type[nn.Module]) -> int:
    for ndim, op in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d)):
        if issubclass(conv_op, op):
            return ndim
    raise ValueError(f"conv_op must be nn.Conv2d or nn.Conv3d, got {conv_op}")


def _kernel(kernel_size: IntOrTuple, ndim: int) -> Tuple[int, ...]:
    kernel = (kernel_size,) * ndim if isinstance(kernel_size, int) else tuple(int(k) for k in kernel_size)
    if len(kernel) != ndim or any(k < 1 or k % 2 == 0 for k in kernel):
        raise ValueError(f"LFAM needs odd kernel sizes, one per axis ({ndim}), got {kernel_size}")
    return kernel


class LateralFeatureAlignment(nn.Module):
    """Aligns ``skip`` to ``up`` (same spatial size): ``DCN(skip; offsets, mask = f(cat(skip, up)))``.

    Args:
        skip_channels: channels of the encoder feature (kept by the module).
        guide_channels: channels of the up-sampled decoder feature the skip is aligned to.
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d``.
        kernel_size: of the offset predictor and of the deformable convolution (odd; per axis for
            anisotropic nnU-Net stages, e.g. ``(1, 3, 3)``).
        offset_groups: channel groups of the skip that get their own offsets.
        modulated: DCNv2 (learned mask) if True, DCNv1 otherwise.
        deformable_conv: a ``DeformableConv`` to use instead of a new one (sharing across levels).
    """

    def __init__(self, skip_channels: int, guide_channels: int, conv_op: Type[nn.Module],
                 kernel_size: IntOrTuple = 3, offset_groups: int = 1, modulated: bool = True,
                 deformable_conv: Optional[DeformableConv] = None):
        super().__init__()
        ndim = _conv_dim(conv_op)
        kernel = _kernel(kernel_size, ndim)
        padding = tuple(k // 2 for k in kernel)
        self.modulated = modulated
        self.deform = deformable_conv if deformable_conv is not None else DeformableConv(
            skip_channels, skip_channels, kernel, padding=padding, offset_groups=offset_groups, ndim=ndim)
        if self.deform.in_channels != skip_channels or self.deform.out_channels != skip_channels:
            raise ValueError(f"deformable_conv maps {self.deform.in_channels}->{self.deform.out_channels} channels, "
                             f"the skip has {skip_channels}")
        predicted = self.deform.offset_channels + (self.deform.mask_channels if modulated else 0)
        self.offset_predictor = conv_op(skip_channels + guide_channels, predicted, kernel, 1, padding, bias=True)
        self.reset_offset_predictor()

    def reset_offset_predictor(self) -> None:
        """Zero offsets and mask logits: the regular grid, mask 0.5 (DCNv2's initialisation)."""
        nn.init.zeros_(self.offset_predictor.weight)
        nn.init.zeros_(self.offset_predictor.bias)

    def forward(self, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if skip.shape[2:] != up.shape[2:]:
            raise ValueError(f"skip {tuple(skip.shape)} and up-sampled feature {tuple(up.shape)} differ in size")
        predicted = self.offset_predictor(torch.cat((skip, up), 1))
        if self.modulated:
            offset, mask_logits = predicted.split([self.deform.offset_channels, self.deform.mask_channels], 1)
            return self.deform(skip, offset, torch.sigmoid(mask_logits))
        return self.deform(skip, predicted)
