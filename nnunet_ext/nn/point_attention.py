"""The pixel branch of the multi-level structural network (MLN; Section 3.3 of
``docs/methods/multi-level-structural.md``, green box of Fig. 4): a transformer over the features of
the uncertain points, then a shared MLP that classifies each point.

Point selection (Section 3.3: "the same as previous except for the encryption ... we choose the
uncertain points based on the regular points rather than encrypted points"). The candidates are the
voxels of the region prediction's grid itself (no ``k N`` random oversampling): in training the
``int(m N)`` most uncertain voxels (m = 0.75) plus ``N - int(m N)`` other voxels drawn at random, as the
loss's selection (Section 2.4); at inference, where the paper gives no rule, the ``N`` most uncertain
voxels (PointRend's inference rule; deterministic, so nnU-Net's sliding window and mirroring see one
function). Uncertainty is the loss's (:func:`~nnunet_ext.losses.uncertain_points.point_uncertainty`:
minus the margin between the two largest logits, ``|p - 0.5|`` ranking for two classes). Selection
runs without gradient. Points are flat voxel indices: they are distinct, so the features scattered
back on the grid (Section 3.4) never collide, and features and labels are read exactly (no
interpolation), so nothing outside the selected voxels reaches the branch.

Transformer (Section 3.3, after Vaswani et al.): with ``x`` the point features (one token per point
of a sample, attention within each sample only),

    x = LayerNorm(x + MHSA(x))                         (multi-head self-attention, residual)
    x = LayerNorm(x + ReLU(Linear(x)))                 (point-wise MLP = 1x1 convolution, ReLU, residual)
    logits = Linear(ReLU(Linear(x)))                   (the shared MLP, one prediction per point)

The input is first projected to the branch width (the paper's 256 channels for every branch; here
the width of the network's full-resolution decoder features). The paper gives no positional
encoding; none is added (the tokens are a set).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from nnunet_ext.losses.uncertain_points import point_uncertainty

__all__ = ["num_pixel_points", "select_uncertain_voxels", "gather_points", "scatter_points", "voxel_centres",
           "PointAttentionBranch"]


def num_pixel_points(spatial_shape: Sequence[int], num_points: Optional[int] = None, point_fraction: float = 1 / 16,
                     max_points: int = 1024) -> int:
    """N per sample: ``num_points`` if given, else ``ceil(point_fraction * voxels)`` capped at
    ``max_points`` (self-attention costs N**2); never more than the voxels of the grid."""
    voxels = math.prod(spatial_shape)
    if num_points is None:
        if not 0 < point_fraction <= 1:
            raise ValueError(f"point_fraction must be in (0, 1], got {point_fraction}")
        if max_points < 1:
            raise ValueError(f"max_points must be >= 1, got {max_points}")
        num_points = min(max_points, math.ceil(point_fraction * voxels))
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    return min(num_points, voxels)


@torch.no_grad()
def select_uncertain_voxels(logits: torch.Tensor, num_points: int, importance_ratio: float = 1.0,
                            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, N) flat indices of distinct voxels of ``logits`` (B, C, *spatial), C >= 2 (softmax).

    The ``int(importance_ratio * N)`` most uncertain voxels come first, then ``N`` minus that many
    drawn uniformly among the others (``importance_ratio=1``: the N most uncertain, deterministic).
    """
    if logits.ndim < 3:
        raise ValueError(f"logits must be (B, C, *spatial), got shape {tuple(logits.shape)}")
    voxels = math.prod(logits.shape[2:])
    if not 1 <= num_points <= voxels:
        raise ValueError(f"num_points must be in [1, {voxels}] (the voxels of the grid), got {num_points}")
    if not 0 <= importance_ratio <= 1:
        raise ValueError(f"importance_ratio (m) must be in [0, 1], got {importance_ratio}")
    num_uncertain = int(importance_ratio * num_points)
    uncertainty = point_uncertainty(logits.detach().flatten(2).float())  # (B, voxels)
    uncertain = uncertainty.topk(num_uncertain, dim=1).indices
    if num_uncertain == num_points:
        return uncertain
    scores = torch.rand(uncertainty.shape, device=logits.device, generator=generator)
    scores.scatter_(1, uncertain, -1.0)  # already taken: never drawn again
    return torch.cat((uncertain, scores.topk(num_points - num_uncertain, dim=1).indices), 1)


