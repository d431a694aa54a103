"""Checking that a label volume lies on its image's voxel grid."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk

from nnunet_ext.errors import UserInputError

GEOMETRY_TOLERANCE = 1e-3  # mm for spacing and origin, absolute for direction cosines


def _grid(image: sitk.Image, ndim: int) -> Tuple[tuple, tuple, tuple, tuple]:
    """Size, spacing, origin and direction of the first ``ndim`` axes of ``image``."""
    n = image.GetDimension()
    direction = np.asarray(image.GetDirection()).reshape(n, n)[:ndim, :ndim].ravel()
    return image.GetSize()[:ndim], image.GetSpacing()[:ndim], image.GetOrigin()[:ndim], tuple(direction)


def check_same_grid(case: str, image: sitk.Image, label: sitk.Image, what: str = 'segmentation',
                    source: Optional[str] = None) -> None:
    """Same size, spacing, origin and direction (up to :data:`GEOMETRY_TOLERANCE`), else an error naming
    the case (and ``source``, the label's file, if given) and the first difference. An image with more axes
    than its label (channels as the last axis: an MSD task's 4D images) is compared on the label's axes."""
    suffix = f" ({source})" if source else ''
    ndim = label.GetDimension()
    if image.GetDimension() < ndim:
        raise UserInputError(f"{case}: image size {image.GetSize()} and {what} size {label.GetSize()} "
                             f"differ{suffix}")
    (size, *image_grid), (label_size, *label_grid) = _grid(image, ndim), _grid(label, ndim)
    if size != label_size:
        raise UserInputError(f"{case}: image size {size} and {what} size {label_size} differ{suffix}")
    for name, a, b in zip(('spacing', 'origin', 'direction'), image_grid, label_grid):
        if not np.allclose(a, b, rtol=0, atol=GEOMETRY_TOLERANCE):
            raise UserInputError(f"{case}: image and {what} {name} differ: {tuple(np.round(a, 4).tolist())} vs "
                                 f"{tuple(np.round(b, 4).tolist())}{suffix}")


def label_image(values: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A uint8 label image of ``values`` (z, y, x) with ``reference``'s geometry exactly."""
    out = sitk.GetImageFromArray(values.astype(np.uint8))
    out.CopyInformation(reference)
    return out
