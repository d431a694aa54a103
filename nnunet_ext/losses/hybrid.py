"""Hybrid loss of ANU-Net (``shared/papers/anunet_attention_nested_unet.md``, Section 3.4, Eq. 8):
a focal-style binary cross-entropy term plus soft Dice, for each deep-supervision head.

Eq. 8 reads ``Loss = sum_i ( 1 - [ alpha * Ybar * log(Y_i) / |Y_i - 0.5|^gamma + (2 Y_i Ybar + s) /
(Y_i^2 + Ybar^2 + s) ] )`` with ``Ybar`` the ground truth, ``Y_i`` the probabilities of head ``X_{0,i}``
and ``s`` the Dice smoothing. Our reading, per head (:class:`HybridLoss` is one summand; Eq. 8's sum
over the heads is nnU-Net's deep-supervision wrapper with equal weights):

    L = mean_c [ 1 - DC_c ] + mean_{c, voxels} FBCE_c

* ``DC_c = (2 sum(Y Ybar) + s) / (sum Y^2 + sum Ybar^2 + s)``: the soft Dice of Eq. 5 with squared
  terms in the denominator, as Eq. 8 writes it; sums over each sample's voxels (averaged over the
  samples) or, with ``batch_dice``, over the whole batch.
* ``FBCE = -[alpha Ybar log Y + (1 - alpha)(1 - Ybar) log(1 - Y)] / max(|Y - 0.5|, margin)^gamma``.
  Eq. 8 prints only the positive part ``alpha Ybar log Y`` (inside ``1 - [...]``, i.e. ``-alpha Ybar
  log Y`` in the loss), but the text calls the term "binary cross entropy" and describes ``alpha`` as
  a class balance that is lowered for ``Ybar = 1`` and raised for ``Ybar = 0``: that is RetinaNet's
  ``alpha_t`` (Eq. 7), which weighs the negatives by ``1 - alpha``. We use the full BCE with
  ``alpha_t``; the term is a mean over voxels (Eq. 8 leaves the reduction open; the mean keeps it on
  the Dice term's scale whatever the patch size).
* The modulating factor ``|Y - 0.5|^-gamma`` is Eq. 8's (large for "hard" voxels near 0.5, the
  paper's stated intent; note it is not RetinaNet's ``(1 - p)^gamma``). It is infinite at ``Y = 0.5``,
  which is where every voxel starts, so ``|Y - 0.5|`` is clamped to ``margin`` (default 0.05: factor
  at most 400 with ``gamma = 2``). ``detach_modulation`` (default) treats it as a per-voxel weight
  without gradient: differentiated, ``-log(Y) |Y - 0.5|^-gamma`` *decreases* as a positive voxel's
  ``Y`` falls below 0.5 towards 0.3 (the factor shrinks faster than ``-log Y`` grows), so the literal
  gradient pushes hard voxels away from 0.5 in either direction, also the wrong one.
  ``detach_modulation=False`` gives the literal form.

Multi-class (our generalisation; the paper is binary): ``apply_nonlin='softmax'`` turns ``C`` logits
into probabilities, the label map into one-hot targets, and each foreground class ``c`` (channel 0,
the background, is dropped unless ``do_bg``) contributes one-vs-rest terms ``FBCE_c`` and ``1 - DC_c``
with ``Y = P_c``, ``1 - Y = sum_{k != c} P_k`` (computed in log space); both terms are averaged over
those classes. ``apply_nonlin='sigmoid'`` is the paper's binary case (one logit channel per class or
region, nnU-Net's region training; ``do_bg`` defaults to True there). Voxels where ``loss_mask`` is 0
(nnU-Net's ignore label) count in neither term.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class HybridLoss(nn.Module):
    """Focal-style BCE + soft Dice of Eq. 8, for one head's logits.

    Args:
        apply_nonlin: ``'softmax'`` (labels: one channel per class incl. background), ``'sigmoid'``
            (binary/regions: independent channels) or ``None`` (``x`` already holds probabilities of
            independent channels; then ``log`` is taken with a clamp at ``1e-7``).
        do_bg: keep channel 0. Default: ``False`` for softmax, ``True`` otherwise.
        alpha: class balance of Eq. 8/Eq. 7 (weight of positive voxels; negatives get ``1 - alpha``).
        gamma: exponent of the modulating factor ``|Y - 0.5|^-gamma``; 0 gives plain balanced BCE.
        margin: lower bound on ``|Y - 0.5|`` (> 0) so predictions at or near 0.5 stay finite.
        smooth: ``s`` of the Dice term.
        batch_dice: one Dice per class over the whole batch (nnU-Net's ``batch_dice``) instead of one
            per sample and class.
        detach_modulation: no gradient through ``|Y - 0.5|^-gamma`` (see the module docstring).
        weight_bce, weight_dice: weights of the two terms (both 1 in Eq. 8).
    """

    def __init__(self, apply_nonlin: Optional[str] = 'softmax', do_bg: Optional[bool] = None, alpha: float = 0.25,
                 gamma: float = 2.0, margin: float = 0.05, smooth: float = 1.0, batch_dice: bool = False,
                 detach_modulation: bool = True, weight_bce: float = 1.0, weight_dice: float = 1.0):
        super().__init__()
        if apply_nonlin not in ('softmax', 'sigmoid', None):
            raise ValueError(f"apply_nonlin must be 'softmax', 'sigmoid' or None, got {apply_nonlin!r}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha (class balance) must lie in [0, 1], got {alpha}")
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if not 0 < margin <= 0.5:
            raise ValueError(f"margin must lie in (0, 0.5] (it bounds |Y - 0.5| away from 0), got {margin}")
        if smooth < 0:
            raise ValueError(f"smooth must be >= 0, got {smooth}")
        self.apply_nonlin = apply_nonlin
        self.do_bg = (apply_nonlin != 'softmax') if do_bg is None else do_bg
        self.alpha, self.gamma, self.margin, self.smooth = float(alpha), float(gamma), float(margin), float(smooth)
        self.batch_dice = batch_dice
        self.detach_modulation = detach_modulation
        self.weight_bce, self.weight_dice = float(weight_bce), float(weight_dice)

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x``: (B, C, *spatial) logits; ``y``: label map (B, 1, *spatial) or (B, *spatial), or a target of
        ``x``'s shape (one-hot or regions, values in [0, 1]); ``loss_mask``: (B, 1, *spatial), 1 where the
        loss counts (0 on nnU-Net's ignore label)."""
        if x.ndim < 3:
            raise ValueError(f"HybridLoss expects (B, C, *spatial) logits, got shape {tuple(x.shape)}")
        if self.apply_nonlin == 'softmax' and x.shape[1] < 2:
            raise ValueError(f"softmax over {x.shape[1]} channel: use apply_nonlin='sigmoid' for a single "
                             f"(binary) output channel")
        if not self.do_bg and x.shape[1] < 2:
            raise ValueError(f"do_bg=False drops channel 0 and leaves no class of the {x.shape[1]}-channel input")
        acc = torch.promote_types(x.dtype, torch.float32)
        x = x.to(acc)
        with torch.no_grad():
            mask = None
            if loss_mask is not None:
                if loss_mask.shape[0] != x.shape[0] or loss_mask.shape[1] != 1 or loss_mask.shape[2:] != x.shape[2:]:
                    raise ValueError(f"loss_mask must have shape (B, 1, *spatial) = {(x.shape[0], 1, *x.shape[2:])}, "
                                     f"got {tuple(loss_mask.shape)}")
                mask = loss_mask.to(acc)
            target = self._target(x, y, acc, mask)

        log_p, log_q = self._log_probs(x)  # log Y, log(1 - Y) per channel
        if not self.do_bg:
            target, log_p, log_q = target[:, 1:], log_p[:, 1:], log_q[:, 1:]
        p = log_p.exp()

        # focal-style BCE (Eq. 8, first term; alpha_t of Eq. 7)
        modulation = (p - 0.5).abs().clamp_min(self.margin).pow(-self.gamma)
        if self.detach_modulation:
            modulation = modulation.detach()
        bce = -(self.alpha * target * log_p + (1 - self.alpha) * (1 - target) * log_q) * modulation
        if mask is not None:
            bce = bce * mask
            n = mask.sum() * bce.shape[1]
            bce_term = bce.sum() / n.clamp_min(1)
        else:
            bce_term = bce.mean()

        # soft Dice with squared denominator (Eq. 5, Eq. 8 second term)
        if mask is not None:
            p, target = p * mask, target * mask
        axes = tuple(range(2, x.ndim))
        if self.batch_dice:
            axes = (0,) + axes
        intersect = (p * target).sum(axes)
        denom = (p * p).sum(axes) + (target * target).sum(axes)
        dice = (2 * intersect + self.smooth) / (denom + self.smooth).clamp_min(1e-8)
        dice_term = (1 - dice).mean()
        return self.weight_bce * bce_term + self.weight_dice * dice_term

    def _log_probs(self, x: torch.Tensor):
        if self.apply_nonlin == 'sigmoid':
            return F.logsigmoid(x), F.logsigmoid(-x)
        if self.apply_nonlin is None:
            eps = 1e-7
            return x.clamp(eps, 1).log(), (1 - x).clamp(eps, 1).log()
        log_p = torch.log_softmax(x, 1)
        # log(1 - P_c) = logsumexp_{k != c} x_k - logsumexp_k x_k, exact where P_c rounds to 1
        lse = torch.logsumexp(x, 1, keepdim=True)
        log_q = []
        for c in range(x.shape[1]):
            others = torch.cat([x[:, :c], x[:, c + 1:]], 1)
            log_q.append(torch.logsumexp(others, 1, keepdim=True) - lse)
        return log_p, torch.cat(log_q, 1)

    @staticmethod
    def _target(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Target of ``x``'s shape; label values under ``mask == 0`` (the ignore label) are set to 0 first."""
        if y.ndim == x.ndim - 1:
            y = y.unsqueeze(1)
        if y.shape == x.shape:
            if y.numel() and (y.min() < 0 or y.max() > 1):
                raise ValueError(f"target of the prediction's shape {tuple(x.shape)} must be one-hot/regions in [0, 1] "
                                 f"(for one binary channel: a label map of {{0, 1}}), got values in "
                                 f"[{y.min().item()}, {y.max().item()}]")
            return y.to(dtype)
        if y.ndim != x.ndim or y.shape[1] != 1 or y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
            raise ValueError(f"target shape {tuple(y.shape)} does not match prediction {tuple(x.shape)}: expected a "
                             f"label map (B, 1, *spatial) or a one-hot/region target of the prediction's shape")
        labels = y.long()
        if mask is not None:
            labels = torch.where(mask > 0, labels, torch.zeros_like(labels))
        if x.shape[1] == 1:  # binary output channel, label map of {0, 1}
            if labels.numel() and (labels.min() < 0 or labels.max() > 1):
                raise ValueError(f"one output channel (binary) but the label map has values "
                                 f"{sorted(torch.unique(labels).tolist())}; expected {{0, 1}}")
            return labels.to(dtype)
        if labels.numel() and (labels.min() < 0 or labels.max() >= x.shape[1]):
            raise ValueError(f"label map has values {sorted(torch.unique(labels).tolist())} but the prediction has "
                             f"{x.shape[1]} classes (0..{x.shape[1] - 1}); pass the ignore label's voxels as "
                             f"loss_mask == 0")
        onehot = torch.zeros(x.shape, device=x.device, dtype=dtype)
        onehot.scatter_(1, labels, 1)
        return onehot


class NNUNetTargetHybridLoss(nn.Module):
    """:class:`HybridLoss` on targets as nnU-Net's data pipeline delivers them: a label map whose
    ``ignore_label`` voxels count in neither term, or (region training) region channels followed by
    nnU-Net's ignore channel when ``has_ignore_channel`` (the same conventions as nnU-Net's
    ``DC_and_CE_loss`` / ``DC_and_BCE_loss``)."""

    def __init__(self, hybrid: HybridLoss, ignore_label: Optional[int] = None, has_ignore_channel: bool = False):
        super().__init__()
        if ignore_label is not None and has_ignore_channel:
            raise ValueError("ignore_label is for label maps, has_ignore_channel for region targets: not both")
        self.hybrid = hybrid
        self.ignore_label = ignore_label
        self.has_ignore_channel = has_ignore_channel

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.has_ignore_channel:
            return self.hybrid(x, y[:, :-1], (1 - y[:, -1:]).to(x.dtype))
        if self.ignore_label is not None:
            return self.hybrid(x, y, (y != self.ignore_label).to(x.dtype))
        return self.hybrid(x, y)
