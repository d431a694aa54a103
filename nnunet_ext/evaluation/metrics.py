"""Per-case segmentation metrics of one prediction against its reference: the metrics the papers
report (ANU-Net Eqs. 9-12, GODC Eqs. 9-11, IFE's Table 1, the multi-level loss paper's HD; references in
``docs/methods/``), per class (label) or per region (a union of labels, nnU-Net's region-based datasets).

With P the predicted mask, G the reference mask, TP/FP/FN/TN the voxel counts:

* Dice = 2TP / (2TP + FP + FN)  (Dice 1945; "DSC" in the papers)
* IoU = TP / (TP + FP + FN)  (Jaccard index; "JC"/"IoU")
* precision = TP / (TP + FP), recall = TP / (TP + FN)  (ANU-Net Eqs. 11-12, GODC Eqs. 10-11)
* RVD = (|P| - |G|) / |G|  (relative volume difference, signed: > 0 over-segments; IFE's RVD, as
  MedPy's ``ravd``)
* HD95, two definitions in use (``hd95``, see below): ``'pooled'`` (the default) = the 95th percentile of
  the union of both directed surface-distance sets (MedPy's ``hd95``); ``'max'`` = the larger of the two
  directed 95th percentiles (MONAI's ``compute_hausdorff_distance(percentile=95)``, DeepMind's
  ``surface-distance`` ``compute_robust_hausdorff(..., 95)``). HD = the maximum of the union (the
  Hausdorff distance of the multi-level loss paper), ASD = mean of that union (average symmetric
  surface distance of Heimann et al., IEEE TMI 2009, as in SLIVER07/LiTS). All in mm.
* volumes of P and G in mm^3 (voxel count times the voxel volume) and the voxel counts.

Surfaces and distances
    The surface of a mask is the set of its voxels that have a face-neighbour outside the mask
    (``mask & ~binary_erosion(mask, face connectivity)``); voxels on the border of the image are
    surface voxels (outside the image counts as outside the mask). Axes of length 1 are dropped
    first (nnU-Net's readers store a 2D image as a (1, H, W) volume), so a 2D case gets its 2D
    contour and its "volumes" are areas in mm^2. A voxel is a point at its centre; the distance
    from a surface voxel of P to G's surface is the Euclidean distance, in mm (the spacing of each
    axis), to the nearest surface voxel of G, computed exactly by ``scipy.ndimage.
    distance_transform_edt(~surface_G, sampling=spacing)``. This is MedPy's construction
    (``__surface_distances`` with connectivity 1). Both masks are first cropped to the bounding box
    of their union, which changes no value and needs no margin: a mask voxel on a face of that box
    has its outward neighbour outside the union, so it is a surface voxel with or without the crop,
    and the exact distance transform only needs the box that holds both surfaces.

    HD95 uses ``numpy.percentile`` (linear interpolation). ``'pooled'`` takes it on the concatenation of
    the two directed sets (P -> G and G -> P), as MedPy's ``hd95``; ``'max'`` takes it on each directed
    set and keeps the larger, as MONAI and ``surface-distance`` do (both with numpy's linear
    percentile; ``surface-distance`` weights by surface area instead of counting voxels, which we do
    not). ``'max'`` is usually the larger: above both directed percentiles lie at most 5 % of each set,
    so at most 5 % of their union; only numpy's interpolation between ranks lets the pooled value
    exceed it, on small surfaces. Published tables use both; compare like with like.

Ignore label
    Voxels whose *reference* is the ignore label are not evaluated: they are removed from both masks
    before anything is counted, so they are never TP/FP/FN/TN, never in a volume and never surface
    voxels. A mask voxel next to an ignored voxel is a surface voxel (the boundary of the evaluated
    region), so a prediction that ends anywhere inside an ignored band around the reference gets
    distance 0 there.

Empty masks (after removing ignored voxels): a ratio whose denominator is 0 is NaN, a distance to or
from an empty surface is NaN. Spelled out in :data:`CONVENTIONS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

__all__ = ["CONVENTIONS", "HD95_DEFINITIONS", "METRICS", "EvaluatedClass", "conventions", "mask_metrics",
           "case_metrics", "surface_distances"]

#: Metric names, in the order of the per-case dictionaries (and the summary's table).
METRICS = ("Dice", "IoU", "precision", "recall", "HD95", "HD", "ASD", "RVD",
           "volume_pred_mm3", "volume_ref_mm3", "n_pred", "n_ref", "TP", "FP", "FN", "TN")

#: The conventions, as written into every summary JSON.
CONVENTIONS: Dict[str, str] = {
    "Dice": "2TP/(2TP+FP+FN); NaN when prediction and reference are both empty (as nnU-Net), "
            "0 when exactly one of them is empty",
    "IoU": "TP/(TP+FP+FN) (Jaccard); NaN when both are empty (as nnU-Net), 0 when exactly one is empty",
    "precision": "TP/(TP+FP); NaN when the prediction is empty (whatever the reference)",
    "recall": "TP/(TP+FN); NaN when the reference is empty (whatever the prediction)",
    "RVD": "(|P|-|G|)/|G|, signed (positive: prediction larger); NaN when the reference is empty",
    "HD95": "95th percentile (numpy.percentile, linear) of the union of the two directed surface-distance "
            "sets P->G and G->P, in mm (--hd95 pooled: MedPy's hd95; not the max of the two directed "
            "percentiles); NaN when the prediction or the reference is empty",
    "HD": "maximum of that union (Hausdorff distance), in mm; NaN when either is empty",
    "ASD": "mean of that union (average symmetric surface distance, Heimann et al. 2009), in mm; "
           "NaN when either is empty",
    "surface": "voxels of the mask with a face-neighbour outside it (mask minus its face-connected "
               "binary erosion, scipy.ndimage); the image border counts as outside; axes of length 1 "
               "are dropped first (2D images)",
    "distance": "Euclidean distance between voxel centres in mm (image spacing), exact, by "
                "scipy.ndimage.distance_transform_edt(~surface, sampling=spacing)",
    "volume": "voxel count times the voxel volume in mm^3 (product of the spacing of the axes longer "
              "than 1: an area in mm^2 for 2D images)",
    "ignore label": "voxels whose reference is the ignore label are removed from both masks: never "
                    "counted, never surface voxels; mask voxels next to them are surface voxels",
    "aggregation": "mean, std (population, ddof=0) and median over the cases whose value is not NaN; "
                   "n_nan counts the others; all NaN -> null",
    "json": "NaN is written as null",
}

#: ``hd95`` choices: ``{name: the HD95 convention written into the summaries}``.
HD95_DEFINITIONS: Dict[str, str] = {
    "pooled": CONVENTIONS["HD95"],
    "max": "the larger of the two directed 95th percentiles (numpy.percentile, linear) of the surface distances "
           "P->G and G->P, in mm (--hd95 max: MONAI's and DeepMind surface-distance's robust Hausdorff); NaN "
           "when the prediction or the reference is empty",
}


def _check_hd95(hd95: str) -> str:
    if hd95 not in HD95_DEFINITIONS:
        raise ValueError(f"hd95 must be one of {', '.join(HD95_DEFINITIONS)}, got {hd95!r}")
    return hd95


def conventions(hd95: str = "pooled") -> Dict[str, str]:
    """:data:`CONVENTIONS` with the HD95 entry of the chosen definition (written into every summary)."""
    return {**CONVENTIONS, "HD95": HD95_DEFINITIONS[_check_hd95(hd95)]}


@dataclass(frozen=True)
class EvaluatedClass:
    """One evaluated class: a label (``labels`` of length 1) or a region (the union of ``labels``)."""
    name: str
    labels: Tuple[int, ...]

    def __post_init__(self):
        if not self.labels:
            raise ValueError(f"class {self.name!r} has no labels")

    @property
    def is_region(self) -> bool:
        return len(self.labels) > 1

    def mask(self, segmentation: np.ndarray) -> np.ndarray:
        if len(self.labels) == 1:
            return segmentation == self.labels[0]
        return np.isin(segmentation, self.labels)


def _check_spacing(spacing: Sequence[float], ndim: int) -> Tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must hold {ndim} positive finite numbers (one per axis), got {spacing}")
    return spacing


def _drop_singleton_axes(pred: np.ndarray, ref: np.ndarray, spacing: Tuple[float, ...]):
    keep = [a for a, n in enumerate(pred.shape) if n > 1]
    if len(keep) == pred.ndim:
        return pred, ref, spacing
    shape = tuple(pred.shape[a] for a in keep)
    return pred.reshape(shape), ref.reshape(shape), tuple(spacing[a] for a in keep)


def _surface(mask: np.ndarray) -> np.ndarray:
    face = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=face, border_value=0)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """The two directed surface-distance sets ``(P -> G, G -> P)`` in mm, one value per surface voxel
    of the first mask (see the module docstring). Both masks must be non-empty and of one shape;
    axes of length 1 are dropped."""
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    spacing = _check_spacing(spacing, pred.ndim)
    pred, ref, spacing = _drop_singleton_axes(pred, ref, spacing)
    if not pred.any() or not ref.any():
        raise ValueError("surface distances need two non-empty masks")
    union = pred | ref
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        box.append(slice(hits[0], hits[-1] + 1))
    box = tuple(box)
    surface_pred, surface_ref = _surface(pred[box]), _surface(ref[box])
    to_ref = ndimage.distance_transform_edt(~surface_ref, sampling=spacing)[surface_pred]
    to_pred = ndimage.distance_transform_edt(~surface_pred, sampling=spacing)[surface_ref]
    return to_ref, to_pred


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else float('nan')


def mask_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                 evaluated: Optional[np.ndarray] = None, hd95: str = "pooled") -> Dict[str, float]:
    """All :data:`METRICS` of one binary prediction against one binary reference.

    ``evaluated`` (optional, boolean, same shape): the voxels to evaluate; the others (the ignore
    label) are removed from both masks first. ``hd95``: ``'pooled'`` or ``'max'`` (module docstring).
    """
    _check_hd95(hd95)
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    spacing = _check_spacing(spacing, pred.ndim)
    total = pred.size
    if evaluated is not None:
        evaluated = np.asarray(evaluated, dtype=bool)
        if evaluated.shape != pred.shape:
            raise ValueError(f"evaluated-voxel mask shape {evaluated.shape} != mask shape {pred.shape}")
        pred = pred & evaluated
        ref = ref & evaluated
        total = int(np.count_nonzero(evaluated))
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    tp = int(np.count_nonzero(pred & ref))
    fp, fn = n_pred - tp, n_ref - tp
    tn = total - tp - fp - fn
    voxel_volume = float(np.prod([s for s, n in zip(spacing, pred.shape) if n > 1]))
    if n_pred and n_ref:
        directed = surface_distances(pred, ref, spacing)
        distances = np.concatenate(directed)
        if hd95 == "pooled":
            hd95_value = float(np.percentile(distances, 95))
        else:
            hd95_value = float(max(np.percentile(d, 95) for d in directed))
        hd, asd = float(distances.max()), float(distances.mean())
    else:
        hd95_value = hd = asd = float('nan')
    values = {"Dice": _ratio(2 * tp, 2 * tp + fp + fn), "IoU": _ratio(tp, tp + fp + fn),
              "precision": _ratio(tp, n_pred), "recall": _ratio(tp, n_ref),
              "HD95": hd95_value, "HD": hd, "ASD": asd, "RVD": _ratio(n_pred - n_ref, n_ref),
              "volume_pred_mm3": n_pred * voxel_volume, "volume_ref_mm3": n_ref * voxel_volume,
              "n_pred": n_pred, "n_ref": n_ref, "TP": tp, "FP": fp, "FN": fn, "TN": tn}
    return {k: values[k] for k in METRICS}


def case_metrics(pred: np.ndarray, ref: np.ndarray, classes: Sequence[EvaluatedClass], spacing: Sequence[float],
                 ignore_label: Optional[int] = None, hd95: str = "pooled") -> Dict[str, Dict[str, float]]:
    """``{class name: metrics}`` of one case: label maps ``pred`` and ``ref`` of one shape, the
    reference's voxel spacing (mm, one per axis), nnU-Net's ignore label (or None) and the HD95
    definition (``'pooled'`` or ``'max'``)."""
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    evaluated = None if ignore_label is None else ref != ignore_label
    return {c.name: mask_metrics(c.mask(pred), c.mask(ref), spacing, evaluated, hd95) for c in classes}
