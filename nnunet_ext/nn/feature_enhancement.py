"""Instructive feature enhancement (IFE) of "Instructive Feature Enhancement for Dichotomous Medical
Image Segmentation" (``docs/methods/ife.md``, Section 2).

Each channel of a feature map is scored per sample by how much edge / texture it carries, the top
``int(r C)`` channels are selected and concatenated to the raw features (Eq. 3):
``F = cat[F_x, top_r(S(F_x))]``. Scores carry no gradient; the selected values do.

Scores (2D as in the paper; 3D is our extension, the paper's "future work"):

* :class:`CurvatureScore` (Section 2.1, Eq. 1): ``sum |K * x|`` over the valid positions of a
  channel, ``K`` Gong and Sbalzarini's mean-curvature kernel
  ``[[-1/16, 5/16, -1/16], [5/16, -1, 5/16], [-1/16, 5/16, -1/16]]`` (the authors' code: no padding,
  absolute value, sum). 3D: ``K3`` is the sum of ``K`` placed on the three orthogonal planes through
  the voxel (centre -3, the 6 face neighbours 10/16, the 12 edge neighbours -1/16, corners 0; it sums
  to 0 like ``K``, so a constant or linear channel scores 0). nnU-Net's 3D stages can be thinner
  than the kernel (1 or 2 slices on anisotropic data): an axis shorter than 3 is replicate-padded by
  one on each side first (the channel is taken as constant across it; for one slice, ``K3`` then
  scores the 2D curvature of the slice plus 3/16 of its second differences along x and y).
* :class:`EntropyScore` (Section 2.2, Eq. 2, Algorithm 1): the 2D information entropy of the pairs
  ``(i, j)`` = (centre value, mean of the other 8 values) of the 3x3 window around every pixel
  (zero padding, one window per pixel, as ``unfold(padding=1)`` in the authors' code), in a joint
  histogram of 256 x 256 bins (Eq. 2: ``i, j in 0..255``), ``P = count / ((H + 2) (W + 2))`` (the
  paper's normalisation by the padded image size ``(H + ext) x (W + ext)``; the authors' code uses
  ``ext = 2 * floor(3 / 2)``), ``E = -sum P log2 P``. The 256 levels span ``[min, max]`` of the
  sample's ``i`` and ``j`` values over all its channels (``histc``'s default range over Algorithm 1's
  input ``F_x``, one sample): a channel's entropy reflects both its texture and its activation
  magnitude, and never depends on the other samples of the batch (the authors' code takes the range
  over the whole batch). A level is ``floor((v - min) / (max - min) * 256)``, the maximum in the last
  level; a sample whose values are all equal has every pair in level (0, 0).
  3D: 3x3x3 windows, the mean of the 26 other values, normalised by ``(D + 2)(H + 2)(W + 2)``.

Vectorised, with static shapes and no host-device synchronisation (``torch.compile(fullgraph=True)``
captures them in one graph; DDP without ``find_unused_parameters`` needs that): one depthwise
convolution with a constant kernel buffer (curvature); one average pooling, one sort of each
(sample, channel)'s ``i * 256 + j`` keys and a run-length count of equal keys (entropy), so its cost and
memory grow with the number of feature values, not with the ``B * C * 65536`` cells of dense
histograms; no Python loop over samples or channels, no ``unique``/``nonzero``. Scores are computed
in float32 (float64 inputs stay float64) with autocast disabled, so a network trained under fp16 or
bf16 autocast selects the channels that float32 arithmetic selects for the same features.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CurvatureScore", "EntropyScore", "InstructiveFeatureEnhancement", "curvature_kernel",
           "ENTROPY_LEVELS"]

ENTROPY_LEVELS = 256


def curvature_kernel(ndim: int, dtype=torch.float32) -> torch.Tensor:
    """Eq. 1's kernel (2D), or its 3D extension ``K3`` (sum over the three orthogonal planes)."""
    a, b, c = -1 / 16, 5 / 16, -1.0
    k2 = torch.tensor([[a, b, a], [b, c, b], [a, b, a]], dtype=torch.float64)
    if ndim == 2:
        return k2.to(dtype)
    if ndim != 3:
        raise ValueError(f"curvature kernel is defined for 2D and 3D, got ndim={ndim}")
    k3 = torch.zeros(3, 3, 3, dtype=torch.float64)
    k3[1, :, :] += k2  # plane z = centre
    k3[:, 1, :] += k2  # plane y = centre
    k3[:, :, 1] += k2  # plane x = centre
    return k3.to(dtype)


