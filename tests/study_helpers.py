"""A tiny unplanned phantom and a study spec on it, as README tells users to run a study; oracles for its
results read from the files nnU-Net and the predictor wrote (numpy Dice, nnU-Net's checkpoints)."""
from __future__ import annotations

import glob
import os
import re
from typing import Dict, List, Sequence

import numpy as np
import SimpleITK as sitk

from cli_helpers import run, user_environment

DATASET_ID = 941
DATASET = 'Dataset941_StudyPhantom'
TRAINERS = ('nnUNetTrainer', 'nnUNetTrainerGODC')
FOLDS = (0, 1)
#: a test-sized budget, the same for every trainer (set on the trainer instance by the study's training job)
BUDGET = ('--epochs', '2', '--iterations', '2', '--val-iterations', '1')


def study_environment(root: str, dataset_id: int = DATASET_ID) -> Dict[str, str]:
    """The user's environment (``eval "$(nnunet-ext env --root ROOT)"``) with an unplanned 2D phantom of 5
    training and 2 test cases; CPU settings of a trial run."""
    from nnunet_ext.demo.phantom import write_phantom_dataset
    env = user_environment(root)
    write_phantom_dataset(env['nnUNet_raw'], dataset_id, 'StudyPhantom', num_train=5, num_test=2, shape=(32, 32),
                          seed=dataset_id, progress=False)
    env.update(nnUNet_n_proc_DA='0', nnUNet_def_n_proc='1')
    return env


def init_study(env: Dict[str, str], spec: str, executor: str, extra: Sequence[str] = ()) -> str:
    run(['nnunet-ext', 'study', 'init', spec, '-d', str(DATASET_ID), '-tr', *TRAINERS[1:], '-f',
         *map(str, FOLDS), '--device', 'cpu', '--executor', executor, *BUDGET, *extra], env)
    return spec


def fold_folder(study_folder: str, trainer: str, fold, seed: int = 0, dataset: str = DATASET) -> str:
    return os.path.join(study_folder, 'results', f'seed_{seed}', dataset, f'{trainer}__nnUNetPlans__2d',
                        f'fold_{fold}')


def prediction_folder(study_folder: str, trainer: str, seed: int = 0, dataset: str = DATASET) -> str:
    return os.path.join(study_folder, 'test', dataset, f'{trainer}__nnUNetPlans__2d', f'seed_{seed}')


def checkpoint_epochs(path: str) -> int:
    """Epochs a checkpoint's nnU-Net log holds (nnU-Net's own record, not ours)."""
    import torch
    logging = torch.load(path, map_location='cpu', weights_only=False)['logging']
    lengths = {len(v) for k, v in logging.items() if k in ('train_losses', 'val_losses', 'ema_fg_dice')}
    assert len(lengths) == 1, lengths
    return lengths.pop()


def numpy_mean_dice(predictions: str, labels: str, label: int) -> float:
    """Mean over the cases of the Dice of ``label`` (numpy; 1 for a case where both are empty)."""
    values = []
    for path in sorted(glob.glob(os.path.join(labels, '*.nii.gz'))):
        reference = sitk.GetArrayFromImage(sitk.ReadImage(path)) == label
        predicted = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(predictions, os.path.basename(path)))) == label
        total = reference.sum() + predicted.sum()
        values.append(1.0 if total == 0 else 2 * np.logical_and(reference, predicted).sum() / total)
    return float(np.mean(values))


def report_test_rows(report_md: str) -> Dict[str, List[str]]:
    """``{trainer: cells}`` of the report's test-set table (the one with a 'mean over classes' column)."""
    rows, inside = {}, False
    for line in report_md.splitlines():
        if line.startswith('| trainer | seeds |'):
            inside = True
            continue
        if inside:
            if not line.startswith('|'):
                break
            cells = [c.strip() for c in line.strip('|').split('|')]
            if not set(cells[0]) <= set('-'):
                rows[cells[0]] = cells
    return rows


def reported_mean(cell: str) -> float:
    return float(re.match(r'([-+]?\d+\.\d+)', cell).group(1))


def file_times(folder: str) -> Dict[str, float]:
    return {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(folder, '**', '*'), recursive=True)
            if os.path.isfile(p)}
