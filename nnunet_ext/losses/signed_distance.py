"""Signed distance maps of ground-truth masks: Phi of Eq. 7 in the multi-level structural loss paper
(``docs/methods/multi-level-structural.md``), the weight map of Kervadec et al.'s boundary
loss (Eq. 6; "Boundary loss for highly unbalanced segmentation", MIDL 2019 / MedIA 2021).

    Phi(x) = -dist(x, dD)  for x in D,     0 on dD,     +dist(x, dD)  outside D,          (Eq. 7)

in physical units (the voxel spacing), by an exact Euclidean distance transform.

Convention (Kervadec's ``one_hot2dist``, made exact for any spacing): on the voxel grid the
interface ``dD`` is the set of voxels of ``D`` that have a face-neighbour outside ``D`` (the
object's inner boundary; the border of the array is not an interface, as in Kervadec's code).
Outside ``D`` the value is the distance to the nearest voxel of ``D`` (always an interface voxel:
from a voxel of ``D`` nearest to ``x`` a step towards ``x`` along any axis where they differ would
leave ``D``), exactly Kervadec's ``edt(~D)``; inside it is minus the distance to the nearest
interface voxel. Kervadec writes the inside as ``-(edt(D) - 1)``, which is the same on straight and
convex voxel edges at unit spacing but, with a spacing in millimetres, no longer vanishes on the
boundary (it subtracts one millimetre, not one voxel step); ours is 0 on every boundary voxel for
any spacing. A class absent from the case gives zeros (Kervadec: "leave blank the negative
classes"), and so does a class filling the whole array (it has no interface inside it): Phi is
undefined there, and the losses treat an all-zero map as "undefined" (see
:mod:`nnunet_ext.losses.boundary`, :mod:`nnunet_ext.losses.mln`).

Computation: ``|Phi| = EDT(~dD)``, one Euclidean distance transform per mask over the whole array
(with ``dD`` found by six shifted comparisons, no morphological erosion pass). Two exact backends
give the same values up to float32 rounding:

- ``'itk'`` (2D and 3D; SimpleITK is a dependency of nnU-Net and of this package): ITK's Maurer et
  al. linear-time exact EDT (``SignedMaurerDistanceMapImageFilter`` on the interface voxels, squared
  distances in float32, one thread: nnU-Net parallelises over its augmentation worker processes).
  On a 128^3 mask about 3.5x faster than scipy's feature transform, whose cost grows faster than
  the voxel count (``bench/distance_targets_time.py``); about 1 ms of overhead per call.
- ``'scipy'`` (any dimension): ``scipy.ndimage.distance_transform_edt``, the reference; faster on
  small arrays.
- ``'auto'`` (default): ``'itk'`` for 2D/3D masks of at least ``ITK_MIN_VOXELS`` voxels, else ``'scipy'``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

__all__ = ["signed_distance_map", "signed_distance_maps", "interface_voxels", "BACKENDS"]

BACKENDS = ('auto', 'itk', 'scipy')
ITK_MIN_VOXELS = 2 ** 17  # 'auto' below this size: scipy (ITK's ~1 ms per call dominates small arrays)


def _spacing(spacing: Optional[Sequence[float]], ndim: int) -> tuple:
    if spacing is None:
        return (1.0,) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must hold {ndim} positive finite numbers (one per axis), got {spacing}")
    return spacing


def interface_voxels(mask: np.ndarray) -> np.ndarray:
    """``dD``: the voxels of the boolean ``mask`` with a face-neighbour (inside the array) outside it.

    Equal to ``mask & ~binary_erosion(mask, face structure, border_value=1)``, by one comparison per
    axis and direction instead of a morphology pass.
    """
    interior = mask.copy()
    for axis in range(mask.ndim):
        lower = [slice(None)] * mask.ndim
        upper = [slice(None)] * mask.ndim
        lower[axis], upper[axis] = slice(None, -1), slice(1, None)
        lower, upper = tuple(lower), tuple(upper)
        interior[lower] &= mask[upper]   # the neighbour at +1 is in the mask (or outside the array)
        interior[upper] &= mask[lower]   # the neighbour at -1
    np.logical_xor(mask, interior, out=interior)  # interior is a subset of mask: xor = mask & ~interior
    return interior


def _itk_available() -> bool:
    try:
        import SimpleITK  # noqa: F401
    except ImportError:  # pragma: no cover - SimpleITK is a dependency of nnU-Net and of this package
        return False
    return True


def _resolve_backend(backend: str, ndim: int, voxels: int) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == 'auto':
        return 'itk' if ndim in (2, 3) and voxels >= ITK_MIN_VOXELS and _itk_available() else 'scipy'
    if backend == 'itk' and ndim not in (2, 3):
        raise ValueError(f"the 'itk' backend handles 2D and 3D masks; this one has {ndim} axes (use 'scipy')")
    return backend


def _distance_to_interface_itk(interface: np.ndarray, spacing: tuple, out: np.ndarray) -> None:
    """``out = EDT(~interface)`` with ITK's Maurer transform (squared, float32), then the square root."""
    import SimpleITK as sitk
    image = sitk.GetImageFromArray(interface.view(np.uint8))
    image.SetSpacing(spacing[::-1])  # ITK orders axes x, y(, z): the reverse of numpy's
    transform = sitk.SignedMaurerDistanceMapImageFilter()
    transform.SetInsideIsPositive(False)
    transform.SetSquaredDistance(True)
    transform.SetUseImageSpacing(True)
    transform.SetBackgroundValue(0)
    transform.SetNumberOfThreads(1)
    # every interface voxel has a face-neighbour outside the mask, so it lies on the contour of the
    # interface set and gets 0; every other voxel the (squared) distance to the nearest interface voxel
    result = transform.Execute(image)  # keep a reference: the view below does not own the buffer
    np.abs(sitk.GetArrayViewFromImage(result), out=out)
    np.sqrt(out, out=out)


