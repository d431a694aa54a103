"""``nnunet_ext.study.statistics`` and ``nnunet_ext.study.report``: the statistics against hand-computed
values, numpy written out here and scipy.stats.wilcoxon called directly; a full report from a synthetic
``results`` dict with tiny 2D and 3D NIfTI images (SimpleITK), its files and its key numbers."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.stats import wilcoxon

from nnunet_ext.study import report, statistics
from nnunet_ext.study.statistics import MEAN

NAN = float('nan')
CLASSES = ['liver', 'tumour']
BASELINE, GODC, MLL = 'nnUNetTrainer', 'nnUNetTrainerGODC', 'nnUNetTrainerMLL'
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _mean(values):
    """numpy's mean of the non-NaN values (NaN when none), written out."""
    values = np.array([v for v in values if not math.isnan(v)], float)
    return float(values.mean()) if values.size else NAN


def _std(values):
    values = np.array([v for v in values if not math.isnan(v)], float)
    return float(values.std(ddof=1)) if values.size > 1 else NAN


# ------------------------------------------------------------------------------------------- statistics

def test_nanmean_and_nanstd_equal_numpy():
    values = [0.3, NAN, 0.9, 0.6]
    assert statistics.nanmean(values) == pytest.approx(np.nanmean(values), rel=1e-15)
    assert statistics.nanstd(values) == pytest.approx(np.nanstd(values, ddof=1), rel=1e-15)
    assert math.isnan(statistics.nanmean([NAN])) and math.isnan(statistics.nanmean([]))
    assert math.isnan(statistics.nanstd([0.5, NAN]))  # one value: no sample std


def test_seed_statistics_hand_computed():
    runs = {0: {'a': {'x': 0.8, 'y': NAN}, 'b': {'x': 0.6, 'y': 0.2}},
            1: {'a': {'x': 0.9, 'y': 0.4}, 'b': {'x': 0.4, 'y': 0.0}}}
    # seed 0: x (0.8 + 0.6) / 2 = 0.7, y 0.2 (NaN skipped), mean 0.45; seed 1: x 0.65, y 0.2, mean 0.425
    stats = statistics.seed_statistics(runs, ['x', 'y'])
    assert stats['x']['per_seed'] == pytest.approx({0: 0.7, 1: 0.65})
    assert stats['x']['mean'] == pytest.approx(0.675)
    assert stats['x']['std'] == pytest.approx(0.05 / math.sqrt(2))  # two values: |a - b| / sqrt(2)
    assert stats['y']['mean'] == pytest.approx(0.2) and stats['y']['std'] == pytest.approx(0.0)
    assert stats[MEAN]['per_seed'] == pytest.approx({0: 0.45, 1: 0.425})
    assert stats[MEAN]['n_seeds'] == 2
    one = statistics.seed_statistics({3: runs[0]}, ['x', 'y'])
    assert one['x']['mean'] == pytest.approx(0.7) and math.isnan(one['x']['std']) and one['x']['n_seeds'] == 1
    none = statistics.seed_statistics({}, ['x'])
    assert math.isnan(none['x']['mean']) and none['x']['n_seeds'] == 0


def test_case_means_average_over_seeds_then_classes():
    runs = {0: {'a': {'x': 0.8, 'y': NAN}, 'b': {'x': 0.6, 'y': 0.2}},
            1: {'a': {'x': 0.6, 'y': 0.4}}}
    means = statistics.case_means(runs, ['x', 'y'])
    assert means['x'] == pytest.approx({'a': 0.7, 'b': 0.6})
    assert means['y'] == pytest.approx({'a': 0.4, 'b': 0.2})
    assert means[MEAN] == pytest.approx({'a': 0.55, 'b': 0.4})


def test_paired_statistics_equal_scipy_with_better_and_worse():
    rng = np.random.default_rng(0)
    cases = [f'c{i}' for i in range(9)]

    def runs(offset):
        return {s: {c: {'x': float(rng.uniform(0.5, 0.9) + offset), 'y': float(rng.uniform(0, 1))} for c in cases}
                for s in (0, 1)}

    dice = {BASELINE: runs(0.0), GODC: runs(0.05)}
    dice[GODC][1]['c2']['x'] = NAN  # c2: seed 0 alone
    tests = statistics.paired_statistics(dice, ['x', 'y'])
    assert list(tests) == [GODC]
    for c in ['x', 'y']:
        ref = [_mean([dice[BASELINE][s][k][c] for s in (0, 1)]) for k in cases]
        other = [_mean([dice[GODC][s][k][c] for s in (0, 1)]) for k in cases]
        expected = wilcoxon(other, ref)
        t = tests[GODC][c]
        assert t['p'] == pytest.approx(float(expected.pvalue), rel=1e-12)
        assert t['statistic'] == pytest.approx(float(expected.statistic))
        d = np.array(other) - np.array(ref)
        assert (t['n_pairs'], t['n_better'], t['n_worse']) == (9, int((d > 0).sum()), int((d < 0).sum()))
        assert t['mean_difference'] == pytest.approx(d.mean(), rel=1e-12)
    missing = statistics.paired_statistics({GODC: dice[GODC]}, ['x'], reference=BASELINE)
    assert missing[GODC]['x']['p'] is None and missing[GODC]['x']['n_pairs'] == 0


