"""Deformable convolution (DCNv1 and modulated DCNv2) in 2D and 3D, in pure PyTorch on ``grid_sample``.

This is the operator behind LFAM, the lateral feature alignment module of "Towards Accurate Medical
Image Segmentation With Gradient-Optimized Dice Loss" (``shared/papers/godc_lfam_gradient_optimized_dice.md``,
Fig. 2): a deformable convolution on each skip connection resamples the skip feature at learned
offsets before it is fused with the up-sampled decoder feature. The paper uses the deformable
convolution of Dai et al., "Deformable Convolutional Networks", ICCV 2017 (its ref. [24], DCNv1);
the optional modulation mask is that of Zhu et al., "Deformable ConvNets v2: More Deformable, Better
Results", CVPR 2019 (DCNv2).

For output position ``p0`` and kernel position ``p_k`` (k = 0..K-1, row-major over the kernel),

    y(p0) = bias + sum_k w_k * m_k(p0) * x(p0 * stride - padding + p_k * dilation + dp_k(p0)),

with ``dp_k`` the learned offset and ``m_k`` the modulation (1 for DCNv1). ``x`` at a fractional
position is interpolated bilinearly (2D) or trilinearly (3D) from the neighbouring pixels, with the
sampling rules of ``torchvision.ops.deform_conv2d``: pixels outside the input count as zero (a
neighbour outside contributes zero, so a point between -1 and 0 is weighted down towards the
border and a point at -1 or beyond, or at ``size`` or beyond, is zero); an integer position samples
exactly that pixel. With zero offsets and unit mask the result equals ``F.conv2d`` / ``F.conv3d``.

Unlike torchvision's op (2D only, no 3D), this runs on every device PyTorch runs on, in 2D and 3D,
and is differentiable with respect to input, offsets, mask, weight and bias by autograd.
Implementation: one ``grid_sample`` call gathers the im2col tensor ``(B, C, K, *out)`` for every
kernel position and offset group (offset groups folded into the batch dimension, kernel positions
into the first spatial dimension of the sampling grid), the mask multiplies it, and one batched
matmul contracts it with the (grouped) weight. Memory is that of the im2col tensor, ``K`` times the
input resampled to the output size.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

IntOrTuple = Union[int, Sequence[int]]

__all__ = ['deform_conv', 'DeformableConv', 'deform_conv_output_size']


def _tuple(value: IntOrTuple, ndim: int, name: str, minimum: int) -> Tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        values = (value,) * ndim
    else:
        try:
            values = tuple(value)
        except TypeError:
            raise ValueError(f"{name} must be an int or a tuple of {ndim} ints, got {value!r}") from None
        if len(values) != ndim:
            raise ValueError(f"{name} must be an int or a tuple of {ndim} ints for a {ndim}D convolution, "
                             f"got {value!r}")
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ValueError(f"{name} must hold ints >= {minimum}, got {value!r}")
    return values


def deform_conv_output_size(input_size: Sequence[int], kernel_size: Sequence[int], stride: IntOrTuple = 1,
                            padding: IntOrTuple = 0, dilation: IntOrTuple = 1) -> Tuple[int, ...]:
    """Spatial output size of a (deformable) convolution, as for ``nn.ConvNd``:
    ``(size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1`` per axis. It is also the
    spatial size that offsets and mask must have."""
    n = len(kernel_size)
    if len(input_size) != n:
        raise ValueError(f"input_size {tuple(input_size)} and kernel_size {tuple(kernel_size)} differ in length")
    stride = _tuple(stride, n, 'stride', 1)
    padding = _tuple(padding, n, 'padding', 0)
    dilation = _tuple(dilation, n, 'dilation', 1)
    return tuple((s + 2 * p - d * (k - 1) - 1) // st + 1
                 for s, k, st, p, d in zip(input_size, kernel_size, stride, padding, dilation))


def deform_conv(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                stride: IntOrTuple = 1, padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Deformable convolution, 2D or 3D (``n = weight.ndim - 2``), DCNv1 (``mask=None``) or modulated
    DCNv2 (``mask`` given). Drop-in for ``torchvision.ops.deform_conv2d`` in 2D (same arguments,
    offset layout and sampling rules), extended to 3D.

    Args:
        input: ``(B, C, H, W)`` or ``(B, C, D, H, W)``.
        offset: ``(B, n * G * K, *out)`` with ``K = prod(kernel_size)``, ``G`` the number of offset
            groups (inferred from the channel count; input channel ``c`` uses offset group
            ``c // (C / G)``) and ``out`` the conv output size (:func:`deform_conv_output_size`).
            Channel ``n * (g * K + k) + i`` is the offset along axis ``i`` of kernel position ``k``
            (row-major over the kernel: ``k = ky * kw + kx`` in 2D, ``(kz * kh + ky) * kw + kx`` in 3D)
            of offset group ``g``; the axes in order: 2D ``(dy, dx)`` = (row, column) exactly as
            torchvision, 3D ``(dz, dy, dx)``. Offsets are in pixels of the input.
        weight: ``(O, C / groups, *kernel_size)``; ``groups = C // weight.shape[1]`` as in torchvision.
        bias: ``(O,)`` or ``None``.
        stride, padding, dilation: int or tuple of ``n`` ints, as for ``nn.ConvNd``. Padding is zero
            padding, i.e. sampling positions are shifted by ``-padding`` and outside is zero.
        mask: ``(B, G * K, *out)`` modulation scalars, channel ``g * K + k``; ``None`` means 1.

    Returns:
        ``(B, O, *out)``.

    Sampling rules (torchvision's): the input is read at ``p0 * stride - padding + p_k * dilation +
    offset``, bilinearly (2D) or trilinearly (3D) interpolated; every neighbouring pixel outside the
    input counts as zero, so a point at ``-1`` or ``size`` (or beyond) along an axis reads zero. The
    value is not differentiable with respect to the offset where a coordinate is an integer (kink of
    the interpolation); autograd then returns one of the one-sided derivatives, like torchvision.
    Sampling positions are formed in at least float32 and sampling runs in at least float32 (half and
    bfloat16 inputs are up-cast for ``grid_sample``, the result has the input's dtype); offsets and mask
    may have another floating dtype than the input.
    """
    n = weight.ndim - 2
    if n not in (2, 3):
        raise ValueError(f"weight must have shape (out_channels, in_channels / groups, *kernel) with a 2D or 3D "
                         f"kernel, got shape {tuple(weight.shape)}")
    if input.ndim != n + 2:
        raise ValueError(f"a {n}D deformable convolution (weight shape {tuple(weight.shape)}) expects input of shape "
                         f"(B, C, {', '.join('DHW'[3 - n:])}), got {tuple(input.shape)}")
    kernel = tuple(weight.shape[2:])
    K = math.prod(kernel)
    B, C = input.shape[:2]
    spatial = tuple(input.shape[2:])
    out_channels, cin_per_group = weight.shape[:2]
    if K == 0 or cin_per_group == 0 or C % cin_per_group != 0:
        raise ValueError(f"input has {C} channels, which is not a multiple of weight.shape[1] = {cin_per_group} "
                         f"(in_channels / groups); weight shape {tuple(weight.shape)}")
    groups = C // cin_per_group
    if out_channels % groups != 0:
        raise ValueError(f"out_channels = {out_channels} must be divisible by groups = {groups} "
                         f"(= in_channels {C} / weight.shape[1] {cin_per_group})")
    stride = _tuple(stride, n, 'stride', 1)
    padding = _tuple(padding, n, 'padding', 0)
    dilation = _tuple(dilation, n, 'dilation', 1)
    out = deform_conv_output_size(spatial, kernel, stride, padding, dilation)
    if any(o < 1 for o in out):
        raise ValueError(f"input of spatial size {spatial} is too small for kernel {kernel} with stride {stride}, "
                         f"padding {padding}, dilation {dilation}: output size would be {out}")

    if offset.ndim != n + 2 or offset.shape[0] != B or tuple(offset.shape[2:]) != out:
        raise ValueError(f"offset must have shape (B, {n} * offset_groups * {K}, *out) = ({B}, {n * K}*G, "
                         f"{', '.join(map(str, out))}) (out = conv output size), got {tuple(offset.shape)}")
    if offset.shape[1] == 0 or offset.shape[1] % (n * K) != 0:
        raise ValueError(f"offset has {offset.shape[1]} channels; expected a positive multiple of "
                         f"{n} * {K} = {n * K} ({n} coordinates per kernel position per offset group)")
    G = offset.shape[1] // (n * K)
    if C % G != 0:
        raise ValueError(f"input channels {C} are not divisible by the {G} offset groups implied by "
                         f"{offset.shape[1]} offset channels ({n} * {G} * {K})")
    if not offset.is_floating_point():
        raise ValueError(f"offset must be a floating-point tensor, got {offset.dtype}")
    if mask is not None:
        if mask.ndim != n + 2 or tuple(mask.shape) != (B, G * K, *out):
            raise ValueError(f"mask must have shape (B, offset_groups * {K}, *out) = {(B, G * K, *out)} "
                             f"(offset groups = {G} from the offset's channels), got {tuple(mask.shape)}")
        if not mask.is_floating_point():
            raise ValueError(f"mask must be a floating-point tensor, got {mask.dtype}")
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(f"bias must have shape ({out_channels},), got {tuple(bias.shape)}")

    # --- sampling grid: (B*G, K*out[0], out[1:], n), coordinates normalised for align_corners=False
    acc = torch.promote_types(offset.dtype, torch.float32)
    dev = offset.device
    axes = []
    for i in range(n):  # base position p0 * stride - padding + p_k * dilation along axis i: (K, *out)
        kpos = torch.arange(kernel[i], device=dev, dtype=acc) * dilation[i]
        opos = torch.arange(out[i], device=dev, dtype=acc) * stride[i] - padding[i]
        kshape = [1] * n
        kshape[i] = kernel[i]
        oshape = [1] * n
        oshape[i] = out[i]
        axes.append((kpos.view(*kshape, *([1] * n)) + opos.view(*([1] * n), *oshape)).expand(*kernel, *out)
                    .reshape(K, *out))
    base = torch.stack(axes, dim=1)  # (K, n, *out)
    sizes = torch.tensor(spatial, device=dev, dtype=acc).view(n, *([1] * n))
    pos = base + offset.view(B, G, K, n, *out).to(acc)
    # pixel coordinate p -> normalised (2p + 1) / size - 1 (align_corners=False): exact pixel centres,
    # valid for size-1 axes too. grid_sample wants the axes reversed: (x, y) / (x, y, z).
    grid = ((2 * pos + 1) / sizes - 1).flip(3).movedim(3, -1)  # (B, G, K, *out, n)
    # half / bfloat16 input is sampled in float32: grid coordinates in half precision would be off by
    # up to ~size/1000 pixels (autocast does the same, grid_sample is on its float32 list)
    sample_dtype = torch.promote_types(input.dtype, torch.float32)
    grid = grid.reshape(B * G, K * out[0], *out[1:], n).to(sample_dtype)

    # --- im2col by one grid_sample: (B*G, C/G, K*out[0], *out[1:]) is (B, C, K, L) in memory
    cols = F.grid_sample(input.reshape(B * G, C // G, *spatial).to(sample_dtype), grid, mode='bilinear',
                         padding_mode='zeros', align_corners=False)
    L = math.prod(out)
    if mask is not None:
        cols = cols.view(B, G, C // G, K, L) * mask.view(B, G, 1, K, L).to(sample_dtype)
    # --- grouped weighted sum: (groups, O/groups, C/groups*K) @ (B, groups, C/groups*K, L)
    cols = cols.reshape(B, groups, cin_per_group * K, L).to(input.dtype)
    w = weight.reshape(groups, out_channels // groups, cin_per_group * K)
    y = torch.matmul(w, cols).view(B, out_channels, *out)
    if bias is not None:
        y = y + bias.view(1, out_channels, *([1] * n))
    return y


class DeformableConv(nn.Module):
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

    Weight and bias are initialised as ``nn.ConvNd`` does (``kaiming_uniform_(a=sqrt(5))``, bias
    uniform in ``+-1/sqrt(fan_in)``), consuming the random generator in the same order.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                 padding: IntOrTuple = 0, dilation: IntOrTuple = 1, groups: int = 1, offset_groups: int = 1,
                 bias: bool = True, ndim: int = 2, device=None, dtype=None):
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
        self.ndim = ndim
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _tuple(kernel_size, ndim, 'kernel_size', 1)
        self.stride = _tuple(stride, ndim, 'stride', 1)
        self.padding = _tuple(padding, ndim, 'padding', 0)
        self.dilation = _tuple(dilation, ndim, 'dilation', 1)
        self.groups = groups
        self.offset_groups = offset_groups
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

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def offset_channels(self) -> int:
        """Channels the offset tensor must have: ``ndim * offset_groups * prod(kernel_size)``."""
        return self.ndim * self.offset_groups * self.kernel_numel

    @property
    def mask_channels(self) -> int:
        """Channels the modulation mask must have: ``offset_groups * prod(kernel_size)``."""
        return self.offset_groups * self.kernel_numel

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
        return deform_conv(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, dilation={self.dilation}, ndim={self.ndim}")
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.offset_groups != 1:
            s += f", offset_groups={self.offset_groups}"
        if self.bias is None:
            s += ", bias=False"
        return s
