"""The sampling kernels of the deformable convolution: bilinear (2D) / trilinear (3D) sampling and the
kernel-position-chunked forward and backward arithmetic (plain tensor code without autograd, run by the
custom operators of :mod:`.operator`).

For output position ``p0`` and kernel position ``p_k`` (k = 0..K-1, row-major over the kernel),

    y(p0) = bias + sum_k w_k * m_k(p0) * x(p0 * stride - padding + p_k * dilation + dp_k(p0)),

with ``dp_k`` the learned offset and ``m_k`` the modulation (1 for DCNv1). ``x`` at a fractional
position is interpolated bilinearly (2D) or trilinearly (3D) from the neighbouring pixels (Dai et al.
Eq. 3-4), with the sampling rules of ``torchvision.ops.deform_conv2d``: pixels outside the input count
as zero (a neighbour outside contributes zero, so a point between -1 and 0 is weighted down towards
the border and a point at -1 or beyond, or at ``size`` or beyond, is zero); an integer position
samples exactly that pixel. With zero offsets and unit mask the result equals ``F.conv2d`` / ``F.conv3d``.

Implementation (why it looks the way it does)
---------------------------------------------
The textbook implementation gathers the im2col tensor ``(B, C, K, L)`` (``L`` output positions) and
contracts it with the weight; autograd then keeps that tensor and the sampling grid for backward:
about 58x the input in 3D with a 3x3x3 kernel (B=2, C=32, modulated). Here forward and backward are
two custom operators (``torch.library.custom_op``: ``nnunet_ext::deform_conv`` and its backward, wired
with ``register_autograd``) that work **one kernel position at a time** (a few at a time on small maps,
where one position's samples have fewer than ``STEP_ELEMENTS`` elements and per-operation overhead would
dominate; never more than ``K // 3``, see :func:`positions_per_step`):

* forward: ``y += W_k @ (m_k * sample(x, p0 * stride - padding + p_k * dilation + dp_k))`` for
  k = 0..K-1 (Dai et al. Eq. 2, Zhu et al. Eq. 3), never holding more than one step's samples
  (``(B, C, L)`` for one position);
* backward: per position, recompute the samples from ``x`` and the offsets and accumulate the gradients
  of input, offsets, mask and weight (bias: a sum of the output gradient).

What is saved is what the operator was given (``x``, offsets, mask, weight): nothing else, and never
a ``(B, C, K, L)`` tensor, in forward or backward. Recomputing the samples costs one more sampling
pass per position in backward, about what autograd's own backward of the gather would cost anyway.
:class:`~nnunet_ext.nn.lateral_alignment.LateralFeatureAlignment` goes one step further (its own
operator recomputes the offset/mask predictor too) and keeps only the skip and the up-sampled feature.

Two samplers, the same arithmetic:

* ``'gather'`` (default on CPU): the input is copied once to zero-padded channels-last rows
  (``(B*G*N', C/G)``, one zero pixel on each side of each axis, so a corner outside the input reads a
  zero row and needs no validity test), and the ``2^n`` interpolation corners of every sampling point
  are summed with their weights by one ``F.embedding_bag(mode='sum', per_sample_weights=...)``, a
  vectorised gather-and-weighted-sum (the 3D CPU ``grid_sample`` kernel is scalar and several times
  slower). Backward: the offset gradient is ``<dL/dsample, d sample / d p_i>`` with ``d sample / d p_i``
  another bag of the same corners (weights ``d w_c / d p_i``); the input gradient is the transposed bag:
  the (row, corner) pairs sorted by target row and summed by one ``embedding_bag`` over the sorted list
  (CPU ``index_add_`` adds row by row and is several times slower).
* ``'grid_sample'`` (default on other devices): ``F.grid_sample`` per kernel position and
  ``aten.grid_sampler_{2,3}d_backward`` for the gradients of input and positions.
"""
from __future__ import annotations

import itertools
import math
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from nnunet_ext.nn.deformable_conv.geometry import _Geometry