def test_timing_statistics_of_medians_already_taken():
    timings = {BASELINE: {(0, 0): {'step_seconds': 0.4}, (1, 0): {'step_seconds': 0.2}},
               GODC: {(0, 0): {'step_seconds': 0.6}, (1, 0): {'step_seconds': None}}}
    out = statistics.timing_statistics(timings)
    assert out[BASELINE]['step_s'] == pytest.approx(0.3) and out[BASELINE]['n_runs'] == 2
    assert out[BASELINE]['step_s_std'] == pytest.approx(0.2 / math.sqrt(2))
    assert out[GODC]['ratio'] == pytest.approx(2.0) and out[GODC]['n_runs'] == 1
    assert math.isnan(out[GODC]['wall_s'])
    assert math.isnan(statistics.timing_statistics(timings, reference='absent')[GODC]['ratio'])


def test_arm_names_add_the_plans_only_when_several():
    entries = [{'trainer': GODC, 'plans': 'P'}, {'trainer': BASELINE, 'plans': 'P'}]
    assert list(statistics.arm_names(entries, BASELINE).values()) == [BASELINE, GODC]
    entries.append({'trainer': GODC, 'plans': 'Q'})
    assert list(statistics.arm_names(entries, BASELINE).values()) == [f'{BASELINE} / P', f'{GODC} / P', f'{GODC} / Q']


def test_differing_cases_and_the_slice_of_most_disagreement():
    means = {BASELINE: {MEAN: {'a': 0.9, 'b': 0.5, 'c': 0.7, 'd': NAN}},
             GODC: {MEAN: {'a': 0.8, 'b': 0.9, 'c': 0.7, 'd': 0.3}}}
    assert report.differing_cases(means, n=2) == ['b', 'a']  # spreads 0.4, 0.1, 0, 0 (d: one value)
    first, second = np.zeros((4, 5, 5), np.uint8), np.zeros((4, 5, 5), np.uint8)
    first[1, :2, :2] = 1
    second[2, :3, :3] = 1  # slice 2: 9 voxels differ, slice 1: 4
    assert report._slice([first, second], None) == 2
    reference = np.zeros((4, 5, 5), np.uint8)
    reference[3] = 1
    assert report._slice([first, first], reference) == 3  # no disagreement: most reference foreground
    assert report._slice([first], reference) == 3  # one prediction: against the reference (slices 1 and 3)


# ------------------------------------------------------------------------------------------ full report

def _dice(rng, low, high, empty=False):
    return None if empty else round(float(rng.uniform(low, high)), 6)


def _write(array, path):
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def _label(shape, shift):
    """A square/box of label 1 with a smaller one of label 2 inside, shifted along the last axis."""
    label = np.zeros(shape, np.uint8)
    label[..., 3:11, 3 + shift:11 + shift] = 1
    label[..., 5:8, 5 + shift:8 + shift] = 2
    return label


