"""CT intensity options of the ResUNet paper (``docs/methods/resunet.md``,
pre-processing: "Hounsfield Windowing" to [-100, 400] HU, then "Histogram Equalization", then
normalisation to [0, 1]), applied identically at conversion (``nnunet-ext convert ... --window LOW HIGH
--hist-eq``) and to new images before prediction (``nnunet-ext preprocess-images``).

* :func:`window` clips intensities to ``[low, high]`` (Hounsfield units for CT).
* :func:`equalize_histogram` is scikit-image's ``exposure.equalize_hist`` (256 bins over the image's
  own range, its cumulative histogram as the mapping), whose values lie in ``[0, 1]``: the paper's
  equalisation and normalisation in one step. It runs on the whole image (the volume for 3D data;
  the paper works on 2D slices), so the mapping depends only on the image itself and conversion and
  prediction-time pre-processing agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from nnunet_ext.errors import UserInputError

EQUALIZATION_BINS = 256


def window(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clips ``array`` to ``[low, high]`` (float32)."""
    if not low < high:
        raise UserInputError(f"--window LOW HIGH needs LOW < HIGH, got {low} {high}")
    return np.clip(array.astype(np.float32, copy=False), low, high)


def equalize_histogram(array: np.ndarray) -> np.ndarray:
    """Histogram equalisation with scikit-image (256 bins over the image's range), values in ``[0, 1]``.
    A constant image is returned unchanged (float32)."""
    from skimage.exposure import equalize_hist
    array = array.astype(np.float32, copy=False)
    if array.size == 0 or array.min() == array.max():
        return array.copy()
    return equalize_hist(array, nbins=EQUALIZATION_BINS).astype(np.float32)


@dataclass(frozen=True)
class CTIntensity:
    """The options ``--window LOW HIGH`` and ``--hist-eq`` as one callable on image arrays."""
    window: Optional[Tuple[float, float]] = None
    hist_eq: bool = False

    def __post_init__(self):
        if self.window is not None and not self.window[0] < self.window[1]:
            raise UserInputError(f"--window LOW HIGH needs LOW < HIGH, got {self.window[0]} {self.window[1]}")

    @property
    def active(self) -> bool:
        return self.window is not None or self.hist_eq

    def __call__(self, array: np.ndarray) -> np.ndarray:
        out = array
        if self.window is not None:
            out = window(out, *self.window)
        if self.hist_eq:
            out = equalize_histogram(out)
        return out

    def apply_to_image(self, image):
        """The options applied to a SimpleITK image (geometry kept); the image itself when none is set."""
        if not self.active:
            return image
        import SimpleITK as sitk
        out = sitk.GetImageFromArray(self(sitk.GetArrayViewFromImage(image)))
        out.CopyInformation(image)
        return out

    def record(self) -> dict:
        """What dataset.json records (key ``nnunet_ext_intensity``), read back by ``preprocess-images -d``."""
        return {'window': list(self.window) if self.window is not None else None, 'hist_eq': self.hist_eq}

    def describe(self) -> str:
        parts = []
        if self.window is not None:
            parts.append(f"window [{self.window[0]:g}, {self.window[1]:g}]")
        if self.hist_eq:
            parts.append("histogram equalisation")
        return ", ".join(parts) if parts else "none"
