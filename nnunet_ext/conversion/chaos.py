"""CHAOS (Kavur et al. 2021; the ANU-Net paper's abdominal data) into nnU-Net raw format, one modality
per dataset: ``CT`` (liver), ``T1DUAL`` (in- and out-phase as two channels) or ``T2SPIR`` (liver, kidneys,
spleen).

Source layout (below ``INPUT``): ``CT/<n>/DICOM_anon/*.dcm`` + ``CT/<n>/Ground/*.png``;
``MR/<n>/T1DUAL/DICOM_anon/{InPhase,OutPhase}/*.dcm`` + ``MR/<n>/T1DUAL/Ground/*.png``;
``MR/<n>/T2SPIR/DICOM_anon/*.dcm`` + ``MR/<n>/T2SPIR/Ground/*.png``. Patients without ``Ground``
(the test sets) go to ``imagesTs``.

Ground truth (one PNG per slice, CHAOS's grey levels): CT 255 = liver (values other than 0 and 255
are an error); MR ranges 55-70 liver, 110-135 right kidney, 175-200 left kidney, 240-255 spleen
(other non-zero values are an error naming the file). Labels: liver 1, right kidney 2, left kidney 3,
spleen 4, or with ``--merge-kidneys`` (as in the ANU-Net paper) liver 1, kidneys 2, spleen 3.

Slice order: a PNG belongs to the DICOM file of the same stem (MR: ``IMG-0002-00001.png`` ->
``IMG-0002-00001.dcm``; for T1DUAL either phase); where the stems differ (CT: ``liver_GT_000.png`` and
``i0000,0000b.dcm``) the k-th PNG in name order belongs to the k-th DICOM file in name order (CHAOS's
convention; the counts must agree). The slice's place in the volume is then its DICOM position (the
series is sorted by ``ImagePositionPatient``), never the file name. PNG rows/columns are the DICOM
slice's rows/columns.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from nnunet_ext.conversion.dicom import read_series, series_files
from nnunet_ext.conversion.geometry import check_same_grid, label_image
from nnunet_ext.parallel import run_cases
from nnunet_ext.conversion.raw_dataset import ConversionSummary, RawDatasetWriter
from nnunet_ext.conversion.readers import label_counts, read_picture
from nnunet_ext.errors import UserInputError

MODALITIES = ('CT', 'T1DUAL', 'T2SPIR')
MR_RANGES = (('liver', 55, 70), ('right_kidney', 110, 135), ('left_kidney', 175, 200), ('spleen', 240, 255))


def label_values(merge_kidneys: bool) -> Dict[str, int]:
    if merge_kidneys:
        return {'background': 0, 'liver': 1, 'kidneys': 2, 'spleen': 3}
    return {'background': 0, 'liver': 1, 'right_kidney': 2, 'left_kidney': 3, 'spleen': 4}


def grey_to_label(case: str, png: str, grey: np.ndarray, modality: str, merge_kidneys: bool) -> np.ndarray:
    """CHAOS grey levels -> labels (see the module docstring)."""
    if modality == 'CT':
        bad = np.setdiff1d(np.unique(grey), [0, 255])
        if bad.size:
            raise UserInputError(f"{case}: CT ground truth {png} has grey values {bad[:10].tolist()}; "
                                 f"expected 0 and 255")
        return (grey == 255).astype(np.uint8)
    values = label_values(merge_kidneys)
    label = np.zeros(grey.shape, np.uint8)
    known = grey == 0
    for organ, low, high in MR_RANGES:
        inside = (grey >= low) & (grey <= high)
        label[inside] = values['kidneys' if merge_kidneys and organ.endswith('kidney') else organ]
        known |= inside
    if not known.all():
        raise UserInputError(f"{case}: ground truth {png} has grey values {np.unique(grey[~known])[:10].tolist()} "
                             f"outside CHAOS's organ ranges {[(lo, hi) for _, lo, hi in MR_RANGES]}")
    return label


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def pair_ground_truth(case: str, pngs: Sequence[str], dicom_sets: Sequence[Sequence[str]]) -> Dict[str, str]:
    """``{dicom file: png}`` for the first DICOM file set (by stem in any set, else by rank in name order)."""
    primary = list(dicom_sets[0])
    for files in dicom_sets:
        by_stem = {_stem(f): i for i, f in enumerate(files)}
        if all(_stem(p) in by_stem for p in pngs):
            if len(pngs) != len(files):
                raise UserInputError(f"{case}: {len(pngs)} ground-truth PNGs for {len(files)} DICOM slices")
            return {primary[by_stem[_stem(p)]]: p for p in pngs}
    if len(pngs) != len(primary):
        raise UserInputError(f"{case}: {len(pngs)} ground-truth PNGs for {len(primary)} DICOM slices (and their names "
                             f"do not match the DICOM files)")
    return dict(zip(sorted(primary), sorted(pngs)))


def convert_case(case: str, modality: str, folder: str, image_outs: Sequence[str], label_out: Optional[str],
                 merge_kidneys: bool) -> Tuple[Tuple[float, ...], Dict[int, int]]:
    """One patient and modality (runs in a worker). Returns (spacing, label voxel counts)."""
    dicom = os.path.join(folder, 'DICOM_anon')
    phases = [os.path.join(dicom, 'InPhase'), os.path.join(dicom, 'OutPhase')] if modality == 'T1DUAL' else [dicom]
    file_sets = [series_files(case, p) for p in phases]
    images = [read_series(case, p, files) for p, files in zip(phases, file_sets)]
    for phase, image in zip(phases[1:], images[1:]):
        check_same_grid(case, images[0], image, os.path.basename(phase))
    for image, out in zip(images, image_outs):
        sitk.WriteImage(image, out, useCompression=True)
    counts: Dict[int, int] = {}
    if label_out is not None:
        ground = os.path.join(folder, 'Ground')
        pngs = sorted(os.path.join(ground, f) for f in os.listdir(ground) if f.lower().endswith('.png'))
        if not pngs:
            raise UserInputError(f"{case}: no PNG in {ground}")
        pairs = pair_ground_truth(case, pngs, file_sets)
        shape = sitk.GetArrayViewFromImage(images[0]).shape
        label = np.zeros(shape, np.uint8)
        for k, dicom_file in enumerate(file_sets[0]):  # position order
            grey = np.asarray(read_picture(case, pairs[dicom_file]).convert('L'))
            if grey.shape != shape[1:]:
                raise UserInputError(f"{case}: {pairs[dicom_file]} is {grey.shape} (rows, columns), the DICOM slice "
                                     f"{os.path.basename(dicom_file)} is {shape[1:]}")
            label[k] = grey_to_label(case, pairs[dicom_file], grey, modality, merge_kidneys)
        sitk.WriteImage(label_image(label, images[0]), label_out, useCompression=True)
        counts = label_counts(label)
    return tuple(images[0].GetSpacing()), counts


def find_patients(input_folder: str, modality: str) -> List[Tuple[int, str]]:
    """(patient number, folder holding DICOM_anon) for the modality, in a stable order."""
    if not os.path.isdir(input_folder):
        raise UserInputError(f"CHAOS input {input_folder!r} is not a folder")
    found = []
    for root, subfolders, _ in sorted(os.walk(input_folder)):
        if 'DICOM_anon' not in subfolders:
            continue
        parts = os.path.normpath(root).split(os.sep)
        if modality == 'CT' and len(parts) >= 2 and parts[-2] == 'CT' and parts[-1].isdigit():
            found.append((int(parts[-1]), root))
        elif (modality != 'CT' and len(parts) >= 3 and parts[-1] == modality and parts[-3] == 'MR'
              and parts[-2].isdigit()):
            found.append((int(parts[-2]), root))
    if not found:
        raise UserInputError(f"no CHAOS {modality} patients below {input_folder} (expected "
                             f"{'CT/<n>/DICOM_anon' if modality == 'CT' else f'MR/<n>/{modality}/DICOM_anon'})")
    return found


def convert_chaos(input_folder: str, raw_root: str, dataset_id: int, modality: str, name: str = '',
                  merge_kidneys: bool = False, overwrite: bool = False,
                  num_processes: int = 2) -> Tuple[str, ConversionSummary, Dict[str, int]]:
    if modality not in MODALITIES:
        raise UserInputError(f"--modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    labels = {'background': 0, 'liver': 1} if modality == 'CT' else label_values(merge_kidneys)
    channels = {0: 'CT'} if modality == 'CT' else ({0: 'InPhase', 1: 'OutPhase'} if modality == 'T1DUAL' else {0: 'T2'})
    summary = ConversionSummary()
    with RawDatasetWriter(raw_root, dataset_id, name or f'CHAOS{modality}', overwrite) as writer:
        jobs = []
        for number, folder in find_patients(input_folder, modality):
            case = f'chaos_{modality.lower()}_{number:02d}'
            writer.claim_case(case, folder)
            split = 'Tr' if os.path.isdir(os.path.join(folder, 'Ground')) else 'Ts'
            jobs.append((case, modality, folder, [writer.image_path(case, c, split) for c in channels],
                         writer.label_path(case) if split == 'Tr' else None, merge_kidneys))
        for job, (spacing, counts) in zip(jobs, run_cases(convert_case, jobs, num_processes, f'CHAOS {modality}')):
            summary.add('Tr' if job[4] is not None else 'Ts', spacing, counts)
        writer.finish(channels, labels, reference='https://chaos.grand-challenge.org/',
                      description=f'CHAOS {modality} converted by nnunet-ext')
    return writer.target, summary, labels
