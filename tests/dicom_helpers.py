"""Writing small DICOM series with SimpleITK (GDCM), as scanners and the public datasets store them."""
from __future__ import annotations

import os
import random
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from nnunet_ext.conversion.dicom import keep_locale


def write_dicom_series(folder: str, array_zyx: np.ndarray, spacing=(0.7, 0.8, 2.5), origin=(-120.0, 30.0, 55.0),
                       names: Optional[Sequence[str]] = None, shuffle_names: bool = False,
                       series_uid: str = '1.2.826.0.1.3680043.2.1125.1',
                       modality: str = 'CT', seed: int = 0) -> sitk.Image:
    """One slice per file, with ImagePositionPatient / ImageOrientationPatient / PixelSpacing set.

    ``names``: file names per slice (default ``image_<k>``, 3D-IRCADb's). ``shuffle_names`` assigns the
    names in a random order, so the name order differs from the position order. Returns the volume as
    SimpleITK sees it (for comparisons)."""
    os.makedirs(folder, exist_ok=True)
    volume = sitk.GetImageFromArray(array_zyx.astype(np.int16))
    volume.SetSpacing(spacing)
    volume.SetOrigin(origin)
    names = list(names) if names is not None else [f'image_{k}' for k in range(array_zyx.shape[0])]
    order = list(range(len(names)))
    if shuffle_names:
        random.Random(seed).shuffle(order)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO('GDCMImageIO')  # file names without extension (image_0, ...)
    direction = volume.GetDirection()
    for k in range(array_zyx.shape[0]):
        slice_ = volume[:, :, k]
        position = volume.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            '0008|0060': modality, '0008|0016': '1.2.840.10008.5.1.4.1.1.2',
            '0008|0018': f'{series_uid}.{k + 1}', '0020|000d': series_uid + '.0', '0020|000e': series_uid,
            '0020|0052': series_uid + '.9', '0010|0010': 'ANON', '0010|0020': 'ANON',
            '0020|0013': str(k + 1), '0020|0032': '\\'.join(f'{p:.6f}' for p in position),
            '0020|0037': '\\'.join(f'{d:.6f}' for d in (direction[0], direction[3], direction[6],
                                                        direction[1], direction[4], direction[7])),
            '0028|0030': f'{spacing[1]:.6f}\\{spacing[0]:.6f}', '0018|0050': f'{spacing[2]:.6f}',
            '0028|1050': '40', '0028|1051': '400', '0028|1052': '0', '0028|1053': '1',
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(os.path.join(folder, names[order[k]]))
        with keep_locale():  # GDCM resets the process locale to "C"
            writer.Execute(slice_)
    return volume
