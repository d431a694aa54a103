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

from nnunet_ext.nn.deformable_conv import DeformableConv, deform_conv

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


class SharedKernelSlice(nn.Module):
    """A deformable convolution whose kernel is a slice of a kernel bank shared by several levels.

    The paper's "Conv. shared" ablation (Table II) shares the deformable kernels of all LFAMs, as
    FPN shares its heads. FPN's levels all have 256 channels; nnU-Net's have 32, 64, ... and
    possibly different (anisotropic) kernel sizes. Our definition: one bank of shape
    ``(C_max, C_max, *k_max)`` (+ bias ``C_max``) for all levels; a level with ``C`` channels and
    kernel ``k`` uses the leading ``C x C`` channel block and the central ``k`` of the bank's kernel.
    Every level thus trains the same parameters (the narrow levels the leading block).
    """

    def __init__(self, bank: DeformableConv, channels: int, kernel_size: Sequence[int]):
        super().__init__()
        kernel = tuple(kernel_size)
        if channels > bank.in_channels or any(k > b for k, b in zip(kernel, bank.kernel_size)):
            raise ValueError(f"a level with {channels} channels and kernel {kernel} does not fit the shared bank "
                             f"({bank.in_channels} channels, kernel {bank.kernel_size})")
        self.bank = bank
        self.in_channels = self.out_channels = channels
        self.kernel_size = kernel
        self.ndim = bank.ndim
        self.offset_groups = bank.offset_groups
        self.padding = tuple(k // 2 for k in kernel)
        self._crop = tuple(slice((b - k) // 2, (b - k) // 2 + k) for b, k in zip(bank.kernel_size, kernel))

    @property
    def kernel_numel(self) -> int:
        return int(torch.tensor(self.kernel_size).prod())

    @property
    def offset_channels(self) -> int:
        return self.ndim * self.offset_groups * self.kernel_numel

    @property
    def mask_channels(self) -> int:
        return self.offset_groups * self.kernel_numel

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = self.in_channels
        weight = self.bank.weight[(slice(0, c), slice(0, c), *self._crop)]
        bias = None if self.bank.bias is None else self.bank.bias[:c]
        return deform_conv(x, offset, weight, bias, 1, self.padding, 1, mask)


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
        deformable_conv: a ``DeformableConv`` or ``SharedKernelSlice`` of matching width and kernel,
            used instead of a new one (sharing across levels).
    """

    def __init__(self, skip_channels: int, guide_channels: int, conv_op: Type[nn.Module],
                 kernel_size: IntOrTuple = 3, offset_groups: int = 1, modulated: bool = True,
                 deformable_conv: Optional[nn.Module] = None):
        super().__init__()
        ndim = _conv_dim(conv_op)
        kernel = _kernel(kernel_size, ndim)
        padding = tuple(k // 2 for k in kernel)
        self.modulated = modulated
        self.deform = deformable_conv if deformable_conv is not None else DeformableConv(
            skip_channels, skip_channels, kernel, padding=padding, offset_groups=offset_groups, ndim=ndim)
        if self.deform.in_channels != skip_channels or self.deform.out_channels != skip_channels \
                or tuple(self.deform.kernel_size) != kernel:
            raise ValueError(f"deformable_conv maps {self.deform.in_channels}->{self.deform.out_channels} channels "
                             f"with kernel {tuple(self.deform.kernel_size)}; the skip has {skip_channels}, kernel {kernel}")
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
