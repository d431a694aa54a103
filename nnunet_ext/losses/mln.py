"""The loss of the multi-level structural network (MLN), Eqs. 12-13 of
``docs/methods/multi-level-structural.md`` (Sections 3.1-3.4, 4.1.1), the fine model's part:

    L_MLN = E_R(P^region) + alpha E_B^S(P^boundary) + beta E_P(L^pixel) + gamma E_R(P^fusion)      (Eq. 13)

    E_B^S(P^boundary) = E_B(sigmoid(P^boundary)) + 1/n sum (P^boundary - (-Phi))^2                (Eq. 12)

(with ``Phi`` normalised per sample and class by default, see "Normalisation" below).

- ``E_R``: the region term, applied to the region head at every deep-supervision scale (nnU-Net's
  weights) and to the fused prediction (full resolution). The paper uses Dice; we take the region
  term of the trainer's loss mixin (nnU-Net's Dice + CE for ``nnUNetTrainerMLN``), as the
  multi-level loss trainers do.
- ``E_B^S`` (Eq. 12): Kervadec's boundary loss (Eq. 6, :class:`~nnunet_ext.losses.boundary.BoundaryLoss`
  with sigmoid probabilities, one channel per foreground class) on ``sigmoid(P^boundary)`` plus the
  mean squared error between ``P^boundary`` and ``-Phi`` (``Phi`` negative inside, so the boundary
  head is positive inside). ``n`` counts the valid voxels of the (sample, class) pairs whose ``Phi``
  is defined (see "Undefined targets").
- ``E_P``: cross-entropy of the pixel branch's logits at its points against the labels of those
  voxels (BCE in the paper's binary setting; softmax CE for label maps), mean over the valid points.
- ``Phi`` is the full-resolution signed distance map delivered with the targets (``cat([labels, Phi])``,
  :mod:`nnunet_ext.training.distance_transform`), in the configuration's spacing (millimetres).
- Normalisation (``SignedDistanceRegressionLoss(normalization=...)``; balanced by default): Eq. 12 is
  written with ``Phi`` in image units. With ``Phi`` in millimetres its L2 part is ``mean(Phi^2)`` at
  initialisation, ~2e3-5e3 mm^2 on 2D 256^2 / 3D 128^3 patches against ~1 for nnU-Net's Dice + CE,
  and its gradient, through the shared decoder, decides what the network learns first (a
  nnU-Net run then predicted 97% foreground). The default ``'mean'`` divides ``Phi`` per (sample,
  class) by ``s = mean |Phi|`` over the patch (:func:`~nnunet_ext.losses.boundary.normalize_distance`),
  in both parts of Eq. 12: the head regresses ``-Phi / s``, a unit-free signed distance with
  ``mean |.| = 1`` (standardised targets, as regression heads are usually trained; the L2 part of a
  zero prediction is ``mean(Phi^2) / s^2``, 1.2-1.6 on organ patches), and ``E_B(sigmoid(P))`` is the
  balanced boundary loss of :mod:`nnunet_ext.losses.boundary`. The scale is the patch's, so the
  same organ in two crops has slightly different targets; the head sees the whole patch, as it must
  to regress distances to boundaries far away in the first place. ``'max'`` (``Phi / max |Phi|``, in
  [-1, 1], Ma et al. [61] / Xue et al. [52]) is available; ``None`` is the literal Eq. 12 (``Phi`` in
  the units of the spacing, divided by ``distance_scale``).
- Undefined targets: where ``Phi`` is undefined for a (sample, class) (class absent from the patch,
  or filling it: the map is all zeros), there is no regression target: those pairs are left out of
  the L2 part (its mean runs over the defined pairs' valid voxels) instead of being trained towards
  ``Phi = 0``, which would pull the head to the decision boundary everywhere. Their ``E_B`` is 0
  (Kervadec's "blank" classes).
- Schedule (Section 4.1.1; :class:`MLNSchedule`): beta = gamma = 0 for the first 12 epochs, then 1;
  alpha rises from 0 by 0.2 per epoch to 1 (the paper's multi-level loss ramp: our boundary branch
  shares the region branch's decoder features, the paper's MLN has alpha = 1 from the start;
  ``MLNSchedule(alpha_increment=None)``). The coarse model's term ``omega_1 E_R(P_{theta_C})`` and the
  overall factor ``omega_2`` have no counterpart (nnU-Net trains one network).

The ignore label is excluded from every term (nnU-Net's region loss masks it; the distance terms
and the point term use the mask). Label maps only (softmax).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ext.losses.boundary import BoundaryLoss, check_normalization, normalize_distance
from nnunet_ext.losses.schedules import TermWeights, check_epochs_per_step
from nnunet_ext.nn.point_attention import gather_points

__all__ = ["MLNTermWeights", "MLNSchedule", "SignedDistanceRegressionLoss", "PointCrossEntropyLoss", "MLNLoss",
           "MLN_TERMS"]

MLN_TERMS = ('region', 'boundary', 'distance_l2', 'point', 'fusion')


@dataclass(frozen=True)
class MLNTermWeights(TermWeights):
    """Weights of Eq. 13: region 1, ``boundary`` alpha (both parts of Eq. 12), ``point`` beta, ``fusion`` gamma."""
    fusion: float


@dataclass(frozen=True)
class MLNSchedule:
    """Section 4.1.1 for the MLN: ``beta`` and ``gamma`` 0 for the first ``start`` epochs (12) and then
    their values (1); ``alpha`` (the weight of Eq. 12) rises by ``alpha_increment`` per step up to
    ``alpha``, ``alpha(e) = min(alpha, alpha_increment * step)``, with ``step = epoch // epochs_per_step``
    counted as in :class:`~nnunet_ext.losses.schedules.PaperSchedule`.

    Default: the ramp the paper gives its multi-level loss model (0 at epoch 0, +0.2 per epoch, 1 from
    epoch 5), a departure from the paper's MLN, which has ``alpha = 1`` from the start "since the region
    branch and the boundary branch are trained separately" (two parallel ASPP heads on a pretrained
    ResNet-18). Here the boundary branch reads the U-Net decoder's last features, the region branch's own
    (:mod:`nnunet_ext.architectures.mln_unet`), and the network starts from random weights: the
    distance regression's gradient into those shared features was 2.5x the region term's at
    initialisation, and with ``alpha = 1`` from the first step one of three seeds never learned the
    small class of the demo phantom (tumour Dice 0.00; 0.97 with the ramp; ``bench/ab_real.py``). With
    the boundary term acting on the region features, the MLL's schedule is the paper's own answer.
    ``alpha_increment=None`` is the paper's literal MLN schedule (``alpha`` from the start).
    """
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    start: int = 12
    epochs_per_step: int = 1
    alpha_increment: Optional[float] = 0.2

    def __post_init__(self):
        check_epochs_per_step(self.epochs_per_step)
        if self.alpha_increment is not None and not self.alpha_increment > 0:
            raise ValueError(f"alpha_increment must be > 0 (or None: alpha from the start), got {self.alpha_increment}")

    def __call__(self, epoch: int) -> MLNTermWeights:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        step = epoch // self.epochs_per_step
        on = step >= self.start
        alpha = self.alpha if self.alpha_increment is None else min(self.alpha, self.alpha_increment * step)
        return MLNTermWeights(1.0, alpha, self.beta if on else 0.0, self.gamma if on else 0.0)


class SignedDistanceRegressionLoss(nn.Module):
    """``E_B^S`` of Eq. 12: ``mean(sigmoid(P) * Phi_n) + mean_defined((P + Phi_n)^2)`` over valid voxels
    and foreground classes, ``Phi_n = Phi / s`` (see the module docstring: ``s = mean |Phi|`` per
    (sample, class) by default; ``distance_scale`` in the literal form).

    Args:
        normalization: ``'mean'`` (default), ``'max'`` or ``None`` (the literal Eq. 12).
        distance_scale: literal form only: the head predicts ``-Phi / distance_scale`` (units of
            ``distance_scale`` millimetres; 1 = Eq. 12 as written).

    ``forward(prediction, distance, loss_mask=None)``: ``prediction`` ``P^boundary`` (B, K, *spatial),
    positive inside; ``distance`` ``Phi`` (B, K, *spatial); ``loss_mask`` (B, 1, *spatial), 0 on
    ignored voxels. :meth:`terms` returns the two parts separately. The L2 part is the mean over the
    valid voxels of the (sample, class) pairs whose ``Phi`` is defined (not all zero); 0 without any.
    """

    def __init__(self, normalization: Optional[str] = 'mean', distance_scale: float = 1.0):
        super().__init__()
        check_normalization(normalization)
        if not distance_scale > 0:
            raise ValueError(f"distance_scale must be > 0, got {distance_scale}")
        if normalization is not None and distance_scale != 1.0:
            raise ValueError(f"distance_scale ({distance_scale}) applies to the literal form (normalization=None); "
                             f"with normalization={normalization!r} the distances are unit-free")
        self.normalization = normalization
        self.distance_scale = float(distance_scale)
        self.boundary = BoundaryLoss(use_sigmoid=True, normalization=None)  # receives Phi_n

    def terms(self, prediction: torch.Tensor, distance: torch.Tensor, loss_mask: Optional[torch.Tensor] = None):
        """``(E_B(sigmoid(P)), L2)``: the two parts of Eq. 12."""
        if prediction.shape != distance.shape:
            raise ValueError(f"the boundary head's prediction {tuple(prediction.shape)} and the distance maps "
                             f"{tuple(distance.shape)} must have the same shape (one map per foreground class)")
        dtype = torch.promote_types(prediction.dtype, torch.float32)  # half/bfloat16 -> float32
        prediction = prediction.to(dtype)
        distance, defined = normalize_distance(distance.to(dtype), self.normalization)
        boundary = self.boundary(prediction, distance, loss_mask)
        squared = (prediction + distance / self.distance_scale).square()
        pairs = defined.to(dtype)  # (B, K): 1 where Phi is defined
        weights = pairs.reshape(*pairs.shape, *([1] * (squared.ndim - 2)))
        if loss_mask is None:
            count = pairs.sum() * squared[0, 0].numel()
        else:
            mask = loss_mask.to(dtype)
            weights = weights * mask
            count = (mask.flatten(2).sum(2) * pairs).sum()
        return boundary, (squared * weights).sum() / count.clamp_min(1)

    def forward(self, prediction: torch.Tensor, distance: torch.Tensor,
                loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        boundary, squared = self.terms(prediction, distance, loss_mask)
        return boundary + squared


class PointCrossEntropyLoss(nn.Module):
    """``E_P`` for the pixel branch: mean cross-entropy of its logits at its points.

    ``forward(point_logits, point_indices, labels, loss_mask=None)``: ``point_logits`` (B, C, N),
    ``point_indices`` (B, N) flat voxel indices into ``labels`` (B, 1, *spatial) (a label map without
    the ignore label), ``loss_mask`` (B, 1, *spatial), 0 on ignored voxels (such points do not count;
    no valid point gives 0).
    """

    def forward(self, point_logits: torch.Tensor, point_indices: torch.Tensor, labels: torch.Tensor,
                loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if labels.shape[1] != 1 or point_logits.shape[0] != labels.shape[0]:
            raise ValueError(f"labels must be a (B={point_logits.shape[0]}, 1, *spatial) label map, got "
                             f"{tuple(labels.shape)}")
        point_labels = gather_points(labels, point_indices)[:, 0].long()
        losses = F.cross_entropy(point_logits.to(torch.promote_types(point_logits.dtype, torch.float32)),
                                 point_labels, reduction='none')
        if loss_mask is None:
            return losses.mean()
        valid = gather_points(loss_mask, point_indices)[:, 0].to(losses.dtype)
        return (losses * valid).sum() / valid.sum().clamp_min(1)


class MLNLoss(nn.Module):
    """Eq. 13 on the MLN network's training output and distance-carrying targets.

    Args:
        region_loss: the per-output region term ``(logits, labels) -> loss`` (e.g. nnU-Net's
            ``DC_and_CE_loss`` with its ignore label).
        ignore_label: label value to ignore, or ``None``.
        deep_supervision_weights: one weight per region output (nnU-Net's); ``None``: all 1.
        distance_loss: ``E_B^S`` (default :class:`SignedDistanceRegressionLoss`).
        point_loss: ``E_P`` (default :class:`PointCrossEntropyLoss`).
        keep_zero_weight_terms: compute terms of weight 0 in the graph (multiplied by 0) instead of
            without gradient; needed under DDP, which expects a gradient for every parameter.

    ``forward(output, target)``: ``output`` an :class:`~nnunet_ext.architectures.mln_unet.MLNOutput`
    (attributes ``region``, ``distance``, ``point_logits``, ``point_indices``, ``fused``); ``target``
    the list of ``cat([labels, Phi], 1)`` per deep-supervision scale (or one tensor). ``weights`` (an
    :class:`MLNTermWeights`) holds alpha, beta, gamma; every call adds the unweighted terms
    (``MLN_TERMS``) to the sums read by :meth:`pop_term_means`.
    """

    def __init__(self, region_loss: nn.Module, ignore_label: Optional[int] = None,
                 deep_supervision_weights: Optional[Sequence[float]] = None, distance_loss: Optional[nn.Module] = None,
                 point_loss: Optional[nn.Module] = None, keep_zero_weight_terms: bool = False):
        super().__init__()
        self.region_loss = region_loss
        self.distance_loss = SignedDistanceRegressionLoss() if distance_loss is None else distance_loss
        self.point_loss = PointCrossEntropyLoss() if point_loss is None else point_loss
        self.ignore_label = ignore_label
        self.deep_supervision_weights = None if deep_supervision_weights is None else \
            [float(w) for w in deep_supervision_weights]
        self.keep_zero_weight_terms = keep_zero_weight_terms
        self.weights = MLNTermWeights(1.0, 1.0, 0.0, 0.0)
        self.term_sums = {t: 0.0 for t in MLN_TERMS}
        self.term_count = 0

    def _targets(self, output, target):
        if isinstance(output, torch.Tensor) or not hasattr(output, 'region'):
            raise ValueError("the MLN loss needs the MLN network's training output (all branches), which it returns "
                             "with deep supervision on; got a plain tensor (deep supervision off?)")
        targets = list(target) if isinstance(target, (list, tuple)) else [target]
        weights = self.deep_supervision_weights or [1.0] * len(output.region)
        if not len(output.region) == len(targets) == len(weights):
            raise ValueError(f"deep supervision: {len(output.region)} region outputs, {len(targets)} targets, "
                             f"{len(weights)} weights; the network's heads must match the trainer's "
                             f"_get_deep_supervision_scales()")
        distance = targets[0][:, 1:]
        if distance.shape != output.distance.shape:
            raise ValueError(f"targets carry {distance.shape[1]} distance map(s) after the label channel; the "
                             f"boundary head predicts {output.distance.shape[1]} (one per foreground class). Are the "
                             f"signed distance maps added to the data pipeline (SignedDistanceTransform)?")
        return targets, weights

    def _term(self, weight: float, compute):
        if weight != 0 or self.keep_zero_weight_terms:
            return compute()
        with torch.no_grad():
            return compute()

    def forward(self, output, target) -> torch.Tensor:
        targets, ds_weights = self._targets(output, target)
        labels = targets[0][:, :1]
        mask = None if self.ignore_label is None else labels != self.ignore_label
        point_labels = labels if mask is None else torch.where(mask, labels, 0)
        w = self.weights
        zero = output.fused.new_zeros((), dtype=torch.float32)
        region = sum((dw * self.region_loss(o, t[:, :1]) for o, t, dw in zip(output.region, targets, ds_weights)
                      if dw != 0), zero)
        boundary, distance_l2 = self._term(w.boundary, lambda: self.distance_loss.terms(
            output.distance, targets[0][:, 1:], mask))
        point = self._term(w.point, lambda: self.point_loss(output.point_logits, output.point_indices,
                                                            point_labels, mask))
        fusion = self._term(w.fusion, lambda: self.region_loss(output.fused, labels))
        values = (region, boundary, distance_l2, point, fusion)
        for name, value in zip(MLN_TERMS, values):
            self.term_sums[name] = self.term_sums[name] + value.detach()  # no device sync per step
        self.term_count += 1
        return w.region * region + w.boundary * (boundary + distance_l2) + w.point * point + w.fusion * fusion

    def pop_term_means(self) -> dict:
        """Mean of each (unweighted) term over the calls since the last pop; resets the sums."""
        means = {t: (float(s) / self.term_count if self.term_count else float('nan'))
                 for t, s in self.term_sums.items()}
        self.term_sums = {t: 0.0 for t in MLN_TERMS}
        self.term_count = 0
        return means