def _check_features(x: torch.Tensor) -> int:
    if x.ndim not in (4, 5):
        raise ValueError(f"expected features of shape (B, C, H, W) or (B, C, D, H, W), got {tuple(x.shape)}")
    return x.ndim - 2


def _scoring_input(x: torch.Tensor) -> torch.Tensor:
    """The features to score: detached, at least float32 (fp16/bf16 features of a network under
    autocast are up-cast; float64 stays float64). Call under ``_full_precision(x)``."""
    return x.detach().to(torch.promote_types(x.dtype, torch.float32))


def _full_precision(x: torch.Tensor):
    """Autocast off on ``x``'s device: under autocast a convolution would cast the up-cast features
    back to fp16/bf16 and the scores, hence the selected channels, would depend on the precision.
    (No-op on devices without autocast, e.g. ``meta``.)"""
    if torch.amp.is_autocast_available(x.device.type):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


def _spatial_size(shape, extra: int = 0) -> int:
    """``prod(s + extra for s in shape)`` as a plain int (traceable by ``torch.compile``)."""
    size = 1
    for s in shape:
        size *= s + extra
    return size


class CurvatureScore(nn.Module):
    """Per sample, per channel ``sum |K * x|`` over valid positions (Eq. 1): ``(B, C, *s) -> (B, C)``.

    The kernels ``K`` (2D) and ``K3`` (3D) are non-persistent buffers: they follow the network's
    device without a copy per call and are not part of its ``state_dict``.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer('kernel_2d', curvature_kernel(2), persistent=False)
        self.register_buffer('kernel_3d', curvature_kernel(3), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ndim = _check_features(x)
        with torch.no_grad(), _full_precision(x):
            x = _scoring_input(x)
            thin = [1 if s < 3 else 0 for s in x.shape[2:]]
            if any(thin):  # F.pad lists the last axis first
                x = F.pad(x, [p for t in reversed(thin) for p in (t, t)], mode='replicate')
            B, C = x.shape[:2]
            kernel = self.kernel_2d if ndim == 2 else self.kernel_3d
            # a no-op when the module lives where x does (K's entries are exact in any float dtype); one
            # single-channel kernel over the (sample, channel) maps: its shape is a constant (ONNX export)
            kernel = kernel.to(device=x.device, dtype=x.dtype).view(1, 1, *([3] * ndim))
            conv = F.conv2d if ndim == 2 else F.conv3d
            maps = conv(x.reshape(B * C, 1, *x.shape[2:]), kernel)
            return maps.abs().reshape(B, C, -1).sum(2)


class EntropyScore(nn.Module):
    """Per sample, per channel 2D information entropy of (centre, neighbour mean) pairs (Eq. 2,
    Algorithm 1; see the module docstring): ``(B, C, *s) -> (B, C)``, in bits.

    With ``n`` the count of histogram cell ``(i, j)`` of a channel, ``N`` its number of values and
    ``Z = prod(s + 2)`` (Algorithm 1's padded size), Eq. 2 is
    ``E = -sum n/Z log2(n/Z) = (N log2 Z - sum_cells n log2 n) / Z``. The counts come from static
    shapes only: each channel's keys ``i * 256 + j`` are sorted; in the sorted row a cell is a run of
    equal keys, numbered by the cumulative sum of the places where the key changes, and a scatter-add of
    ones per number counts each run (standard ONNX operators: ``CumSum``, ``ScatterElements``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ndim = _check_features(x)
        with torch.no_grad(), _full_precision(x):
            x = _scoring_input(x)
            B, C = x.shape[:2]
            pool = F.avg_pool2d if ndim == 2 else F.avg_pool3d
            window = 3 ** ndim
            centre = x
            neighbours = (pool(F.pad(x, [1, 1] * ndim), 3, 1) * window - x) / (window - 1)  # zero padding
            # 256 levels over the sample's [min, max] of all its centres and neighbour means
            lo = torch.minimum(centre.flatten(1).amin(1), neighbours.flatten(1).amin(1)).view(B, 1, *([1] * ndim))
            hi = torch.maximum(centre.flatten(1).amax(1), neighbours.flatten(1).amax(1)).view(B, 1, *([1] * ndim))
            scale = ENTROPY_LEVELS / (hi - lo)
            scale = torch.where(hi > lo, scale, torch.zeros_like(scale))

            def level(v):
                return ((v - lo) * scale).floor_().clamp_(0, ENTROPY_LEVELS - 1).to(torch.int32)

            total = _spatial_size(x.shape[2:])
            padded = _spatial_size(x.shape[2:], 2)
            keys = (level(centre) * ENTROPY_LEVELS + level(neighbours)).view(B, C, total)
            keys = keys.sort(dim=-1).values
            differs = keys[..., 1:] != keys[..., :-1]  # (B, C, N - 1): a new cell begins at p + 1
            # each value's cell number in its sorted row (0, 1, ...), then the values per cell number
            cell = torch.cat((torch.zeros_like(keys[..., :1], dtype=torch.int64), differs.long().cumsum(-1)), -1)
            counts = torch.zeros(B, C, total, dtype=torch.float32, device=x.device)
            counts = counts.scatter_add(-1, cell, torch.ones_like(counts))
            n_log_n = (counts * counts.clamp_min(1).log2()).sum(-1)  # empty cell numbers add 0
            # -sum (n/Z) log2(n/Z) = (total * log2 Z - sum n log2 n) / Z
            return (total * math.log2(padded) - n_log_n) / padded


class InstructiveFeatureEnhancement(nn.Module):
    """``cat[x, top_{int(r C)}(score(x))]`` per sample (Eq. 3).

    Args:
        score: ``CurvatureScore()``, ``EntropyScore()`` or any module mapping (B, C, *s) to (B, C).
        ratio: r, the share of channels selected (``int(r * C)`` channels; 0 selects none).
        channels: C, if known (for :attr:`out_channels`).

    The selected channels are ordered by decreasing score; the scores get no gradient, the
    selected values do (``gather``).
    """

    def __init__(self, score: nn.Module, ratio: float, channels: int | None = None):
        super().__init__()
        if not 0 <= ratio <= 1:
            raise ValueError(f"IFE ratio r must be in [0, 1], got {ratio}")
        self.score = score
        self.ratio = float(ratio)
        self.channels = channels

    def selected_channels(self, channels: int) -> int:
        return int(self.ratio * channels)

    @property
    def out_channels(self) -> int:
        if self.channels is None:
            raise ValueError("out_channels needs the input channel count (pass channels=...)")
        return self.channels + self.selected_channels(self.channels)

    def selection(self, x: torch.Tensor) -> torch.Tensor:
        """Indices (B, k) of the selected channels of each sample, by decreasing score, equal scores by
        increasing channel index (a stable sort: ``topk`` leaves the order of ties open, and channels of
        small deep maps often tie, so the network would depend on the device; ONNX's ``TopK`` and a
        stable sort agree). The order comes from pairwise comparisons, ``C^2`` per sample, in standard
        ONNX operators (the exporter has no stable sort)."""
        C = x.shape[1]
        k = self.selected_channels(C)
        scores = self.score(x)
        if scores.shape != x.shape[:2]:
            raise ValueError(f"score returned shape {tuple(scores.shape)}, expected {tuple(x.shape[:2])}")
        channel = torch.arange(C, device=x.device)
        mine, other = scores.unsqueeze(2), scores.unsqueeze(1)  # (B, C, 1), (B, 1, C)
        ahead = (other > mine) | ((other == mine) & (channel.view(1, 1, C) < channel.view(1, C, 1)))
        rank = ahead.sum(2)  # (B, C): how many channels come before each channel
        at_rank = rank.unsqueeze(1) == torch.arange(k, device=x.device).view(1, k, 1)  # (B, k, C)
        return (at_rank.long() * channel.view(1, 1, C)).sum(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels is not None and x.shape[1] != self.channels:
            raise ValueError(f"IFE built for {self.channels} channels got input {tuple(x.shape)}")
        index = self.selection(x)
        spatial = x.shape[2:]
        selected = x.gather(1, index.view(*index.shape, *([1] * len(spatial))).expand(*index.shape, *spatial))
        return torch.cat((x, selected), 1)
