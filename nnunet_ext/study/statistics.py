"""The statistics of a study report: Dice over cases and seeds, the paired
test against the baseline, seconds per iteration.

Dice values are ``runs[run][case][class]`` with NaN where the Dice is undefined (prediction and reference
both empty; ``None`` in the study's ``results``). A *run* is one seed: its test cases, or for
cross-validation the validation cases of all its folds pooled (keys ``(fold, case)``: folds are disjoint,
so each training case counts once per seed).

* Dice of a run, per class: the mean over its cases, NaN cases skipped; :data:`MEAN` is the mean of those
  class means (:func:`run_means`).
* Per trainer: mean and sample standard deviation (ddof=1; NaN for one seed) of the runs' values over
  seeds (:func:`seed_statistics`).
* Paired difference to the baseline: per case and class the Dice averaged over seeds (NaN seeds skipped);
  for :data:`MEAN` the average over classes of those; then ``paired_wilcoxon`` of
  :mod:`nnunet_ext.evaluation.paired_test` over the cases, differences = trainer - baseline, with the
  number of cases where the trainer is better and worse (:func:`paired_statistics`).
* Seconds per iteration: per run the median duration of nnU-Net's ``train_step``; per trainer the mean
  over its runs, and the ratio to the baseline's (:func:`timing_statistics`).

:func:`configuration_statistics` computes all of it for one configuration of a study's ``results``
(the dict described in :mod:`nnunet_ext.study.report`).
"""
from __future__ import annotations

import math
from typing import Dict, Hashable, List, Mapping, Optional, Sequence

import numpy as np

from nnunet_ext.evaluation.paired_test import paired_wilcoxon

__all__ = ["MEAN", "REFERENCE", "nanmean", "nanstd", "run_means", "seed_statistics", "case_means", "paired_test",
           "paired_statistics", "median_step", "timing_statistics", "fold_key", "configurations", "arm_names",
           "configuration_statistics"]

MEAN = 'mean'  # the mean over classes, as a pseudo-class in tables and statistics
REFERENCE = 'nnUNetTrainer'  # the default baseline
NAN = float('nan')

Runs = Mapping[Hashable, Mapping[Hashable, Mapping[str, float]]]  # runs[run][case][class] -> Dice


def nanmean(values) -> float:
    """The mean of the non-NaN values; NaN when there is none."""
    values = np.asarray(list(values), dtype=float)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else NAN


def nanstd(values) -> float:
    """The sample standard deviation (ddof=1) of the non-NaN values; NaN for fewer than two."""
    values = np.asarray(list(values), dtype=float)
    values = values[~np.isnan(values)]
    return float(values.std(ddof=1)) if values.size > 1 else NAN


def run_means(per_case: Mapping[Hashable, Mapping[str, float]], classes: Sequence[str]) -> Dict[str, float]:
    """One run's Dice: per class the mean over cases (NaN skipped), ``MEAN`` the mean of those."""
    means = {c: nanmean(per_case[case][c] for case in per_case) for c in classes}
    means[MEAN] = nanmean(means[c] for c in classes)
    return means


def seed_statistics(runs: Runs, classes: Sequence[str]) -> dict:
    """``{class or MEAN: {'mean', 'std', 'n_seeds', 'per_seed'}}`` of one trainer over its seeds, from
    ``runs[seed][case][class]`` (Dice). std: sample standard deviation (ddof=1), NaN for one seed."""
    per_seed = {seed: run_means(per_case, classes) for seed, per_case in runs.items()}
    out = {}
    for c in [*classes, MEAN]:
        values = [per_seed[s][c] for s in sorted(per_seed)]
        out[c] = {'mean': nanmean(values), 'std': nanstd(values),
                  'n_seeds': int(np.count_nonzero(~np.isnan(values))),
                  'per_seed': {s: per_seed[s][c] for s in sorted(per_seed)}}
    return out


def case_means(runs: Runs, classes: Sequence[str]) -> Dict[str, Dict[Hashable, float]]:
    """``{class or MEAN: {case: Dice averaged over seeds}}`` (NaN seeds skipped); ``MEAN`` per case is the
    average over classes of the seed-averaged values."""
    cases = sorted(set().union(*(per_case.keys() for per_case in runs.values())))
    out = {c: {case: nanmean(runs[s][case][c] for s in runs if case in runs[s]) for case in cases}
           for c in classes}
    out[MEAN] = {case: nanmean(out[c][case] for c in classes) for case in cases}
    return out


