"""The deformable convolution (Dai et al. Eq. 2; modulated, Zhu et al. Eq. 3) and LFAM's forward in standard
ONNX operators, for export (``nnunet-ext export``, ``docs/commands/export.md``).

The custom operators of :mod:`.operator` and ``nnunet_ext.nn.lateral_alignment`` are opaque to an ONNX
exporter (a runtime without our library could not run them). These functions compute the same values with
operators every ONNX runtime has had since opset 13 (``Gather``, ``Floor``, ``MatMul`` and elementwise
arithmetic), in the form of the CPU 'gather' sampler of :mod:`.sampling`:

* the input becomes a table of rows, one per pixel (channels last, one row per offset group);
* per kernel position ``k``: the positions and weights of the ``2 ** n`` corners of the bi/trilinear cell
  around each sampling position (weight zero for a corner outside the image: zero padding; times the
  modulation), one ``Gather`` of the corners' rows, and one batched ``MatMul`` that sums them with their weights;
* ``y += samples_k @ W_k``: one ``MatMul`` per kernel position with that position's weights.

Why not ``GridSample`` (one per kernel position, as the 'grid_sample' sampler does): ONNX Runtime's CPU
``GridSample`` on 5-D input is about 2x slower than these gathers on a 48 x 96 x 96 skip with 32 channels, and
needs opset 20. Why all corners at once: one gather, product and sum per corner is no faster in ONNX Runtime and
gives a graph 4x larger (a 3D network with LFAM took 34 s to export instead of 5). Both forms are
memory-bound: every intermediate of a whole patch goes through main memory, where PyTorch's operator works in
cache-sized chunks, so a 3D network with LFAM stays slower in ONNX Runtime than in PyTorch on a CPU
(``docs/commands/export.md``, Speed).

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
    rows = x.reshape(-1, G, C // G, math.prod(spatial)).transpose(2, 3).reshape(-1, C // G)
    offsets = offset.reshape(-1, G, K, n, N)
    modulation = None if mask is None else mask.reshape(-1, G, K, N)
    if modulation is not None and mask_logits:
        modulation = torch.sigmoid(modulation)
    first = _first_rows(offsets, math.prod(spatial))
    grid = _output_grid(out, stride, padding, offset.dtype, offset.device)
    dilation_ = torch.tensor(dilation, dtype=grid.dtype, device=grid.device).view(n, 1)
    weights = _weights_per_position(weight, C // weight.shape[1])
    result = None
    for k, position in enumerate(itertools.product(*[range(s) for s in kernel])):
        coordinates = offsets[:, :, k] + grid + torch.tensor(position, dtype=grid.dtype).view(n, 1) * dilation_
        samples = _interpolate(rows, first, coordinates, spatial, None if modulation is None else modulation[:, :, k])
        samples = samples.reshape(-1, N, C) if G == 1 else samples.transpose(1, 2).reshape(-1, N, C)
        term = torch.matmul(samples.to(weights.dtype), weights[k])
        result = term if result is None else result + term
    if bias is not None:
        result = result + bias
    return result.transpose(1, 2).reshape(-1, O, *out)


def _interpolate(rows: torch.Tensor, first: torch.Tensor, coordinates: torch.Tensor, spatial: Sequence[int],
                 modulation: Optional[torch.Tensor]) -> torch.Tensor:
    """Bi/trilinear samples ``(B, G, N, C/G)`` of ``rows`` at pixel ``coordinates`` ``(B, G, n, N)``, zero outside
    the image, times ``modulation`` ``(B, G, N)``. Positions and weights of the ``2 ** n`` corners of every
    cell are computed at once (fewer nodes: a small graph exports in seconds)."""
    n = len(spatial)
    corners = torch.tensor(list(itertools.product((0, 1), repeat=n)), dtype=coordinates.dtype,
                           device=coordinates.device).view(1, 1, 2 ** n, n, 1)
    last = torch.tensor([s - 1 for s in spatial], dtype=coordinates.dtype, device=coordinates.device).view(n, 1)
    row_stride = torch.tensor([math.prod(spatial[i + 1:]) for i in range(n)], device=coordinates.device).view(n, 1)
    low = torch.floor(coordinates)
    fraction = (coordinates - low).unsqueeze(2)
    pixel = low.unsqueeze(2) + corners  # (B, G, Q, n, N)
    inside = ((pixel >= 0) & (pixel <= last)).to(coordinates.dtype)
    weight = torch.prod((corners * fraction + (1 - corners) * (1 - fraction)) * inside, 3)  # (B, G, Q, N)
    if modulation is not None:
        weight = weight * modulation.unsqueeze(2)
    index = (first.unsqueeze(2) + (torch.minimum(torch.clamp(pixel, min=0), last).long() * row_stride).sum(3))
    # all corners in one gather (B, G, N, Q, C/G), summed with their weights by one batched MatMul
    samples = rows[index.transpose(2, 3).reshape(-1)].reshape(*index.shape[:2], -1, 2 ** n, rows.shape[1])
    return torch.matmul(weight.transpose(2, 3).unsqueeze(3).to(rows.dtype), samples).squeeze(3)


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
