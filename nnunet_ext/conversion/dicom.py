"""Reading DICOM series with SimpleITK (GDCM): slices sorted by their position along the slice normal
(``ImagePositionPatient`` / ``ImageOrientationPatient``), not by file name, and zipped folders
extracted to a scratch directory first (3D-IRCADb ships ``PATIENT_DICOM.zip`` and ``MASKS_DICOM.zip``).

GDCM sets the process locale to "C" when it reads or writes DICOM (Python's default text encoding
then becomes ASCII); every GDCM call here runs inside :func:`keep_locale`, which restores it.
"""
from __future__ import annotations

import contextlib
import locale
import os
import zipfile
from typing import Iterator, List, Optional

import SimpleITK as sitk

from nnunet_ext.errors import UserInputError


@contextlib.contextmanager
def keep_locale() -> Iterator[None]:
    """Restores the process locale that GDCM resets to "C"."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def series_files(case: str, folder: str) -> List[str]:
    """The files of the one DICOM series in ``folder``, sorted by slice position (GDCM's sorter)."""
    if not os.path.isdir(folder):
        raise UserInputError(f"{case}: DICOM folder {folder} does not exist")
    with keep_locale():
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not ids:
        names = [n for n in os.listdir(folder) if not n.startswith('.')]
        if not names:
            raise UserInputError(f"{case}: empty DICOM series folder {folder}")
        raise UserInputError(f"{case}: no readable DICOM series in {folder} ({len(names)} files, none DICOM)")
    if len(ids) > 1:
        raise UserInputError(f"{case}: {len(ids)} DICOM series in {folder}; expected one")
    with keep_locale():
        return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, ids[0]))


def read_series(case: str, folder: str, files: Optional[List[str]] = None) -> sitk.Image:
    """The series as one 3D image with its geometry (spacing from the positions, origin, direction)."""
    files = files if files is not None else series_files(case, folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with keep_locale():
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
