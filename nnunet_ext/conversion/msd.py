"""Medical Segmentation Decathlon tasks (a ``TaskNN_Name`` folder or its ``.tar`` download) into nnU-Net
raw format, delegating the per-image work to nnU-Net's own MSD converter (``split_4d_nifti``: 4D
multi-modal images into one file per channel, geometry kept) and writing through
:class:`RawDatasetWriter` (all-or-nothing, ``--overwrite``), which nnU-Net's ``convert_msd_dataset``
does not do, after the checks of every case (:func:`check_msd_case`; nnU-Net's converter runs none).
Labels and channel names come from the task's ``dataset.json``."""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from typing import Dict, Optional, Sequence, Tuple

import SimpleITK as sitk

from nnunet_ext.conversion.geometry import check_same_grid
from nnunet_ext.conversion.raw_dataset import ConversionSummary, RawDatasetWriter
from nnunet_ext.conversion.readers import checked_label_counts, read_image, read_label
from nnunet_ext.errors import UserInputError
from nnunet_ext.parallel import run_cases


def _task_folder(path: str, scratch: str) -> str:
    if os.path.isfile(path) and tarfile.is_tarfile(path):
        with tarfile.open(path) as archive:
            archive.extractall(scratch, filter='data')
        candidates = [os.path.join(scratch, d) for d in os.listdir(scratch)
                      if os.path.isfile(os.path.join(scratch, d, 'dataset.json'))]
        if len(candidates) != 1:
            raise UserInputError(f"{path}: expected one MSD task folder (with dataset.json) in the archive, found "
                                 f"{len(candidates)}")
        return candidates[0]
    if not os.path.isdir(path):
        raise UserInputError(f"MSD input {path!r} is neither a task folder nor a .tar archive")
    if not os.path.isfile(os.path.join(path, 'dataset.json')):
        raise UserInputError(f"MSD input {path!r} has no dataset.json: give the TaskNN_Name folder (or its .tar)")
    return path


def _nifti_cases(folder: str) -> Dict[str, str]:
    if not os.path.isdir(folder):
        return {}
    return {f[:-len('.nii.gz')]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if f.endswith('.nii.gz') and not f.startswith(('.', '_'))}


def check_msd_case(case: str, image_path: str, label_path: Optional[str], allowed_labels: Sequence[int]
                   ) -> Tuple[Tuple[float, ...], Dict[int, int]]:
    """The checks of every case (``readers``): image and label complete, finite intensities, the label on the
    image's spatial grid, label values among those ``dataset.json`` lists. Returns (spacing, label counts)."""
    image = read_image(case, image_path)
    spacing = tuple(image.GetSpacing()[:3])  # a 4D image: the spatial axes
    if label_path is None:
        return spacing, {}
    label = read_label(case, label_path)
    if label.GetDimension() != 3:
        raise UserInputError(f"{case}: label {label_path} is {label.GetDimension()}D; MSD labels are 3D")
    check_same_grid(case, image, label, 'label', source=label_path)
    counts = checked_label_counts(case, sitk.GetArrayViewFromImage(label), allowed_labels, label_path)
    return spacing, counts


def convert_msd_case(case: str, image_path: str, label_path: Optional[str], allowed_labels: Sequence[int],
                     image_folder: str, label_out: Optional[str]) -> Tuple[Tuple[float, ...], Dict[int, int]]:
    """One case (runs in a worker): :func:`check_msd_case`, then nnU-Net's ``split_4d_nifti`` and the label
    copied."""
    from nnunetv2.dataset_conversion.convert_MSD_dataset import split_4d_nifti
    spacing, counts = check_msd_case(case, image_path, label_path, allowed_labels)
    split_4d_nifti(image_path, image_folder)
    if label_path is not None:
        shutil.copy(label_path, label_out)
    return spacing, counts


def convert_msd(input_path: str, raw_root: str, dataset_id: int, name: str = '', overwrite: bool = False,
                num_processes: int = 2) -> Tuple[str, ConversionSummary]:
    with tempfile.TemporaryDirectory(prefix='nnunet_ext_msd_') as scratch:
        task = _task_folder(input_path, scratch)
        with open(os.path.join(task, 'dataset.json'), encoding='utf-8') as f:
            meta = json.load(f)
        for key in ('labels', 'modality'):
            if key not in meta:
                raise UserInputError(f"{task}/dataset.json has no {key!r}: not an MSD task folder")
        name = name or os.path.basename(os.path.normpath(task)).split('_', 1)[-1]
        images, labels = _nifti_cases(os.path.join(task, 'imagesTr')), _nifti_cases(os.path.join(task, 'labelsTr'))
        tests = _nifti_cases(os.path.join(task, 'imagesTs'))
        if sorted(images) != sorted(labels):
            only_i, only_l = sorted(set(images) - set(labels)), sorted(set(labels) - set(images))
            raise UserInputError(f"MSD {task}: images without label {only_i}, labels without image {only_l}")
        if not images:
            raise UserInputError(f"MSD {task}: no imagesTr/*.nii.gz")
        try:
            allowed = sorted(int(k) for k in meta['labels'])
        except (TypeError, ValueError):
            raise UserInputError(f"{task}/dataset.json: 'labels' must map label values to names, got "
                                 f"{meta['labels']!r}") from None
        summary = ConversionSummary()
        with RawDatasetWriter(raw_root, dataset_id, name, overwrite) as writer:
            jobs, splits = [], []
            for split, cases in (('Tr', images), ('Ts', tests)):
                for case, path in cases.items():
                    writer.claim_case(case, path)
                    label = labels.get(case) if split == 'Tr' else None
                    jobs.append((case, path, label, allowed, os.path.dirname(writer.image_path(case, split=split)),
                                 label and writer.label_path(case)))
                    splits.append(split)
            for split, (spacing, counts) in zip(splits, run_cases(convert_msd_case, jobs, num_processes,
                                                                  f'MSD {name}')):
                summary.add(split, spacing, counts)
            channel_names = {int(k): v for k, v in meta['modality'].items()}
            label_map = {v: int(k) for k, v in meta['labels'].items()}
            writer.finish(channel_names, label_map, reference=meta.get('reference'),
                          license=meta.get('licence', meta.get('license', 'see the MSD task')),
                          description=meta.get('description'), release=meta.get('release'))
        return writer.target, summary
