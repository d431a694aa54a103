"""A/B test on real data: ``nnUNetTrainer`` against the trainers given with ``-tr``, trained for the same
budget with several seeds each, scored by test-set Dice with the stock nnU-Net predictor.

    python bench/ab_real.py --demo -tr nnUNetTrainerGODC            # phantom, 12 x 50 iterations, seeds 0 1 2
    python bench/ab_real.py --demo -tr nnUNetTrainerGODC --seeds 0 1 --epochs 2 --iterations 10   # a quick check
    python bench/ab_real.py --dataset 501 -tr nnUNetTrainerGODC nnUNetTrainerMLL --device cuda \\
        --epochs 100 --iterations 250 --val-iterations 50 --seeds 0 1 2 --out ab_501

Dataset
    Any nnU-Net raw dataset that is planned and preprocessed for ``--configuration`` with ``--plans``
    (``nnUNetv2_plan_and_preprocess -d ID -c 2d``, or ``nnunet-ext plan`` for our planners), found through
    ``--root DIR`` (``DIR/nnUNet_raw``, ``DIR/nnUNet_preprocessed``) or the environment's ``nnUNet_raw`` /
    ``nnUNet_preprocessed``. Those folders are only read, never written (one exception, as with
    ``nnUNetv2_train``: a dataset preprocessed in nnU-Net's old ``.npz`` format is unpacked in place by
    nnU-Net's trainer). ``--demo`` instead writes the demo phantom (``nnunet_ext.demo``: CT-like 2D slices,
    liver and small tumours; 40 training + 10 test cases of 96x96 by default) to ``--root`` (default: a
    temporary folder, removed afterwards) and plans and preprocesses it with nnU-Net's default planner; a
    phantom already planned in ``--root`` by an earlier run is reused.

Test set
    ``imagesTs``/``labelsTs`` when the raw dataset has ``labelsTs`` (every label file needs its images;
    images without a label are not used). Otherwise (or with ``--test-set holdout``) a held-out part of
    ``imagesTr``: ``--holdout N`` cases (default 20%, at least 2), chosen by a fixed seeded permutation
    (``random.Random(--split-seed).shuffle`` of the sorted case identifiers; the same for every trainer and
    seed). ``--test-set labelsTs`` refuses a dataset without test labels.

    Mechanism: a private ``splits_final.json``. The run builds its own ``nnUNet_preprocessed/DatasetX``
    inside the output folder, made of symbolic links to every entry of the user's preprocessed dataset
    folder (plans, dataset.json, fingerprint, preprocessed data, gt_segmentations) except
    ``splits_final.json``, and writes a ``splits_final.json`` with a single fold 0: ``val`` =
    ``--val-cases`` cases of the training part (default 10%, at least 1; the next cases of the same
    permutation) for nnU-Net's per-epoch pseudo-Dice, ``train`` = the rest. The held-out test cases are in
    neither list, so nnU-Net's data loaders never load them. Every trainer trains fold 0 of that file. The
    user's own ``splits_final.json`` and cross-validation stay untouched and nothing is preprocessed again.
    ``--val-cases 0`` trains on the whole training part and validates on it (nnU-Net's fold ``all``; the
    pseudo-Dice is then measured on training cases). Caveat of a held-out split: nnU-Net's plans
    (target spacing, patch size, CT intensity percentiles) were computed on all of ``imagesTr``, the
    held-out cases included; only a ``labelsTs`` test set is untouched by planning.

Training
    Each (trainer, seed) is one subprocess (this script with a hidden ``--run-one SPEC.json``) that seeds
    ``random``, ``numpy`` and ``torch`` (``torch.manual_seed``, which seeds every CUDA device too) with
    the seed, builds the trainer through nnU-Net's Python API exactly as ``nnUNetv2_train`` does
    (``get_trainer_from_args``, with its thread and cuDNN settings), sets ``num_epochs = --epochs``,
    ``num_iterations_per_epoch = --iterations`` and ``num_val_iterations_per_epoch = --val-iterations``
    on the instance (before ``run_training``, so nnU-Net's learning-rate schedule spans the run) and calls
    ``run_training()``. This is the same code path for ``nnUNetTrainer`` (which reads no training-length
    variable) and for ours (which also get ``nnUNet_ext_num_epochs`` etc., so their logs say so). Results
    go to a private ``nnUNet_results`` per run; checkpoints are deleted at the end unless
    ``--keep-models``.

    What the seed fixes: the network's initialisation (always) and, with ``nnUNet_n_proc_DA=0`` (the
    default here on a CPU), everything nnU-Net draws in the training process: which cases and patch
    locations are sampled, foreground oversampling and every data-augmentation parameter (nnU-Net's
    single-threaded augmenter draws from the seeded global numpy/torch generators). A CPU run with
    ``nnUNet_n_proc_DA=0`` is therefore repeatable run to run (checked: identical losses, pseudo-Dice and
    test Dice) as long as ``--jobs`` is the same (it sets the number of torch threads, which changes the
    order of floating-point sums). For a given seed every trainer whose network is nnU-Net's (GODC, MLL
    losses) starts from the same weights as ``nnUNetTrainer`` and, until a method draws random numbers of
    its own (MLL's point sampling does), sees the same batches.

    With augmentation workers (``nnUNet_n_proc_DA`` > 0, nnU-Net's default on a GPU) sampling and
    augmentation happen in the worker processes, which nnU-Net starts with ``seeds=None`` (fresh OS
    entropy); this script passes them seeds derived from the run's seed instead (worker ``i`` of the k-th
    augmenter: ``seed * 1000003 + 1000 k + i``), so each worker's stream is reproducible, but nnU-Net's
    ``NonDetMultiThreadedAugmenter`` hands out batches in whatever order the workers finish them, so the
    batch sequence, and the run, are not.
    On a GPU cuDNN autotuning (``cudnn.benchmark``, as ``nnUNetv2_train`` sets it), non-deterministic CUDA
    kernels and ``torch.compile`` add run-to-run noise of their own. Seeds measure the spread of all of
    this; the paired test below averages it out per case.

Prediction and Dice
    After training, the same subprocess predicts the test cases from their raw images with nnU-Net's
    ``nnUNetPredictor`` at its defaults (what ``nnUNetv2_predict`` runs: tile step 0.5, Gaussian weighting,
    mirroring; ``checkpoint_final.pth`` of fold 0), single-process on a CPU, with 2 preprocessing and 2
    export workers on a GPU, and evaluates them with ``nnunet_ext.evaluation`` (``nnunet-ext evaluate
    -d DATASET``: classes, regions and ignore label from dataset.json; Dice NaN when prediction and
    reference are both empty).

Statistics (functions ``seed_statistics``, ``case_means``, ``paired_statistics``)
    * Test Dice of a run, per class: mean over test cases (NaN cases skipped); "mean" = mean of those class
      means. Per trainer: mean and sample standard deviation (ddof=1; "n/a" for one seed) of the runs'
      values over seeds.
    * Paired difference to ``nnUNetTrainer``: per case and class the Dice averaged over seeds (NaN seeds
      skipped), for "mean" the average of those over classes; then ``paired_wilcoxon`` of
      ``nnunet_ext.evaluation.paired_test`` (scipy's two-sided Wilcoxon signed-rank test, zero differences
      dropped) over the cases, differences = trainer - nnUNetTrainer.
    * Seconds per iteration: the median duration of nnU-Net's ``train_step`` (forward, backward, optimiser
      step; it ends by copying the loss to the CPU, so it includes the GPU's work), robust to the first
      steps' warm-up and ``torch.compile``; averaged over seeds and as a ratio to ``nnUNetTrainer``. Also
      the wall time of ``run_training`` per iteration (data loading, augmentation, validation iterations,
      logging, checkpoints included). With ``--jobs 2`` two runs share the machine: compare ratios only.
    * Pseudo-Dice: ``checkpoint_final.pth['logging']['ema_fg_dice']`` per epoch (nnU-Net's exponential
      moving average of the foreground Dice on the validation iterations), one line per run.

Output (``--out``, default ``./ab_real``; must not exist or be empty): ``report.md`` (tables, also printed),
``pseudo_dice.png``, ``ab_real.json`` (every per-case number, the split, the settings), ``logs/`` (nnU-Net's
output per run), ``runs/TRAINER__seedS/`` (predictions, evaluation summary; ``nnUNet_results`` with
``--keep-models``). Everything is written to a hidden temporary folder next to ``--out`` that is renamed at
the very end; any error removes it, so a failed run leaves nothing behind.

On a CPU (``--device cpu``, the default) training uses ``nnUNet_n_proc_DA=0`` unless it is set, and every
subprocess gets ``OMP_WAIT_POLICY=PASSIVE``; ``--jobs 2`` runs two trainings at a time (each with half the
cores' threads). On a GPU use ``--device cuda``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

REFERENCE = 'nnUNetTrainer'
MEAN = 'mean'  # the mean over classes, as a pseudo-class in tables and statistics
FOLD = 0
DEMO_ID = 978
DEMO_NAME = 'ABRealPhantom'
MIN_TEST_CASES = 2
MIN_TRAIN_CASES = 2  # nnU-Net's training cases (fold 0 'train'), after the validation cases
HERE = os.path.abspath(__file__)


class ABError(Exception):
    """A problem with the user's input or data; printed without a traceback, exit code 2."""