# ------------------------------------------------------------------------------------------------
# the kernel-position-chunked core (plain tensor code without autograd, run by the custom operators)
# ------------------------------------------------------------------------------------------------
def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """At least float32 (positions, sampling and the contraction)."""
    dtype = torch.float32
    for d in dtypes:
        dtype = torch.promote_types(dtype, d)
    return dtype


def _kernel_positions(geo: _Geometry) -> List[Tuple[int, ...]]:
    """Kernel index tuples in row-major order: k = (kz * kh + ky) * kw + kx."""
    return list(itertools.product(*[range(k) for k in geo.kernel]))


def _base_positions(geo: _Geometry, dtype: torch.dtype, device: torch.device) -> List[torch.Tensor]:
    """Per axis, ``p0 * stride - padding`` for every output position, flattened to ``(L,)``. Built with
    ``arange`` on the device (no host-to-device copy)."""
    n = geo.n
    bases = []
    for i in range(n):
        shape = [1] * n
        shape[i] = geo.out[i]
        axis = torch.arange(geo.out[i], device=device, dtype=dtype) * float(geo.stride[i]) - float(geo.padding[i])
        bases.append(axis.view(shape).expand(geo.out).reshape(geo.L))
    return bases


def _positions(offset_v: torch.Tensor, bases: List[torch.Tensor], geo: _Geometry, k: int, kk: Tuple[int, ...],
               dtype: torch.dtype) -> List[torch.Tensor]:
    """Sampling coordinates (pixels of the input) of kernel position ``k``: per axis ``(B, G, L)``."""
    return [offset_v[:, :, k, i].to(dtype) + (bases[i] + float(kk[i] * geo.dilation[i])) for i in range(geo.n)]


# Kernel positions handled together by the 'gather' sampler where one position's samples are small
# (deep levels, small 2D maps): fewer, larger tensor operations. Read at call time (tests change it;
# setting ``nnunet_ext.nn.deformable_conv.STEP_ELEMENTS`` sets this one).
STEP_ELEMENTS = 2 ** 20


def positions_per_step(geo: _Geometry) -> int:
    """How many kernel positions the 'gather' sampler processes together: one, unless one position's
    samples ``B * L * C`` have fewer than :data:`STEP_ELEMENTS` elements; then as many as keep a step's
    samples below it, at most ``K // 3`` (never the whole im2col tensor). One with grouped convolutions
    and for the 'grid_sample' sampler."""
    return steps_for(geo.batch * geo.L, geo.channels, geo.K, geo.groups, geo.sampler)


