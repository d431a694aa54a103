"""Checking that a label volume lies on its image's voxel grid."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from nnunet_ext.errors import UserInputError

GEOMETRY_TOLERANCE = 1e-3  # mm for spacing and origin, absolute for direction cosines


def check_same_grid(case: str, image: sitk.Image, label: sitk.Image, what: str = 'segmentation') -> None:
    """Same size, spacing, origin and direction (up to :data:`GEOMETRY_TOLERANCE`), else an error naming
    the case and the first difference."""
    if image.GetSize() != label.GetSize():
        raise UserInputError(f"{case}: image size {image.GetSize()} and {what} size {label.GetSize()} differ")
    for name, a, b in (('spacing', image.GetSpacing(), label.GetSpacing()),
                       ('origin', image.GetOrigin(), label.GetOrigin()),
                       ('direction', image.GetDirection(), label.GetDirection())):
        if not np.allclose(a, b, rtol=0, atol=GEOMETRY_TOLERANCE):
            raise UserInputError(f"{case}: image and {what} {name} differ: {tuple(np.round(a, 4).tolist())} vs "
                                 f"{tuple(np.round(b, 4).tolist())}")


def label_image(values: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A uint8 label image of ``values`` (z, y, x) with ``reference``'s geometry exactly."""
    out = sitk.GetImageFromArray(values.astype(np.uint8))
    out.CopyInformation(reference)
    return out
