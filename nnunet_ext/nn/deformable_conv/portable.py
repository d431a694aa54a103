"""The deformable convolution (Dai et al. Eq. 2; modulated, Zhu et al. Eq. 3) and LFAM's forward in standard
ONNX operators, for export (``nnunet-ext export``, ``docs/commands/export.md``).

The custom operators of :mod:`.operator` and ``nnunet_ext.nn.lateral_alignment`` are opaque to an ONNX
exporter (a runtime without our library could not run them). These functions compute the same values with
operators every ONNX runtime has: one ``GridSample`` per kernel position (bilinear / trilinear, zeros outside,
``align_corners=False`` with pixel ``p`` at ``(2p + 1) / size - 1``: exactly the 'grid_sample' sampler of
:mod:`.sampling`), the modulation, and one ``1 x 1`` convolution over the ``C * K`` samples. ``GridSample``
exists from ONNX opset 16 on 4-D input and from opset 20 on 5-D input (3D networks). Forward only: no
chunking by kernel position and no memory economy, which export does not need. The batch axis stays free
(every reshape leaves it at ``-1``); the spatial sizes are those of the traced input.

The tests compare these against the custom operators (``tests/test_export.py``), whose own tests compare
against loops written from the papers' equations.
"""
from __future__ import annotations

import itertools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from nnunet_ext.nn.deformable_conv.geometry import _tuple


def deform_conv_portable(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                         mask: Optional[torch.Tensor] = None, mask_logits: bool = False) -> torch.Tensor:
    """:func:`nnunet_ext.nn.deformable_conv.deform_conv` (same arguments and layouts) in standard operators;
    ``mask_logits``: ``mask`` holds logits, the modulation is their sigmoid (LFAM)."""
    n = weight.ndim - 2
    kernel = tuple(weight.shape[2:])
    K = 1
    for k in kernel:
        K *= k
    stride, padding, dilation = (_tuple(v, n, name, m) for v, name, m in
                                 ((stride, 'stride', 1), (padding, 'padding', 0), (dilation, 'dilation', 1)))
    C, spatial, out = x.shape[1], tuple(x.shape[2:]), tuple(offset.shape[2:])
    G = offset.shape[1] // (n * K)
    groups = C // weight.shape[1]
    table = x.reshape(-1, C // G, *spatial)  # (B*G, C/G, *spatial): offset group g reads its channels
    offsets = offset.reshape(-1, G, K, n, *out)
    modulation = None if mask is None else mask.reshape(-1, G, K, *out)
    bases = []
    for i in range(n):
        shape = [1] * (n + 2)
        shape[2 + i] = out[i]
        bases.append((torch.arange(out[i], device=x.device, dtype=offset.dtype) * stride[i] - padding[i]).view(shape))
    samples = []
    for k, kk in enumerate(itertools.product(*[range(s) for s in kernel])):
        # pixel coordinates (B, G, *out) per axis, normalised for grid_sample, axes reversed (x first)
        coords = [(2.0 * (offsets[:, :, k, i] + bases[i] + kk[i] * dilation[i]) + 1.0) / spatial[i] - 1.0
                  for i in range(n)]
        grid = torch.stack(coords[::-1], -1).reshape(-1, *out, n)
        s = F.grid_sample(table, grid.to(x.dtype), mode='bilinear', padding_mode='zeros', align_corners=False)
        if modulation is not None:
            m = modulation[:, :, k]
            s = s * (torch.sigmoid(m) if mask_logits else m).reshape(-1, 1, *out).to(s.dtype)
        samples.append(s.reshape(-1, C, *out))
    # (B, C * K, *out), channel c * K + k: the layout of weight.reshape(O, C / groups * K)
    columns = torch.stack(samples, 2).reshape(-1, C * K, *out)
    conv = F.conv2d if n == 2 else F.conv3d
    return conv(columns, weight.reshape(weight.shape[0], -1, *([1] * n)), bias, groups=groups)


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
