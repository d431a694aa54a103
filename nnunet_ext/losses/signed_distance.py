"""Signed distance maps of ground-truth masks: Phi of Eq. 7 in the multi-level structural loss paper
(``shared/papers/multi_level_structural_loss.md``), the weight map of Kervadec et al.'s boundary
loss (Eq. 6; "Boundary loss for highly unbalanced segmentation", MIDL 2019 / MedIA 2021).

    Phi(x) = -dist(x, dD)  for x in D,     0 on dD,     +dist(x, dD)  outside D,

in physical units (the voxel spacing), computed by scipy's exact Euclidean distance transform.

Convention (Kervadec's ``one_hot2dist``, made exact for any spacing): on the voxel grid the
interface ``dD`` is the set of voxels of ``D`` that have a face-neighbour outside ``D`` (the
object's inner boundary; the border of the array is not an interface, as in Kervadec's code).
Outside ``D`` the value is the distance to the nearest voxel of ``D`` (always an interface voxel),
exactly Kervadec's ``edt(~D)``; inside it is minus the distance to the nearest interface voxel.
Kervadec writes the inside as ``-(edt(D) - 1)``, which is the same on straight and convex voxel
edges at unit spacing but, with a spacing in millimetres, no longer vanishes on the boundary (it
subtracts one millimetre, not one voxel step); ours is 0 on every boundary voxel for any spacing.
A class absent from the case gives zeros (Kervadec: "leave blank the negative classes"), and so
does a class filling the whole array (it has no interface inside it).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

__all__ = ["signed_distance_map", "signed_distance_maps"]


def _spacing(spacing: Optional[Sequence[float]], ndim: int) -> tuple:
    if spacing is None:
        return (1.0,) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must hold {ndim} positive finite numbers (one per axis), got {spacing}")
    return spacing


def signed_distance_map(mask: np.ndarray, spacing: Optional[Sequence[float]] = None,
                        dtype=np.float32) -> np.ndarray:
    """Phi (Eq. 7) of one binary mask of any dimension, with ``spacing`` per axis (default 1).

    Negative inside, 0 on the inner boundary voxels, positive outside; all zeros for an empty or
    full mask. See the module docstring for the convention.
    """
    mask = np.asarray(mask)
    if mask.ndim == 0:
        raise ValueError("mask must have at least one axis")
    mask = mask.astype(bool, copy=False)
    spacing = _spacing(spacing, mask.ndim)
    if not mask.any() or mask.all():
        return np.zeros(mask.shape, dtype=dtype)
    face = ndimage.generate_binary_structure(mask.ndim, 1)
    interior = ndimage.binary_erosion(mask, structure=face, border_value=1)
    boundary = mask & ~interior
    distance = ndimage.distance_transform_edt(~boundary, sampling=spacing)
    return (np.where(mask, -distance, distance) + 0.0).astype(dtype, copy=False)  # + 0.0: no -0.0


def signed_distance_maps(labels: np.ndarray, classes: Sequence, spacing: Optional[Sequence[float]] = None,
                         dtype=np.float32) -> np.ndarray:
    """Phi per class of a label map: ``(len(classes), *labels.shape)``.

    Each entry of ``classes`` is a label value or a sequence of label values (a region, their
    union). Voxels of any other value (background, other classes, the ignore label) are outside.
    """
    labels = np.asarray(labels)
    out = np.empty((len(classes), *labels.shape), dtype=dtype)
    for i, c in enumerate(classes):
        member = np.isin(labels, np.atleast_1d(np.asarray(c)))
        out[i] = signed_distance_map(member, spacing, dtype)
    return out
