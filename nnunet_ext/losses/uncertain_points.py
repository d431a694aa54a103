"""Pixel-wise loss on uncertain points: the term E_P of Eqs. 10-11 of the multi-level structural
loss paper (``docs/methods/multi-level-structural.md``, Section 2.4), with the point
selection of PointRend (Kirillov et al., CVPR 2020, the paper's ref. [58]).

Selection (Section 2.4, under no_grad): draw ``k N`` points uniformly in the patch (k = 3),
interpolate the logits there, keep the ``int(m N)`` most uncertain (m = 0.75) and add ``N - int(m N)``
fresh uniform points. The loss is the cross-entropy (softmax, labels) or binary cross-entropy
(sigmoid, regions) between the logits interpolated at those points and the ground truth there:

    E_P = mean_{x in S} CE(L(x), V(x)).

Uncertainty (paper: "probabilities closest to 0.5"): for softmax outputs minus the margin between
the two largest logits (PointRend's ``calculate_uncertainty``; for two classes it ranks points
exactly by ``|p - 0.5|``), for sigmoid outputs minus the smallest ``|logit|`` over channels.

Points are continuous coordinates in ``[0, 1]`` per axis (axis order of the tensor, i.e. (y, x) in
2D, (z, y, x) in 3D). Coordinate ``u`` lies at pixel position ``u * size - 0.5``: pixel ``i``'s
centre is ``(i + 0.5) / size``. Logits are interpolated (bi/trilinear, ``grid_sample`` with border
padding: a point within half a pixel of the border reads the border pixel, not zero); the label of
a point is that of the voxel containing it (labels are not interpolated). The gradient therefore
reaches the logits only at the 2**d voxels around each sampled point.

Where the paper applies the term on its final logits layer, 4x coarser than the image, nnU-Net's
final logits are at full resolution: the default ``N`` is 1/16 of the patch's voxels, the size of
the paper's logits grid for a 2D patch.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["point_sample", "nearest_point_sample", "point_uncertainty", "select_uncertain_points",
           "sample_uncertain_points", "UncertainPointLoss"]


def _check_coords(x: torch.Tensor, coords: torch.Tensor) -> int:
    d = x.ndim - 2
    if d not in (2, 3):
        raise ValueError(f"expected a 2D (B, C, H, W) or 3D (B, C, D, H, W) tensor, got shape {tuple(x.shape)}")
    if coords.ndim != 3 or coords.shape[0] != x.shape[0] or coords.shape[2] != d:
        raise ValueError(f"coords must have shape (B={x.shape[0]}, N, {d}), got {tuple(coords.shape)}")
    return d


def point_sample(x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Interpolate ``x`` (B, C, *spatial) at ``coords`` (B, N, d) in [0, 1]: returns (B, C, N)."""
    d = _check_coords(x, coords)
    B, N = coords.shape[:2]
    grid = (2 * coords - 1).flip(-1).reshape(B, N, *([1] * (d - 1)), d).to(x.dtype)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False).reshape(
        B, x.shape[1], N)