def paired_test(reference: Mapping[Hashable, float], other: Mapping[Hashable, float]) -> dict:
    """``paired_wilcoxon(reference, other)`` plus ``n_better`` and ``n_worse``: the paired cases (both
    values defined) where ``other`` is above and below ``reference``."""
    result = paired_wilcoxon(reference, other)
    differences = [other[k] - reference[k] for k in reference.keys() & other.keys()
                   if not math.isnan(reference[k]) and not math.isnan(other[k])]
    result['n_better'] = sum(d > 0 for d in differences)
    result['n_worse'] = sum(d < 0 for d in differences)
    return result


def paired_statistics(dice: Mapping[str, Runs], classes: Sequence[str],
                      reference: str = REFERENCE) -> Dict[str, Dict[str, dict]]:
    """``{trainer: {class or MEAN: paired_test(reference, trainer)}}`` over the cases, each with the
    seed-averaged Dice (``case_means``); ``dice[trainer][seed][case][class]``. A reference without runs
    gives tests without pairs (their note says so)."""
    ref = case_means(dice.get(reference, {}), classes)
    out = {}
    for trainer in dice:
        if trainer == reference:
            continue
        other = case_means(dice[trainer], classes)
        out[trainer] = {c: paired_test(ref[c], other[c]) for c in [*classes, MEAN]}
    return out


def median_step(step_seconds) -> Optional[float]:
    """A run's seconds per iteration: the median of its ``train_step`` durations (a list), a median
    already taken (a number), or None when it has none."""
    if step_seconds is None:
        return None
    if isinstance(step_seconds, (int, float)):
        return None if math.isnan(step_seconds) else float(step_seconds)
    return float(np.median(step_seconds)) if len(step_seconds) else None


def _wall_per_step(run: Mapping) -> float:
    """run_training seconds per iteration, when the run has its step list and its training time."""
    steps, seconds = run.get('step_seconds'), run.get('run_training_seconds')
    if seconds is None or steps is None or isinstance(steps, (int, float)):
        return NAN
    return seconds / max(1, len(steps))


def timing_statistics(timings: Mapping[str, Mapping[Hashable, dict]], reference: str = REFERENCE
                      ) -> Dict[str, dict]:
    """Per trainer: ``step_s`` (mean over its runs of each run's median train_step seconds), ``step_s_std``
    (ddof=1), ``n_runs`` (runs with a step time), ``ratio`` (to the reference's ``step_s``) and ``wall_s``
    (mean over runs of run_training seconds per iteration; NaN without). ``timings[trainer][run]`` holds
    ``step_seconds`` (see :func:`median_step`) and optionally ``run_training_seconds``."""
    out = {}
    for trainer, runs in timings.items():
        medians = [m for m in (median_step(r.get('step_seconds')) for r in runs.values()) if m is not None]
        out[trainer] = {'step_s': nanmean(medians), 'step_s_std': nanstd(medians), 'n_runs': len(medians),
                        'wall_s': nanmean(_wall_per_step(r) for r in runs.values())}
    ref = out.get(reference, {}).get('step_s', NAN)
    for values in out.values():
        values['ratio'] = values['step_s'] / ref if ref and not math.isnan(ref) else NAN
    return out


# ------------------------------------------------------------------------------------- a study's results

def _dice(value) -> float:
    return NAN if value is None else float(value)


def _per_case(values: Mapping[str, Mapping[str, Optional[float]]], classes: Sequence[str], fold=None) -> dict:
    """``{case or (fold, case): {class: Dice}}`` with None (and absent classes) as NaN."""
    return {(case if fold is None else (str(fold), case)): {c: _dice(v.get(c)) for c in classes}
            for case, v in values.items()}


def fold_key(fold) -> tuple:
    """Sort key of folds: 0, 1, ... then 'all'."""
    return (1, str(fold)) if isinstance(fold, str) else (0, fold)


def configurations(results: Mapping) -> List[str]:
    """The configurations of the study, in the order they first appear (trainings, then tests)."""
    return list(dict.fromkeys(e['configuration'] for e in [*results['trainings'], *results['tests']]))


