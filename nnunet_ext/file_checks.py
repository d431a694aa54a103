"""Whether a file is all there, and the label values a ``dataset.json`` lists: shared by the converters
(``nnunet_ext.conversion.readers``) and by ``evaluate`` / ``compare`` (``nnunet_ext.evaluation.segmentation_files``).

:func:`check_complete_file` refuses an empty file; a gzip file whose stream does not decompress to its end
with matching CRC and length (a ``.nii.gz`` cut short by an interrupted copy: SimpleITK reads what it can of
it and leaves the rest zero, without an error); a NIfTI file (``.nii``, and the decompressed stream of a
``.nii.gz``) shorter than its header's data offset plus voxels times bytes per voxel. Other formats
(``.png``, ``.tif``, ``.mha``, ``.nrrd``, DICOM) are left to their reader, which refuses a short file.
"""
from __future__ import annotations

import gzip
import io
import os
import zlib
from typing import Optional, Sequence, Tuple

import numpy as np

from nnunet_ext.errors import UserInputError

GZIP_MAGIC = b"\x1f\x8b"
NIFTI_ENDINGS = (".nii", ".nii.gz")
_CHUNK = 1 << 22
_NIFTI_HEADER_BYTES = 540  # NIfTI-2 (NIfTI-1: 348)


def one_line(text: object) -> str:
    """``text`` with every run of white space (newlines included) as one space."""
    return " ".join(str(text).split())


def last_line(error: BaseException) -> str:
    """The last non-empty line of an exception's message (SimpleITK puts the C++ source location first),
    or its type's name."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _nifti_data_end(head: bytes) -> Optional[Tuple[int, int, int]]:
    """``(offset, voxels, bytes per voxel)`` from the first bytes of a NIfTI-1 or NIfTI-2 file, or None
    when they are no NIfTI header (the reader will say what is wrong)."""
    from nibabel.nifti1 import Nifti1Header
    from nibabel.nifti2 import Nifti2Header
    if len(head) < 4:
        return None
    sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
    klass = Nifti1Header if 348 in sizes else Nifti2Header if 540 in sizes else None
    if klass is None or len(head) < klass.template_dtype.itemsize:
        return None
    try:
        header = klass.from_fileobj(io.BytesIO(head), check=False)
        voxels = int(np.prod(header.get_data_shape(), dtype=np.int64))
        return int(header.get_data_offset()), voxels, int(header.get_data_dtype().itemsize)
    except Exception:  # nibabel's errors for a broken header vary: the reader reports the file
        return None


def check_complete_file(path: str, what: str = "file") -> None:
    """Refuses a file that is empty, truncated or corrupt (module docstring); ``what`` starts the message
    (``"case X: prediction"``)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_NIFTI_HEADER_BYTES)
    except OSError as e:  # no read permission, a file removed meanwhile
        raise UserInputError(f"{what} {path} cannot be opened ({e.strerror or e})") from None
    if size == 0:
        raise UserInputError(f"{what} {path} is empty (0 bytes); copy or write it again")
    length, compressed = size, head[:2] == GZIP_MAGIC
    if compressed:
        try:
            with gzip.open(path, "rb") as stream:
                head = stream.read(_NIFTI_HEADER_BYTES)
                length = len(head)
                while True:
                    chunk = stream.read(_CHUNK)
                    if not chunk:
                        break
                    length += len(chunk)
        except EOFError:
            raise UserInputError(f"{what} {path} is truncated: its gzip stream stops before its end marker "
                                 f"({size} bytes; an interrupted copy?); copy or write it again") from None
        except (OSError, zlib.error) as e:  # gzip.BadGzipFile (CRC or length mismatch) is an OSError
            raise UserInputError(f"{what} {path} is corrupt: its gzip stream does not decompress "
                                 f"({last_line(e)}); copy or write it again") from None
    if path.lower().endswith(NIFTI_ENDINGS):
        announced = _nifti_data_end(head)
        if announced is not None:
            offset, voxels, itemsize = announced
            expected = offset + voxels * itemsize
            if length < expected:
                raise UserInputError(
                    f"{what} {path} is truncated: {length} bytes{' decompressed' if compressed else ''}, its NIfTI "
                    f"header announces {expected} ({offset} + {voxels} voxels x {itemsize} byte"
                    f"{'s' if itemsize > 1 else ''}); copy or write it again")


def allowed_values(labels: Sequence[object]) -> Tuple[int, ...]:
    """Sorted label values of ``dataset.json``'s ``labels`` values (integers, or lists of them: regions)."""
    values = set()
    for value in labels:
        values.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return tuple(sorted(values))
