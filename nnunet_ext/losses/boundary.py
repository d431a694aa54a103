"""Boundary loss of Kervadec et al. (Eq. 6 of the multi-level structural loss paper,
``shared/papers/multi_level_structural_loss.md``, Section 2.1.2): the boundary term E_B of Eq. 11.

    E_B = mean_{c in foreground} mean_{x in Omega} P_c(x) * Phi_c(x),

``P`` the softmax (labels) or sigmoid (regions) probabilities and ``Phi_c`` the signed distance map
of class ``c``'s ground truth (:mod:`nnunet_ext.losses.signed_distance`). Phi is negative inside,
positive outside, so the loss is minimised by the ground truth itself (probability 1 where Phi < 0,
0 where Phi > 0); its value is in the units of Phi (millimetres when the maps are computed with the
voxel spacing) and is negative at the optimum.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["BoundaryLoss"]


class BoundaryLoss(nn.Module):
    """``mean(P_c * Phi_c)`` over foreground classes, samples and (valid) voxels (Eq. 6).

    Args:
        use_sigmoid: probabilities by sigmoid per channel (region-based training: every channel is a
            foreground region) instead of softmax over channels (labels: channel 0 is background).

    ``forward(logits, distance, loss_mask=None)``: ``logits`` (B, C, *spatial); ``distance``
    (B, K, *spatial) with K = C - 1 foreground classes (softmax, class ``k`` = channel ``k + 1``) or
    K = C (sigmoid); ``loss_mask`` (B, 1, *spatial), 1 where the voxel counts (0 on the ignore label).
    A batch without any valid voxel gives 0 (with a gradient of zeros).
    """

    def __init__(self, use_sigmoid: bool = False):
        super().__init__()
        self.use_sigmoid = use_sigmoid

    def forward(self, logits: torch.Tensor, distance: torch.Tensor,
                loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if logits.ndim < 3:
            raise ValueError(f"logits must be (B, C, *spatial), got shape {tuple(logits.shape)}")
        classes = logits.shape[1] if self.use_sigmoid else logits.shape[1] - 1
        if classes < 1:
            raise ValueError(f"softmax logits need a background and at least one foreground channel, "
                             f"got shape {tuple(logits.shape)}")
        expected = (logits.shape[0], classes, *logits.shape[2:])
        if tuple(distance.shape) != expected:
            kind = 'one per channel (sigmoid)' if self.use_sigmoid else 'one per foreground channel (softmax)'
            raise ValueError(f"distance maps must have shape {expected} ({kind}) for logits {tuple(logits.shape)}, "
                             f"got {tuple(distance.shape)}")
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half/bfloat16 -> float32
        probabilities = torch.sigmoid(logits) if self.use_sigmoid else torch.softmax(logits, 1)[:, 1:]
        weighted = probabilities * distance.to(logits.dtype)
        if loss_mask is None:
            return weighted.mean()
        if tuple(loss_mask.shape) != (logits.shape[0], 1, *logits.shape[2:]):
            raise ValueError(f"loss_mask must have shape {(logits.shape[0], 1, *logits.shape[2:])}, "
                             f"got {tuple(loss_mask.shape)}")
        mask = loss_mask.to(logits.dtype)
        return (weighted * mask).sum() / (mask.sum() * classes).clamp_min(1)