class RunFailed(Exception):
    """A training run failed; the message ends with its output. Exit code 1."""


# ----------------------------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='bench/ab_real.py', description=__doc__.split('\n\n')[0],
        epilog='The docstring at the top of bench/ab_real.py explains the test set, the seeding and the statistics.')
    parser.add_argument('--dataset', help='dataset id or name (planned and preprocessed); or use --demo')
    parser.add_argument('--demo', action='store_true', help='make the demo phantom dataset and run on it')
    parser.add_argument('-c', '--configuration', default='2d', help='nnU-Net configuration (default: 2d)')
    parser.add_argument('-tr', nargs='+', required=True, metavar='TRAINER',
                        help=f'trainers to compare with {REFERENCE} (which is always trained)')
    parser.add_argument('-p', '--plans', default='nnUNetPlans', help='plans identifier (default: nnUNetPlans)')
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2], help='seeds (default: 0 1 2)')
    parser.add_argument('--epochs', type=int, default=12, help='epochs per run (default: 12)')
    parser.add_argument('--iterations', type=int, default=50, help='training iterations per epoch (default: 50)')
    parser.add_argument('--val-iterations', type=int, default=10,
                        help="nnU-Net's validation iterations per epoch, for its pseudo-Dice (default: 10)")
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda', 'mps'], help='default: cpu')
    parser.add_argument('--jobs', type=int, default=1, help='trainings run at a time (default: 1; 2 on 2 cores '
                                                            'is ~1.5x faster overall)')
    parser.add_argument('--out', default='ab_real', help='output folder (default: ./ab_real; must not exist or '
                                                         'be empty)')
    parser.add_argument('--root', help='nnU-Net data root: DIR/nnUNet_raw, DIR/nnUNet_preprocessed (default: the '
                                       "environment's); with --demo where the phantom is made (default: a "
                                       'temporary folder)')
    parser.add_argument('--test-set', choices=['auto', 'labelsTs', 'holdout'], default='auto',
                        help='auto (default): imagesTs/labelsTs if labelsTs exists, else a held-out part of imagesTr')
    parser.add_argument('--holdout', type=int, help='held-out test cases taken from imagesTr (default: 20%%, >= 2)')
    parser.add_argument('--val-cases', type=int, help="cases of the training part used for nnU-Net's pseudo-Dice "
                                                      '(default: 10%%, >= 1; 0: validate on the training cases)')
    parser.add_argument('--split-seed', type=int, default=12345, help='seed of the case permutation (default: 12345)')
    parser.add_argument('--keep-models', action='store_true', help='keep every run\'s nnUNet_results (checkpoints)')
    parser.add_argument('--demo-cases', nargs=2, type=int, default=[40, 10], metavar=('TRAIN', 'TEST'),
                        help='--demo: phantom training and test cases (default: 40 10)')
    parser.add_argument('--demo-shape', nargs='+', type=int, default=[96, 96],
                        help='--demo: phantom shape, 2 or 3 axes (default: 96 96)')
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses and checks the options that need no data; errors exit with code 2 (argparse)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo == (args.dataset is not None):
        parser.error('give exactly one of --dataset and --demo')
    if REFERENCE in args.tr:
        parser.error(f'-tr: {REFERENCE} is the reference and always trained; list only the trainers to compare')
    if len(set(args.tr)) != len(args.tr):
        parser.error('-tr: a trainer is listed twice')
    if len(set(args.seeds)) != len(args.seeds):
        parser.error('--seeds: a seed is listed twice')
    if any(s < 0 or s >= 2 ** 31 for s in args.seeds):
        parser.error('--seeds must be in 0 .. 2**31-1')
    for option in ('epochs', 'iterations', 'val_iterations', 'jobs'):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if args.holdout is not None and args.holdout < MIN_TEST_CASES:
        parser.error(f'--holdout must be >= {MIN_TEST_CASES} (a paired test needs cases), got {args.holdout}')
    if args.holdout is not None and args.test_set == 'labelsTs':
        parser.error('--holdout is for a held-out test set; it contradicts --test-set labelsTs')
    if args.val_cases is not None and args.val_cases < 0:
        parser.error(f'--val-cases must be >= 0, got {args.val_cases}')
    if args.demo:
        if args.plans != 'nnUNetPlans':
            parser.error("--demo plans the phantom with nnU-Net's default planner (nnUNetPlans): leave out --plans")
        n_train, n_test = args.demo_cases
        if n_train < MIN_TRAIN_CASES + 1 or n_test < MIN_TEST_CASES:
            parser.error(f'--demo-cases: need >= {MIN_TRAIN_CASES + 1} training and >= {MIN_TEST_CASES} test cases')
        if len(args.demo_shape) not in (2, 3) or min(args.demo_shape[-2:]) < 24:
            parser.error('--demo-shape: 2 or 3 axes, in-plane sizes >= 24')
    if len(args.seeds) < 3:
        print(f'note: {len(args.seeds)} seed{"s" if len(args.seeds) > 1 else ""}; use >= 3 for a spread over seeds',
              file=sys.stderr)
    output = os.path.abspath(args.out)
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        parser.error(f'--out {args.out} exists and is not an empty folder')
    if not os.path.isdir(os.path.dirname(output)):
        parser.error(f'the parent folder of --out {args.out} does not exist')
    if args.root is not None and not args.demo and not os.path.isdir(args.root):
        parser.error(f'--root {args.root} is not a folder')
    return args


