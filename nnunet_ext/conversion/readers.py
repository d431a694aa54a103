"""Reading source files and checking source labels, shared by the converters: every failure is a
:class:`UserInputError` naming the case and the file."""
from __future__ import annotations

from typing import Dict, Hashable, Sequence

import numpy as np
import SimpleITK as sitk

from nnunet_ext.errors import UserInputError


def read_image(case: str, path: str) -> sitk.Image:
    """A NIfTI/MHA/... file with SimpleITK."""
    try:
        return sitk.ReadImage(path)
    except RuntimeError as e:
        raise UserInputError(f"{case}: cannot read {path}: {str(e).strip().splitlines()[-1]}") from None


def read_picture(case: str, path: str):
    """A PNG/JPEG/TIFF/GIF/BMP file with Pillow (loaded, so a truncated file fails here)."""
    from PIL import Image, UnidentifiedImageError
    try:
        image = Image.open(path)
        image.load()
        return image
    except (OSError, UnidentifiedImageError) as e:
        raise UserInputError(f"{case}: cannot read {path}: {e}") from None


def label_counts(label: np.ndarray) -> Dict[int, int]:
    """Voxels per label value."""
    values, counts = np.unique(label, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


def checked_label_counts(case: str, label: np.ndarray, allowed: Sequence[int], path: str) -> Dict[int, int]:
    """:func:`label_counts`, after refusing label values outside ``allowed``."""
    counts = label_counts(label)
    unexpected = sorted(set(counts) - set(allowed))
    if unexpected:
        raise UserInputError(f"{case}: unexpected label values {unexpected} (allowed {list(allowed)}) in {path}")
    return counts


def add_unique(found: Dict[Hashable, str], key: Hashable, path: str, what: str) -> None:
    """``found[key] = path``; a second file for the same key is an error naming both."""
    if key in found:
        raise UserInputError(f"duplicate {what}: {found[key]} and {path}")
    found[key] = path
