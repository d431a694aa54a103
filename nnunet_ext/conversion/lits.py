"""LiTS (Liver Tumor Segmentation Challenge, Bilic et al. 2019; the ResUNet and GODC papers' liver
data) into nnU-Net raw format.

Source layout: ``volume-N.nii[.gz]`` and ``segmentation-N.nii[.gz]`` anywhere below ``INPUT`` (e.g. the
two "Training Batch 1/2" folders of the download), test volumes ``test-volume-N.nii[.gz]`` (no labels)
to ``imagesTs``. Labels: 0 background, 1 liver, 2 tumour. Case ids ``lits_NNN`` / ``lits_test_NNN``.

Each case is checked before it is written: a segmentation exists for every volume (and vice versa),
image and segmentation have the same size and the same geometry (spacing, origin, direction up to
``geometry.GEOMETRY_TOLERANCE``; the label then gets the image's geometry exactly, as nnU-Net's integrity check
wants), the label values are within {0, 1, 2}. Cases are converted one at a time per worker
(streaming; the download is ~15 GB).
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Tuple

import SimpleITK as sitk

from nnunet_ext.conversion.ct_intensity import CTIntensity
from nnunet_ext.conversion.geometry import check_same_grid, label_image
from nnunet_ext.parallel import run_cases
from nnunet_ext.conversion.raw_dataset import ConversionSummary, RawDatasetWriter
from nnunet_ext.conversion.readers import add_unique, checked_label_counts, read_image, read_label
from nnunet_ext.errors import UserInputError

LABELS = {'background': 0, 'liver': 1, 'tumor': 2}
_PATTERNS = {
    'volume': re.compile(r'^volume-(\d+)\.nii(\.gz)?$'),
    'segmentation': re.compile(r'^segmentation-(\d+)\.nii(\.gz)?$'),
    'test': re.compile(r'^test-volume-(\d+)\.nii(\.gz)?$'),
}


def find_lits_files(input_folder: str) -> Dict[str, Dict[int, str]]:
    """``{'volume': {N: path}, 'segmentation': {N: path}, 'test': {N: path}}`` from a recursive walk;
    the same case number twice (e.g. a .nii and a .nii.gz) is an error naming both files."""
    if not os.path.isdir(input_folder):
        raise UserInputError(f"LiTS input {input_folder!r} is not a folder")
    found: Dict[str, Dict[int, str]] = {kind: {} for kind in _PATTERNS}
    for folder, _, files in sorted(os.walk(input_folder)):
        for name in sorted(files):
            for kind, pattern in _PATTERNS.items():
                match = pattern.match(name)
                if match:
                    number = int(match.group(1))
                    add_unique(found[kind], number, os.path.join(folder, name), f'LiTS {kind} {number}')
    return found


def convert_case(case: str, image_path: str, label_path: Optional[str], image_out: str, label_out: Optional[str],
                 intensity: CTIntensity, allowed_labels: Tuple[int, ...]) -> Tuple[Tuple[float, ...], Dict[int, int]]:
    """Converts one case (runs in a worker). Returns (spacing, label voxel counts)."""
    image = read_image(case, image_path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise UserInputError(f"{case}: expected a 3D single-channel CT volume, got {image.GetDimension()}D with "
                             f"{image.GetNumberOfComponentsPerPixel()} components ({image_path})")
    counts: Dict[int, int] = {}
    if label_path is not None:
        label = read_label(case, label_path)
        check_same_grid(case, image, label)
        values = sitk.GetArrayViewFromImage(label)
        counts = checked_label_counts(case, values, allowed_labels, label_path)
        sitk.WriteImage(label_image(values, image), label_out, useCompression=True)
    sitk.WriteImage(intensity.apply_to_image(image), image_out, useCompression=True)
    return tuple(image.GetSpacing()), counts


def convert_lits(input_folder: str, raw_root: str, dataset_id: int, name: str = 'LiTS', overwrite: bool = False,
                 intensity: CTIntensity = CTIntensity(), num_processes: int = 2) -> Tuple[str, ConversionSummary]:
    found = find_lits_files(input_folder)
    volumes, segmentations = found['volume'], found['segmentation']
    missing_seg = sorted(set(volumes) - set(segmentations))
    missing_vol = sorted(set(segmentations) - set(volumes))
    if missing_seg:
        raise UserInputError(f"LiTS: no segmentation for volume(s) {missing_seg} (e.g. {volumes[missing_seg[0]]})")
    if missing_vol:
        raise UserInputError(f"LiTS: no volume for segmentation(s) {missing_vol} "
                             f"(e.g. {segmentations[missing_vol[0]]})")
    if not volumes:
        raise UserInputError(f"LiTS: no volume-N.nii[.gz] / segmentation-N.nii[.gz] pair below {input_folder}")
    summary = ConversionSummary()
    with RawDatasetWriter(raw_root, dataset_id, name, overwrite) as writer:
        jobs: List[Tuple] = []
        for number in sorted(volumes):
            case = f'lits_{number:03d}'
            writer.claim_case(case, volumes[number])
            jobs.append((case, volumes[number], segmentations[number], writer.image_path(case),
                         writer.label_path(case), intensity, tuple(LABELS.values())))
        for number, path in sorted(found['test'].items()):
            case = f'lits_test_{number:03d}'
            writer.claim_case(case, path)
            jobs.append((case, path, None, writer.image_path(case, split='Ts'), None, intensity, ()))
        for job, (spacing, counts) in zip(jobs, run_cases(convert_case, jobs, num_processes, 'LiTS')):
            summary.add('Tr' if job[2] is not None else 'Ts', spacing, counts)
        target = writer.finish({0: 'CT'}, LABELS, reference='https://competitions.codalab.org/competitions/17094',
                               description='LiTS converted by nnunet-ext',
                               nnunet_ext_intensity=intensity.record())
    return target, summary

