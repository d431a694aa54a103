"""NIH Pancreas-CT (TCIA; the multi-level loss paper's pancreas data) into nnU-Net raw format.

Source layout (the TCIA download and the separate label archive, anywhere below ``INPUT``):
``PANCREAS_NNNN/<study>/<series>/*.dcm`` (one CT series per patient) and ``labelNNNN.nii.gz`` (the
label volumes, e.g. in ``TCIA_pancreas_labels-02-05-2017/``). Labels: 0 background, 1 pancreas.

Orientation: the label NIfTI files are not stored in the DICOM series' voxel order (the known
mismatch of this dataset: their axes are flipped relative to the DICOM series as SimpleITK reads
it). We verify by geometry, never by guessing: the label is re-oriented with SimpleITK's
``DICOMOrient`` to the image's orientation (a permutation/flip of axes that keeps every voxel's
physical position), and must then lie exactly on the CT's grid (size, spacing, origin, direction up to
``geometry.GEOMETRY_TOLERANCE``); otherwise the case is refused with both geometries in the message.
The summary lists the cases whose label was re-oriented and how. Case ids ``pancreas_NNNN``.
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Tuple

import SimpleITK as sitk

from nnunet_ext.conversion.ct_intensity import CTIntensity
from nnunet_ext.conversion.dicom import read_series
from nnunet_ext.conversion.geometry import check_same_grid, label_image
from nnunet_ext.parallel import run_cases
from nnunet_ext.conversion.raw_dataset import ConversionSummary, RawDatasetWriter
from nnunet_ext.conversion.readers import add_unique, checked_label_counts, read_label
from nnunet_ext.errors import UserInputError

LABELS = {'background': 0, 'pancreas': 1}
_PATIENT = re.compile(r'^PANCREAS_(\d+)$')
_LABEL = re.compile(r'^label(\d+)\.nii(\.gz)?$')


def _series_folder(case: str, patient: str) -> str:
    """The one folder below ``patient`` that holds DICOM files."""
    folders = sorted({root for root, _, files in os.walk(patient) if any(not f.startswith('.') for f in files)})
    if not folders:
        raise UserInputError(f"{case}: no files below {patient}")
    if len(folders) > 1:
        raise UserInputError(f"{case}: {len(folders)} series folders below {patient} ({', '.join(folders[:3])}); "
                             f"expected one CT series")
    return folders[0]


def find_cases(input_folder: str) -> Tuple[Dict[int, str], Dict[int, str]]:
    if not os.path.isdir(input_folder):
        raise UserInputError(f"NIH Pancreas-CT input {input_folder!r} is not a folder")
    patients: Dict[int, str] = {}
    labels: Dict[int, str] = {}
    for folder, subfolders, files in sorted(os.walk(input_folder)):
        for name in sorted(subfolders):
            match = _PATIENT.match(name)
            if match:
                number = int(match.group(1))
                add_unique(patients, number, os.path.join(folder, name), f'patient {number}')
        for name in sorted(files):
            match = _LABEL.match(name)
            if match:
                number = int(match.group(1))
                add_unique(labels, number, os.path.join(folder, name), f'label {number}')
    return patients, labels


def orientation(image: sitk.Image) -> str:
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def align_label(case: str, image: sitk.Image, label: sitk.Image) -> Tuple[sitk.Image, str]:
    """``label`` on ``image``'s grid: as stored if it already is, else re-oriented with ``DICOMOrient``
    and checked. Returns (label, what was done)."""
    if label.GetDimension() != 3:
        raise UserInputError(f"{case}: label volume is {label.GetDimension()}D, expected 3D")
    stored, wanted = orientation(label), orientation(image)
    if stored != wanted:
        label = sitk.DICOMOrient(label, wanted)
    try:
        what = 'label' if stored == wanted else f'label (re-oriented {stored} -> {wanted})'
        check_same_grid(case, image, label, what)
    except UserInputError as e:
        raise UserInputError(f"{e}; the label does not cover the CT's voxels, refusing to guess") from None
    return label, ('' if stored == wanted else f'{stored} -> {wanted}')


def convert_case(case: str, patient: str, label_path: str, image_out: str, label_out: str,
                 intensity: CTIntensity) -> Tuple[Tuple[float, ...], Dict[int, int], str]:
    image = read_series(case, _series_folder(case, patient))
    label, reoriented = align_label(case, image, read_label(case, label_path))
    values = sitk.GetArrayViewFromImage(label)
    counts = checked_label_counts(case, values, tuple(LABELS.values()), label_path)
    sitk.WriteImage(label_image(values, image), label_out, useCompression=True)
    sitk.WriteImage(intensity.apply_to_image(image), image_out, useCompression=True)
    return tuple(image.GetSpacing()), counts, reoriented


def convert_nih_pancreas(input_folder: str, raw_root: str, dataset_id: int, name: str = 'PancreasCT',
                         overwrite: bool = False, intensity: CTIntensity = CTIntensity(),
                         num_processes: int = 2) -> Tuple[str, ConversionSummary, List[str]]:
    patients, labels = find_cases(input_folder)
    no_label, no_patient = sorted(set(patients) - set(labels)), sorted(set(labels) - set(patients))
    if no_label:
        raise UserInputError(f"NIH Pancreas-CT: no labelNNNN.nii.gz for patient(s) {no_label[:10]}")
    if no_patient:
        raise UserInputError(f"NIH Pancreas-CT: no PANCREAS_NNNN DICOM folder for label(s) {no_patient[:10]}")
    if not patients:
        raise UserInputError(f"no PANCREAS_NNNN folders and labelNNNN.nii.gz files below {input_folder}")
    summary = ConversionSummary()
    notes: List[str] = []
    with RawDatasetWriter(raw_root, dataset_id, name, overwrite) as writer:
        jobs = []
        for number in sorted(patients):
            case = f'pancreas_{number:04d}'
            writer.claim_case(case, patients[number])
            jobs.append((case, patients[number], labels[number], writer.image_path(case), writer.label_path(case),
                         intensity))
        converted = run_cases(convert_case, jobs, num_processes, 'Pancreas-CT')
        for job, (spacing, counts, reoriented) in zip(jobs, converted):
            summary.add('Tr', spacing, counts)
            if reoriented:
                notes.append(f"{job[0]}: label re-oriented {reoriented}")
        writer.finish({0: 'CT'}, LABELS, reference='https://doi.org/10.7937/K9/TCIA.2016.tNB1kqBU',
                      description='NIH Pancreas-CT converted by nnunet-ext', nnunet_ext_intensity=intensity.record())
    return writer.target, summary, notes