def _results(tmp_path, shape, configurations, test_set=True):
    rng = np.random.default_rng(42)
    test_cases = [f'ts{i}' for i in range(6)] if test_set else []
    images, labels = tmp_path / 'imagesTs', tmp_path / 'labelsTs'
    images.mkdir()
    labels.mkdir()
    for case in test_cases:
        _write(rng.normal(0, 1, shape).astype(np.float32), images / f'{case}_0000.nii.gz')
        _write(_label(shape, 0), labels / f'{case}.nii.gz')
    trainings, tests = [], []
    for configuration in configurations:
        for trainer, offset in ((BASELINE, 0.0), (GODC, 0.05), (MLL, 0.0)):
            for seed in (0, 1):
                for fold in (0, 1):
                    state = 'done'
                    if trainer == MLL:
                        state = 'failed' if (fold, seed) == (0, 0) else 'pending'
                    elif trainer == GODC and (fold, seed) == (1, 1):
                        state = 'running'
                    done = state == 'done'
                    per_case = {f'tr{fold}_{i}': {'liver': _dice(rng, 0.7 + offset, 0.9 + offset),
                                                  'tumour': _dice(rng, 0.2, 0.6, empty=i == 3)} for i in range(5)}
                    trainings.append(dict(
                        trainer=trainer, configuration=configuration, plans='nnUNetPlans', fold=fold, seed=seed,
                        state=state, error='RuntimeError: CUDA out of memory' if state == 'failed' else None,
                        validation_per_case=per_case if done else None,
                        curves={'ema_fg_dice': [0.1, 0.4 + offset, 0.6 + seed / 10], 'mean_fg_dice': [0.1, 0.5, 0.6],
                                'train_losses': [1, 0.5, 0.2], 'val_losses': [1, 0.6, 0.4]} if done else None,
                        step_seconds=(0.4 if trainer == BASELINE else 0.5 + 0.1 * seed) if done else None,
                        epochs=3 if done else None))
                state = 'missing' if trainer == MLL else 'done'
                predictions = None
                if state == 'done' and test_set:
                    predictions = tmp_path / f'pred_{configuration}_{trainer}_{seed}'
                    predictions.mkdir()
                    for i, case in enumerate(test_cases):
                        _write(_label(shape, (i + seed) % 3 if trainer == GODC else 0), predictions / f'{case}.nii.gz')
                tests.append(dict(
                    trainer=trainer, configuration=configuration, plans='nnUNetPlans', seed=seed, state=state,
                    error=None, predictions=None if predictions is None else str(predictions),
                    per_case={c: {'liver': _dice(rng, 0.8 + offset, 0.95),
                                  'tumour': _dice(rng, 0.1, 0.7, empty=c == 'ts2')}
                              for c in test_cases} if state == 'done' and test_set else None))
    if not test_set:
        tests = []
    return dict(name='tiny', dataset='Dataset978_Phantom', baseline=BASELINE, classes=CLASSES, file_ending='.nii.gz',
                trainings=trainings, tests=tests,
                test_images={c: [str(images / f'{c}_0000.nii.gz')] for c in test_cases},
                test_labels=str(labels) if test_set else None)


def _value(v):
    return NAN if v is None else v


def _section(text, configuration):
    """The report's text of one configuration."""
    start = text.index(f'## Configuration {configuration}\n')
    end = text.find('\n## Configuration ', start + 1)
    return text[start:] if end < 0 else text[start:end]