# ------------------------------------------------------------------------------------------------- split

def split_cases(training_cases: Sequence[str], labelled_test_cases: Optional[Sequence[str]],
                holdout: Optional[int], val_cases: Optional[int], split_seed: int) -> Dict[str, List[str]]:
    """``{'train', 'val', 'test'}`` (sorted case lists). ``labelled_test_cases`` (from labelsTs) or, when
    None, ``holdout`` cases of ``training_cases`` (default 20%, >= 2) form the test set; ``val_cases`` of
    the rest (default 10%, >= 1) are nnU-Net's validation cases, the others its training cases; with
    ``val_cases == 0`` the validation cases are the training cases. One permutation
    ``random.Random(split_seed).shuffle(sorted(training_cases))``: test cases first, then validation."""
    order = sorted(training_cases)
    if len(set(order)) != len(order):
        raise ABError('duplicate training case identifiers')
    random.Random(split_seed).shuffle(order)
    if labelled_test_cases is None:
        n_test = holdout if holdout is not None else max(MIN_TEST_CASES, round(0.2 * len(order)))
        if len(order) - n_test < MIN_TRAIN_CASES + (0 if val_cases == 0 else 1):
            raise ABError(f'too few cases: {len(order)} in imagesTr, {n_test} held out for testing leaves '
                          f'{len(order) - n_test}; need {MIN_TRAIN_CASES} for training '
                          f'{"" if val_cases == 0 else "+ 1 for validation "}(give a smaller --holdout, or a dataset '
                          f'with imagesTs/labelsTs)')
        test, rest = order[:n_test], order[n_test:]
    else:
        test, rest = sorted(labelled_test_cases), order
        overlap = set(test) & set(rest)
        if overlap:
            raise ABError(f'test cases also in imagesTr: {", ".join(sorted(overlap)[:10])}')
    if len(test) < MIN_TEST_CASES:
        raise ABError(f'too few test cases: {len(test)}; need >= {MIN_TEST_CASES}')
    n_val = val_cases if val_cases is not None else max(1, round(0.1 * len(rest)))
    if len(rest) - n_val < MIN_TRAIN_CASES:
        raise ABError(f'too few cases: {len(rest)} training cases, {n_val} for validation leaves {len(rest) - n_val}; '
                      f'need >= {MIN_TRAIN_CASES} (give a smaller --val-cases)')
    val, train = rest[:n_val], rest[n_val:]
    return {'train': sorted(train), 'val': sorted(val) if n_val else sorted(train), 'test': sorted(test)}


# ------------------------------------------------------------------------------------------- statistics

def _nanmean(values) -> float:
    values = np.asarray(list(values), dtype=float)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float('nan')


def _nanstd(values) -> float:
    values = np.asarray(list(values), dtype=float)
    values = values[~np.isnan(values)]
    return float(values.std(ddof=1)) if values.size > 1 else float('nan')


def run_means(per_case: Mapping[str, Mapping[str, float]], classes: Sequence[str]) -> Dict[str, float]:
    """One run's test Dice: per class the mean over cases (NaN skipped), ``MEAN`` the mean of those."""
    means = {c: _nanmean(per_case[case][c] for case in per_case) for c in classes}
    means[MEAN] = _nanmean(means[c] for c in classes)
    return means


def seed_statistics(runs: Mapping[int, Mapping[str, Mapping[str, float]]], classes: Sequence[str]) -> dict:
    """``{class or MEAN: {'mean', 'std', 'n_seeds', 'per_seed'}}`` of one trainer over its seeds, from
    ``runs[seed][case][class]`` (Dice). std: sample standard deviation (ddof=1), NaN for one seed."""
    per_seed = {seed: run_means(per_case, classes) for seed, per_case in runs.items()}
    out = {}
    for c in [*classes, MEAN]:
        values = [per_seed[s][c] for s in sorted(per_seed)]
        out[c] = {'mean': _nanmean(values), 'std': _nanstd(values),
                  'n_seeds': int(np.count_nonzero(~np.isnan(values))),
                  'per_seed': {s: per_seed[s][c] for s in sorted(per_seed)}}
    return out


def case_means(runs: Mapping[int, Mapping[str, Mapping[str, float]]], classes: Sequence[str]
               ) -> Dict[str, Dict[str, float]]:
    """``{class or MEAN: {case: Dice averaged over seeds}}`` (NaN seeds skipped); ``MEAN`` per case is the
    average over classes of the seed-averaged values."""
    cases = sorted(set().union(*(per_case.keys() for per_case in runs.values())))
    out = {c: {case: _nanmean(runs[s][case][c] for s in runs if case in runs[s]) for case in cases}
           for c in classes}
    out[MEAN] = {case: _nanmean(out[c][case] for c in classes) for case in cases}
    return out


def paired_statistics(dice: Mapping[str, Mapping[int, Mapping[str, Mapping[str, float]]]], classes: Sequence[str],
                      reference: str = REFERENCE) -> Dict[str, Dict[str, dict]]:
    """``{trainer: {class or MEAN: paired_wilcoxon(reference, trainer)}}`` over the cases, each with the
    seed-averaged Dice (``case_means``); ``dice[trainer][seed][case][class]``."""
    from nnunet_ext.evaluation.paired_test import paired_wilcoxon
    ref = case_means(dice[reference], classes)
    out = {}
    for trainer in dice:
        if trainer == reference:
            continue
        other = case_means(dice[trainer], classes)
        out[trainer] = {c: paired_wilcoxon(ref[c], other[c]) for c in [*classes, MEAN]}
    return out