def nearest_point_sample(x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Value of the voxel containing each point (no interpolation; exact for labels): (B, C, N).
    ``coords`` must be on ``x``'s device (nothing is copied per call)."""
    _check_coords(x, coords)
    B, C = x.shape[:2]
    index = None
    for axis, size in enumerate(x.shape[2:]):
        i = torch.floor(coords[..., axis] * size).long().clamp_(0, size - 1)
        index = i if index is None else index * size + i
    return x.reshape(B, C, -1).gather(2, index[:, None].expand(B, C, -1))


def point_uncertainty(point_logits: torch.Tensor, use_sigmoid: bool = False) -> torch.Tensor:
    """(B, C, N) logits at points -> (B, N) uncertainty, larger = closer to the decision boundary."""
    if use_sigmoid:
        return -point_logits.abs().amin(1)
    if point_logits.shape[1] < 2:
        raise ValueError("softmax uncertainty needs at least two channels")
    top2 = point_logits.topk(2, dim=1).values
    return top2[:, 1] - top2[:, 0]


def select_uncertain_points(candidates: torch.Tensor, uncertainty: torch.Tensor, num_kept: int) -> torch.Tensor:
    """The ``num_kept`` candidates (B, kN, d) of largest ``uncertainty`` (B, kN), per sample."""
    if not 0 <= num_kept <= candidates.shape[1]:
        raise ValueError(f"cannot keep {num_kept} of {candidates.shape[1]} candidates")
    index = uncertainty.topk(num_kept, dim=1).indices
    return candidates.gather(1, index[..., None].expand(-1, -1, candidates.shape[2]))


@torch.no_grad()
def sample_uncertain_points(logits: torch.Tensor, num_points: int, oversample_ratio: float = 3.0,
                            importance_ratio: float = 0.75, use_sigmoid: bool = False,
                            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """PointRend's training-time selection (Section 2.4): (B, N, d) coordinates in [0, 1].

    ``int(oversample_ratio * N)`` uniform candidates are drawn first (one ``torch.rand`` call), then
    the ``int(importance_ratio * N)`` most uncertain are kept, then the remaining points are drawn
    uniformly (a second call). The first ``int(importance_ratio * N)`` rows are the uncertain ones.
    """
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    if not oversample_ratio >= 1:
        raise ValueError(f"oversample_ratio (k) must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_ratio <= 1:
        raise ValueError(f"importance_ratio (m) must be in [0, 1], got {importance_ratio}")
    B, d = logits.shape[0], logits.ndim - 2
    num_candidates = int(oversample_ratio * num_points)
    num_kept = int(importance_ratio * num_points)
    factory = dict(device=logits.device, dtype=torch.float32, generator=generator)
    candidates = torch.rand(B, num_candidates, d, **factory)
    uncertainty = point_uncertainty(point_sample(logits.detach().float(), candidates), use_sigmoid)
    kept = select_uncertain_points(candidates, uncertainty, num_kept)
    return torch.cat((kept, torch.rand(B, num_points - num_kept, d, **factory)), 1)


class UncertainPointLoss(nn.Module):
    """E_P (Eq. 10): CE / BCE on N points chosen PointRend-style, mean over the valid points.

    Args:
        num_points: N per sample. ``None``: ``ceil(point_fraction * voxels)`` of the logits' patch.
        point_fraction: see ``num_points`` (1/16 by default, see the module docstring).
        oversample_ratio: k (3 in the paper).
        importance_ratio: m (0.75 in the paper).
        use_sigmoid: regions (sigmoid per channel, BCE) instead of labels (softmax, CE).

    ``forward(logits, target, loss_mask=None)``: ``logits`` (B, C, *spatial); ``target`` (B, 1,
    *spatial) label map (softmax) or (B, C, *spatial) binary maps (sigmoid); ``loss_mask`` (B, 1,
    *spatial), 0 on voxels to ignore (the ignore label). Points on ignored voxels do not count; no
    valid point gives 0. The points of the last call are kept in ``last_points`` (B, N, d).
    """

    def __init__(self, num_points: Optional[int] = None, point_fraction: float = 1 / 16,
                 oversample_ratio: float = 3.0, importance_ratio: float = 0.75, use_sigmoid: bool = False):
        super().__init__()
        if num_points is not None and num_points < 1:
            raise ValueError(f"num_points must be >= 1 or None, got {num_points}")
        if not 0 < point_fraction <= 1:
            raise ValueError(f"point_fraction must be in (0, 1], got {point_fraction}")
        self.num_points = num_points
        self.point_fraction = point_fraction
        self.oversample_ratio = oversample_ratio
        self.importance_ratio = importance_ratio
        self.use_sigmoid = use_sigmoid
        self.last_points: Optional[torch.Tensor] = None

    def points_for(self, spatial_shape) -> int:
        if self.num_points is not None:
            return self.num_points
        return max(1, math.ceil(self.point_fraction * math.prod(spatial_shape)))

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        channels = logits.shape[1] if self.use_sigmoid else 1
        if target.shape != (logits.shape[0], channels, *logits.shape[2:]):
            raise ValueError(f"target must have shape {(logits.shape[0], channels, *logits.shape[2:])} for logits "
                             f"{tuple(logits.shape)}, got {tuple(target.shape)}")
        points = sample_uncertain_points(logits, self.points_for(logits.shape[2:]), self.oversample_ratio,
                                         self.importance_ratio, self.use_sigmoid)
        self.last_points = points
        point_logits = point_sample(logits.to(torch.promote_types(logits.dtype, torch.float32)), points)  # (B, C, N)
        point_target = nearest_point_sample(target, points)
        if self.use_sigmoid:
            losses = F.binary_cross_entropy_with_logits(point_logits, point_target.float(), reduction='none').mean(1)
        else:
            losses = F.cross_entropy(point_logits, point_target[:, 0].long(), reduction='none')
        if loss_mask is None:
            return losses.mean()
        valid = nearest_point_sample(loss_mask, points)[:, 0].float()
        return (losses * valid).sum() / valid.sum().clamp_min(1)