def gather_points(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Values of ``x`` (B, C, *spatial) at flat voxel ``indices`` (B, N): (B, C, N)."""
    if indices.ndim != 2 or indices.shape[0] != x.shape[0]:
        raise ValueError(f"indices must have shape (B={x.shape[0]}, N), got {tuple(indices.shape)}")
    flat = x.flatten(2)
    return flat.gather(2, indices[:, None].expand(-1, flat.shape[1], -1))


def scatter_points(values: torch.Tensor, indices: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """A (B, C, *spatial_shape) map of zeros holding ``values`` (B, C, N) at the flat ``indices``
    (B, N), which must be distinct per sample (Section 3.4's pixel feature map)."""
    B, C, N = values.shape
    if tuple(indices.shape) != (B, N):
        raise ValueError(f"indices must have shape {(B, N)} for values {tuple(values.shape)}, "
                         f"got {tuple(indices.shape)}")
    flat = values.new_zeros(B, C, math.prod(spatial_shape))
    return flat.scatter(2, indices[:, None].expand(-1, C, -1), values).reshape(B, C, *spatial_shape)


def voxel_centres(indices: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """(B, N, d) coordinates in [0, 1] of the centres of the flat voxel ``indices`` (B, N), in the
    convention of :mod:`nnunet_ext.losses.uncertain_points` (voxel ``i`` at ``(i + 0.5) / size``).
    Integer arithmetic with Python sizes: no tensor is built from the shape (no host-to-device copy)."""
    coords, rest = [], indices
    for size in reversed(tuple(int(s) for s in spatial_shape)):
        coords.append((torch.remainder(rest, size).float() + 0.5) / size)
        rest = torch.div(rest, size, rounding_mode='floor')
    return torch.stack(coords[::-1], -1)


class PointAttentionBranch(nn.Module):
    """Section 3.3's pixel branch: features at the selected points -> transformer -> shared MLP.

    Args:
        in_channels: channels of the feature map the points are read from (the paper: ResBlock1 of
            the backbone; the MLN U-Net: the full-resolution encoder stage).
        channels: width of the point features (the tokens and the branch's output features).
        num_classes: logits per point.
        num_heads: heads of the self-attention; must divide ``channels``.

    ``forward(features, indices)``: ``features`` (B, in_channels, *spatial), ``indices`` (B, N) flat
    voxel indices. Returns ``(point_features (B, channels, N), point_logits (B, num_classes, N))``;
    both depend on ``features`` at the selected voxels only.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_heads: int = 4):
        super().__init__()
        if min(in_channels, channels, num_classes, num_heads) < 1:
            raise ValueError(f"PointAttentionBranch needs positive sizes, got in_channels={in_channels}, "
                             f"channels={channels}, num_classes={num_classes}, num_heads={num_heads}")
        if channels % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the point feature width ({channels})")
        self.embed = nn.Linear(in_channels, channels)
        self.attention = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.attention_norm = nn.LayerNorm(channels)
        self.pointwise = nn.Linear(channels, channels)
        self.pointwise_norm = nn.LayerNorm(channels)
        self.classifier = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(), nn.Linear(channels, num_classes))

    def forward(self, features: torch.Tensor, indices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(gather_points(features, indices).transpose(1, 2))  # (B, N, channels)
        x = self.attention_norm(x + self.attention(x, x, x, need_weights=False)[0])
        x = self.pointwise_norm(x + torch.relu(self.pointwise(x)))
        return x.transpose(1, 2), self.classifier(x).transpose(1, 2)