def signed_distance_map(mask: np.ndarray, spacing: Optional[Sequence[float]] = None, dtype=np.float32,
                        out: Optional[np.ndarray] = None, backend: str = 'auto') -> np.ndarray:
    """Phi (Eq. 7) of one binary mask of any dimension, with ``spacing`` per axis (default 1).

    Negative inside, 0 on the inner boundary voxels, positive outside; all zeros for an empty or
    full mask. See the module docstring for the convention and the backends. ``out``: an array of
    the mask's shape and a float dtype to write into (returned).
    """
    mask = np.asarray(mask)
    if mask.ndim == 0:
        raise ValueError("mask must have at least one axis")
    mask = mask.astype(bool, copy=False)
    spacing = _spacing(spacing, mask.ndim)
    if out is None:
        out = np.empty(mask.shape, dtype=dtype)
    elif out.shape != mask.shape or not np.issubdtype(out.dtype, np.floating):
        raise ValueError(f"out must be a float array of shape {mask.shape}, got {out.dtype} {out.shape}")
    backend = _resolve_backend(backend, mask.ndim, mask.size)
    if not mask.any() or mask.all():
        out[...] = 0
        return out
    interface = interface_voxels(np.ascontiguousarray(mask))
    if backend == 'itk' and out.dtype == np.float32 and out.flags.c_contiguous:
        _distance_to_interface_itk(interface, spacing, out)
    elif backend == 'itk':
        buffer = np.empty(mask.shape, np.float32)
        _distance_to_interface_itk(interface, spacing, buffer)
        out[...] = buffer
    else:
        out[...] = ndimage.distance_transform_edt(~interface, sampling=spacing)
    np.negative(out, out=out, where=mask)
    out += 0.0  # -0.0 (the interface voxels) -> 0.0
    return out


def signed_distance_maps(labels: np.ndarray, classes: Sequence, spacing: Optional[Sequence[float]] = None,
                         dtype=np.float32, backend: str = 'auto') -> np.ndarray:
    """Phi per class of a label map: ``(len(classes), *labels.shape)``.

    Each entry of ``classes`` is a label value or a sequence of label values (a region, their
    union). Voxels of any other value (background, other classes, the ignore label) are outside.
    """
    labels = np.asarray(labels)
    out = np.empty((len(classes), *labels.shape), dtype=dtype)
    for i, c in enumerate(classes):
        member = np.isin(labels, np.atleast_1d(np.asarray(c)))
        signed_distance_map(member, spacing, dtype, out=out[i], backend=backend)
    return out