def timing_statistics(timings: Mapping[str, Mapping[int, dict]], reference: str = REFERENCE) -> Dict[str, dict]:
    """Per trainer: ``step_s`` (mean over seeds of each run's median train_step seconds), ``step_s_std``,
    ``ratio`` (to the reference's ``step_s``) and ``wall_s`` (mean over seeds of run_training seconds per
    iteration); ``timings[trainer][seed]`` holds ``step_seconds`` (list) and ``run_training_seconds``."""
    out = {}
    for trainer, runs in timings.items():
        medians = [float(np.median(r['step_seconds'])) for r in runs.values() if r['step_seconds']]
        walls = [r['run_training_seconds'] / max(1, len(r['step_seconds'])) for r in runs.values()]
        out[trainer] = {'step_s': _nanmean(medians), 'step_s_std': _nanstd(medians), 'wall_s': _nanmean(walls)}
    ref = out.get(reference, {}).get('step_s', float('nan'))
    for values in out.values():
        values['ratio'] = values['step_s'] / ref if ref and not math.isnan(ref) else float('nan')
    return out


# ---------------------------------------------------------------------------------------------- report

def _num(value, spec: str = '.4f') -> str:
    return 'n/a' if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _pm(stats: Mapping[str, float]) -> str:
    if math.isnan(stats['mean']):
        return 'n/a'
    return f"{stats['mean']:.4f} ± {_num(stats['std'])}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return '\n'.join(lines)


def dice_table(summary: Mapping[str, dict], timing: Mapping[str, dict], classes: Sequence[str]) -> str:
    header = ['trainer', 'seeds', *classes, 'mean over classes', 's/it (train_step)', 'ratio', 'wall s/it']
    rows = [[trainer, str(stats[MEAN]['n_seeds']), *[_pm(stats[c]) for c in classes], _pm(stats[MEAN]),
             _num(timing[trainer]['step_s']), _num(timing[trainer]['ratio'], '.3f'), _num(timing[trainer]['wall_s'])]
            for trainer, stats in summary.items()]
    return _table(header, rows)


def paired_table(paired: Mapping[str, Mapping[str, dict]], classes: Sequence[str]) -> str:
    header = ['trainer', 'class', 'cases', 'mean diff', 'median diff', 'W', 'p', 'note']
    rows = []
    for trainer, tests in paired.items():
        for c in [*classes, MEAN]:
            t = tests[c]
            rows.append([trainer, c, str(t['n_pairs']), _num(t['mean_difference'], '+.4f'),
                         _num(t['median_difference'], '+.4f'), _num(t['statistic'], '.1f'), _num(t['p'], '.4g'),
                         t['note'] or ''])
    return _table(header, rows)


def runs_table(summary: Mapping[str, dict], curves: Mapping[str, Mapping[int, dict]],
               timings: Mapping[str, Mapping[int, dict]], classes: Sequence[str]) -> str:
    header = ['trainer', 'seed', *classes, 'mean', 'final pseudo-Dice', 'train s', 's/it (median step)']
    rows = []
    for trainer, stats in summary.items():
        for seed in stats[MEAN]['per_seed']:
            ema = curves[trainer][seed].get('ema_fg_dice') or [float('nan')]
            run = timings[trainer][seed]
            rows.append([trainer, str(seed), *[_num(stats[c]['per_seed'][seed]) for c in [*classes, MEAN]],
                         _num(ema[-1]), f"{run['run_training_seconds']:.0f}",
                         _num(float(np.median(run['step_seconds'])) if run['step_seconds'] else float('nan'))])
    return _table(header, rows)


def render_report(content: dict) -> str:
    s = content['settings']
    split = content['split']
    budget = s['epochs'] * s['iterations']
    lines = [f"# A/B on real data: {content['dataset']}, {s['configuration']}", '',
             f"- command: `{content['command']}`",
             f"- date: {content['date']}; machine: {content['machine']}; device: {s['device']}; "
             f"torch {content['versions']['torch']}, nnunetv2 {content['versions']['nnunetv2']}",
             f"- budget per run: {s['epochs']} epochs x {s['iterations']} iterations = {budget} training iterations, "
             f"{s['val_iterations']} validation iterations per epoch; plans {s['plans']}; seeds "
             f"{' '.join(map(str, s['seeds']))}; {s['jobs']} run(s) at a time; nnUNet_n_proc_DA={s['n_proc_DA']}",
             f"- cases: {len(split['train'])} training, "
             + (f"{len(split['val'])} validation (pseudo-Dice), " if split['val'] != split['train'] else
                'validation on the training cases (--val-cases 0), ')
             + f"{len(split['test'])} test ({content['test_source']})",
             '- test Dice: mean ± sample std (ddof=1) over seeds of each run\'s mean over test cases; "mean over '
             'classes" = mean of the class means', '',
             '## Test Dice and training speed', '', content['tables']['dice'], '',
             f'## Paired difference to {REFERENCE}', '',
             'Per test case: Dice averaged over seeds (mean: then over classes); differences trainer - '
             f'{REFERENCE}; Wilcoxon signed-rank test ({content["wilcoxon"]}).', '',
             content['tables']['paired'], '', '## Runs', '', content['tables']['runs'], '',
             '## Pseudo-Dice per epoch', '',
             "nnU-Net's EMA pseudo-Dice on the validation iterations (`checkpoint_final.pth['logging']['ema_fg_dice']`)"
             '; thin: one run, thick: mean over seeds.', '', '![pseudo-Dice](pseudo_dice.png)', '']
    if content.get('notes'):
        lines += ['## Notes', '', *[f'- {n}' for n in content['notes']], '']
    return '\n'.join(lines)


