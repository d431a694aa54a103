"""Reading source files and checking source labels, shared by the converters: every failure is a
:class:`UserInputError` naming the case and the file.

The per-case checks (``docs/commands/convert.md``, "The checks of every case"):

* :func:`check_complete`: the whole file is there (:func:`nnunet_ext.file_checks.check_complete_file`, shared
  with ``evaluate``). SimpleITK reads what it can of a truncated ``.nii.gz`` and leaves the rest zero, so a
  gzip file is decompressed to its end first (its CRC and length, stored at the end, must match) and a NIfTI
  file must be as long as its header says. Other formats (``.mha``, ``.nrrd``, DICOM) rely on their reader,
  which refuses a short file.
* :func:`read_image` (an image: finite intensities; for NIfTI read with nibabel, because ITK's NIfTI
  reader turns NaN and infinity into 0 without a word) and :func:`read_label` (a label: integer values),
  both after :func:`check_complete`.
* :func:`checked_label_counts`: only the values the dataset's labels list.
* ``geometry.check_same_grid``: image and label on the same grid (size, spacing, origin, direction).
"""
from __future__ import annotations

from typing import Dict, Hashable, Sequence

import numpy as np
import SimpleITK as sitk

from nnunet_ext.errors import UserInputError
from nnunet_ext.file_checks import allowed_values, check_complete_file


def check_complete(case: str, path: str) -> None:
    """Refuse an empty, truncated or corrupt file (:func:`nnunet_ext.file_checks.check_complete_file`)."""
    check_complete_file(path, f"{case}:")


def _read(case: str, path: str) -> sitk.Image:
    check_complete(case, path)
    try:
        return sitk.ReadImage(path)
    except RuntimeError as e:
        raise UserInputError(f"{case}: cannot read {path}: {str(e).strip().splitlines()[-1]}") from None


def _is_float(image: sitk.Image) -> bool:
    return image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32,
                                  sitk.sitkVectorFloat64)


def read_image(case: str, path: str) -> sitk.Image:
    """An image (NIfTI/MHA/...) with SimpleITK, complete (:func:`check_complete`) and with finite
    intensities (no NaN or infinity, which nnU-Net's normalisation would spread over the whole case)."""
    image = _read(case, path)
    if _is_float(image):
        values = sitk.GetArrayViewFromImage(image)
        if path.endswith(('.nii', '.nii.gz')):  # ITK's NIfTI reader turns NaN and infinity into 0 silently
            import nibabel
            values = np.asanyarray(nibabel.load(path).dataobj)
        if not np.isfinite(values).all():
            bad = int(values.size - np.isfinite(values).sum())
            raise UserInputError(f"{case}: {path} has {bad} voxels that are NaN or infinite; fix or mask them "
                                 f"before converting")
    return image


def read_label(case: str, path: str) -> sitk.Image:
    """A label image, complete (:func:`check_complete`) and integer-valued (a float file is accepted when
    every value is a whole number)."""
    label = _read(case, path)
    if _is_float(label):
        values = sitk.GetArrayViewFromImage(label)
        fractional = values[np.mod(values, 1) != 0]
        if fractional.size:
            raise UserInputError(f"{case}: label {path} has non-integer values (e.g. "
                                 f"{np.unique(fractional)[:5].tolist()}); labels must be whole numbers")
    return label


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
    """:func:`label_counts`, after refusing non-integer values and values outside ``allowed``."""
    if np.issubdtype(label.dtype, np.floating):
        fractional = label[np.mod(label, 1) != 0]
        if fractional.size:
            raise UserInputError(f"{case}: label {path} has non-integer values (e.g. "
                                 f"{np.unique(fractional)[:5].tolist()}); labels must be whole numbers")
        label = label.astype(np.int64)
    counts = label_counts(label)
    unexpected = sorted(set(counts) - set(allowed))
    if unexpected:
        raise UserInputError(f"{case}: unexpected label values {unexpected} (allowed {list(allowed)}) in {path}")
    return counts


def dataset_label_values(labels: Dict[str, object]) -> Sequence[int]:
    """The label values a ``dataset.json``'s ``labels`` names (integers, and the members of regions)."""
    return allowed_values(labels.values())


def add_unique(found: Dict[Hashable, str], key: Hashable, path: str, what: str) -> None:
    """``found[key] = path``; a second file for the same key is an error naming both."""
    if key in found:
        raise UserInputError(f"duplicate {what}: {found[key]} and {path}")
    found[key] = path
