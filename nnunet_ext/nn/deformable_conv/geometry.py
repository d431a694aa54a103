"""Geometry and argument checks of a deformable convolution call (Python ints only: constant under
``torch.compile``): the spatial output size, the sampler choice and :class:`_Geometry`, the static
description every layer of the package works from (:mod:`.sampling`, :mod:`.operator`, :mod:`.module`).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

IntOrTuple = Union[int, Sequence[int]]

SAMPLERS = ('auto', 'gather', 'grid_sample')


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
    return tuple([(s + 2 * p - d * (k - 1) - 1) // st + 1
                  for s, k, st, p, d in zip(input_size, kernel_size, stride, padding, dilation)])


def resolve_sampler(sampler: str, device: torch.device) -> str:
    """``'auto'`` -> ``'gather'`` on CPU, ``'grid_sample'`` elsewhere; other values are checked."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if sampler == 'auto':
        return 'gather' if device.type == 'cpu' else 'grid_sample'
    return sampler


class OffsetChannels:
    """The channel counts a deformable convolution layer's offsets and mask must have, from its ``ndim``,
    ``offset_groups`` and ``kernel_size`` (``DeformableConv`` and LFAM's ``SharedKernelSlice``)."""

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


class _Geometry(NamedTuple):
    """Static description of one deformable convolution call (Python ints only: constant under compile)."""
    n: int
    kernel: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: Tuple[int, ...]
    dilation: Tuple[int, ...]
    spatial: Tuple[int, ...]
    out: Tuple[int, ...]
    batch: int
    channels: int
    out_channels: int
    groups: int
    offset_groups: int
    sampler: str

    @property
    def K(self) -> int:
        return math.prod(self.kernel)

    @property
    def L(self) -> int:
        return math.prod(self.out)

    @property
    def N(self) -> int:
        return math.prod(self.spatial)


def _geometry(input: torch.Tensor, offset_shape: Sequence[int], weight: torch.Tensor, bias: Optional[torch.Tensor],
              stride: IntOrTuple, padding: IntOrTuple, dilation: IntOrTuple, mask_shape: Optional[Sequence[int]],
              sampler: str) -> _Geometry:
    """Checks the arguments of :func:`deform_conv` (shapes only) and returns the call's geometry."""
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
    if any([o < 1 for o in out]):
        raise ValueError(f"input of spatial size {spatial} is too small for kernel {kernel} with stride {stride}, "
                         f"padding {padding}, dilation {dilation}: output size would be {out}")
    offset_shape = tuple(offset_shape)
    if len(offset_shape) != n + 2 or offset_shape[0] != B or offset_shape[2:] != out:
        raise ValueError(f"offset must have shape (B, {n} * offset_groups * {K}, *out) = ({B}, {n * K}*G, "
                         f"{', '.join(map(str, out))}) (out = conv output size), got {offset_shape}")
    if offset_shape[1] == 0 or offset_shape[1] % (n * K) != 0:
        raise ValueError(f"offset has {offset_shape[1]} channels; expected a positive multiple of "
                         f"{n} * {K} = {n * K} ({n} coordinates per kernel position per offset group)")
    G = offset_shape[1] // (n * K)
    if C % G != 0:
        raise ValueError(f"input channels {C} are not divisible by the {G} offset groups implied by "
                         f"{offset_shape[1]} offset channels ({n} * {G} * {K})")
    if mask_shape is not None and (len(mask_shape) != n + 2 or tuple(mask_shape) != (B, G * K, *out)):
        raise ValueError(f"mask must have shape (B, offset_groups * {K}, *out) = {(B, G * K, *out)} "
                         f"(offset groups = {G} from the offset's channels), got {tuple(mask_shape)}")
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(f"bias must have shape ({out_channels},), got {tuple(bias.shape)}")
    return _Geometry(n, kernel, stride, padding, dilation, spatial, out, B, C, out_channels, groups, G,
                     resolve_sampler(sampler, input.device))

