"""The layer :class:`DeformableConv` (``nn.Module``): learnable weight and bias, offsets and mask as inputs,
convolving with :func:`~nnunet_ext.nn.deformable_conv.operator.deform_conv`."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from nnunet_ext.nn.deformable_conv.geometry import (SAMPLERS, IntOrTuple, OffsetChannels, _tuple,
                                                     deform_conv_output_size)
from nnunet_ext.nn.deformable_conv.operator import deform_conv


class DeformableConv(OffsetChannels, nn.Module):
    """Deformable convolution layer (DCNv1, or DCNv2 when a mask is passed), 2D or 3D, with learnable
    weight and bias; offsets and mask are inputs to :meth:`forward` (in LFAM they are predicted by a
    separate, zero-initialised conv from the skip and decoder features). See :func:`deform_conv` for
    the formula, the offset/mask layout and the sampling rules.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as for
            ``nn.Conv2d`` / ``nn.Conv3d`` (zero padding only).
        offset_groups: number of channel groups with their own offsets (and mask); must divide
            ``in_channels``.
        ndim: 2 or 3.
        sampler: see :func:`deform_conv` (``'auto'``: gather on CPU, grid_sample elsewhere).

    Weight and bias are initialised as ``nn.ConvNd`` does (``kaiming_uniform_(a=sqrt(5))``, bias
    uniform in ``+-1/sqrt(fan_in)``), consuming the random generator in the same order.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                 padding: IntOrTuple = 0, dilation: IntOrTuple = 1, groups: int = 1, offset_groups: int = 1,
                 bias: bool = True, ndim: int = 2, device=None, dtype=None, sampler: str = 'auto'):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")
        for name, v in (('in_channels', in_channels), ('out_channels', out_channels), ('groups', groups),
                        ('offset_groups', offset_groups)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must both be "
                             f"divisible by groups ({groups})")
        if in_channels % offset_groups:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by offset_groups ({offset_groups})")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        self.ndim = ndim
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _tuple(kernel_size, ndim, 'kernel_size', 1)
        self.stride = _tuple(stride, ndim, 'stride', 1)
        self.padding = _tuple(padding, ndim, 'padding', 0)
        self.dilation = _tuple(dilation, ndim, 'dilation', 1)
        self.groups = groups
        self.offset_groups = offset_groups
        self.sampler = sampler
        factory = {'device': device, 'dtype': dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Same initialisation as ``nn.ConvNd.reset_parameters``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * math.prod(self.kernel_size)
            if fan_in:
                bound = 1 / math.sqrt(fan_in)
                nn.init.uniform_(self.bias, -bound, bound)

    def weight_and_bias(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The kernel and bias this layer convolves with (:class:`SharedKernelSlice` has the same method)."""
        return self.weight, self.bias

    def output_size(self, input_size: Sequence[int]) -> Tuple[int, ...]:
        """Spatial output size (also that of offset and mask) for an input of spatial size ``input_size``."""
        return deform_conv_output_size(input_size, self.kernel_size, self.stride, self.padding, self.dilation)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x``: (B, in_channels, *spatial); ``offset``: (B, offset_channels, *out); ``mask``: None or
        (B, mask_channels, *out), ``out = self.output_size(spatial)``."""
        if x.ndim != self.ndim + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} ({self.ndim}D, {self.in_channels} input channels) expects input "
                             f"of shape (B, {self.in_channels}, {', '.join('DHW'[3 - self.ndim:])}), "
                             f"got {tuple(x.shape)}")
        if offset.ndim != self.ndim + 2 or offset.shape[1] != self.offset_channels:
            raise ValueError(f"offset must have {self.offset_channels} channels ({self.ndim} * offset_groups "
                             f"{self.offset_groups} * kernel {self.kernel_numel}) and shape (B, C, *out), "
                             f"got {tuple(offset.shape)}")
        if mask is not None and (mask.ndim != self.ndim + 2 or mask.shape[1] != self.mask_channels):
            raise ValueError(f"mask must have {self.mask_channels} channels (offset_groups {self.offset_groups} * "
                             f"kernel {self.kernel_numel}) and shape (B, C, *out), got {tuple(mask.shape)}")
        return deform_conv(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask,
                           sampler=self.sampler)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, dilation={self.dilation}, ndim={self.ndim}")
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.offset_groups != 1:
            s += f", offset_groups={self.offset_groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.sampler != 'auto':
            s += f", sampler={self.sampler!r}"
        return s
