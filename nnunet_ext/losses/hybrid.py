"""Hybrid loss of ANU-Net (``docs/methods/anunet.md``, Section 3.4, Eq. 8):
a focal-style binary cross-entropy term plus soft Dice, for each deep-supervision head.

Eq. 8 reads ``Loss = sum_i ( 1 - [ alpha * Ybar * log(Y_i) / |Y_i - 0.5|^gamma + (2 Y_i Ybar + s) /
(Y_i^2 + Ybar^2 + s) ] )`` with ``Ybar`` the ground truth, ``Y_i`` the probabilities of head ``X_{0,i}``
and ``s`` the Dice smoothing. Our reading, per head (:class:`HybridLoss` is one summand; Eq. 8's sum
over the heads is nnU-Net's deep-supervision wrapper with equal weights):

    L = weight_bce * FBCE + weight_dice * mean_c [ 1 - DC_c ]

* ``DC_c = (2 sum(Y Ybar) + s) / (sum Y^2 + sum Ybar^2 + s)``: the soft Dice of Eq. 5 with squared
  terms in the denominator, as Eq. 8 writes it; sums over each sample's voxels (averaged over the
  samples) or, with ``batch_dice``, over the whole batch (under DDP: the global batch, see below).
* Per voxel and class, ``bce = -[alpha Ybar log Y + (1 - alpha)(1 - Ybar) log(1 - Y)]``. Eq. 8 prints
  only the positive part ``alpha Ybar log Y`` (inside ``1 - [...]``, i.e. ``-alpha Ybar log Y`` in the
  loss), but the text calls the term "binary cross entropy" and describes ``alpha`` as a class balance:
  RetinaNet's ``alpha_t`` (Eq. 7), which weighs the negatives by ``1 - alpha``. We use the full BCE with
  ``alpha_t``. The text's reason for ``alpha`` is to lower the weight of the *more frequent* class (it
  calls the healthy voxels positive and lowers their weight); in a label map of an organ or lesion the
  frequent class is the background, so the default ``alpha = 0.75`` weighs an object voxel 3x a
  background voxel. RetinaNet's 0.25 (our default until it failed on real images) does the opposite:
  each object voxel weighs a third of a background voxel. 0.5 is cross-entropy's balance.
* The modulating weight (``modulation``). Eq. 8's factor ``|Y - 0.5|^-gamma`` is meant to make hard voxels
  count more (Section 3.4). Taken literally (``'literal'``) it is largest for *uncertain* voxels
  (``Y`` near 0.5) and small for *confidently wrong* ones: an object voxel at ``Y = 0.02`` weighs
  ``0.48^-2 ~ 4`` against 400 for a voxel at ``Y = 0.5``, the same as a background voxel predicted right
  at 0.02. A network that has settled on background (every object voxel wrong at ``Y ~ 0.02``) then
  learns least from the voxels it gets most wrong: in the weighted mean a few uncertain background
  voxels take the weight (measured on a 64^2 patch, 8 % object at ``Y = 0.02``: the focal-BCE gradient
  on the object logits is 0.25x cross-entropy's, 0.01x with 20 % of the background uncertain at 0.45;
  ANU-Net's pseudo-Dice stayed 0 on real polyp and nerve-ultrasound images while the same network
  learned with nnU-Net's Dice+CE). The default ``'hardness'`` measures hardness by the probability of
  the *right* answer, ``p_t = Ybar Y + (1 - Ybar)(1 - Y)``:

      w = max(p_t - 0.5, margin)^-gamma        (p_t - 0.5 = (2 Ybar - 1)(Y - 0.5))

  On the right side of 0.5 this is exactly Eq. 8's ``|Y - 0.5|^-gamma`` (an uncertain voxel counts more
  than a confident right one); on the wrong side it is the largest weight, ``margin^-gamma``, as for a
  voxel at 0.5. The weight then falls monotonically with ``p_t``, as RetinaNet's ``(1 - p_t)^gamma``
  does, the factor Eq. 8 cites. ``|Y - 0.5|`` (or ``p_t - 0.5``) is clamped to ``margin`` (default
  0.05) so the weight stays finite. ``detach_modulation`` (default) treats ``w`` as a weight without
  gradient: differentiated, ``-log(Y) |Y - 0.5|^-gamma`` *decreases* as a positive voxel's ``Y`` falls
  below 0.5 towards 0.3 (the factor shrinks faster than ``-log Y`` grows), so the literal gradient pushes
  hard voxels away from 0.5 in either direction, also the wrong one (``'hardness'`` is constant on the
  wrong side and has no such pull).

Scale of the focal-BCE term (``bce_normalization``). Eq. 8 leaves the reduction open; the mean over
voxels, ``FBCE = mean(w * bce)`` (``'voxels'``, the literal form), is badly out of scale: ``w >= 2^gamma``
everywhere and ``w = margin^-gamma = 400`` (gamma 2) at ``Y = 0.5``, which is where every voxel starts
(two-class softmax or sigmoid of near-zero logits). At initialisation the term is then about
``0.69 * 0.75 * 400 ~ 200`` (alpha 0.25) against a Dice term ``<= 1`` (measured: 197 vs 1.0 on an empty
256^2 patch, 184 vs 0.72 at 10% foreground); after nnU-Net's gradient clipping (norm 12) the Dice part of
the step is lost, and ANU-Net's pseudo-Dice stayed 0 on real data (the first of two failures on real
images; the literal modulation above is the second). RetinaNet, whose factor the paper cites, has the
opposite arrangement: ``(1 - p_t)^gamma <= 1`` only *down*-weights easy examples, the sum is normalised
by the number of positive anchors, and the classifier's prior-probability bias keeps the loss of the
many easy negatives small at the start, so its focal term is O(1). What Eq. 8's factor is meant to do
(Section 3.4: hard voxels count more than easy ones) is a *relative* weighting. The default
``'weights'`` keeps exactly these relative weights and drops the absolute scale: the modulated BCE is
a weighted mean,

    FBCE = sum_{v,c} w_vc * bce_vc / sum_{v,c} stopgrad(w_vc)                        (voxels under
                                                                                    loss_mask only)

At initialisation every ``w`` is about the same, so ``FBCE`` is the alpha-balanced BCE (0.17 on an
empty patch with alpha 0.75, 0.52 with 0.25; Dice 1.0): within 10x of the Dice term on any patch.
Later it is the BCE of the hard (wrong or uncertain) voxels (the weighted mean tilts towards them) and
stays O(1); a fixed normaliser such as the weight at initialisation (``margin^-gamma``) would instead
shrink the term 100x once the predictions are confident (``w -> 2^gamma``). The normaliser carries no
gradient (a scale, like RetinaNet's anchor count), so the gradient of each voxel is the modulation's,
divided by the batch's total weight.

Multi-class (our generalisation; the paper is binary): ``apply_nonlin='softmax'`` turns ``C`` logits
into probabilities, the label map into one-hot targets, and each foreground class ``c`` (channel 0,
the background, is dropped unless ``do_bg``) contributes one-vs-rest terms with ``Y = P_c``,
``1 - Y = sum_{k != c} P_k`` (computed in log space); the Dice term is averaged over those classes, the
focal BCE is one (weighted) mean over voxels and classes. ``apply_nonlin='sigmoid'`` is the paper's
binary case (one logit channel per class or region, nnU-Net's region training; ``do_bg`` defaults to
True there). Voxels where ``loss_mask`` is 0 (nnU-Net's ignore label) count in neither term.

Multi-GPU (``ddp``, as nnU-Net's ``MemoryEfficientSoftDiceLoss``). nnU-Net averages the ranks'
gradients. With ``ddp=True`` and an initialised process group, (1) with ``batch_dice`` the Dice sums
(intersection, ``sum Y^2``, ``sum Ybar^2`` per class) are summed over the ranks by an all-reduce whose
backward all-reduces the gradient (nnU-Net's ``AllGatherGrad`` does the same), so the Dice is the one of
the global batch; (2) the focal-BCE normaliser is the mean over the ranks of their ``sum w``. A step on
``W`` ranks then equals one process on the concatenated batch (the BCE part and the batch Dice also for
unequal per-rank batch sizes; the per-sample Dice, ``batch_dice=False``, and ``'voxels'``, whose
normaliser is the local voxel count as in nnU-Net's CE, for equal ones). Without ``ddp`` each rank uses
its local batch.

No host-device synchronisation: the forward reads no tensor value on the host (the shapes are checked,
which is free). Label *values* are not validated per call (nnU-Net's losses do not either;
``nnUNetv2_plan_and_preprocess --verify_dataset_integrity`` checks them once per dataset);
``check_values=True`` adds that check, with a clear message, at the cost of a synchronisation per call.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

BCE_NORMALIZATIONS = ('weights', 'voxels')
MODULATIONS = ('hardness', 'literal')


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of the default process group; the backward sums the gradients over the ranks
    (each rank's loss depends on every rank's input), as nnU-Net's ``AllGatherGrad`` does."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class HybridLoss(nn.Module):
    """Focal-style BCE + soft Dice of Eq. 8, for one head's logits (see the module docstring).

    Args:
        apply_nonlin: ``'softmax'`` (labels: one channel per class incl. background), ``'sigmoid'``
            (binary/regions: independent channels) or ``None`` (``x`` already holds probabilities of
            independent channels; then ``log`` is taken with a clamp at ``1e-7``).
        do_bg: keep channel 0. Default: ``False`` for softmax, ``True`` otherwise.
        alpha: class balance of Eq. 8/Eq. 7 (weight of positive voxels; negatives get ``1 - alpha``);
            0.75 (default) weighs the object's voxels 3x the background's (see the module docstring).
        gamma: exponent of the modulating weight; 0 gives plain balanced BCE.
        margin: lower bound on ``|Y - 0.5|`` (``p_t - 0.5`` for ``'hardness'``; > 0) so the weight stays
            finite at and near 0.5.
        smooth: ``s`` of the Dice term.
        batch_dice: one Dice per class over the whole batch (nnU-Net's ``batch_dice``) instead of one
            per sample and class.
        detach_modulation: no gradient through the modulating weight.
        weight_bce, weight_dice: weights of the two terms (both 1 in Eq. 8).
        modulation: ``'hardness'`` (default): ``w = max(p_t - 0.5, margin)^-gamma`` with ``p_t`` the
            probability of the true answer, i.e. Eq. 8's ``|Y - 0.5|^-gamma`` on the right side of 0.5 and
            the largest weight ``margin^-gamma`` on the wrong side; ``'literal'``: Eq. 8's
            ``max(|Y - 0.5|, margin)^-gamma`` everywhere (a confidently wrong voxel then weighs ~100x less
            than an uncertain one).
        bce_normalization: ``'weights'`` (default): the modulated BCE divided by the sum of the
            modulating weights, a weighted mean of the BCE on the Dice term's scale; ``'voxels'``: divided
            by the number of voxels, Eq. 8's literal scale (~200 at initialisation with the defaults).
        ddp: under ``torch.distributed``, the batch Dice and the BCE normaliser of the global batch
            (nnU-Net's ``ddp`` flag); ignored when no process group is initialised.
        check_values: validate the label values on every call (a host-device synchronisation per call;
            for debugging).
    """

    def __init__(self, apply_nonlin: Optional[str] = 'softmax', do_bg: Optional[bool] = None, alpha: float = 0.75,
                 gamma: float = 2.0, margin: float = 0.05, smooth: float = 1.0, batch_dice: bool = False,
                 detach_modulation: bool = True, weight_bce: float = 1.0, weight_dice: float = 1.0,
                 bce_normalization: str = 'weights', modulation: str = 'hardness', ddp: bool = True,
                 check_values: bool = False):
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
        if bce_normalization not in BCE_NORMALIZATIONS:
            raise ValueError(f"bce_normalization must be 'weights' (weighted mean, balanced with the Dice term) or "
                             f"'voxels' (Eq. 8's literal mean over voxels), got {bce_normalization!r}")
        if modulation not in MODULATIONS:
            raise ValueError(f"modulation must be 'hardness' (the largest weight on wrong voxels, Eq. 8's elsewhere) "
                             f"or 'literal' (Eq. 8's |Y - 0.5|^-gamma everywhere), got {modulation!r}")
        self.apply_nonlin = apply_nonlin
        self.modulation = modulation
        self.do_bg = (apply_nonlin != 'softmax') if do_bg is None else do_bg
        self.alpha, self.gamma, self.margin, self.smooth = float(alpha), float(gamma), float(margin), float(smooth)
        self.batch_dice = batch_dice
        self.detach_modulation = detach_modulation
        self.weight_bce, self.weight_dice = float(weight_bce), float(weight_dice)
        self.bce_normalization = bce_normalization
        self.ddp = ddp
        self.check_values = check_values

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
        global_batch = self.ddp and _distributed()
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
        if self.modulation == 'hardness':  # p_t - 0.5 = (2 Ybar - 1)(Y - 0.5): <= 0 on the wrong side of 0.5
            distance = (2 * target - 1) * (p - 0.5)
        else:
            distance = (p - 0.5).abs()
        modulation = distance.clamp_min(self.margin).pow(-self.gamma)
        if self.detach_modulation:
            modulation = modulation.detach()
        bce = -(self.alpha * target * log_p + (1 - self.alpha) * (1 - target) * log_q) * modulation
        if mask is not None:
            bce = bce * mask
        if self.bce_normalization == 'weights':
            with torch.no_grad():
                total_weight = (modulation if mask is None else modulation * mask).sum()
                if global_batch:  # mean over the ranks of their total weight
                    dist.all_reduce(total_weight)
                    total_weight = total_weight / dist.get_world_size()
            bce_term = bce.sum() / total_weight.clamp_min(1e-12)
        elif mask is not None:
            bce_term = bce.sum() / (mask.sum() * bce.shape[1]).clamp_min(1)
        else:
            bce_term = bce.mean()

        # soft Dice with squared denominator (Eq. 5, Eq. 8 second term)
        if mask is not None:
            p, target = p * mask, target * mask
        axes = tuple(range(2, x.ndim))
        if self.batch_dice:
            axes = (0,) + axes
        intersect = (p * target).sum(axes)
        sum_p2 = (p * p).sum(axes)
        sum_t2 = (target * target).sum(axes)
        if self.batch_dice and global_batch:  # one all-reduce of the (3, C) sums, gradients summed back
            intersect, sum_p2, sum_t2 = _AllReduceSum.apply(torch.stack([intersect, sum_p2, sum_t2])).unbind(0)
        dice = (2 * intersect + self.smooth) / (sum_p2 + sum_t2 + self.smooth).clamp_min(1e-8)
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

    def _target(self, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype,
                mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Target of ``x``'s shape; label values under ``mask == 0`` (the ignore label) are set to 0 first.
        Shapes are checked here; values only with ``check_values`` (reading them syncs host and device)."""
        if y.ndim == x.ndim - 1:
            y = y.unsqueeze(1)
        if y.shape == x.shape:
            if self.check_values and y.numel() and (y.min() < 0 or y.max() > 1):
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
            if self.check_values and labels.numel() and (labels.min() < 0 or labels.max() > 1):
                raise ValueError(f"one output channel (binary) but the label map has values "
                                 f"{sorted(torch.unique(labels).tolist())}; expected {{0, 1}}")
            return labels.to(dtype)
        if self.check_values and labels.numel() and (labels.min() < 0 or labels.max() >= x.shape[1]):
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
    ``DC_and_CE_loss`` / ``DC_and_BCE_loss``). nnU-Net's region targets are ``bool`` tensors (its
    region transform makes them so); float targets work the same."""

    def __init__(self, hybrid: HybridLoss, ignore_label: Optional[int] = None, has_ignore_channel: bool = False):
        super().__init__()
        if ignore_label is not None and has_ignore_channel:
            raise ValueError("ignore_label is for label maps, has_ignore_channel for region targets: not both")
        self.hybrid = hybrid
        self.ignore_label = ignore_label
        self.has_ignore_channel = has_ignore_channel

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.has_ignore_channel:
            return self.hybrid(x, y[:, :-1], torch.logical_not(y[:, -1:]).to(x.dtype))
        if self.ignore_label is not None:
            return self.hybrid(x, y, (y != self.ignore_label).to(x.dtype))
        return self.hybrid(x, y)
