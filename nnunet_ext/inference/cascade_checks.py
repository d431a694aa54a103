"""The checks of the two-stage prediction (``cascade.py``, ``nnunet-ext cascade-predict``) that run before any
work starts: the options (folds, ``--refine`` / ``--refine_tol``, ``--coarse`` or ``--coarse_masks``,
``--save_coarse_masks``, ``--margin``), the model folders and their checkpoints, the fine model's crop
record (``nnunet_ext_crop`` in its dataset.json) against its labels and the coarse model's, and the
input folder's cases and channels. Every failure is a :class:`~nnunet_ext.errors.UserInputError`;
:func:`check_cascade` returns what the run needs (:class:`CascadePlan`).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_ext.conversion.crop_to_label import RECORD_KEY, CropLabels
from nnunet_ext.conversion.raw_dataset import case_channel_files
from nnunet_ext.errors import UserInputError

DEFAULT_FOLDS = ('0', '1', '2', '3', '4')  # nnUNetv2_predict's default
PAPER_REFINEMENT = (10, 0.99)  # multi-level paper, Section 4.1: T_max = 10, tol = 0.99


@dataclass(frozen=True)
class Refinement:
    """The test-time refinement of the coarse-to-fine framework (Algorithm 1): at most ``max_rounds`` fine
    rounds in all (1: no refinement), stopping a case when RDSC >= ``tolerance``."""
    max_rounds: int = 1
    tolerance: float = PAPER_REFINEMENT[1]

    def __post_init__(self):
        if self.max_rounds < 1:
            raise UserInputError(f"--refine takes the number of fine rounds in all (>= 1), got {self.max_rounds}")
        if not 0 < self.tolerance <= 1:
            raise UserInputError(f"--refine_tol is a relative Dice in (0, 1], got {self.tolerance}")


# ---------------------------------------------------------------- models and inputs
@dataclass(frozen=True)
class StageModel:
    """A trained nnU-Net model: ``DATASET CONFIG TRAINER [FOLD ...]`` and the plans identifier."""
    dataset: str
    configuration: str
    trainer: str
    plans: str
    folds: Tuple[str, ...]
    option: str  # the command-line option, for messages

    @classmethod
    def parse(cls, values: Sequence[str], plans: str, option: str) -> 'StageModel':
        if len(values) < 3:
            raise UserInputError(f"{option} takes DATASET CONFIG TRAINER [FOLD ...], got {' '.join(values)}")
        folds = tuple(values[3:]) or DEFAULT_FOLDS
        bad = [f for f in folds if f != 'all' and not re.fullmatch(r'\d+', f)]
        if bad:
            raise UserInputError(f"{option}: folds are numbers or 'all', got {bad}")
        return cls(values[0], values[1], values[2], plans, folds, option)

    def folder(self, checkpoint: str) -> str:
        """The model folder in nnUNet_results, checked to hold ``checkpoint`` for every fold."""
        from nnunet_ext.nnunet_glue import dataset_name
        from nnunetv2.utilities.file_path_utilities import get_output_folder
        folder = get_output_folder(dataset_name(self.dataset), self.trainer, self.plans, self.configuration)
        if not os.path.isdir(folder):
            raise UserInputError(f"{self.option}: no trained model {folder} (train it with nnUNetv2_train "
                                 f"{self.dataset} {self.configuration} FOLD -tr {self.trainer} -p {self.plans})")
        missing = [f for f in self.folds if not os.path.isfile(os.path.join(folder, f'fold_{f}', checkpoint))]
        if missing:
            raise UserInputError(f"{self.option}: {folder} has no {checkpoint} for fold(s) {', '.join(missing)}")
        return folder


def _dataset_json(folder: str) -> dict:
    with open(os.path.join(folder, 'dataset.json'), encoding='utf-8') as f:
        return json.load(f)


def list_cases(folder: str, file_ending: str, channels: int) -> Dict[str, List[str]]:
    """``{case: [channel files]}`` of an nnU-Net input folder (``CASE_XXXX<file_ending>``), every case with
    exactly the channels ``0 .. channels - 1``."""
    if not os.path.isdir(folder):
        raise UserInputError(f"-i {folder!r} is not a folder")
    found = case_channel_files(folder, file_ending, channels, 'the models')
    if not found:
        raise UserInputError(f"no CASE_0000{file_ending} images in {folder} (the models were trained on "
                             f"{file_ending} files, nnU-Net naming)")
    return found


def _read_record(fine_folder: str, option: str) -> Tuple[dict, CropLabels]:
    fine_json = _dataset_json(fine_folder)
    record = fine_json.get(RECORD_KEY)
    if record is None:
        raise UserInputError(f"{option}: {fine_folder}/dataset.json has no '{RECORD_KEY}' record: the fine model "
                             f"must be trained on a dataset made with nnunet-ext convert ... --crop-to-label LABEL")
    labels = CropLabels.from_record(record)
    model_labels = {k: v for k, v in fine_json['labels'].items()}
    if model_labels != labels.crop_dataset_labels:
        raise UserInputError(f"{option}: the model's labels {model_labels} differ from its crop record "
                             f"{labels.crop_dataset_labels}")
    return fine_json, labels


# ---------------------------------------------------------------- all checks of a run
@dataclass(frozen=True)
class CascadePlan:
    """What :func:`check_cascade` established: everything the run needs from the models and the inputs."""
    fine_folder: str
    coarse_folder: Optional[str]  # None with --coarse_masks
    record: dict  # the fine model's crop record (nnunet_ext_crop in its dataset.json)
    labels: CropLabels  # its labels
    file_ending: str
    cases: Dict[str, List[str]]  # {case: [channel files]} of the input folder
    region_values: Sequence[int]  # the coarse label values of the fine model's region labels


def check_cascade(input_folder: str, fine: StageModel, coarse: Optional[StageModel] = None,
                  coarse_masks: Optional[str] = None, checkpoint: str = 'checkpoint_final.pth',
                  margin_mm: Optional[float] = None, save_coarse_masks: Optional[str] = None,
                  refinement: Refinement = Refinement()) -> CascadePlan:
    """Checks the options, models and inputs of :func:`~nnunet_ext.inference.cascade.run_cascade` (same
    arguments; ``checkpoint``: ``PredictorSettings.checkpoint``) before any work starts; raises
    :class:`~nnunet_ext.errors.UserInputError` on the first problem."""
    if (coarse is None) == (coarse_masks is None):
        raise UserInputError("give either --coarse DATASET CONFIG TRAINER [FOLD ...] or --coarse_masks DIR")
    if save_coarse_masks is not None and coarse is None:
        raise UserInputError("--save_coarse_masks saves the coarse model's masks; with --coarse_masks there are none")
    fine_folder = fine.folder(checkpoint)
    fine_json, labels = _read_record(fine_folder, fine.option)
    record = fine_json[RECORD_KEY]
    if refinement.max_rounds > 1 and not labels.keeps_crop_label:
        raise UserInputError(f"--refine re-crops to the fine model's prediction, so the fine model must segment the "
                             f"crop label itself; {fine_folder} segments {', '.join(labels.kept)} inside "
                             f"{labels.crop_label} (make its dataset with --crop-to-label {labels.crop_label} "
                             f"--crop-keep {labels.crop_label} ...)")
    if margin_mm is not None and not np.isclose(margin_mm, record['margin_mm'], rtol=0, atol=1e-6):
        raise UserInputError(f"--margin {margin_mm:g} mm, but the fine model was trained on crops with a "
                             f"{record['margin_mm']:g} mm margin (nnunet-ext convert --crop-margin); they must agree")
    file_ending, channels = fine_json['file_ending'], len(fine_json['channel_names'])
    if coarse is not None:
        coarse_folder = coarse.folder(checkpoint)
        coarse_json = _dataset_json(coarse_folder)
        if labels.crop_label not in coarse_json['labels']:
            raise UserInputError(f"{coarse.option}: the model's labels {coarse_json['labels']} have no "
                                 f"{labels.crop_label!r}, the label the fine model's crops were made of")
        region_values = tuple(int(coarse_json['labels'][n]) for n in labels.region_labels
                              if n in coarse_json['labels'])
        if coarse_json['file_ending'] != file_ending or len(coarse_json['channel_names']) != channels:
            raise UserInputError(f"the coarse model takes {len(coarse_json['channel_names'])} channel(s) of "
                                 f"{coarse_json['file_ending']} files, the fine model {channels} of {file_ending}")
    else:
        coarse_folder = None
        if not os.path.isdir(coarse_masks):
            raise UserInputError(f"--coarse_masks {coarse_masks!r} is not a folder")
        region_values = labels.region_values
    cases = list_cases(input_folder, file_ending, channels)
    if coarse_masks is not None:
        missing = [c for c in cases if not os.path.isfile(os.path.join(coarse_masks, c + file_ending))]
        if missing:
            raise UserInputError(f"--coarse_masks: no {missing[0]}{file_ending} in {coarse_masks} "
                                 f"({len(missing)} case(s) missing)")
    return CascadePlan(fine_folder, coarse_folder, record, labels, file_ending, cases, region_values)
