"""Reading DICOM series with SimpleITK (GDCM): slices sorted by their position along the slice normal
(``ImagePositionPatient`` / ``ImageOrientationPatient``), not by file name, and zipped folders
extracted to a scratch directory first (3D-IRCADb ships ``PATIENT_DICOM.zip`` and ``MASKS_DICOM.zip``)."""
from __future__ import annotations

import os
import zipfile
from typing import List, Optional

import numpy as np
import SimpleITK as sitk

from nnunet_ext.errors import UserInputError


def series_files(case: str, folder: str) -> List[str]:
    """The files of the one DICOM series in ``folder``, sorted by slice position (GDCM's sorter)."""
    if not os.path.isdir(folder):
        raise UserInputError(f"{case}: DICOM folder {folder} does not exist")
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not ids:
        names = [n for n in os.listdir(folder) if not n.startswith('.')]
        if not names:
            raise UserInputError(f"{case}: empty DICOM series folder {folder}")
        raise UserInputError(f"{case}: no readable DICOM series in {folder} ({len(names)} files, none DICOM)")
    if len(ids) > 1:
        raise UserInputError(f"{case}: {len(ids)} DICOM series in {folder}; expected one")
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, ids[0]))
    return files


def positions_along_normal(files: List[str]) -> np.ndarray:
    """Slice positions projected on the slice normal (mm), from the files' own tags."""
    out = []
    for f in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(f)
        reader.ReadImageInformation()
        ipp = np.array([float(v) for v in reader.GetMetaData('0020|0032').split('\\')])
        iop = np.array([float(v) for v in reader.GetMetaData('0020|0037').split('\\')])
        out.append(float(np.dot(ipp, np.cross(iop[:3], iop[3:]))))
    return np.array(out)


def read_series(case: str, folder: str, files: Optional[List[str]] = None) -> sitk.Image:
    """The series as one 3D image with its geometry (spacing from the positions, origin, direction)."""
    files = files if files is not None else series_files(case, folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise UserInputError(f"{case}: cannot read the DICOM series in {folder}: "
                             f"{str(e).strip().splitlines()[-1]}") from None
    if image.GetDimension() == 2:  # a single slice
        image = sitk.JoinSeries(image)
    return image


def unzipped(case: str, path: str, scratch: str) -> str:
    """``path`` if it is a folder, else ``path + '.zip'`` extracted into ``scratch`` (its top folder)."""
    if os.path.isdir(path):
        return path
    archive = path + '.zip'
    if not os.path.isfile(archive):
        raise UserInputError(f"{case}: neither {path}/ nor {archive} exists")
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(scratch)
    except zipfile.BadZipFile as e:
        raise UserInputError(f"{case}: {archive} is not a valid zip file ({e})") from None
    inner = os.path.join(scratch, os.path.basename(path))
    if not os.path.isdir(inner):
        raise UserInputError(f"{case}: {archive} does not contain a {os.path.basename(path)}/ folder")
    return inner
