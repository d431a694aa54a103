"""Reading and writing images like nnU-Net 2.8.1's readers, with SimpleITK only.

* ``find_cases`` reproduces ``utilities.utils.create_lists_from_splitted_dataset_folder`` (what
  ``nnUNetv2_predict -i FOLDER`` does): files ``CASE_XXXX<file_ending>``, cases sorted, channels sorted.
* ``read_images`` reproduces ``SimpleITKIO.read_images`` (array (C, z, y, x) float32, 'spacing' reversed to
  (z, y, x), 2d images as (C, 1, y, x) with spacing (999 * max, y, x), 'sitk_stuff') and
  ``NaturalImage2DIO.read_images`` (PNG/BMP/TIF read with SimpleITK: (C, 1, y, x), RGB(A) channels first,
  spacing (999, 1, 1)).
* ``write_segmentation`` reproduces their ``write_seg`` (uint8, or uint16 from label 255 on; SimpleITKIO
  with the input's spacing, origin and direction, compressed), written atomically.
"""
from __future__ import annotations

import os
import re
import sys
from typing import List, Sequence, Tuple

import numpy as np

from nnunet_ext.errors import UserInputError

SUPPORTED_READERS = ('SimpleITKIO', 'NaturalImage2DIO')


def find_cases(folder: str, file_ending: str) -> List[Tuple[str, List[str]]]:
    """(case id, [channel files]) for every case of ``folder``, like nnU-Net's
    create_lists_from_splitted_dataset_folder: case ids are the names ending in ``file_ending`` without the
    ending and the 5 characters ``_XXXX`` before it; a case's files are ``CASE_dddd<file_ending>``, sorted."""
    if not os.path.isdir(folder):
        raise UserInputError(f"input folder {folder} does not exist (or is not a folder)")
    files = sorted(i for i in os.listdir(folder) if os.path.isfile(os.path.join(folder, i)) and i.endswith(file_ending))
    crop = len(file_ending) + 5
    identifiers = sorted(set(i[:-crop] for i in files))
    cases = []
    for case in identifiers:
        pattern = re.compile(re.escape(case) + r"_\d\d\d\d" + re.escape(file_ending))
        channel_files = [os.path.join(folder, i) for i in files if pattern.fullmatch(i)]
        if channel_files:
            cases.append((case, channel_files))
    if not cases:
        raise UserInputError(f"{folder} holds no case: nnU-Net input files are named CASE_0000{file_ending} "
                             f"(one file per channel, _0000, _0001, ...)")
    return cases


def _sitk():
    import SimpleITK
    return SimpleITK


def _read_sitk(path: str):
    sitk = _sitk()
    try:
        return sitk.ReadImage(path)
    except RuntimeError as e:
        lines = [i.strip() for i in str(e).splitlines() if i.strip()]
        why = lines[-1] if lines else 'unreadable'
        raise UserInputError(f"cannot read image {path} ({why[:200]})") from None


def channels_in_file(path: str, reader: str) -> int:
    """How many input channels the reader makes of ``path``, from its header alone (for checking a folder before
    predicting anything)."""
    sitk = _sitk()
    info = sitk.ImageFileReader()
    info.SetFileName(path)
    try:
        info.ReadImageInformation()
    except RuntimeError:
        raise UserInputError(f"cannot read image {path} (not an image SimpleITK can read)") from None
    dimension, components = info.GetDimension(), info.GetNumberOfComponents()
    size = info.GetSize()
    if reader == 'NaturalImage2DIO':
        return components if dimension == 2 and components in (3, 4) else 1
    ndim = dimension + (1 if components > 1 else 0)  # the ndim of sitk.GetArrayFromImage
    if ndim <= 3:
        return 1
    return size[3] if dimension == 4 and components == 1 else (size[2] if components > 1 else size[-1])


def read_images(paths: Sequence[str], reader: str) -> Tuple[np.ndarray, dict]:
    """The channels of one case as nnU-Net's ``reader`` returns them: (float32 array (C, z, y, x), properties)."""
    if reader == 'SimpleITKIO':
        return _read_simpleitk(paths)
    if reader == 'NaturalImage2DIO':
        return _read_natural(paths)
    raise UserInputError(f"the image reader {reader} is not supported without nnU-Net "
                         f"(supported: {', '.join(SUPPORTED_READERS)})")