def arm_names(entries: Sequence[Mapping], baseline: str) -> Dict[tuple, str]:
    """``{(trainer, plans): name}`` for the entries of one configuration: the trainer's name, with the
    plans after a slash where the configuration has several plans. The baseline's come first."""
    pairs = list(dict.fromkeys((e['trainer'], e['plans']) for e in entries))
    pairs.sort(key=lambda pair: pair[0] != baseline)
    several = len({plans for _, plans in pairs}) > 1
    return {pair: f'{pair[0]} / {pair[1]}' if several else pair[0] for pair in pairs}


def _group(entries: Sequence[Mapping], names: Mapping[tuple, str]) -> Dict[str, List[Mapping]]:
    """The 'done' entries per arm name (every arm present, possibly empty)."""
    out: Dict[str, List[Mapping]] = {name: [] for name in names.values()}
    for e in entries:
        if e['state'] == 'done':
            out[names[(e['trainer'], e['plans'])]].append(e)
    return out


def _validation(done: Mapping[str, List[Mapping]], classes: Sequence[str], baseline: Optional[str]) -> dict:
    runs = {}
    for arm, trainings in done.items():
        runs[arm] = {}
        for t in trainings:
            if t.get('validation_per_case'):
                seed_runs = runs[arm].setdefault(t['seed'], {})
                seed_runs.update(_per_case(t['validation_per_case'], classes, t['fold']))
    folds = {arm: sorted({t['fold'] for t in trainings if t.get('validation_per_case')}, key=fold_key)
             for arm, trainings in done.items()}
    cases = {arm: len(set().union(*(r.keys() for r in arm_runs.values()))) for arm, arm_runs in runs.items()}
    return {'summary': {arm: seed_statistics(r, classes) for arm, r in runs.items()},
            'paired': paired_statistics(runs, classes, baseline) if baseline else {},
            'folds': folds, 'cases': cases}


def _test(done: Mapping[str, List[Mapping]], classes: Sequence[str], baseline: Optional[str]) -> dict:
    runs = {arm: {t['seed']: _per_case(t['per_case'], classes) for t in tests if t.get('per_case') is not None}
            for arm, tests in done.items()}
    return {'summary': {arm: seed_statistics(r, classes) for arm, r in runs.items()},
            'paired': paired_statistics(runs, classes, baseline) if baseline else {},
            'case_means': {arm: case_means(r, classes) for arm, r in runs.items()},
            'cases': {arm: len(set().union(*(r.keys() for r in arm_runs.values()))) for arm, arm_runs in runs.items()}}


def _timing(done: Mapping[str, List[Mapping]], baseline: Optional[str]) -> dict:
    timings = {arm: {(t['fold'], t['seed']): {'step_seconds': t.get('step_seconds')} for t in trainings}
               for arm, trainings in done.items()}
    out = timing_statistics(timings, baseline or '')  # no baseline: no ratios
    for arm, trainings in done.items():
        out[arm]['epochs'] = sorted({t['epochs'] for t in trainings if t.get('epochs') is not None})
    return out


def configuration_statistics(results: Mapping, configuration: str) -> dict:
    """Everything the report shows for one configuration: ``arms`` (names, baseline first), ``baseline``
    (its arm name, or None when the study has no baseline entry here), ``validation`` (``summary``,
    ``paired``, ``folds``, ``cases`` per arm), ``test`` (``summary``, ``paired``, ``case_means``, ``cases``;
    None without a test set), ``timing`` (:func:`timing_statistics` plus ``epochs``) and ``curves``
    (``{arm: {'fold F, seed S': curves}}``). Only entries in state 'done' count."""
    classes = results['classes']
    trainings = [e for e in results['trainings'] if e['configuration'] == configuration]
    tests = [e for e in results['tests'] if e['configuration'] == configuration]
    names = arm_names([*trainings, *tests], results['baseline'])
    baseline = next((name for (trainer, _), name in names.items() if trainer == results['baseline']), None)
    done_trainings, done_tests = _group(trainings, names), _group(tests, names)
    has_test_set = bool(results.get('test_images')) or bool(tests)
    curves = {arm: {f"fold {t['fold']}, seed {t['seed']}": t['curves'] for t in ts if t.get('curves')}
              for arm, ts in done_trainings.items()}
    return {'arms': list(names.values()), 'baseline': baseline,
            'validation': _validation(done_trainings, classes, baseline),
            'test': _test(done_tests, classes, baseline) if has_test_set else None,
            'timing': _timing(done_trainings, baseline), 'curves': curves}