def steps_for(rows: int, channels: int, kernel_positions: int, groups: int = 1, sampler: str = 'gather') -> int:
    """:func:`positions_per_step` from sizes: ``rows = B * L`` output positions of ``channels`` channels."""
    if sampler != 'gather' or groups != 1:
        return 1
    return max(1, min(kernel_positions // 3, STEP_ELEMENTS // (rows * channels)))


def _step_positions(offset_v: torch.Tensor, bases: List[torch.Tensor], geo: _Geometry, k0: int, k1: int,
                    dtype: torch.dtype) -> List[torch.Tensor]:
    """Sampling coordinates of kernel positions ``k0 .. k1 - 1``: per axis ``(B, G, k1 - k0, L)``. The
    kernel index of each position comes from ``arange`` on the device (no host-to-device copy)."""
    if k1 - k0 == 1:
        kk = _kernel_positions(geo)[k0]
        return [p.unsqueeze(2) for p in _positions(offset_v, bases, geo, k0, kk, dtype)]
    ks = torch.arange(k0, k1, device=offset_v.device)
    out = []
    for i in range(geo.n):
        index = torch.div(ks, math.prod(geo.kernel[i + 1:]), rounding_mode='floor') % geo.kernel[i]
        shift = (index * geo.dilation[i]).to(dtype).view(k1 - k0, 1)
        out.append(offset_v[:, :, k0:k1, i].to(dtype) + (bases[i].view(1, geo.L) + shift))
    return out


def _step_to_rows(t: torch.Tensor, geo: _Geometry, c: int) -> torch.Tensor:
    """Samples of ``c`` positions, ``(B*G*c*L, Cg)`` in (b, g, position, l) order -> ``(B*L, c*C)``: each
    output row's samples, position-major then channel (the order of the split kernel's rows)."""
    B, G, L = geo.batch, geo.offset_groups, geo.L
    if G == 1 and c == 1:
        return t.view(B * L, geo.channels)
    return t.view(B, G, c, L, -1).permute(0, 3, 2, 1, 4).reshape(B * L, c * geo.channels)


def _step_from_rows(t: torch.Tensor, geo: _Geometry, c: int) -> torch.Tensor:
    """Inverse of :func:`_step_to_rows`."""
    B, G, L = geo.batch, geo.offset_groups, geo.L
    if G == 1 and c == 1:
        return t.view(B * L, geo.channels)
    return t.view(B, L, c, G, -1).permute(0, 3, 2, 1, 4).reshape(B * G * c * L, geo.channels // G)


def _step_rows(table: '_Table', geo: _Geometry, c: int) -> torch.Tensor:
    """Table row of the first pixel of each sample's (b, g) block for ``c`` positions."""
    if c == 1:
        return table.row_base
    BG = geo.batch * geo.offset_groups
    return table.row_base.view(BG, 1, geo.L).expand(BG, c, geo.L).reshape(BG * c * geo.L)


def _step_mask(mask_v: Optional[torch.Tensor], k0: int, k1: int, logits: bool,
               dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Modulation of positions ``k0 .. k1 - 1`` as a column ``(B*G*c*L, 1)``; sigmoid of logits."""
    if mask_v is None:
        return None
    m = mask_v[:, :, k0:k1].to(dtype)
    m = torch.sigmoid(m) if logits else m
    return m.reshape(-1, 1)


def _fold_corners(per_axis, combine):
    """Combines per-axis pairs ``(lo, hi)`` over the ``2^n`` corners, axis 0 most significant
    (corner ``c`` has bit ``n - 1 - i`` for axis ``i``)."""
    out = list(per_axis[-1])
    for pair in reversed(per_axis[:-1]):
        out = [combine(a, b) for a in pair for b in out]
    return out


class _Table(NamedTuple):
    """The input as zero-padded channels-last rows: ``rows`` ``(B*G*N', C/G)`` with ``N' = prod(size + 2)``
    (one zero pixel on each side of each axis), the row of the first pixel of each output row's
    ``(b, g)`` block (``row_base``, ``(B*G*L,)``), the row strides of the padded axes and the row offsets
    of the ``2^n`` corners of a cell."""
    rows: torch.Tensor
    row_base: torch.Tensor
    strides: Tuple[int, ...]
    corner_offsets: Tuple[int, ...]


def _index_dtype(geo: _Geometry) -> torch.dtype:
    padded = geo.batch * geo.offset_groups * math.prod([s + 2 for s in geo.spatial])
    return torch.int32 if padded < 2 ** 31 - 1 else torch.int64


def _gather_table(x: torch.Tensor, geo: _Geometry, dtype: torch.dtype) -> _Table:
    B, G, n = geo.batch, geo.offset_groups, geo.n
    padded = tuple([s + 2 for s in geo.spatial])
    rows = x.new_zeros((B * G, *padded, geo.channels // G), dtype=dtype)
    rows[(slice(None),) + (slice(1, -1),) * n] = x.reshape(B * G, geo.channels // G, *geo.spatial).movedim(1, -1)
    strides = tuple([math.prod(padded[i + 1:]) for i in range(n)])
    itype = _index_dtype(geo)
    row_base = (torch.arange(B * G, device=x.device, dtype=itype) * math.prod(padded)).view(B * G, 1) \
        .expand(B * G, geo.L).reshape(B * G * geo.L)
    corner_offsets = tuple([sum([b * s for b, s in zip(bits, strides)])
                            for bits in itertools.product((0, 1), repeat=n)])
    return _Table(rows.reshape(B * G * math.prod(padded), -1), row_base, strides, corner_offsets)


def _padded_to_input(rows: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """Gradient rows of the padded table -> ``(B, C, *spatial)`` (the padding's rows are dropped)."""
    B, G, n = geo.batch, geo.offset_groups, geo.n
    padded = tuple([s + 2 for s in geo.spatial])
    inner = rows.view(B * G, *padded, -1)[(slice(None),) + (slice(1, -1),) * n]
    return inner.movedim(-1, 1).reshape(B, geo.channels, *geo.spatial)


class _Corners(NamedTuple):
    index: torch.Tensor  # (R, 2^n) rows of the padded table
    weight: torch.Tensor  # (R, 2^n) interpolation weights
    axis_weights: List[Tuple[torch.Tensor, torch.Tensor]]  # per axis: (1 - frac, frac)
    inside: Optional[List[torch.Tensor]]  # per axis: 1 where the position is in (-1, size), else 0


def _corners(pos: List[torch.Tensor], geo: _Geometry, table: _Table, derivatives: bool,
             row_base: torch.Tensor) -> _Corners:
    """The ``2^n`` neighbours of each sampling point in the zero-padded table and their bilinear /
    trilinear weights (Dai et al. Eq. 4: ``G(q, p) = prod_i max(0, 1 - |q_i - p_i|)``).

    A position is clamped to ``[-1, size]`` per axis; its cell's low corner to ``[-1, size - 1]``. Corners
    at ``-1`` or ``size`` are rows of the zero padding, so a point at ``-1`` or ``size`` (or beyond) reads
    zero and a point in ``(-1, 0)`` or ``(size - 1, size)`` is weighted down towards the border, as
    torchvision. The derivative with respect to the position is zero outside ``(-1, size)`` (the value
    is constant zero there); NaN positions propagate NaN."""
    n = geo.n
    R = row_base.shape[0]
    itype = row_base.dtype
    weights, inside = [], []
    base = row_base
    for i in range(n):
        size = float(geo.spatial[i])
        p = pos[i].reshape(R)
        clamped = p.clamp(-1.0, size)
        low = torch.floor(clamped).clamp_(max=size - 1.0)
        frac = clamped - low
        weights.append((1.0 - frac, frac))
        base = base + (low.to(itype) + 1) * table.strides[i]
        if derivatives:
            inside.append(((p > -1.0) & (p < size)).to(p.dtype))
    index = torch.stack([base + c for c in table.corner_offsets], 1)
    weight = torch.stack(_fold_corners(weights, torch.mul), 1)
    return _Corners(index, weight, weights, inside if derivatives else None)


def _dweight(corners: _Corners, i: int, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """``d weight_c / d p_i`` for every corner ``c`` (``(R, 2^n)``), times ``scale`` ``(R, 1)`` if given:
    ``+-prod_{j != i} weight_j``, zero outside ``(-1, size)``."""
    n = len(corners.axis_weights)
    factor = corners.inside[i] if scale is None else corners.inside[i] * scale.reshape(-1)
    others = [corners.axis_weights[j] for j in range(n) if j != i]
    rest = [w * factor for w in _fold_corners(others, torch.mul)] if others else [factor]
    rest_neg = [-w for w in rest]
    per_corner = []
    for bits in itertools.product((0, 1), repeat=n):
        j = 0
        for a in range(n):
            if a != i:
                j = 2 * j + bits[a]
        per_corner.append(rest[j] if bits[i] else rest_neg[j])
    return torch.stack(per_corner, 1)


def _scatter_rows(values: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The transpose of :func:`_bag`: ``out[q] = sum_{r, c: index[r, c] = q} weight[r, c] * values[r]``,
    ``(num_rows, Cg)``. The (row, corner) pairs are sorted by target row and summed by one
    ``embedding_bag`` over the sorted list (a vectorised, deterministic segment sum; ``index_add_`` /
    ``scatter_add_`` on CPU add row by row and are several times slower)."""
    corners = index.shape[1]  # a power of two
    flat = index.reshape(-1)
    order = torch.sort(flat, stable=True)[1]
    counts = torch.zeros(num_rows, device=index.device, dtype=index.dtype).scatter_add_(
        0, flat.long(), torch.ones_like(flat))
    starts = torch.cumsum(counts, 0, dtype=index.dtype) - counts  # first entry of each target row
    sources = torch.bitwise_right_shift(order, corners.bit_length() - 1).to(index.dtype)
    return F.embedding_bag(sources, values, starts, per_sample_weights=torch.take(weight, order).to(values.dtype),
                           mode='sum')


def _bag(table: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum_c weight[:, c] * table[index[:, c]]`` -> ``(R, Cg)``: one fused gather and weighted sum."""
    return F.embedding_bag(index, table, per_sample_weights=weight.to(table.dtype), mode='sum')


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.einsum('rc,rc->r', a, b)


def _grouped_mm(a: torch.Tensor, w: torch.Tensor, groups: int) -> torch.Tensor:
    """``a (R, groups * I) @ w (groups, I, J)`` per group -> ``(R, groups * J)``."""
    if groups == 1:
        return a @ w[0]
    R = a.shape[0]
    return torch.bmm(a.view(R, groups, -1).transpose(0, 1), w).transpose(0, 1).reshape(R, -1)


def _grouped_weight_grad(gy: torch.Tensor, s: torch.Tensor, groups: int) -> torch.Tensor:
    """``sum_r s[r] (x) gy[r]`` per group: ``(groups, Cin/groups, Cout/groups)``."""
    R = gy.shape[0]
    if groups == 1:
        return (s.t() @ gy).unsqueeze(0)
    return torch.bmm(s.view(R, groups, -1).permute(1, 2, 0), gy.view(R, groups, -1).transpose(0, 1))


def _split_weight(weight: torch.Tensor, geo: _Geometry, dtype: torch.dtype) -> torch.Tensor:
    """``(O, C/groups, *kernel)`` -> ``(K, groups, C/groups, O/groups)``: per kernel position the matrix
    that maps channels-last samples to channels-last outputs."""
    O, Cg = weight.shape[:2]
    return (weight.to(dtype).reshape(geo.groups, O // geo.groups, Cg, geo.K).permute(3, 0, 2, 1).contiguous())


def _unsplit_weight_grad(gw: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """Inverse of :func:`_split_weight` for the accumulated gradient ``(K, groups, C/groups, O/groups)``."""
    K, groups, Cg, Og = gw.shape
    return gw.permute(1, 3, 2, 0).reshape(groups * Og, Cg, *geo.kernel)


def _grid_table(x: torch.Tensor, geo: _Geometry, dtype: torch.dtype) -> torch.Tensor:
    """The input as ``grid_sample`` wants it: ``(B*G, C/G, *spatial)``."""
    return x.to(dtype).reshape(geo.batch * geo.offset_groups, geo.channels // geo.offset_groups, *geo.spatial)


def _grid(pos: List[torch.Tensor], geo: _Geometry) -> torch.Tensor:
    """Normalised ``grid_sample`` coordinates (align_corners=False: pixel p -> (2p + 1) / size - 1, exact
    pixel centres, valid for size-1 axes), axes reversed: ``(B*G, *out, n)``."""
    B, G = geo.batch, geo.offset_groups
    coords = [(2.0 * p + 1.0) / float(s) - 1.0 for p, s in zip(pos, geo.spatial)]
    return torch.stack(coords[::-1], dim=-1).reshape(B * G, *geo.out, geo.n)


def _mask_at(mask_v: Optional[torch.Tensor], k: int, logits: bool, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Kernel position ``k``'s modulation ``(B, G, L)``; ``sigmoid`` of it when the mask is given as logits
    (LFAM: no full mask tensor is ever formed)."""
    if mask_v is None:
        return None
    m = mask_v[:, :, k].to(dtype)
    return torch.sigmoid(m) if logits else m


def _forward_step_gather(y, table, offset_v, mask_v, mask_logits, bases, wk, geo, k0, k1, pos_dtype):
    """``y += sum_k W_k @ (m_k * sample_k)`` over kernel positions ``k0 .. k1 - 1`` (channels-last rows)."""
    c = k1 - k0
    corners = _corners([p.reshape(-1) for p in _step_positions(offset_v, bases, geo, k0, k1, pos_dtype)], geo,
                       table, False, _step_rows(table, geo, c))
    m = _step_mask(mask_v, k0, k1, mask_logits, pos_dtype)
    w = corners.weight if m is None else corners.weight * m
    s = _step_to_rows(_bag(table.rows, corners.index, w), geo, c)
    if geo.groups == 1:
        y.addmm_(s, wk[k0:k1, 0].reshape(c * geo.channels, geo.out_channels))
    else:  # c == 1
        y.add_(_grouped_mm(s, wk[k0], geo.groups))


def _forward_position_grid(y, table, offset_v, mask_v, mask_logits, bases, wk, geo, k, kk, pos_dtype):
    """``y += W_k @ (m_k * sample_k)`` for one kernel position (``grid_sample``, channels first)."""
    B, G, L = geo.batch, geo.offset_groups, geo.L
    dtype = table.dtype
    grid = _grid(_positions(offset_v, bases, geo, k, kk, pos_dtype), geo).to(dtype)
    s = F.grid_sample(table, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    m = _mask_at(mask_v, k, mask_logits, dtype)
    if m is not None:
        s = s * m.reshape(B * G, 1, *geo.out)
    s = s.reshape(B, geo.groups, geo.channels // geo.groups, L)
    y.add_(torch.matmul(wk[k].transpose(1, 2), s).reshape(B, geo.out_channels, L))


def deform_forward(x: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor], weight: torch.Tensor,
                   bias: Optional[torch.Tensor], geo: _Geometry, mask_logits: bool = False) -> torch.Tensor:
    """The forward arithmetic of Dai et al. Eq. 2 / Zhu et al. Eq. 3, one kernel position at a time (plain
    tensor code without autograd; the custom operators call it). ``mask_logits``: ``mask`` holds logits,
    the modulation is their sigmoid. Returns ``(B, O, *out)`` in the compute dtype."""
    B, G, K, L, n = geo.batch, geo.offset_groups, geo.K, geo.L, geo.n
    dtype = _compute_dtype(x.dtype, weight.dtype)
    pos_dtype = _compute_dtype(offset.dtype)
    offset_v = offset.reshape(B, G, K, n, L)
    mask_v = None if mask is None else mask.reshape(B, G, K, L)
    bases = _base_positions(geo, pos_dtype, x.device)
    wk = _split_weight(weight, geo, dtype)
    if geo.sampler == 'gather':
        table = _gather_table(x, geo, dtype)
        y = torch.zeros(B * L, geo.out_channels, device=x.device, dtype=dtype)
        step = positions_per_step(geo)
        for k0 in range(0, K, step):
            _forward_step_gather(y, table, offset_v, mask_v, mask_logits, bases, wk, geo, k0, min(K, k0 + step),
                                 pos_dtype)
        del table
        y = y.view(B, L, geo.out_channels).transpose(1, 2).contiguous()
    else:
        table = _grid_table(x, geo, dtype)
        y = torch.zeros(B, geo.out_channels, L, device=x.device, dtype=dtype)
        for k, kk in enumerate(_kernel_positions(geo)):
            _forward_position_grid(y, table, offset_v, mask_v, mask_logits, bases, wk, geo, k, kk, pos_dtype)
    y = y.view(B, geo.out_channels, *geo.out)
    if bias is not None:
        y.add_(bias.to(dtype).view(1, -1, *([1] * n)))
    return y


class DeformGrads(NamedTuple):
    input: Optional[torch.Tensor]
    offset: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]


def _backward_step_gather(gx, gw, goff_v, gmask_v, gy_rows, table, offset_v, mask_v, mask_logits, bases, wk, geo,
                          k0, k1, pos_dtype, needs):
    """Gradients of kernel positions ``k0 .. k1 - 1`` (channels-last rows): the samples are recomputed; the
    offset gradient is ``<dL/ds, m * d sample / d p_i>`` with ``d sample / d p_i`` a bag of the same corners
    with the weights' derivatives; the input gradient is the transposed bag (:func:`_scatter_rows`).
    Returns the updated input-gradient accumulator."""
    need_x, need_off, need_mask, need_w = needs
    B, G, L, n = geo.batch, geo.offset_groups, geo.L, geo.n
    c = k1 - k0
    dtype = table.rows.dtype
    corners = _corners([p.reshape(-1) for p in _step_positions(offset_v, bases, geo, k0, k1, pos_dtype)], geo,
                       table, need_off, _step_rows(table, geo, c))
    m = _step_mask(mask_v, k0, k1, mask_logits, pos_dtype)
    if geo.groups == 1:  # dL / d(m * sample), (B*G*c*L, Cg)
        gs = _step_from_rows(gy_rows @ wk[k0:k1, 0].reshape(c * geo.channels, geo.out_channels).t(), geo, c)
    else:  # c == 1
        gs = _step_from_rows(_grouped_mm(gy_rows, wk[k0].transpose(1, 2), geo.groups), geo, c)
    if need_mask or need_w:
        v = _bag(table.rows, corners.index, corners.weight)  # the samples
        if need_mask:
            gm = _rowdot(gs, v)
            if mask_logits:  # d sigmoid(a) / da = m (1 - m)
                gm = gm * (m * (1.0 - m)).reshape(-1).to(gm.dtype)
            gmask_v[:, :, k0:k1] = gm.view(B, G, c, L).to(gmask_v.dtype)
        if need_w:
            sv = _step_to_rows(v if m is None else v * m.to(dtype), geo, c)
            if geo.groups == 1:
                gw[k0:k1, 0] += (sv.t() @ gy_rows).view(c, geo.channels, geo.out_channels)
            else:
                gw[k0] += _grouped_weight_grad(gy_rows, sv, geo.groups)
            del sv
        del v
    if need_off:
        for i in range(n):  # m folded into the derivative weights
            dw = _dweight(corners, i, m)
            goff_v[:, :, k0:k1, i] = _rowdot(gs, _bag(table.rows, corners.index, dw)).view(B, G, c, L) \
                .to(goff_v.dtype)
            del dw
    if need_x:
        wm = corners.weight if m is None else corners.weight * m
        part = _scatter_rows(gs, corners.index, wm, table.rows.shape[0])
        gx = part if gx is None else gx.add_(part)
    return gx


def _backward_position_grid(gx, gw, goff_v, gmask_v, gy_cf, table, offset_v, mask_v, mask_logits, bases, wk, geo, k,
                            kk, pos_dtype, needs):
    """Gradients of kernel position ``k`` with ``grid_sample`` and ``aten.grid_sampler_{2,3}d_backward``."""
    need_x, need_off, need_mask, need_w = needs
    B, G, L, n = geo.batch, geo.offset_groups, geo.L, geo.n
    dtype = table.dtype
    grid = _grid(_positions(offset_v, bases, geo, k, kk, pos_dtype), geo).to(dtype)
    m = _mask_at(mask_v, k, mask_logits, dtype)
    m = None if m is None else m.reshape(B * G, 1, *geo.out)
    gs = torch.matmul(wk[k], gy_cf).reshape(B * G, geo.channels // G, *geo.out)
    if need_mask or need_w:
        v = F.grid_sample(table, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
        if need_mask:
            gm = (gs * v).sum(1)
            if mask_logits:
                gm = gm * (m * (1.0 - m)).reshape(gm.shape)
            gmask_v[:, :, k] = gm.reshape(B, G, L).to(gmask_v.dtype)
        if need_w:
            s = (v if m is None else v * m).reshape(B, geo.groups, geo.channels // geo.groups, L)
            gw[k] += torch.einsum('bgcl,bgol->gco', s, gy_cf)
        del v
    if m is not None:
        gs = gs * m
    if need_x or need_off:
        backward_op = torch.ops.aten.grid_sampler_2d_backward if n == 2 else torch.ops.aten.grid_sampler_3d_backward
        g_in, g_grid = backward_op(gs, table, grid, 0, 0, False, [need_x, need_off])
        if need_x:
            gx = g_in if gx is None else gx.add_(g_in)
        if need_off:
            for i in range(n):
                gpos = g_grid[..., n - 1 - i] * (2.0 / float(geo.spatial[i]))
                goff_v[:, :, k, i] = gpos.reshape(B, G, L).to(goff_v.dtype)
    return gx


def deform_backward(grad_out: torch.Tensor, x: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor],
                    weight: torch.Tensor, geo: _Geometry, needs: Tuple[bool, bool, bool, bool, bool],
                    offset_grad_out: Optional[torch.Tensor] = None, mask_grad_out: Optional[torch.Tensor] = None,
                    mask_logits: bool = False) -> DeformGrads:
    """Gradients of :func:`deform_forward`, recomputing each kernel position's samples (plain tensor code).

    ``needs`` = (input, offset, mask, weight, bias). ``offset_grad_out`` / ``mask_grad_out``: optional
    tensors of the offset's / mask's shape to write those gradients into (LFAM writes them straight into
    its predictor's gradient). With ``mask_logits`` the mask gradient is that of the logits. Gradients
    are in the compute dtype (at least float32)."""
    B, G, K, L, n = geo.batch, geo.offset_groups, geo.K, geo.L, geo.n
    need_x, need_off, need_mask, need_w, need_b = needs
    need_mask = need_mask and mask is not None
    dtype = _compute_dtype(x.dtype, weight.dtype)
    pos_dtype = _compute_dtype(offset.dtype)
    offset_v = offset.reshape(B, G, K, n, L)
    mask_v = None if mask is None else mask.reshape(B, G, K, L)
    goff = gmask = goff_v = gmask_v = None
    if need_off:
        goff = offset_grad_out if offset_grad_out is not None else torch.empty(
            B, n * G * K, *geo.out, device=x.device, dtype=pos_dtype)
        goff_v = goff.view(B, G, K, n, L)
    if need_mask:
        gmask = mask_grad_out if mask_grad_out is not None else torch.empty(
            B, G * K, *geo.out, device=x.device, dtype=pos_dtype)
        gmask_v = gmask.view(B, G, K, L)
    gy = grad_out.to(dtype)
    gb = gy.sum(dim=[0, *range(2, n + 2)]) if need_b else None
    if not (need_x or need_off or need_mask or need_w):
        return DeformGrads(None, None, None, None, gb)
    bases = _base_positions(geo, pos_dtype, x.device)
    wk = _split_weight(weight, geo, dtype)
    gw = torch.zeros_like(wk) if need_w else None
    gx = None
    position_needs = (need_x, need_off, need_mask, need_w)
    if geo.sampler == 'gather':
        table = _gather_table(x, geo, dtype)
        gy_rows = gy.reshape(B, geo.out_channels, L).transpose(1, 2).reshape(B * L, geo.out_channels)
        del gy
        step = positions_per_step(geo)
        for k0 in range(0, K, step):
            gx = _backward_step_gather(gx, gw, goff_v, gmask_v, gy_rows, table, offset_v, mask_v, mask_logits,
                                       bases, wk, geo, k0, min(K, k0 + step), pos_dtype, position_needs)
        del table, gy_rows
        if need_x:
            gx = _padded_to_input(gx, geo)
    else:
        table = _grid_table(x, geo, dtype)
        gy_cf = gy.reshape(B, geo.groups, geo.out_channels // geo.groups, L)
        for k, kk in enumerate(_kernel_positions(geo)):
            gx = _backward_position_grid(gx, gw, goff_v, gmask_v, gy_cf, table, offset_v, mask_v, mask_logits, bases,
                                         wk, geo, k, kk, pos_dtype, position_needs)
        if need_x:
            gx = gx.reshape(B, geo.channels, *geo.spatial)
    return DeformGrads(gx, goff, gmask, None if gw is None else _unsplit_weight_grad(gw, geo), gb)