def _row(section, prefix):
    rows = [line for line in section.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, (prefix, rows)
    return rows[0]


def _check_numbers(results, configuration, section):
    """The key numbers of one configuration's section, recomputed here from ``results``."""
    # test table: per seed the mean over cases (NaN skipped) per class, mean over classes; mean ± std over seeds
    tests = {t['trainer']: {} for t in results['tests']}
    for t in results['tests']:
        if t['configuration'] == configuration and t['state'] == 'done':
            tests[t['trainer']][t['seed']] = t['per_case']
    per_seed = {}
    for seed, per_case in tests[GODC].items():
        values = {c: _mean([_value(v[c]) for v in per_case.values()]) for c in CLASSES}
        per_seed[seed] = [values['liver'], values['tumour'], _mean(values.values())]
    columns = np.array(list(per_seed.values()))
    cells = [f'{_mean(columns[:, i]):.4f} ± {_std(columns[:, i]):.4f}' for i in range(3)]
    assert _row(section, f'| {GODC} | 2 |') == f"| {GODC} | 2 | {' | '.join(cells)} |"
    assert f'| {MLL} | 0 | n/a | n/a | n/a |' in section.splitlines()  # nothing done: n/a

    # paired test on the test cases: per case averaged over seeds; liver
    cases = sorted(results['test_images'])
    ref = [_mean([tests[BASELINE][s][c]['liver'] for s in (0, 1)]) for c in cases]
    other = [_mean([tests[GODC][s][c]['liver'] for s in (0, 1)]) for c in cases]
    d = np.array(other) - np.array(ref)
    p = float(wilcoxon(other, ref).pvalue)
    row = _row(section, f'| {GODC} | liver | 6 |')
    assert f'| {d.mean():+.4f} | {np.median(d):+.4f} |' in row
    assert f'| {p:.4g} | {int((d > 0).sum())} | {int((d < 0).sum())} |' in row

    # cross-validation: per seed the validation cases of all its done folds pooled
    runs = {}
    for t in results['trainings']:
        if t['configuration'] == configuration and t['trainer'] == GODC and t['state'] == 'done':
            runs.setdefault(t['seed'], {}).update({(t['fold'], k): v for k, v in t['validation_per_case'].items()})
    liver = [_mean([_value(v['liver']) for v in per_case.values()]) for per_case in runs.values()]
    assert _row(section, f'| {GODC} | liver | 0 1 | 2 | 10 |').endswith(
        f'| {_mean(liver):.4f} ± {_std(liver):.4f} |')  # 10 cases: folds 0 and 1 (seed 1 has fold 0 only)
    base = {}
    for t in results['trainings']:
        if t['configuration'] == configuration and t['trainer'] == BASELINE:
            for k, v in t['validation_per_case'].items():
                base.setdefault((t['fold'], k), []).append(_value(v['liver']))
    godc = {}
    for seed_runs in runs.values():
        for key, v in seed_runs.items():
            godc.setdefault(key, []).append(_value(v['liver']))
    keys = sorted(base)
    p = float(wilcoxon([_mean(godc[k]) for k in keys], [_mean(base[k]) for k in keys]).pvalue)
    assert f'| {p:.4g} |' in _row(section, f'| liver | {GODC} | 10 |')

    # seconds per iteration: mean of the trainings' medians, ratio to the baseline's 0.4
    godc_steps = [0.5, 0.5, 0.6]  # seed 0 folds 0 and 1, seed 1 fold 0
    assert _row(section, f'| {GODC} | 3 | 3 |') == (f'| {GODC} | 3 | 3 | {np.mean(godc_steps):.4f} | '
                                                   f'{np.std(godc_steps, ddof=1):.4f} | '
                                                   f'{np.mean(godc_steps) / 0.4:.3f} |')
    assert f'| {MLL} | 0 | n/a | n/a | n/a | n/a |' in section.splitlines()


@pytest.mark.parametrize('shape, configurations', [((16, 16), ['2d']), ((5, 16, 16), ['2d', '3d_fullres'])])
def test_full_report_files_and_numbers(tmp_path, shape, configurations):
    results = _results(tmp_path, shape, configurations)
    folder = tmp_path / 'report'
    paths = report.write_report(results, str(folder))
    pngs = [f'{kind}_{c}.png' for c in configurations for kind in ('pseudo_dice', 'qualitative')]
    assert sorted(paths) == sorted(['report.md', 'report.html', *pngs])
    assert sorted(os.listdir(folder)) == sorted(paths)  # no temporary folder left
    for name in pngs:
        assert (folder / name).read_bytes()[:8] == PNG_SIGNATURE
    text = (folder / 'report.md').read_text(encoding='utf-8')
    assert 'folds: 0 1; seeds: 0 1' in text and 'baseline: nnUNetTrainer' in text
    for configuration in configurations:
        section = _section(text, configuration)
        _check_numbers(results, configuration, section)
        assert f'![pseudo-Dice, {configuration}](pseudo_dice_{configuration}.png)' in section
        assert f'(qualitative_{configuration}.png)' in section
        assert f'- training {MLL} (nnUNetPlans) fold 0 seed 0: failed: RuntimeError: CUDA out of memory' in section
        assert f'- training {GODC} (nnUNetPlans) fold 1 seed 1: running' in section
        assert f'- test {MLL} (nnUNetPlans) seed 1: missing' in section
    page = (folder / 'report.html').read_text(encoding='utf-8')
    tables = sum(line.startswith('|---|') for line in text.splitlines())
    assert page.startswith('<!DOCTYPE html>') and page.count('<table>') == tables == 5 * len(configurations)
    assert '<img src="pseudo_dice_2d.png"' in page and 'http' not in page
    assert f'<td>{GODC}</td>' in page


def test_report_without_test_set(tmp_path):
    results = _results(tmp_path, (16, 16), ['2d'], test_set=False)
    paths = report.write_report(results, str(tmp_path / 'report'))
    assert sorted(paths) == ['pseudo_dice_2d.png', 'report.html', 'report.md']
    text = (tmp_path / 'report' / 'report.md').read_text(encoding='utf-8')
    assert 'No test set: this study predicts no test images, so there is no test table.' in text
    assert 'mean over classes' not in text and 'No figure: no test set.' in text


def test_an_error_leaves_the_previous_report(tmp_path, monkeypatch):
    results = _results(tmp_path, (16, 16), ['2d'])
    folder = tmp_path / 'report'
    report.write_report(results, str(folder))
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}

    def broken(*args, **kwargs):
        raise RuntimeError('disk full')

    monkeypatch.setattr(report, 'plot_qualitative', broken)
    with pytest.raises(RuntimeError, match='disk full'):
        report.write_report(results, str(folder))
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