def plot_pseudo_dice(curves: Mapping[str, Mapping[int, dict]], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.style
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    with matplotlib.style.context('default'):
        figure = Figure(figsize=(7.5, 4.5), layout='constrained')
        ax = figure.subplots()
        colours = matplotlib.colormaps['tab10']
        for i, (trainer, runs) in enumerate(curves.items()):
            series = [runs[s]['ema_fg_dice'] for s in sorted(runs) if runs[s].get('ema_fg_dice')]
            for values in series:
                ax.plot(range(1, len(values) + 1), values, color=colours(i % 10), alpha=0.35, linewidth=0.8)
            if series:
                length = min(len(v) for v in series)
                mean = np.mean([v[:length] for v in series], axis=0)
                ax.plot(range(1, length + 1), mean, color=colours(i % 10), linewidth=2.2, marker='o', markersize=3,
                        label=f'{trainer} ({len(series)} seeds)')
        ax.set(xlabel='epoch', ylabel='pseudo-Dice (EMA, foreground mean)', title=title, ylim=(-0.02, 1.02))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        figure.savefig(path, format='png', dpi=100)


# ------------------------------------------------------------------------------------------------- data

@contextlib.contextmanager
def _quiet(log_path: str):
    with open(log_path, 'a', encoding='utf-8') as log, contextlib.redirect_stdout(log):
        yield


def prepare_demo(args, log_path: str) -> str:
    """The demo phantom in ``nnUNet_raw`` (the environment), planned and preprocessed; reused when an
    earlier run made it with the same size. Returns the dataset name."""
    from nnunet_ext.demo.phantom import write_phantom_dataset
    name = f'Dataset{DEMO_ID:03d}_{DEMO_NAME}'
    raw, pre = os.environ['nnUNet_raw'], os.environ['nnUNet_preprocessed']
    taken = [d for base in (raw, pre) for d in os.listdir(base) if d.startswith(f'Dataset{DEMO_ID:03d}_') and d != name]
    if taken:
        raise ABError(f"dataset id {DEMO_ID} (the demo phantom's) is taken in --root by {taken[0]}: "
                      f"use another --root")
    n_train, n_test = args.demo_cases
    if os.path.isdir(os.path.join(raw, name)):
        with open(os.path.join(raw, name, 'dataset.json'), encoding='utf-8') as f:
            made = json.load(f)
        same = (made.get('numTraining') == n_train and made.get('nnunet_ext_demo_shape') == list(args.demo_shape)
                and len(os.listdir(os.path.join(raw, name, 'labelsTs'))) == n_test)
        planned = os.path.isfile(os.path.join(pre, name, f'{args.plans}.json'))
        if not (same and planned):
            raise ABError(f"{os.path.join(raw, name)} exists from an earlier run with other --demo-cases/--demo-shape, "
                          f"or was never preprocessed: remove {os.path.join(raw, name)} and "
                          f"{os.path.join(pre, name)}, or use another --root")
        print(f'reusing the demo phantom {os.path.join(raw, name)}', flush=True)
        return name
    print(f'writing the demo phantom ({n_train} + {n_test} cases of {"x".join(map(str, args.demo_shape))}) and '
          f'planning it ...', flush=True)
    folder = write_phantom_dataset(raw, DEMO_ID, DEMO_NAME, n_train, n_test, args.demo_shape, seed=0, progress=False)
    try:
        with open(os.path.join(folder, 'dataset.json'), encoding='utf-8') as f:
            dataset_json = json.load(f)
        dataset_json['nnunet_ext_demo_shape'] = list(args.demo_shape)
        with open(os.path.join(folder, 'dataset.json'), 'w', encoding='utf-8') as f:
            json.dump(dataset_json, f, indent=4)
        from nnunet_ext.planning import plan_and_preprocess
        previous = os.environ.get('nnUNet_n_proc_DA')
        os.environ['nnUNet_n_proc_DA'] = '1'  # nnU-Net's planner fails with 0
        try:
            with _quiet(log_path):
                plan_and_preprocess(DEMO_ID, 'ExperimentPlanner', configurations=[args.configuration],
                                    num_processes=[2], fingerprint_processes=2, verify_dataset_integrity=True,
                                    progress=False)
        finally:
            if previous is None:
                os.environ.pop('nnUNet_n_proc_DA', None)
            else:
                os.environ['nnUNet_n_proc_DA'] = previous
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(os.path.join(pre, name), ignore_errors=True)
        raise
    return name


def dataset_name(dataset: str) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        return maybe_convert_to_dataset_name(dataset if not dataset.isdigit() else int(dataset))
    except (RuntimeError, ValueError) as e:
        raise ABError(f'--dataset {dataset}: {e}') from None


def _image_lists(folder: str, file_ending: str, n_channels: int) -> Dict[str, List[str]]:
    from nnunetv2.utilities.utils import (create_lists_from_splitted_dataset_folder,
                                          get_identifiers_from_splitted_dataset_folder)
    if not os.path.isdir(folder):
        return {}
    identifiers = get_identifiers_from_splitted_dataset_folder(folder, file_ending)
    lists = create_lists_from_splitted_dataset_folder(folder, file_ending, identifiers)
    out = dict(zip(identifiers, lists))
    wrong = [c for c, files in out.items() if len(files) != n_channels]
    if wrong:
        raise ABError(f'{folder}: cases with other than {n_channels} channel files (_0000 ...): '
                      f'{", ".join(sorted(wrong)[:10])}')
    return out


def resolve_dataset(name: str, args) -> dict:
    """Reads the raw dataset: its training cases, the test set (labelsTs or held out) and the split;
    checks the preprocessed data. Returns what the runs need."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    raw = os.path.join(os.environ['nnUNet_raw'], name)
    pre = os.path.join(os.environ['nnUNet_preprocessed'], name)
    if not os.path.isfile(os.path.join(raw, 'dataset.json')):
        raise ABError(f'{raw}/dataset.json does not exist: the test set and the evaluation need the raw dataset')
    with open(os.path.join(raw, 'dataset.json'), encoding='utf-8') as f:
        dataset_json = json.load(f)
    lacking = [k for k in ('file_ending', 'channel_names', 'labels') if k not in dataset_json]
    if lacking:
        raise ABError(f"{raw}/dataset.json has no {', '.join(map(repr, lacking))} entry")
    file_ending, n_channels = dataset_json['file_ending'], len(dataset_json['channel_names'])
    training = get_filenames_of_train_images_and_targets(raw, dataset_json)
    labels_ts = os.path.join(raw, 'labelsTs')
    has_labels_ts = os.path.isdir(labels_ts) and any(f.endswith(file_ending) for f in os.listdir(labels_ts))
    if args.test_set == 'labelsTs' and not has_labels_ts:
        raise ABError(f'{name} has no test labels ({labels_ts} with {file_ending} files): leave out --test-set '
                      f'labelsTs to hold out part of imagesTr instead')
    notes = []
    if has_labels_ts and args.test_set != 'holdout':
        labels = {f[:-len(file_ending)]: os.path.join(labels_ts, f) for f in sorted(os.listdir(labels_ts))
                  if f.endswith(file_ending)}
        images = _image_lists(os.path.join(raw, 'imagesTs'), file_ending, n_channels)
        missing = sorted(set(labels) - set(images))
        if missing:
            raise ABError(f'{labels_ts}: labels without images in imagesTs: {", ".join(missing[:10])}')
        unused = sorted(set(images) - set(labels))
        if unused:
            notes.append(f'{len(unused)} imagesTs case(s) without a label in labelsTs not used')
        split = split_cases(list(training), list(labels), None, args.val_cases, args.split_seed)
        test_images = {c: images[c] for c in split['test']}
        test_labels = {c: labels[c] for c in split['test']}
        source = 'imagesTs/labelsTs'
    else:
        if args.test_set == 'auto':
            notes.append(f'{name} has no labelsTs: the test cases are held out from imagesTr')
        split = split_cases(list(training), None, args.holdout, args.val_cases, args.split_seed)
        test_images = {c: training[c]['images'] for c in split['test']}
        test_labels = {c: training[c]['label'] for c in split['test']}
        source = f'held out from imagesTr, split seed {args.split_seed}'
    for files in [*test_images.values(), [*test_labels.values()]]:
        for file in files:
            if not os.path.isfile(file):
                raise ABError(f'{file} does not exist')
    plans_file = os.path.join(pre, f'{args.plans}.json')
    if not os.path.isfile(plans_file):
        raise ABError(f'{plans_file} does not exist: plan and preprocess first, e.g. nnUNetv2_plan_and_preprocess -d '
                      f'{name[7:10]} -c {args.configuration} (nnunet-ext plan ... -pl PLANNER for our planners)')
    with open(plans_file, encoding='utf-8') as f:
        plans = json.load(f)
    if args.configuration not in plans['configurations']:
        raise ABError(f"{plans_file} has no configuration {args.configuration!r} "
                      f"(it has {', '.join(plans['configurations'])})")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    data_folder = os.path.join(pre, PlansManager(plans).get_configuration(args.configuration).data_identifier)
    not_preprocessed = [c for c in split['train'] + split['val']
                        if not os.path.isfile(os.path.join(data_folder, c + '.pkl'))]
    if not_preprocessed:
        raise ABError(f'{data_folder} lacks preprocessed training cases ({", ".join(not_preprocessed[:5])}'
                      f'{" ..." if len(not_preprocessed) > 5 else ""}): preprocess the dataset again')
    return dict(name=name, raw=raw, preprocessed=pre, dataset_json=dataset_json, split=split,
                test_images=test_images, test_labels=test_labels, source=source, notes=notes)


def private_preprocessed(dataset: dict, root: str) -> None:
    """``root/NAME``: links to the user's preprocessed dataset folder's entries and our splits_final.json."""
    folder = os.path.join(root, dataset['name'])
    os.makedirs(folder)
    for entry in sorted(os.listdir(dataset['preprocessed'])):
        if entry != 'splits_final.json':
            os.symlink(os.path.join(dataset['preprocessed'], entry), os.path.join(folder, entry))
    split = dataset['split']
    with open(os.path.join(folder, 'splits_final.json'), 'w', encoding='utf-8') as f:
        json.dump([{'train': split['train'], 'val': split['val']}], f, indent=2)


def check_trainers(names: Sequence[str]) -> None:
    """A quick check, before hours of training, that each trainer name is defined where nnU-Net looks:
    a ``class NAME(`` in nnU-Net's trainer tree or a folder of ``nnUNet_extTrainer`` (text search; importing
    nnU-Net's trainer tree takes ~15 s, and each run imports it anyway and fails there if it must)."""
    import importlib.util
    import re
    folders = [os.path.join(p, 'training', 'nnUNetTrainer')
               for p in importlib.util.find_spec('nnunetv2').submodule_search_locations]
    folders += [p for p in os.environ.get('nnUNet_extTrainer', '').split(os.pathsep) if p and os.path.isdir(p)]
    defined = set()
    pattern = re.compile(r'^\s*class\s+(\w+)\s*[(:]', re.M)
    for folder in folders:
        for parent, _, files in os.walk(folder):
            for file in files:
                if file.endswith('.py'):
                    with open(os.path.join(parent, file), encoding='utf-8', errors='replace') as f:
                        defined.update(pattern.findall(f.read()))
    unknown = [n for n in [REFERENCE, *names] if n not in defined]
    if unknown:
        raise ABError(f"-tr: no trainer class {', '.join(unknown)} in nnU-Net's trainers or in nnUNet_extTrainer "
                      f"({os.pathsep.join(folders[1:])}); `nnunet-ext trainers` lists ours")


# ------------------------------------------------------------------------------------------------- runs

def _seed_augmentation_workers(seed: int) -> None:
    """nnU-Net starts its augmentation workers with ``seeds=None`` (OS entropy): give them seeds derived
    from the run's seed instead (this process only)."""
    import itertools
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as module
    base = module.NonDetMultiThreadedAugmenter
    counter = itertools.count()

    class SeededNonDetMultiThreadedAugmenter(base):
        def __init__(self, data_loader, transform, num_processes, *args, seeds=None, **kwargs):
            if seeds is None:
                k = next(counter)
                seeds = [(seed * 1000003 + 1000 * k + i) % 2 ** 32 for i in range(num_processes)]
            super().__init__(data_loader, transform, num_processes, *args, seeds=seeds, **kwargs)

    module.NonDetMultiThreadedAugmenter = SeededNonDetMultiThreadedAugmenter


def run_one(spec_path: str) -> int:
    """One (trainer, seed): train, predict the test cases, evaluate; writes ``run.json`` next to the spec.
    Runs in its own process (the environment is set by the caller)."""
    with open(spec_path, encoding='utf-8') as f:
        spec = json.load(f)
    seed = spec['seed']
    random.seed(seed)
    np.random.seed(seed)
    import torch
    torch.manual_seed(seed)
    warnings.filterwarnings('ignore', category=FutureWarning)
    device = torch.device(spec['device'])
    if device.type == 'cpu':  # as nnUNetv2_train -device cpu, split between concurrent runs
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec['jobs']))
    elif device.type == 'cuda':  # as nnUNetv2_train
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
    if get_allowed_n_proc_DA() > 0:
        _seed_augmentation_workers(seed)
    from nnunetv2.run.run_training import get_trainer_from_args
    trainer = get_trainer_from_args(spec['dataset'], spec['configuration'], FOLD, spec['trainer'], spec['plans'],
                                    device=device)
    trainer.num_epochs = spec['epochs']
    trainer.num_iterations_per_epoch = spec['iterations']
    trainer.num_val_iterations_per_epoch = spec['val_iterations']
    steps: List[float] = []
    nnunet_train_step = trainer.train_step

    def train_step(batch):  # instance-level wrapper: nnU-Net's step, timed
        start = time.perf_counter()
        try:
            return nnunet_train_step(batch)
        finally:
            steps.append(time.perf_counter() - start)

    trainer.train_step = train_step
    start = time.perf_counter()
    trainer.run_training()
    run_training_seconds = time.perf_counter() - start
    fold_folder, model_folder = trainer.output_folder, trainer.output_folder_base
    del trainer
    if device.type == 'cuda':
        torch.cuda.empty_cache()

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunet_ext.evaluation.evaluate import evaluate_folders
    from nnunet_ext.evaluation.results_folders import read_training_curves
    start = time.perf_counter()
    predictor = nnUNetPredictor(device=device, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, use_folds=(FOLD,),
                                                   checkpoint_name='checkpoint_final.pth')
    cases = sorted(spec['test_images'])
    lists = [spec['test_images'][c] for c in cases]
    outputs = [os.path.join(spec['predictions'], c) for c in cases]
    os.makedirs(spec['predictions'], exist_ok=True)
    if device.type == 'cuda':
        predictor.predict_from_files(lists, outputs, save_probabilities=False, overwrite=True,
                                     num_processes_preprocessing=2, num_processes_segmentation_export=2)
    else:
        predictor.predict_from_files_sequential(lists, outputs, save_probabilities=False, overwrite=True)
    predict_seconds = time.perf_counter() - start
    summary = evaluate_folders(spec['predictions'], spec['test_labels'], dataset=spec['dataset'],
                               output_file=os.path.join(os.path.dirname(spec_path), 'evaluation.json'),
                               num_processes=1, progress=False, log=lambda *a, **k: None)
    classes = [c['name'] for c in summary['classes']]
    per_case = {c['case']: {name: c['metrics'][name]['Dice'] for name in classes}
                for c in summary['metric_per_case']}
    curves = read_training_curves(os.path.join(fold_folder, 'checkpoint_final.pth'))
    result = dict(trainer=spec['trainer'], seed=seed, classes=classes, per_case=per_case, curves=curves,
                  step_seconds=steps, run_training_seconds=run_training_seconds, predict_seconds=predict_seconds,
                  epochs=spec['epochs'], iterations=spec['iterations'])
    from nnunet_ext.evaluation.summary import nan_to_none
    with open(os.path.join(os.path.dirname(spec_path), 'run.json'), 'w', encoding='utf-8') as f:
        json.dump(nan_to_none(result), f, allow_nan=False)
    return 0