def _read_simpleitk(paths: Sequence[str]) -> Tuple[np.ndarray, dict]:
    sitk = _sitk()
    images, spacings, origins, directions, spacings_for_nnunet = [], [], [], [], []
    for f in paths:
        itk_image = _read_sitk(f)
        spacings.append(itk_image.GetSpacing())
        origins.append(itk_image.GetOrigin())
        directions.append(itk_image.GetDirection())
        npy_image = sitk.GetArrayFromImage(itk_image)
        if npy_image.ndim == 2:
            npy_image = npy_image[None, None]
            max_spacing = max(spacings[-1])
            spacings_for_nnunet.append((max_spacing * 999, *list(spacings[-1])[::-1]))
        elif npy_image.ndim == 3:
            npy_image = npy_image[None]
            spacings_for_nnunet.append(list(spacings[-1])[::-1])
        elif npy_image.ndim == 4:
            spacings_for_nnunet.append(list(spacings[-1])[::-1][1:])
        else:
            raise UserInputError(f"{f}: unexpected number of dimensions {npy_image.ndim} (nnU-Net reads 2d, 3d, 4d)")
        images.append(npy_image)
        spacings_for_nnunet[-1] = list(np.abs(spacings_for_nnunet[-1]))
    names = ', '.join(os.path.basename(p) for p in paths)
    if len(set(i.shape for i in images)) > 1:
        raise UserInputError(f"the channels of a case differ in shape ({names}: "
                             f"{', '.join(str(i.shape[1:]) for i in images)})")
    if len(set(spacings)) > 1:
        raise UserInputError(f"the channels of a case differ in spacing ({names}: {spacings})")
    if len(set(origins)) > 1:
        print(f"WARNING: the channels {names} differ in origin: {origins}", file=sys.stderr)
    if len(set(directions)) > 1:
        print(f"WARNING: the channels {names} differ in direction: {directions}", file=sys.stderr)
    properties = {'sitk_stuff': {'spacing': spacings[0], 'origin': origins[0], 'direction': directions[0]},
                  'spacing': spacings_for_nnunet[0]}
    return np.vstack(images, dtype=np.float32, casting='unsafe'), properties


def _read_natural(paths: Sequence[str]) -> Tuple[np.ndarray, dict]:
    sitk = _sitk()
    images = []
    for f in paths:
        npy_img = _like_pillow(f, sitk.GetArrayFromImage(_read_sitk(f)))
        if npy_img.ndim == 3:
            if npy_img.shape[-1] not in (3, 4):
                raise UserInputError(f"{f}: a 3-axis natural image must be RGB or RGBA (last axis 3 or 4), got shape "
                                     f"{npy_img.shape}")
            images.append(npy_img.transpose((2, 0, 1))[:, None])
        elif npy_img.ndim == 2:
            images.append(npy_img[None, None])
        else:
            raise UserInputError(f"{f}: NaturalImage2DIO reads 2d images only, got shape {npy_img.shape}")
    if len(set(i.shape for i in images)) > 1:
        raise UserInputError(f"the channels of a case differ in shape "
                             f"({', '.join(os.path.basename(p) for p in paths)})")
    return np.vstack(images, dtype=np.float32, casting='unsafe'), {'spacing': (999, 1, 1)}


def _like_pillow(path: str, array: np.ndarray) -> np.ndarray:
    """What skimage's imread (Pillow) gives where SimpleITK's PNG/BMP readers differ: a BMP with a grey-ramp
    palette is greyscale for Pillow (ITK expands it to RGB); 1-bit greyscale images are 0/1 for Pillow (ITK: 0/255)."""
    try:
        with open(path, 'rb') as f:
            head = f.read(54 + 4 * 256)
    except OSError:
        return array
    if head[:2] == b'BM' and len(head) >= 54:
        dib = int.from_bytes(head[14:18], 'little')
        bits = int.from_bytes(head[28:30], 'little')
        if bits in (1, 8) and array.ndim == 3 and array.shape[-1] == 3:
            colors = int.from_bytes(head[46:50], 'little') or 2 ** bits
            entry = 3 if dib == 12 else 4
            start = 14 + dib
            palette = head[start:start + entry * colors]
            values = (0, 255) if colors == 2 else range(colors)
            grey = len(palette) == entry * colors and all(
                palette[i * entry:i * entry + 3] == bytes([v]) * 3 for i, v in enumerate(values))
            if grey:
                array = array[..., 0]
                if colors == 2:
                    array = (array > 0).astype(np.uint8)
    elif head[:8] == b'\x89PNG\r\n\x1a\n' and len(head) >= 26:
        bit_depth, color_type = head[24], head[25]
        if color_type == 0 and bit_depth == 1:
            array = (array > 0).astype(np.uint8)
    return array


def temporary_name(path: str) -> str:
    """A name beside ``path`` with the same file ending (so that writers pick the same format), for writing it
    atomically: write there, then ``os.replace``."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f'.tmp-{os.getpid()}-{name}')


def write_segmentation(seg: np.ndarray, path: str, properties: dict, reader: str) -> None:
    """``reader``'s write_seg: ``seg`` (z, y, x) (2d images: (1, y, x)); uint8, or uint16 if a label is >= 255."""
    sitk = _sitk()
    assert seg.ndim == 3, 'segmentation must be 3d (2d as 1, y, x)'
    seg = seg.astype(np.uint8 if np.max(seg) < 255 else np.uint16, copy=False)
    if reader == 'SimpleITKIO':
        output_dimension = len(properties['sitk_stuff']['spacing'])
        assert 1 < output_dimension < 4
        image = sitk.GetImageFromArray(seg[0] if output_dimension == 2 else seg)
        image.SetSpacing(properties['sitk_stuff']['spacing'])
        image.SetOrigin(properties['sitk_stuff']['origin'])
        image.SetDirection(properties['sitk_stuff']['direction'])
    elif reader == 'NaturalImage2DIO':
        image = sitk.GetImageFromArray(seg[0])
    else:
        raise UserInputError(f"the image writer {reader} is not supported without nnU-Net")
    temporary = temporary_name(path)
    try:
        sitk.WriteImage(image, temporary, True)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
