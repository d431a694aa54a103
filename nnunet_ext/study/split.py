"""The test set of a study, and its own split when the spec has ``[split]`` (what ``bench/ab_real.py``
uses).

Without ``[split]``: nnU-Net's folds of ``splits_final.json``; the test set is ``imagesTs`` with ``labelsTs``.

With ``[split]``: one permutation of the ``imagesTr`` cases, ``random.Random(seed).shuffle`` of the sorted
identifiers (the same for every trainer and seed). The test set is ``labelsTs`` (``test = "labelsTs"``, or
``"auto"`` when there are test labels) or the permutation's first ``holdout`` cases (default 20 %, at
least 2); of the rest the next ``val_cases`` (default 10 %, at least 1) are nnU-Net's validation cases and
the others its training cases (``val_cases = 0``: it validates on the training cases). The study builds its
own ``preprocessed/DATASET`` of symbolic links to every entry of the user's preprocessed dataset folder but
``splits_final.json``, and writes a ``splits_final.json`` with that one fold 0: nnU-Net's data loaders never
see a held-out case, and the user's folder stays untouched. Caveat: the plans (target spacing, patch size,
CT intensity percentiles) were computed on all of ``imagesTr``, the held-out cases included; only a
``labelsTs`` test set is untouched by planning.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

from nnunet_ext.errors import UserInputError
from nnunet_ext.study.layout import StudyLayout
from nnunet_ext.study.spec import StudySpec

MIN_TEST_CASES = 2
MIN_TRAIN_CASES = 2  # nnU-Net's training cases (fold 0 'train'), after the validation cases
SPLIT_FILE = 'study_split.json'  # in the private dataset folder: train, val, test
TEST_LABELS = 'study_test_labels'  # in the private dataset folder: links to the held-out cases' labels


def split_cases(training_cases: Sequence[str], labelled_test_cases: Optional[Sequence[str]],
                holdout: Optional[int], val_cases: Optional[int], seed: int) -> Dict[str, List[str]]:
    """``{'train', 'val', 'test'}`` (sorted case lists). ``labelled_test_cases`` (from labelsTs) or, when
    None, ``holdout`` cases of ``training_cases`` (default 20%, >= 2) form the test set; ``val_cases`` of
    the rest (default 10%, >= 1) are nnU-Net's validation cases, the others its training cases; with
    ``val_cases == 0`` the validation cases are the training cases. One permutation
    ``random.Random(seed).shuffle(sorted(training_cases))``: test cases first, then validation."""
    order = sorted(training_cases)
    if len(set(order)) != len(order):
        raise UserInputError('duplicate training case identifiers')
    random.Random(seed).shuffle(order)
    if labelled_test_cases is None:
        n_test = holdout if holdout is not None else max(MIN_TEST_CASES, round(0.2 * len(order)))
        if len(order) - n_test < MIN_TRAIN_CASES + (0 if val_cases == 0 else 1):
            raise UserInputError(f'split.holdout: too few cases: {len(order)} in imagesTr, {n_test} held out for '
                                 f'testing leaves {len(order) - n_test}; need {MIN_TRAIN_CASES} for training '
                                 f'{"" if val_cases == 0 else "+ 1 for validation "}(hold out fewer, or use a '
                                 f'dataset with imagesTs/labelsTs)')
        test, rest = order[:n_test], order[n_test:]
    else:
        test, rest = sorted(labelled_test_cases), order
        overlap = set(test) & set(rest)
        if overlap:
            raise UserInputError(f'test cases also in imagesTr: {", ".join(sorted(overlap)[:10])}')
    if len(test) < MIN_TEST_CASES:
        raise UserInputError(f'too few test cases: {len(test)}; need >= {MIN_TEST_CASES}')
    n_val = val_cases if val_cases is not None else max(1, round(0.1 * len(rest)))
    if len(rest) - n_val < MIN_TRAIN_CASES:
        raise UserInputError(f'split.val_cases: too few cases: {len(rest)} training cases, {n_val} for validation '
                             f'leaves {len(rest) - n_val}; need >= {MIN_TRAIN_CASES}')
    val, train = rest[:n_val], rest[n_val:]
    return {'train': sorted(train), 'val': sorted(val) if n_val else sorted(train), 'test': sorted(test)}


def raw_dataset_json(dataset: str) -> dict:
    """``nnUNet_raw/DATASET/dataset.json``."""
    with open(os.path.join(os.environ['nnUNet_raw'], dataset, 'dataset.json'), encoding='utf-8') as f:
        return json.load(f)


def _cases(folder: str, ending: str, channels: int) -> Dict[str, List[str]]:
    """``{case: [image files]}`` of a raw images folder (``CASE_0000.nii.gz`` ...)."""
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder
    if not os.path.isdir(folder):
        return {}
    return {case: [os.path.join(folder, f'{case}_{c:04d}{ending}') for c in range(channels)]
            for case in sorted(get_identifiers_from_splitted_dataset_folder(folder, ending))}


def labels_ts_cases(dataset: str) -> Dict[str, List[str]]:
    """``{case: [image files]}`` of ``imagesTs`` with a label in ``labelsTs``."""
    dataset_json = raw_dataset_json(dataset)
    ending, raw = dataset_json['file_ending'], os.path.join(os.environ['nnUNet_raw'], dataset)
    images = _cases(os.path.join(raw, 'imagesTs'), ending, len(dataset_json['channel_names']))
    return {case: files for case, files in images.items()
            if os.path.isfile(os.path.join(raw, 'labelsTs', case + ending))}


def uses_labels_ts(spec: StudySpec, dataset: str) -> bool:
    return spec.split is None or spec.split.test == 'labelsTs' or (
        spec.split.test == 'auto' and bool(labels_ts_cases(dataset)))


def private_dataset(spec: StudySpec, dataset: str) -> str:
    return os.path.join(StudyLayout(spec.folder).preprocessed, dataset)


def read_split(spec: StudySpec, dataset: str) -> Optional[dict]:
    try:
        with open(os.path.join(private_dataset(spec, dataset), SPLIT_FILE), encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def make_split(spec: StudySpec, dataset: str) -> dict:
    """The private preprocessed dataset folder with the study's split (all or nothing); returns the split."""
    raw = os.path.join(os.environ['nnUNet_raw'], dataset)
    dataset_json = raw_dataset_json(dataset)
    training = _cases(os.path.join(raw, 'imagesTr'), dataset_json['file_ending'], len(dataset_json['channel_names']))
    settings = spec.split
    labelled = sorted(labels_ts_cases(dataset)) if uses_labels_ts(spec, dataset) else None
    if settings.test == 'labelsTs' and not labelled:
        raise UserInputError(f"split.test: {dataset} has no labelsTs cases; use test = \"holdout\"")
    split = split_cases(list(training), labelled, settings.holdout, settings.val_cases, settings.seed)
    user_folder = os.path.join(os.environ['nnUNet_preprocessed'], dataset)
    target = private_dataset(spec, dataset)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    temporary = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f'.{dataset}.partial-')
    try:
        for entry in sorted(os.listdir(user_folder)):
            if entry != 'splits_final.json' and not entry.startswith('.'):
                os.symlink(os.path.join(user_folder, entry), os.path.join(temporary, entry))
        with open(os.path.join(temporary, 'splits_final.json'), 'w', encoding='utf-8') as f:
            json.dump([{'train': split['train'], 'val': split['val']}], f, indent=2)
        if not labelled:  # the held-out cases' labels, where the evaluation finds them
            os.makedirs(os.path.join(temporary, TEST_LABELS))
            ending = dataset_json['file_ending']
            for case in split['test']:
                os.symlink(os.path.join(raw, 'labelsTr', case + ending), os.path.join(temporary, TEST_LABELS,
                                                                                      case + ending))
        with open(os.path.join(temporary, SPLIT_FILE), 'w', encoding='utf-8') as f:
            json.dump(dict(split, seed=settings.seed, test_source='labelsTs' if labelled else 'held out from imagesTr'),
                      f, indent=2)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return split


def test_set(spec: StudySpec, dataset: str) -> Tuple[Dict[str, List[str]], Optional[str]]:
    """``({case: [image files]}, folder of their labels)`` of the study's test set (a folder of links to
    the held-out labels in ``labelsTr`` for a held-out test set)."""
    if uses_labels_ts(spec, dataset):
        cases = labels_ts_cases(dataset)
        return cases, os.path.join(os.environ['nnUNet_raw'], dataset, 'labelsTs') if cases else None
    split = read_split(spec, dataset)
    if split is None:
        return {}, None
    dataset_json = raw_dataset_json(dataset)
    raw, ending = os.path.join(os.environ['nnUNet_raw'], dataset), dataset_json['file_ending']
    training = _cases(os.path.join(raw, 'imagesTr'), ending, len(dataset_json['channel_names']))
    return {case: training[case] for case in split['test']}, os.path.join(private_dataset(spec, dataset), TEST_LABELS)
