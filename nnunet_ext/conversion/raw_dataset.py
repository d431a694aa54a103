"""Writing an nnU-Net raw dataset all-or-nothing.

:class:`RawDatasetWriter` is a context manager: cases are written into a hidden temporary folder next
to the target (``nnUNet_raw/.DatasetNNN_NAME.partial-XXXX``), ``dataset.json`` is written with
nnU-Net's own ``generate_dataset_json``, and the folder is moved into place (``os.replace``) only when
the ``with`` block finished without error; on any error the temporary folder is removed, so no
half-written dataset is ever left behind. A dataset id already used in ``nnUNet_raw`` is refused
unless ``overwrite=True`` (the old folder is then replaced at the very end, after success).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnunet_ext.errors import UserInputError

_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_\-]*$')


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 1 <= dataset_id <= 999:
        raise UserInputError(f"--id must be in 1..999 (nnU-Net's DatasetNNN), got {dataset_id}")
    if not _NAME.match(name):
        raise UserInputError(f"--name {name!r}: use letters, digits, '_' and '-' only")
    return f'Dataset{dataset_id:03d}_{name}'


def case_channel_files(folder: str, file_ending: str, channels: int, expected_by: str) -> Dict[str, List[str]]:
    """``{case: [channel files]}`` of an images folder in nnU-Net naming (``CASE_XXXX<file_ending>``), cases
    sorted; every case must have exactly the channels ``0 .. channels - 1`` (``expected_by`` says who
    expects them, for the error). ``{}`` for a folder without such files."""
    pattern = re.compile(r'^(.+)_(\d{4})' + re.escape(file_ending) + '$')
    found: Dict[str, Dict[int, str]] = {}
    for name in sorted(os.listdir(folder)):
        match = pattern.match(name)
        if match:
            found.setdefault(match.group(1), {})[int(match.group(2))] = os.path.join(folder, name)
    for case, files in found.items():
        if sorted(files) != list(range(channels)):
            raise UserInputError(f"{case}: channels {sorted(files)} in {folder}; {expected_by} expect(s) {channels} "
                                 f"(_0000 .. _{channels - 1:04d})")
    return {case: [files[c] for c in range(channels)] for case, files in found.items()}


def existing_datasets(raw_root: str, dataset_id: int) -> List[str]:
    """The folders ``raw_root/DatasetNNN_*`` of this id, sorted."""
    return sorted(glob.glob(os.path.join(raw_root, f'Dataset{dataset_id:03d}_*')))


@dataclass
class ConversionSummary:
    """What a conversion wrote, printed at the end: cases, label voxel counts, spacings."""
    training_cases: int = 0
    test_cases: int = 0
    label_voxels: Counter = field(default_factory=Counter)
    spacings: List[Sequence[float]] = field(default_factory=list)

    def add(self, split: str, spacing: Sequence[float], label_counts: Optional[Dict[int, int]] = None) -> None:
        if split == 'Tr':
            self.training_cases += 1
        else:
            self.test_cases += 1
        self.spacings.append(tuple(float(s) for s in spacing))
        if label_counts:
            self.label_voxels.update({int(k): int(v) for k, v in label_counts.items()})

    def format(self, labels: Dict[str, int]) -> str:
        names = {v: k for k, v in labels.items() if isinstance(v, int)}
        lines = [f"cases: {self.training_cases} training, {self.test_cases} test"]
        for value in sorted(self.label_voxels):
            lines.append(f"label {value} ({names.get(value, '?')}): {self.label_voxels[value]} voxels")
        if self.spacings:
            s = np.array(self.spacings)
            lines.append("spacing (x, y[, z]) min " + " x ".join(f"{v:.3g}" for v in s.min(0)) +
                         ", median " + " x ".join(f"{v:.3g}" for v in np.median(s, 0)) +
                         ", max " + " x ".join(f"{v:.3g}" for v in s.max(0)))
        return "\n".join(lines)


class RawDatasetWriter:
    """All-or-nothing writer of ``nnUNet_raw/DatasetNNN_NAME`` (see the module docstring).

    Inside the ``with`` block use :meth:`image_path` / :meth:`label_path` to get the file names to write
    (workers may write them in parallel), :meth:`claim_case` to reserve a case id (duplicates are an
    error) and :meth:`finish` to write ``dataset.json``. ``finish`` must be called for the dataset to
    be moved into place.
    """

    def __init__(self, raw_root: str, dataset_id: int, name: str, overwrite: bool = False,
                 file_ending: str = '.nii.gz'):
        if not raw_root:
            raise UserInputError("nnUNet_raw is not set: eval \"$(nnunet-ext env --root DIR)\" first")
        self.raw_root = os.path.abspath(raw_root)
        self.folder_name = dataset_folder_name(dataset_id, name)
        self.target = os.path.join(self.raw_root, self.folder_name)
        self.dataset_id = dataset_id
        self.overwrite = overwrite
        self.file_ending = file_ending
        self.existing = existing_datasets(self.raw_root, dataset_id)
        if self.existing and not overwrite:
            raise UserInputError(f"dataset id {dataset_id} is already taken in nnUNet_raw: "
                                 f"{', '.join(map(os.path.basename, self.existing))} (choose another --id or "
                                 f"pass --overwrite to replace it)")
        self.tmp: Optional[str] = None
        self._cases: Dict[str, str] = {}
        self._finished = False

    def __enter__(self) -> 'RawDatasetWriter':
        os.makedirs(self.raw_root, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=f'.{self.folder_name}.partial-', dir=self.raw_root)
        for sub in ('imagesTr', 'labelsTr', 'imagesTs', 'labelsTs'):
            os.makedirs(os.path.join(self.tmp, sub))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if not self._finished:
                    raise RuntimeError("RawDatasetWriter: finish() was not called; nothing was written")
                self._move_into_place()
        finally:
            if self.tmp is not None and os.path.isdir(self.tmp):
                shutil.rmtree(self.tmp)

    # --- paths
    def claim_case(self, case_id: str, source: str) -> None:
        """Reserves ``case_id``; a second claim (two sources mapping to one id) is an error naming both."""
        if not _NAME.match(case_id):
            raise UserInputError(f"case id {case_id!r} (from {source}) has characters nnU-Net cannot use")
        if case_id in self._cases:
            raise UserInputError(f"duplicate case id {case_id!r}: {self._cases[case_id]} and {source}")
        self._cases[case_id] = source

    def image_path(self, case_id: str, channel: int = 0, split: str = 'Tr') -> str:
        return os.path.join(self._tmp(), f'images{split}', f'{case_id}_{channel:04d}{self.file_ending}')

    def label_path(self, case_id: str, split: str = 'Tr') -> str:
        """``labelsTr`` (training) or ``labelsTs`` (reference labels of test cases, for evaluation)."""
        return os.path.join(self._tmp(), f'labels{split}', f'{case_id}{self.file_ending}')

    def _tmp(self) -> str:
        if self.tmp is None:
            raise RuntimeError("RawDatasetWriter must be used as a context manager")
        return self.tmp

    # --- the end
    def finish(self, channel_names: Dict[int, str], labels: Dict[str, object], **dataset_json_kwargs) -> str:
        """Writes ``dataset.json`` with nnU-Net's ``generate_dataset_json`` (training cases counted from
        ``labelsTr``; ``converted_by`` names this package unless given). Returns the final dataset folder."""
        from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
        from nnunet_ext import __version__
        dataset_json_kwargs.setdefault('converted_by', f'nnunet-ext {__version__} (nnunet-ext convert)')
        tmp = self._tmp()
        num_training = len([f for f in os.listdir(os.path.join(tmp, 'labelsTr')) if f.endswith(self.file_ending)])
        if num_training == 0:
            raise UserInputError("no training case was converted (no image/label pair found)")
        citation = dataset_json_kwargs.pop('citation', None)
        generate_dataset_json(tmp, channel_names, labels, num_training, self.file_ending,
                              dataset_name=self.folder_name, **dataset_json_kwargs)
        if citation is not None:  # nnU-Net 2.8.1's generate_dataset_json writes `release` as the citation
            path = os.path.join(tmp, 'dataset.json')
            with open(path, encoding='utf-8') as f:
                content = json.load(f)
            content['citation'] = citation
            with open(path, 'w', encoding='utf-8') as f:
                json.dump(content, f, indent=4)
        self._finished = True
        return self.target

    def _move_into_place(self) -> None:
        tmp = self._tmp()
        for sub in ('imagesTs', 'labelsTs'):
            if not os.listdir(os.path.join(tmp, sub)):
                os.rmdir(os.path.join(tmp, sub))
        for old in self.existing:  # --overwrite: only now, after everything succeeded
            shutil.rmtree(old)
        os.replace(tmp, self.target)
        self.tmp = None
