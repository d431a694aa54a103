"""Gradient-optimized Dice loss (GODC) of "Towards Accurate Medical Image Segmentation With
Gradient-Optimized Dice Loss" (``docs/methods/godc-lfam.md``).

The gradient of the soft Dice loss with respect to a prediction is inversely proportional to the
soft union ``U = sum(P + G - P*G)`` (Eq. 7): small objects get large steps, large objects small
ones. GODC multiplies each sample's Dice loss by its union normalised within the batch (Eq. 8),

    L = mean_{b,c} (1 - DC_bc) * w_bc,    w_bc = stopgrad(U_bc / mean_b' U_b'c) ** p,

so that the gradient no longer depends on the object's size. ``p = 1`` is the paper's loss,
``p = 2`` its "more aggressive" variant ``(||U||*)^2``, whose gradient grows with object size.

Samples without foreground. Where class ``c`` is absent from sample ``b`` (``G_bc = 0``: an
all-background patch, frequent with nnU-Net's patch sampling), ``I = 0``, ``U = sum P`` and
``DC = smooth / (sum P + smooth)``: with the default ``smooth = 1e-5`` the Dice is ~0 (the term ~1 *
w) unless the predicted soft volume falls below ~1e-5, and its gradient ``smooth / (sum P + smooth)^2``
vanishes (measured: gradient norm 2e-11 on such a 64^2 sample against 2e-3 on a sample with
foreground). Eq. 7 says why: the Dice gradient on a false positive is proportional to the IoU, which
is 0 there. Dice alone therefore does not push false positives down on background-only patches
(nnU-Net's batch Dice does, through the batch's union; CE does, where present). GODC's own weight
gives the fix: on such a sample ``(1 - DC) * U / mean U ~ sum P / mean U``, the false-positive
volume in units of the batch's mean union. With ``empty_gradient`` (default) the weight carries its
gradient on exactly these (sample, class) pairs, ``w_bc = (U_bc / stopgrad(mean_b' U_b'c)) ** p``, so
a false positive there gets ``~(1 - DC) / mean U`` per voxel: the same scale as GODC's gradient on a
sample with foreground (``~1 / mean U``, Eq. 7 times the weight), still independent of the object's
size. The loss *value* is Eq. 8's either way; only the gradient on absent classes changes.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn


class GODCLoss(nn.Module):
    """Per-sample, per-class soft Dice loss weighted by the batch-normalised soft union (Eq. 8).

    ``DC_bc = (2 I_bc + smooth) / (sum P_bc + sum G_bc + smooth)`` is the soft Dice of Eq. 2
    (``I + U = sum P + sum G``) and ``U_bc`` the soft union of Eq. 1, both summed over the
    spatial axes of sample ``b`` and channel ``c`` (voxels outside ``loss_mask`` excluded).
    The weight carries no gradient where the class is present in the sample (on absent classes see
    ``empty_gradient``). Terms are always per sample: a batch-wide union (nnU-Net's
    ``batch_dice``) would make every weight 1 and collapse GODC to Dice. With one sample, or
    equal unions, GODC equals ``1 - DC``.

    Args:
        apply_nonlin: applied to the network output first (softmax over channels for labels,
            sigmoid for regions); ``None`` if ``x`` already holds probabilities.
        do_bg: keep channel 0. ``False`` for softmax outputs (background), ``True`` for regions.
        smooth: added to numerator and denominator of Dice. A class absent from a sample has ``DC =
            smooth / (sum P + smooth)``: 1 (loss 0) only if the predicted soft volume ``sum P`` is far
            below ``smooth``; with the default 1e-5 and any realistic prediction it is ~0 (loss ~1 times
            the weight), without gradient (see ``empty_gradient``). Empty class and empty prediction:
            ``DC = 1``, no NaN.
        exponent: ``p`` above. 1 is the paper's GODC, 2 the aggressive variant.
        ddp: under ``torch.distributed``, normalise the unions by the mean over the *global*
            batch (all ranks, gathered without gradient); otherwise by the local batch. nnU-Net
            averages gradients over ranks, so the global mean makes a multi-GPU step equal to a
            single-GPU step on the whole batch. Ignored when no process group is initialised.
        eps: lower bound on the normalising mean union; a class with zero union in every sample
            gets weight 0 (its Dice is 1 there anyway).
        empty_gradient: where the class is absent from the sample, let the union weight carry its
            gradient (a false-positive term on background-only samples; module docstring). ``False``:
            the weight is detached everywhere (such samples then get no gradient).
    """

    def __init__(self, apply_nonlin: Optional[Callable] = None, do_bg: bool = True, smooth: float = 1e-5,
                 exponent: float = 1.0, ddp: bool = True, eps: float = 1e-8, empty_gradient: bool = True):
        super().__init__()
        if not exponent >= 0:  # also refuses NaN
            raise ValueError(f"GODC exponent must be >= 0 (1: paper, 2: aggressive variant), got {exponent}")
        if smooth < 0:
            raise ValueError(f"smooth must be >= 0, got {smooth}")
        self.apply_nonlin = apply_nonlin
        self.do_bg = do_bg
        self.smooth = float(smooth)
        self.exponent = float(exponent)
        self.ddp = ddp
        self.eps = eps
        self.empty_gradient = empty_gradient

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x``: (B, C, *spatial) logits (or probabilities); ``y``: label map (B, 1, *spatial) or
        (B, *spatial), or a one-hot/region target of ``x``'s shape; ``loss_mask``: (B, 1,
        *spatial), 1 where the loss counts (nnU-Net's ignore-label mask)."""
        if x.ndim < 3:
            raise ValueError(f"GODCLoss expects (B, C, *spatial) input, got shape {tuple(x.shape)}")
        if not self.do_bg and x.shape[1] < 2:
            raise ValueError(f"do_bg=False drops channel 0 and leaves no class of the {x.shape[1]}-channel input")
        if self.apply_nonlin is not None:
            x = self.apply_nonlin(x)
        axes = tuple(range(2, x.ndim))
        acc = torch.promote_types(x.dtype, torch.float32)  # sums in fp32 under AMP, fp64 for fp64 input

        with torch.no_grad():
            y_onehot = self._one_hot(x, y, acc)
            if loss_mask is not None:
                if loss_mask.shape[0] != x.shape[0] or loss_mask.shape[2:] != x.shape[2:] or loss_mask.shape[1] != 1:
                    raise ValueError(f"loss_mask must have shape (B, 1, *spatial) = {(x.shape[0], 1, *x.shape[2:])}, "
                                     f"got {tuple(loss_mask.shape)}")
                y_onehot = y_onehot * loss_mask
            if not self.do_bg:
                y_onehot = y_onehot[:, 1:]
            sum_gt = y_onehot.sum(axes, dtype=acc)

        if not self.do_bg:
            x = x[:, 1:]
        if loss_mask is not None:
            x = x * loss_mask
        intersect = (x * y_onehot).sum(axes, dtype=acc)
        sum_pred = x.sum(axes, dtype=acc)

        dice = (2 * intersect + self.smooth) / (sum_pred + sum_gt + self.smooth).clamp_min(1e-8)
        union = sum_pred + sum_gt - intersect
        # the weight carries gradient only where the class is absent from the sample (I = 0, U = sum P)
        absent = (sum_gt == 0) if self.empty_gradient else None
        return ((1 - dice) * self._union_weight(union, absent)).mean()

    @staticmethod
    def _one_hot(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if y.ndim == x.ndim - 1:
            y = y.unsqueeze(1)
        if y.shape == x.shape:
            return y.to(dtype)
        if y.ndim != x.ndim or y.shape[1] != 1 or y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]:
            raise ValueError(f"target shape {tuple(y.shape)} does not match prediction {tuple(x.shape)}: expected a "
                             f"label map (B, 1, *spatial) or a one-hot target of the prediction's shape")
        y_onehot = torch.zeros(x.shape, device=x.device, dtype=dtype)
        y_onehot.scatter_(1, y.long(), 1)
        return y_onehot

    def _union_weight(self, union: torch.Tensor, absent: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(U_bc / stopgrad(mean_b U_bc)) ** p`` for a (B, C) tensor of unions, with gradient through
        ``U_bc`` only where ``absent`` and ``U_bc > 0`` (and the class's mean union is above ``eps``: a
        class empty and predicted empty everywhere keeps weight ~0 and no gradient). No host-device synchronisation:
        the sample count joins the all-reduce as a device tensor."""
        with torch.no_grad():
            if self.ddp and dist.is_available() and dist.is_initialized():
                # one all-reduce of [sum of unions per class, number of samples]: ranks may hold different
                # batch sizes
                stats = torch.cat([union.sum(0), torch.ones_like(union[:, 0]).sum(0, keepdim=True)])
                dist.all_reduce(stats)
                mean = stats[:-1] / stats[-1]
            else:
                mean = union.mean(0)
            live = mean > self.eps
            mean = mean.clamp_min(self.eps)
        if absent is None:
            union = union.detach()
        else:
            # U = 0 (nothing predicted) needs no push, and (U / mean) ** p has an infinite slope there for p < 1
            union = torch.where(absent & live & (union > 0), union, union.detach())
        weight = union / mean
        return weight if self.exponent == 1 else weight.pow(self.exponent)
