"""Synthetic CT-like phantoms in nnU-Net raw format (no download).

Each case is an axial slice (2D) or a small volume (3D) of a body ellipse of soft tissue with a
subcutaneous fat ring, a bright vertebra, a large "liver" (label 1) and one or two small
hypodense "tumours" (label 2) inside the liver: two foreground classes whose sizes differ by
about two orders of magnitude, the situation GODC was designed for. Intensities are in HU with
Gaussian noise, so nnU-Net plans them with its CT normalisation.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

LABELS = {'background': 0, 'liver': 1, 'tumour': 2}
FILE_ENDING = '.nii.gz'


@dataclass(frozen=True)
class PhantomCase:
    image: np.ndarray  # float32 HU, spatial shape (y, x) or (z, y, x)
    label: np.ndarray  # uint8, same shape
    spacing: Tuple[float, ...]  # per axis, same order as the arrays


def _ellipsoid(grid: Sequence[np.ndarray], centre: Sequence[float], radii: Sequence[float],
               angle: float = 0.0) -> np.ndarray:
    """Mask of an ellipsoid (rotated by ``angle`` in the last two axes) on a voxel grid."""
    d = [g - c for g, c in zip(grid, centre)]
    cos, sin = np.cos(angle), np.sin(angle)
    d[-2], d[-1] = cos * d[-2] - sin * d[-1], sin * d[-2] + cos * d[-1]
    return sum((di / r) ** 2 for di, r in zip(d, radii)) <= 1.0


def make_phantom_case(rng: np.random.Generator, shape: Sequence[int],
                      spacing: Sequence[float] | None = None) -> PhantomCase:
    """One random phantom of spatial ``shape`` (2 or 3 axes; the in-plane axes are the last two)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape[-2:]) < 24:
        raise ValueError(f"phantom shape must have 2 or 3 axes with in-plane size >= 24, got {shape}")
    spacing = tuple(float(s) for s in spacing) if spacing is not None else (
        (0.8, 0.8) if len(shape) == 2 else (2.5, 0.8, 0.8))
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing='ij')
    h, w = shape[-2:]
    through_plane = [] if len(shape) == 2 else [shape[0] / 2 + rng.uniform(-1, 1)]
    through_radius = [] if len(shape) == 2 else [shape[0] * rng.uniform(0.55, 0.7)]

    image = np.full(shape, -1000.0, dtype=np.float32)  # air
    body_c = [*through_plane, h / 2 + rng.uniform(-2, 2), w / 2 + rng.uniform(-2, 2)]
    body_r = [*[r * 2 for r in through_radius], h * rng.uniform(0.36, 0.42), w * rng.uniform(0.42, 0.47)]
    body = _ellipsoid(grid, body_c, body_r)
    image[body] = -90.0  # fat
    inner = _ellipsoid(grid, body_c, [r - 3 if i >= len(through_plane) else r for i, r in enumerate(body_r)])
    image[inner] = 40.0  # muscle / soft tissue
    spine_c = [*through_plane, body_c[-2] + 0.6 * body_r[-2], body_c[-1]]
    image[_ellipsoid(grid, spine_c, [*[r * 2 for r in through_radius], h * 0.06, w * 0.06])] = 450.0

    liver_c = [*through_plane, body_c[-2] - rng.uniform(0.0, 0.15) * body_r[-2],
               body_c[-1] - rng.uniform(0.3, 0.4) * body_r[-1]]
    liver_r = [*through_radius, h * rng.uniform(0.17, 0.22), w * rng.uniform(0.2, 0.25)]
    liver = _ellipsoid(grid, liver_c, liver_r, angle=rng.uniform(-0.5, 0.5)) & inner
    image[liver] = 65.0
    label = liver.astype(np.uint8)

    for _ in range(rng.integers(1, 3)):  # one or two tumours, well inside the liver
        t_centre = [c + rng.uniform(-0.4, 0.4) * r for c, r in zip(liver_c, liver_r)]
        t_radius = rng.uniform(0.045, 0.075) * min(h, w) / 2
        t_radii = [t_radius / (spacing[0] / spacing[-1])] * len(through_plane) + [t_radius, t_radius]
        tumour = _ellipsoid(grid, t_centre, [max(r, 0.6) for r in t_radii]) & liver
        image[tumour] = 15.0
        label[tumour] = LABELS['tumour']

    image += rng.normal(0.0, 12.0, size=shape).astype(np.float32)
    return PhantomCase(image=image, label=label, spacing=spacing)


def _write(array: np.ndarray, spacing: Tuple[float, ...], path: str) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(reversed(spacing)))  # SimpleITK orders axes x, y(, z)
    sitk.WriteImage(img, path, useCompression=True)


def write_phantom_dataset(raw_root: str, dataset_id: int, name: str = 'DemoPhantom', num_train: int = 40,
                          num_test: int = 10, shape: Sequence[int] = (96, 96), seed: int = 0,
                          labels_test_dir: str | None = None, progress: bool = True) -> str:
    """Write ``Dataset{id:03d}_{name}`` (imagesTr, labelsTr, imagesTs, dataset.json) under
    ``raw_root`` and the test labels to ``labels_test_dir`` (default ``<dataset>/labelsTs``).

    Written into a temporary folder that is renamed at the end, so an error leaves nothing
    behind. Refuses to overwrite an existing dataset folder. Returns the dataset folder.
    """
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset id must be in 1..999, got {dataset_id}")
    if num_train < 2:
        raise ValueError(f"need at least 2 training cases, got {num_train}")
    folder = os.path.join(raw_root, f'Dataset{dataset_id:03d}_{name}')
    if os.path.exists(folder):
        raise FileExistsError(f"{folder} already exists; remove it or choose another dataset id")
    tmp = folder + '.partial'
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    try:
        for sub in ('imagesTr', 'labelsTr', 'imagesTs', 'labelsTs'):
            os.makedirs(os.path.join(tmp, sub))
        cases = [('Tr', i) for i in range(num_train)] + [('Ts', i) for i in range(num_test)]
        for split, i in tqdm(cases, desc=f'writing phantom dataset {dataset_id}', disable=not progress):
            case = make_phantom_case(rng, shape)
            identifier = f'phantom_{split.lower()}{i:03d}'
            _write(case.image, case.spacing, os.path.join(tmp, f'images{split}', f'{identifier}_0000{FILE_ENDING}'))
            _write(case.label, case.spacing, os.path.join(tmp, f'labels{split}', f'{identifier}{FILE_ENDING}'))
        generate_dataset_json(tmp, channel_names={0: 'CT'}, labels=LABELS, num_training_cases=num_train,
                              file_ending=FILE_ENDING, dataset_name=name,
                              description=f'Synthetic CT-like {len(shape)}D phantoms made by nnunet-ext '
                                          f'(seed {seed}): liver (large) and tumours (small)',
                              license='CC0 (synthetic)', converted_by='nnunet-ext')
        if labels_test_dir is not None:
            shutil.move(os.path.join(tmp, 'labelsTs'), labels_test_dir)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