def _from_json(value):
    """None (JSON null) -> NaN for the Dice values of a run."""
    return float('nan') if value is None else float(value)


def _kill(process: subprocess.Popen) -> None:
    """Ends a run we started and the processes it started (its own session/process group)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def launch_runs(runs: Sequence[dict], environment: Mapping[str, str], jobs: int, log_folder: str) -> List[dict]:
    """Runs the specs ``jobs`` at a time, each ``python ab_real.py --run-one SPEC``; returns their
    ``run.json`` in order. The first failure ends the others and raises with the tail of its log."""
    pending = list(enumerate(runs))
    running: Dict[int, tuple] = {}
    results: Dict[int, dict] = {}
    started = time.perf_counter()
    try:
        while pending or running:
            while pending and len(running) < jobs:
                index, spec = pending.pop(0)
                log_path = os.path.join(log_folder, f"{spec['trainer']}__seed{spec['seed']}.log")
                log = open(log_path, 'w', encoding='utf-8')
                process = subprocess.Popen([sys.executable, HERE, '--run-one', spec['spec_path']],
                                           env=dict(environment), stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
                running[index] = (process, log, log_path, spec)
                print(f"[{len(results) + len(running)}/{len(runs)}] training {spec['trainer']} seed {spec['seed']} ...",
                      flush=True)
            time.sleep(0.5)
            for index, (process, log, log_path, spec) in list(running.items()):
                if process.poll() is None:
                    continue
                log.close()
                del running[index]
                if process.returncode != 0:
                    with open(log_path, encoding='utf-8', errors='replace') as f:
                        tail = f.read()[-3000:]
                    raise RunFailed(f"{spec['trainer']} seed {spec['seed']} failed (exit {process.returncode}); "
                                       f"the end of its output:\n{tail}")
                with open(os.path.join(os.path.dirname(spec['spec_path']), 'run.json'), encoding='utf-8') as f:
                    result = json.load(f)
                results[index] = result
                means = run_means({k: {c: _from_json(v) for c, v in d.items()} for k, d in result['per_case'].items()},
                                  result['classes'])
                print(f"    {spec['trainer']} seed {spec['seed']}: {result['run_training_seconds']:.0f} s training, "
                      f"test Dice " + ', '.join(f'{c} {_num(v)}' for c, v in means.items())
                      + f" ({time.perf_counter() - started:.0f} s elapsed)", flush=True)
    finally:
        for process, log, _, _ in running.values():
            _kill(process)
            log.close()
    return [results[i] for i in range(len(runs))]


# ------------------------------------------------------------------------------------------------- main

def _versions() -> Dict[str, str]:
    from importlib.metadata import version
    return {p: version(p) for p in ('torch', 'nnunetv2')}


def run(args, argv: Sequence[str]) -> str:
    """Everything after argument parsing; returns the output folder."""
    from nnunet_ext.environment import TRAINER_VARIABLE, trainers_folder
    output = os.path.abspath(args.out)
    work = tempfile.mkdtemp(prefix='.' + os.path.basename(output) + '.', suffix='.tmp', dir=os.path.dirname(output))
    demo_root = None
    started = datetime.datetime.now()
    try:
        logs = os.path.join(work, 'logs')
        os.makedirs(logs)
        driver_log = os.path.join(logs, 'setup.log')
        ours = trainers_folder()  # nnUNet_extTrainer as `nnunet-ext env` sets it: ours first, others kept
        others = [p for p in os.environ.get(TRAINER_VARIABLE, '').split(os.pathsep) if p and os.path.abspath(p) != ours]
        environment = {'nnUNet_results': os.path.join(work, 'runs'),  # each run sets its own (spec)
                       TRAINER_VARIABLE: os.pathsep.join([ours, *others])}
        if args.demo:
            demo_root = os.path.abspath(args.root) if args.root else tempfile.mkdtemp(prefix='nnunet_ext_ab_real_')
            for variable in ('nnUNet_raw', 'nnUNet_preprocessed'):
                environment[variable] = os.path.join(demo_root, variable)
                os.makedirs(environment[variable], exist_ok=True)
        else:
            for variable in ('nnUNet_raw', 'nnUNet_preprocessed'):
                folder = os.path.join(os.path.abspath(args.root), variable) if args.root else os.environ.get(variable)
                if not folder or not os.path.isdir(folder):
                    raise ABError(f'{variable} ' + (f'{folder} is not a folder' if folder else 'is not set') +
                                  ': give --root DIR (DIR/nnUNet_raw, DIR/nnUNet_preprocessed) or set it')
                environment[variable] = os.path.abspath(folder)
        os.environ.update(environment)  # nnunetv2 (2.8.1) reads them from os.environ when it needs them
        check_trainers(args.tr)
        clock = time.perf_counter()
        name = prepare_demo(args, driver_log) if args.demo else dataset_name(args.dataset)
        if args.demo:
            print(f'    ready in {time.perf_counter() - clock:.0f} s', flush=True)
        if args.device != 'cpu':
            import torch
            if args.device == 'cuda' and not torch.cuda.is_available():
                raise ABError('--device cuda: PyTorch sees no CUDA GPU')
            if args.device == 'mps' and not torch.backends.mps.is_available():
                raise ABError('--device mps: PyTorch sees no MPS device')
        dataset = resolve_dataset(name, args)
        private_pre = os.path.join(work, 'nnUNet_preprocessed')
        private_preprocessed(dataset, private_pre)
        labels_folder = os.path.join(work, 'test_labels')
        os.makedirs(labels_folder)
        ending = dataset['dataset_json']['file_ending']
        for case, path in dataset['test_labels'].items():
            os.symlink(os.path.abspath(path), os.path.join(labels_folder, case + ending))

        n_proc_da = os.environ.get('nnUNet_n_proc_DA', '0' if args.device == 'cpu' else None)
        child = {k: v for k, v in os.environ.items() if not k.startswith('nnUNet_ext_num_')}
        child.update(environment, nnUNet_preprocessed=private_pre, OMP_WAIT_POLICY='PASSIVE',
                     nnUNet_ext_num_epochs=str(args.epochs), nnUNet_ext_num_iterations_per_epoch=str(args.iterations),
                     nnUNet_ext_num_val_iterations_per_epoch=str(args.val_iterations))
        if n_proc_da is not None:
            child['nnUNet_n_proc_DA'] = n_proc_da
        trainers = [REFERENCE, *args.tr]
        specs = []
        for seed in args.seeds:
            for trainer in trainers:
                folder = os.path.join(work, 'runs', f'{trainer}__seed{seed}')
                os.makedirs(folder)
                spec = dict(dataset=name, configuration=args.configuration, plans=args.plans, trainer=trainer,
                            seed=seed, device=args.device, epochs=args.epochs, iterations=args.iterations,
                            val_iterations=args.val_iterations, jobs=args.jobs, test_images=dataset['test_images'],
                            test_labels=labels_folder, predictions=os.path.join(folder, 'predictions'),
                            spec_path=os.path.join(folder, 'spec.json'),
                            # nnU-Net names a model folder by trainer, plans and configuration only: one
                            # nnUNet_results per run, or the seeds would overwrite each other
                            nnUNet_results=os.path.join(folder, 'nnUNet_results'))
                with open(spec['spec_path'], 'w', encoding='utf-8') as f:
                    json.dump(spec, f, indent=2)
                specs.append(spec)
        split = dataset['split']
        print(f"{name}: {len(split['train'])} training, {len(split['val'])} validation, {len(split['test'])} test "
              f"cases ({dataset['source']}); {len(specs)} runs of {args.epochs} x {args.iterations} iterations on "
              f"{args.device}, {args.jobs} at a time", flush=True)
        results = launch_runs(specs, child, args.jobs, logs)

        classes = results[0]['classes']
        dice = {t: {} for t in trainers}
        curves = {t: {} for t in trainers}
        timings = {t: {} for t in trainers}
        for r in results:
            dice[r['trainer']][r['seed']] = {case: {c: _from_json(v) for c, v in values.items()}
                                             for case, values in r['per_case'].items()}
            curves[r['trainer']][r['seed']] = {k: [_from_json(v) for v in values] for k, values in r['curves'].items()}
            timings[r['trainer']][r['seed']] = {'step_seconds': r['step_seconds'],
                                                'run_training_seconds': r['run_training_seconds'],
                                                'predict_seconds': r['predict_seconds']}
        summary = {t: seed_statistics(dice[t], classes) for t in trainers}
        paired = paired_statistics(dice, classes)
        timing = timing_statistics(timings)
        from nnunet_ext.evaluation.paired_test import WILCOXON_CONVENTION
        command = 'python bench/ab_real.py ' + ' '.join(argv)
        settings = dict(configuration=args.configuration, plans=args.plans, seeds=list(args.seeds),
                        epochs=args.epochs, iterations=args.iterations, val_iterations=args.val_iterations,
                        device=args.device, jobs=args.jobs, n_proc_DA=n_proc_da if n_proc_da is not None else
                        "nnU-Net's default", split_seed=args.split_seed)
        notes = list(dataset['notes'])
        if len(args.seeds) < 3:
            notes.append(f'only {len(args.seeds)} seed(s): the spread over seeds is not meaningful')
        content = dict(dataset=name if not args.demo else f'{name} (demo phantom)', command=command,
                       date=started.isoformat(timespec='seconds'),
                       machine=f'{platform.platform()}, {os.cpu_count()} logical CPUs', versions=_versions(),
                       settings=settings, classes=classes, test_source=dataset['source'],
                       split=dataset['split'], wilcoxon=WILCOXON_CONVENTION.replace('(fold, case)', 'test-case'),
                       notes=notes)
        content['tables'] = dict(dice=dice_table(summary, timing, classes), paired=paired_table(paired, classes),
                                 runs=runs_table(summary, curves, timings, classes))
        report = render_report(content)
        plot_pseudo_dice(curves, os.path.join(work, 'pseudo_dice.png'),
                         f"{name}, {args.configuration}: {args.epochs} x {args.iterations} iterations, {args.device}")
        from nnunet_ext.evaluation.summary import nan_to_none
        record = dict(content, summary=summary, paired=paired, timing=timing,
                      dice={t: {str(s): v for s, v in runs.items()} for t, runs in dice.items()},
                      curves={t: {str(s): v for s, v in runs.items()} for t, runs in curves.items()},
                      timings={t: {str(s): v for s, v in runs.items()} for t, runs in timings.items()})
        with open(os.path.join(work, 'ab_real.json'), 'w', encoding='utf-8') as f:
            json.dump(nan_to_none(_str_keys(record)), f, indent=1, allow_nan=False)
        with open(os.path.join(work, 'report.md'), 'w', encoding='utf-8') as f:
            f.write(report)
        shutil.rmtree(private_pre)  # links only: the user's data stays
        shutil.rmtree(labels_folder)
        for spec in specs:
            os.remove(spec['spec_path'])
            if not args.keep_models:
                shutil.rmtree(os.path.join(os.path.dirname(spec['spec_path']), 'nnUNet_results'), ignore_errors=True)
        if os.path.isdir(output):
            os.rmdir(output)  # empty, checked by parse_args
        os.replace(work, output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if demo_root is not None and args.root is None:
            shutil.rmtree(demo_root, ignore_errors=True)
    print('\n' + content['tables']['dice'] + '\n\n' + content['tables']['paired'] + '\n')
    print(f'written: {output} (report.md, pseudo_dice.png, ab_real.json, logs/, runs/)')
    return output


def _str_keys(value):
    if isinstance(value, dict):
        return {str(k): _str_keys(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_str_keys(v) for v in value]
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ['--run-one']:
        if len(argv) != 2:
            print('usage: ab_real.py --run-one SPEC.json', file=sys.stderr)
            return 2
        with open(argv[1], encoding='utf-8') as f:
            results_folder = json.load(f).get('nnUNet_results')
        if results_folder:  # this run's own nnUNet_results
            os.environ['nnUNet_results'] = results_folder
        return run_one(argv[1])
    args = parse_args(argv)
    try:
        run(args, argv)
    except ABError as e:
        print(f'bench/ab_real.py: error: {e}', file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f'bench/ab_real.py: {e}\nnothing was written (--out {args.out})', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
