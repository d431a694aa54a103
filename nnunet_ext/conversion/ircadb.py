"""3D-IRCADb-01 (IRCAD, Soler et al. 2010; the ResUNet and GODC papers' liver data) into nnU-Net raw format.

Source layout: patient folders ``3Dircadb1.N`` anywhere below ``INPUT``, each with ``PATIENT_DICOM``
(the CT series) and ``MASKS_DICOM/<structure>`` (one binary DICOM series per structure: ``liver``,
``livertumor01``, ``portalvein``, ...), as folders or as the distributed ``PATIENT_DICOM.zip`` /
``MASKS_DICOM.zip``. Slices are ordered by DICOM position (:mod:`nnunet_ext.conversion.dicom`).

Labels: ``--structures`` maps structure-name patterns (``fnmatch``) to label values, applied in the
given order (a later structure overwrites an earlier one where they overlap); default ``liver=1
livertumor*=2`` (liver, all liver tumours merged). A pattern without wildcard must exist in every
patient; a wildcard pattern may match none (a patient without tumours). Every mask must lie on the
CT's grid (same size, spacing, origin, direction). Case ids ``ircadb_NN``.
"""
from __future__ import annotations

import fnmatch
import os
import re
import tempfile
from typing import Dict, List, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from nnunet_ext.conversion.ct_intensity import CTIntensity
from nnunet_ext.conversion.dicom import read_series, unzipped
from nnunet_ext.conversion.geometry import check_same_grid, label_image
from nnunet_ext.parallel import run_cases
from nnunet_ext.conversion.raw_dataset import ConversionSummary, RawDatasetWriter
from nnunet_ext.conversion.readers import add_unique, label_counts
from nnunet_ext.errors import UserInputError

DEFAULT_STRUCTURES = (('liver', 1), ('livertumor*', 2))
_PATIENT = re.compile(r'^3Dircadb1\.(\d+)$')


def parse_structures(items: Sequence[str]) -> Tuple[Tuple[str, int], ...]:
    """``['liver=1', 'livertumor*=2']`` -> ``(('liver', 1), ('livertumor*', 2))``."""
    out = []
    for item in items:
        pattern, sep, value = item.partition('=')
        if not sep or not pattern or not value.isdigit() or not 1 <= int(value) <= 255:
            raise UserInputError(f"--structures {item!r}: expected PATTERN=LABEL with LABEL in 1..255, e.g. liver=1")
        out.append((pattern, int(value)))
    return tuple(out)


def label_names(structures: Sequence[Tuple[str, int]]) -> Dict[str, int]:
    names: Dict[str, int] = {'background': 0}
    for pattern, value in structures:
        name = 'tumor' if pattern == 'livertumor*' else re.sub(r'[^A-Za-z0-9_]', '', pattern) or f'label{value}'
        if value not in names.values():
            names[name] = value
    return names


def find_patients(input_folder: str) -> Dict[int, str]:
    if not os.path.isdir(input_folder):
        raise UserInputError(f"3D-IRCADb input {input_folder!r} is not a folder")
    found: Dict[int, str] = {}
    for folder, subfolders, _ in sorted(os.walk(input_folder)):
        for name in sorted(subfolders):
            match = _PATIENT.match(name)
            if match:
                number = int(match.group(1))
                add_unique(found, number, os.path.join(folder, name), f'3D-IRCADb patient {number}')
    if not found:
        raise UserInputError(f"no 3D-IRCADb patient folder (3Dircadb1.N) below {input_folder}")
    return found


def convert_case(case: str, folder: str, image_out: str, label_out: str, structures: Tuple[Tuple[str, int], ...],
                 intensity: CTIntensity) -> Tuple[Tuple[float, ...], Dict[int, int], List[str]]:
    """One patient (runs in a worker). Returns (spacing, label voxel counts, structures used)."""
    with tempfile.TemporaryDirectory(prefix='nnunet_ext_ircadb_') as scratch:
        image = read_series(case, unzipped(case, os.path.join(folder, 'PATIENT_DICOM'), scratch))
        masks = unzipped(case, os.path.join(folder, 'MASKS_DICOM'), scratch)
        available = sorted(d for d in os.listdir(masks) if os.path.isdir(os.path.join(masks, d)))
        label = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
        used: List[str] = []
        for pattern, value in structures:
            matched = fnmatch.filter(available, pattern)
            if not matched and not any(c in pattern for c in '*?['):
                raise UserInputError(f"{case}: no mask {pattern!r} in {masks} (available: {', '.join(available)})")
            for name in matched:
                mask = read_series(case, os.path.join(masks, name))
                check_same_grid(case, image, mask, f'mask {name!r}')
                label[sitk.GetArrayViewFromImage(mask) > 0] = value
                used.append(name)
        sitk.WriteImage(label_image(label, image), label_out, useCompression=True)
        sitk.WriteImage(intensity.apply_to_image(image), image_out, useCompression=True)
    return tuple(image.GetSpacing()), label_counts(label), used


def convert_ircadb(input_folder: str, raw_root: str, dataset_id: int, name: str = 'IRCADb',
                   structures: Sequence[Tuple[str, int]] = DEFAULT_STRUCTURES, overwrite: bool = False,
                   intensity: CTIntensity = CTIntensity(), num_processes: int = 2
                   ) -> Tuple[str, ConversionSummary, Dict[str, int]]:
    patients = find_patients(input_folder)
    labels = label_names(structures)
    summary = ConversionSummary()
    with RawDatasetWriter(raw_root, dataset_id, name, overwrite) as writer:
        jobs = []
        for number, folder in sorted(patients.items()):
            case = f'ircadb_{number:02d}'
            writer.claim_case(case, folder)
            jobs.append((case, folder, writer.image_path(case), writer.label_path(case), tuple(structures), intensity))
        for spacing, counts, _ in run_cases(convert_case, jobs, num_processes, '3D-IRCADb'):
            summary.add('Tr', spacing, counts)
        writer.finish({0: 'CT'}, labels, reference='https://www.ircad.fr/research/data-sets/liver-segmentation-3d-ircadb-01/',
                      description='3D-IRCADb-01 converted by nnunet-ext',
                      nnunet_ext_intensity=intensity.record())
    return writer.target, summary, labels
