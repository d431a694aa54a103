"""Boundary loss of Kervadec et al. (Eq. 6 of the multi-level structural loss paper,
``docs/methods/multi-level-structural.md``, Section 2.1.2): the boundary term E_B of Eq. 11.

    E_B = mean_{c in foreground} mean_{x in Omega} P_c(x) * Phi_c(x) / s_c,                    (Eq. 6)

``P`` the softmax (labels) or sigmoid (regions) probabilities, ``Phi_c`` the signed distance map of
class ``c``'s ground truth (Eq. 7, :mod:`nnunet_ext.losses.signed_distance`: negative inside,
positive outside, in the units of the voxel spacing) and ``s_c`` a per-(sample, class) scale.

Normalisation (``normalization``; the balanced form is the default):

- ``'mean'`` (default): ``s = mean_x |Phi(x)|`` over the patch, per sample and class. Then
  ``E_B`` of every (sample, class) lies in ``[-1, 1]`` (``sum P Phi / sum |Phi|`` without ignored
  voxels; ``-1``..``0`` at the optimum, like nnU-Net's negative soft Dice), is unit-free (a ratio of
  two distances: the same loss for a spacing in mm or in m) and its gradient
  ``dE_B/dP(x) = Phi(x) / (s N)`` has a mean magnitude of exactly ``1/N`` per voxel, that of a
  voxel-mean cross-entropy. At initialisation (``P ~ 1/C``) it is ``~ mean(Phi)/(C s)``, a few
  tenths, where nnU-Net's Dice + CE is ~1.
- ``'max'``: ``s = max_x |Phi(x)|``, ``Phi / s`` in ``[-1, 1]``: the normalised signed distance of
  Ma et al. ("How distance transform maps boost segmentation CNNs", MIDL 2020, the paper's ref.
  [61], who normalise inside and outside separately; one scale keeps ``Phi / s`` a scaled distance
  function) and of Xue et al. [52]. Its values are ~3x smaller than ``'mean'`` (max/mean ~ 2.5-4 on
  organ patches), ~0.1 at initialisation.
- ``None``: the literal form of the paper and of Kervadec et al., ``mean(P Phi)`` in the units of
  ``Phi``: millimetres, ~10-30 at initialisation on 2D 256^2 / 3D 128^3 patches, a term that swamps
  the region term (nnU-Net's trainers then predict background everywhere), and that changes with
  the unit of the spacing. Kervadec et al. counter it with the rebalancing schedule
  ``a E_R + (1 - a) E_B`` (:class:`~nnunet_ext.losses.schedules.KervadecRebalanceSchedule`).

Dividing a (sample, class) term by a positive constant computed from the target keeps its minimiser
(the ground truth: probability 1 where Phi < 0, 0 where Phi > 0) and the relative weight of its
voxels; it changes how much each (sample, class) weighs, as the per-sample Dice of nnU-Net does.
A per-configuration constant instead (e.g. the patch diagonal in mm, which also makes ``Phi``
unit-free and ``|Phi| <= 1``) would keep Kervadec's relative weighting of samples, but leaves
``E_B`` at ~0.05 at initialisation on the patches above, 20-30x under the region term.
An all-zero ``Phi`` (class absent from the patch, or filling it: Phi undefined) contributes 0, as in
Kervadec's code ("leave blank"), and still counts in the mean over classes. The scale is per sample:
it does not depend on the other samples of the batch, nor on the other processes under DDP.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

__all__ = ["BoundaryLoss", "normalize_distance", "NORMALIZATIONS"]

NORMALIZATIONS = ('mean', 'max', None)


def check_normalization(normalization) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS} ('mean': balanced, the default; None: "
                         f"the paper's literal form in the units of the spacing), got {normalization!r}")


def normalize_distance(distance: torch.Tensor, normalization: Optional[str] = 'mean'
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(Phi / s, defined)`` for distance maps (B, K, *spatial): ``s`` per (sample, class), the mean
    (``'mean'``) or maximum (``'max'``) of ``|Phi|`` over the patch (``None``: ``s = 1``, Phi unchanged);
    ``defined`` (B, K) is False where Phi is all zero (class absent or filling the patch; Phi / s is 0
    there). Runs on the device without synchronising (no data-dependent branch)."""
    check_normalization(normalization)
    magnitude = distance.abs().flatten(2)
    scale = magnitude.amax(2) if normalization == 'max' else magnitude.mean(2)
    defined = scale > 0
    if normalization is None:
        return distance, defined
    scale = torch.where(defined, scale, torch.ones_like(scale))
    return distance / scale.reshape(*scale.shape, *([1] * (distance.ndim - 2))), defined


class BoundaryLoss(nn.Module):
    """``mean(P_c * Phi_c / s_c)`` over foreground classes, samples and (valid) voxels (Eq. 6).

    Args:
        use_sigmoid: probabilities by sigmoid per channel (region-based training: every channel is a
            foreground region) instead of softmax over channels (labels: channel 0 is background).
        normalization: ``'mean'`` (default), ``'max'`` or ``None`` (the literal form); see the module
            docstring.

    ``forward(logits, distance, loss_mask=None)``: ``logits`` (B, C, *spatial); ``distance``
    (B, K, *spatial) with K = C - 1 foreground classes (softmax, class ``k`` = channel ``k + 1``) or
    K = C (sigmoid); ``loss_mask`` (B, 1, *spatial), 1 where the voxel counts (0 on the ignore label).
    A batch without any valid voxel gives 0 (with a gradient of zeros). Half-precision logits are
    computed in float32.
    """

    def __init__(self, use_sigmoid: bool = False, normalization: Optional[str] = 'mean'):
        super().__init__()
        check_normalization(normalization)
        self.use_sigmoid = use_sigmoid
        self.normalization = normalization

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
        if loss_mask is not None and tuple(loss_mask.shape) != (logits.shape[0], 1, *logits.shape[2:]):
            raise ValueError(f"loss_mask must have shape {(logits.shape[0], 1, *logits.shape[2:])}, "
                             f"got {tuple(loss_mask.shape)}")
        dtype = torch.promote_types(logits.dtype, torch.float32)  # half/bfloat16 -> float32
        logits = logits.to(dtype)
        distance, _ = normalize_distance(distance.to(dtype), self.normalization)
        probabilities = torch.sigmoid(logits) if self.use_sigmoid else torch.softmax(logits, 1)[:, 1:]
        weighted = probabilities * distance
        if loss_mask is None:
            return weighted.mean()
        mask = loss_mask.to(dtype)
        return (weighted * mask).sum() / (mask.sum() * classes).clamp_min(1)
