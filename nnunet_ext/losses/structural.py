"""The multi-level structural loss (Eq. 11 of ``docs/methods/multi-level-structural.md``,
the fine model's part; Eq. 3 with weights):

    L = w_R E_R(P, V) + alpha E_B(P, V) + beta E_P(L, V),

region term ``E_R`` (Dice + CE as nnU-Net, or GODC + CE), boundary term ``E_B`` (Eq. 6,
:class:`~nnunet_ext.losses.boundary.BoundaryLoss`; by default with Phi divided per sample and class
by its mean magnitude, a unit-free term in [-1, 1] balanced against the region term, the literal
millimetre form being ``BoundaryLoss(normalization=None)``) and point term ``E_P`` (Eq. 10,
:class:`~nnunet_ext.losses.uncertain_points.UncertainPointLoss`), the weights set per epoch by a
schedule (:mod:`nnunet_ext.losses.schedules`).

Targets carry the distance maps: every target tensor is ``cat([labels, Phi], 1)``, ``labels`` being
what nnU-Net's own loss receives (a label map, or region channels + an ignore channel) and ``Phi``
one signed distance map per foreground class / region of that same tensor's resolution (built in
the data pipeline, :mod:`nnunet_ext.training.distance_transform`).

With deep supervision (a list of outputs, highest resolution first) the region and boundary terms
are summed over outputs with nnU-Net's weights, each against the distance maps of its own
resolution; the point term uses the highest-resolution output, the final logits (as the paper).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from nnunet_ext.losses.boundary import BoundaryLoss
from nnunet_ext.losses.schedules import TermWeights
from nnunet_ext.losses.uncertain_points import UncertainPointLoss

__all__ = ["StructuralLoss", "TERMS"]

TERMS = ('region', 'boundary', 'point')


class StructuralLoss(nn.Module):
    """``w_R E_R + alpha E_B + beta E_P`` on nnU-Net outputs and distance-carrying targets.

    Args:
        region_loss: per-output region term ``(logits, labels) -> loss`` (e.g. nnU-Net's
            ``DC_and_CE_loss``); it handles the ignore label itself.
        label_channels: leading target channels that are labels (1 for a label map; the number of
            regions, plus 1 for the ignore channel, in region-based training).
        use_sigmoid: region-based training (sigmoid outputs, binary region targets).
        ignore_label: label value to ignore (label maps). For regions, pass ``has_ignore_channel``.
        has_ignore_channel: regions only: the last label channel marks ignored voxels.
        deep_supervision_weights: one weight per output when outputs are lists; ``None`` for a
            single output.
        boundary_loss, point_loss: the E_B and E_P modules; ``None`` for the defaults matching
            ``use_sigmoid`` (``BoundaryLoss(use_sigmoid)``: balanced, ``normalization='mean'``).
            ``point_loss=False`` leaves the point term out (ablation);
            ``boundary_loss=False`` leaves the boundary term out.

    ``weights`` (a :class:`TermWeights`) holds the current ``w_R, alpha, beta``; a term whose weight
    is 0 is still evaluated, without gradient, for the log. Every call adds the three unweighted
    term values to ``term_sums`` (see :meth:`pop_term_means`).
    """

    def __init__(self, region_loss: nn.Module, label_channels: int = 1, use_sigmoid: bool = False,
                 ignore_label: Optional[int] = None, has_ignore_channel: bool = False,
                 deep_supervision_weights: Optional[Sequence[float]] = None,
                 boundary_loss=None, point_loss=None):
        super().__init__()
        if label_channels < 1:
            raise ValueError(f"label_channels must be >= 1, got {label_channels}")
        if use_sigmoid and ignore_label is not None:
            raise ValueError("region-based targets mark ignored voxels with an ignore channel: pass "
                             "has_ignore_channel=True instead of ignore_label")
        if has_ignore_channel and not use_sigmoid:
            raise ValueError("has_ignore_channel is for region-based targets; label maps use ignore_label")
        self.region_loss = region_loss
        self.boundary_loss = BoundaryLoss(use_sigmoid) if boundary_loss is None else (boundary_loss or None)
        self.point_loss = UncertainPointLoss(use_sigmoid=use_sigmoid) if point_loss is None else (point_loss or None)
        self.label_channels = label_channels
        self.use_sigmoid = use_sigmoid
        self.ignore_label = ignore_label
        self.has_ignore_channel = has_ignore_channel
        self.deep_supervision_weights = None if deep_supervision_weights is None else \
            [float(w) for w in deep_supervision_weights]
        self.weights = TermWeights(1.0, 0.0, 0.0)
        self.term_sums = {t: 0.0 for t in TERMS}
        self.term_count = 0

    def split_target(self, target: torch.Tensor):
        """``(labels, distance, loss_mask, point_target)`` of one packed target tensor."""
        labels, distance = target[:, :self.label_channels], target[:, self.label_channels:]
        if self.use_sigmoid:
            if self.has_ignore_channel:
                return labels, distance, 1 - labels[:, -1:], labels[:, :-1]
            return labels, distance, None, labels
        if self.ignore_label is None:
            return labels, distance, None, labels
        mask = labels != self.ignore_label
        return labels, distance, mask, torch.where(mask, labels, 0)

    def _as_lists(self, output, target):
        if isinstance(output, (list, tuple)) != isinstance(target, (list, tuple)):
            raise ValueError("outputs and targets must both be lists (deep supervision) or both tensors")
        if not isinstance(output, (list, tuple)):
            if self.deep_supervision_weights is not None and len(self.deep_supervision_weights) != 1:
                raise ValueError(f"got one output, but {len(self.deep_supervision_weights)} deep supervision weights")
            return [output], [target], [1.0]
        weights = self.deep_supervision_weights or [1.0] * len(output)
        if not len(output) == len(target) == len(weights):
            raise ValueError(f"deep supervision: {len(output)} outputs, {len(target)} targets, {len(weights)} weights; "
                             f"the network's heads must match the trainer's _get_deep_supervision_scales()")
        return list(output), list(target), weights

    def _term(self, weight: float, compute):
        if weight != 0:
            return compute()
        with torch.no_grad():
            return compute()

    def forward(self, output, target) -> torch.Tensor:
        outputs, targets, ds_weights = self._as_lists(output, target)
        parts = [self.split_target(t) for t in targets]
        for o, (labels, distance, _, _) in zip(outputs, parts):
            expected = (o.shape[1] if self.use_sigmoid else o.shape[1] - 1) if self.boundary_loss is not None else None
            if expected is not None and distance.shape[1] != expected:
                raise ValueError(f"targets carry {distance.shape[1]} distance maps after {self.label_channels} label "
                                 f"channel(s); {expected} expected for outputs of {o.shape[1]} channels. Are the "
                                 f"signed distance maps added to the data pipeline (SignedDistanceTransform)?")
        w = self.weights
        zero = outputs[0].new_zeros(())
        region = sum((dw * self.region_loss(o, p[0]) for o, p, dw in zip(outputs, parts, ds_weights) if dw != 0),
                     zero)
        boundary = zero
        if self.boundary_loss is not None:
            boundary = self._term(w.boundary, lambda: sum(
                (dw * self.boundary_loss(o, p[1], p[2]) for o, p, dw in zip(outputs, parts, ds_weights) if dw != 0),
                zero))
        point = zero
        if self.point_loss is not None:
            point = self._term(w.point, lambda: self.point_loss(outputs[0], parts[0][3], parts[0][2]))
        for name, value in zip(TERMS, (region, boundary, point)):
            self.term_sums[name] = self.term_sums[name] + value.detach()  # no device sync per step
        self.term_count += 1
        return w.region * region + w.boundary * boundary + w.point * point

    def pop_term_means(self) -> dict:
        """Mean of each (unweighted) term over the calls since the last pop; resets the sums."""
        means = {t: (float(s) / self.term_count if self.term_count else float('nan'))
                 for t, s in self.term_sums.items()}
        self.term_sums = {t: 0.0 for t in TERMS}
        self.term_count = 0
        return means
