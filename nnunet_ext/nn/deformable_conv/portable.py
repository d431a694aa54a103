"""The deformable convolution (Dai et al. Eq. 2; modulated, Zhu et al. Eq. 3) and LFAM's forward in standard
ONNX operators, for export (``nnunet-ext export``, ``docs/commands/export.md``).

The custom operators of :mod:`.operator` and ``nnunet_ext.nn.lateral_alignment`` are opaque to an ONNX
exporter (a runtime without our library could not run them). These functions compute the same values with
operators every ONNX runtime has had since opset 13 (``Gather``, ``Floor``, ``MatMul`` and elementwise
arithmetic), in the form of the CPU 'gather' sampler of :mod:`.sampling`:

* the input, zero-padded by one pixel on every side, becomes a table of rows, one per pixel (channels last, one
  row per offset group);
* per kernel position ``k``: for each sampling position, the row of its bi/trilinear cell's lower corner (the
  other ``2 ** n`` corners are constant steps away in the padded image, the padding reads as zero outside the
  image) and the corner weights (products of per-axis fractions, times the modulation, zero for a cell outside
  the image); one ``Gather`` of the corners' rows and one batched ``MatMul`` that sums them with their weights;
* ``y += samples_k @ W_k``: one ``MatMul`` per kernel position with that position's weights.

Why not ``GridSample`` (one per kernel position, as the 'grid_sample' sampler does): ONNX Runtime's CPU
``GridSample`` on 5-D input is several times slower than these gathers on a 48 x 96 x 96 skip with 32 channels,
and needs opset 20. Why the padded image: the index and weight arithmetic per position then works on ``N``-vectors
rather than on ``2 ** n`` corners x ``n`` axes (one corner index per position instead of clamping and masking
every corner), which took 40 % of the module's time in ONNX Runtime. What remains is memory-bound: the gathered
corners of a whole patch (8 x channels x voxels per kernel position) go through main memory, where PyTorch's
operator works in cache-sized chunks (``docs/commands/export.md``, Speed).

Forward only, no memory economy beyond one kernel position at a time. The batch axis stays free (row
numbers of each batch item are computed from the data, every reshape leaves the batch at ``-1``); the spatial
sizes are those of the traced input.

The tests compare these against the custom operators (``tests/test_export.py``), whose own tests compare
against loops written from the papers' equations.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import torch

from nnunet_ext.nn.deformable_conv.geometry import _tuple


def deform_conv_portable(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                         mask: Optional[torch.Tensor] = None, mask_logits: bool = False) -> torch.Tensor:
    """:func:`nnunet_ext.nn.deformable_conv.deform_conv` (same arguments and layouts) in standard operators;
    ``mask_logits``: ``mask`` holds logits, the modulation is their sigmoid (LFAM)."""
    n = weight.ndim - 2
    kernel = tuple(weight.shape[2:])
    K = math.prod(kernel)
    stride, padding, dilation = (_tuple(v, n, name, m) for v, name, m in
                                 ((stride, 'stride', 1), (padding, 'padding', 0), (dilation, 'dilation', 1)))
    C, spatial, out = x.shape[1], tuple(x.shape[2:]), tuple(offset.shape[2:])
    N, O = math.prod(out), weight.shape[0]
    G = offset.shape[1] // (n * K)
    rows = _padded_rows(x, G)
    offsets = offset.reshape(-1, G, K, n, N)
    modulation = None if mask is None else mask.reshape(-1, G, K, N)
    if modulation is not None and mask_logits:
        modulation = torch.sigmoid(modulation)
    first = _first_rows(offsets, math.prod(s + 2 for s in spatial))
    steps = _corner_steps(spatial, x.device)
    grid = _output_grid(out, stride, padding, offset.dtype, offset.device)
    dilation_ = torch.tensor(dilation, dtype=grid.dtype, device=grid.device).view(n, 1)
    weights = _weights_per_position(weight, C // weight.shape[1])
    result = None
    for k, position in enumerate(itertools.product(*[range(s) for s in kernel])):
        coordinates = offsets[:, :, k] + grid + torch.tensor(position, dtype=grid.dtype).view(n, 1) * dilation_
        samples = _interpolate(rows, first, steps, coordinates, spatial,
                               None if modulation is None else modulation[:, :, k])
        samples = samples.reshape(-1, N, C) if G == 1 else samples.transpose(1, 2).reshape(-1, N, C)
        term = torch.matmul(samples.to(weights.dtype), weights[k])
        result = term if result is None else result + term
    if bias is not None:
        result = result + bias
    return result.transpose(1, 2).reshape(-1, O, *out)


def _padded_rows(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B * G * P, C/G)``: the image zero-padded by one pixel on every side (``P`` pixels), as a table of rows,
    one per pixel and offset group, channels last."""
    channels_last = x.reshape(-1, x.shape[1] // groups, *x.shape[2:]).movedim(1, -1)
    padded = torch.nn.functional.pad(channels_last, (0, 0) + (1, 1) * (x.ndim - 2))
    return padded.reshape(-1, channels_last.shape[-1])


def _corner_steps(spatial: Sequence[int], device: torch.device) -> torch.Tensor:
    """``(2 ** n,)``: the row steps from a cell's lower corner to each of its corners in the padded image, in
    the order of ``itertools.product((0, 1), repeat=n)`` (axis 0 the most significant, as the weights of
    :func:`_interpolate`)."""
    padded = [s + 2 for s in spatial]
    return torch.tensor([sum(c * math.prod(padded[axis + 1:]) for axis, c in enumerate(corner))
                         for corner in itertools.product((0, 1), repeat=len(spatial))], device=device)


def _interpolate(rows: torch.Tensor, first: torch.Tensor, steps: torch.Tensor, coordinates: torch.Tensor,
                 spatial: Sequence[int], modulation: Optional[torch.Tensor]) -> torch.Tensor:
    """Bi/trilinear samples ``(B, G, N, C/G)`` of the padded image's ``rows`` at pixel ``coordinates``
    ``(B, G, n, N)`` of the image, zero outside it, times ``modulation`` ``(B, G, N)``.

    A cell whose lower corner lies in ``[-1, size - 1]`` on every axis has all its ``2 ** n`` corners in the padded
    image, those outside the image on its zero border; any other cell lies outside the image and gets weight 0. So
    each sampling position needs one row number (its cell's lower corner) plus ``steps`` to the other corners,
    and corner weights that are products of per-axis fractions: the work per position is a few operations on
    ``N``-vectors, one ``Gather`` of the corners' rows and one batched ``MatMul`` that sums them."""
    padded = [s + 2 for s in spatial]
    low = torch.floor(coordinates)
    fraction = coordinates - low
    inside = lower_corner = weight = None
    for axis, size in enumerate(spatial):
        below, f = low[:, :, axis], fraction[:, :, axis]
        within = (below >= -1) & (below <= size - 1)
        inside = within if inside is None else inside & within
        row = (torch.clamp(below, -1, size - 1) + 1).long()
        lower_corner = row if lower_corner is None else lower_corner * padded[axis] + row
        pair = torch.stack((1 - f, f))  # (2, B, G, N)
        weight = pair if weight is None else (weight.unsqueeze(1) * pair).flatten(0, 1)  # (2 ** (axis + 1), B, G, N)
    factor = inside.to(coordinates.dtype)
    if modulation is not None:
        factor = factor * modulation
    index = (first + lower_corner).unsqueeze(-1) + steps  # (B, G, N, 2 ** n), corners in the order of `weight`
    samples = rows[index.reshape(-1)].reshape(*index.shape, rows.shape[1])
    weight = (weight * factor).movedim(0, -1).unsqueeze(-2)  # (B, G, N, 1, 2 ** n)
    return torch.matmul(weight.to(rows.dtype), samples).squeeze(-2)


def _first_rows(offsets: torch.Tensor, pixels: int) -> torch.Tensor:
    """``(B, G, 1)``: the number of the first row of each (batch item, offset group) in the table. Computed from
    the data (a cumulative sum of ones), not from ``arange(B)``, so that the exported batch axis stays free."""
    ones = torch.ones_like(offsets[:, :, 0, 0, :1], dtype=torch.long)
    return (torch.cumsum(ones.reshape(-1), 0) - 1).reshape(ones.shape) * pixels


def _output_grid(out: Sequence[int], stride: Sequence[int], padding: Sequence[int], dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """``(n, N)``: per axis, the pixel coordinate ``o * stride - padding`` of each output position."""
    axes = [torch.arange(s, dtype=dtype, device=device) * st - p for s, st, p in zip(out, stride, padding)]
    return torch.stack([g.reshape(-1) for g in torch.meshgrid(*axes, indexing='ij')])


def _weights_per_position(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``(K, C, O)``: kernel position ``k``'s weights as a matrix from input to output channels (block-diagonal
    over the convolution's groups)."""
    O, Cg = weight.shape[:2]
    per_group = weight.reshape(groups, O // groups, Cg, -1).permute(0, 3, 2, 1)  # (groups, K, C/groups, O/groups)
    if groups == 1:
        return per_group[0]
    return torch.stack([torch.block_diag(*per_group[:, k]) for k in range(per_group.shape[1])])


def lateral_alignment_portable(module, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``LateralFeatureAlignment.forward`` (``nnunet_ext.nn.lateral_alignment``) in standard operators: the
    offset predictor's convolution over ``cat(skip, up)``, split into offsets and mask logits, then
    :func:`deform_conv_portable` on the skip."""
    deform = module.deform
    weight, bias = deform.weight_and_bias()
    prediction = module.offset_predictor(torch.cat((skip, up), 1))
    offset_channels = deform.offset_channels
    offset = prediction[:, :offset_channels]
    mask = prediction[:, offset_channels:] if module.modulated else None
    return deform_conv_portable(skip, offset, weight, bias, deform.stride, deform.padding, deform.dilation, mask,
                                mask_logits=True)
