"""``bench/ab_real.py``: the statistics and the report from fabricated per-case Dice (against numpy and
scipy.stats.wilcoxon), the seeded split, argument and dataset validation (exit code 2, nothing left
behind), and one end-to-end run on a tiny phantom (marked ``cli``) whose Dice is recomputed here with
numpy from the predictions and the test labels."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from scipy.stats import wilcoxon

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench')
sys.path.insert(0, BENCH)

import ab_real  # noqa: E402

NAN = float('nan')
CLASSES = ['liver', 'tumour']
CASES = [f'case{i}' for i in range(8)]
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _fabricated(seed_offsets, rng_seed):
    """{seed: {case: {class: Dice}}} with a few NaN (both masks empty) entries."""
    rng = np.random.default_rng(rng_seed)
    runs = {}
    for seed, offset in seed_offsets.items():
        runs[seed] = {case: {'liver': float(np.clip(0.85 + offset + rng.normal(0, 0.05), 0, 1)),
                             'tumour': float(np.clip(0.4 + offset + rng.normal(0, 0.2), 0, 1))} for case in CASES}
    runs[min(runs)]['case3']['tumour'] = NAN
    for seed in runs:  # a case without tumour that no run predicts: NaN for every seed
        runs[seed]['case5']['tumour'] = NAN
    return runs


@pytest.fixture
def dice():
    return {'nnUNetTrainer': _fabricated({0: 0.0, 1: 0.01, 2: -0.02}, 1),
            'nnUNetTrainerGODC': _fabricated({0: 0.03, 1: 0.05, 2: 0.02}, 2)}


def _case_mean_over_seeds(runs, case, name):
    values = [runs[s][case][name] for s in runs if not math.isnan(runs[s][case][name])]
    return np.mean(values) if values else NAN


def test_seed_statistics_equal_numpy(dice):
    runs = dice['nnUNetTrainer']
    stats = ab_real.seed_statistics(runs, CLASSES)
    per_seed = {}
    for seed, per_case in runs.items():
        per_seed[seed] = {c: np.nanmean([per_case[k][c] for k in CASES]) for c in CLASSES}
        per_seed[seed]['mean'] = np.mean([per_seed[seed][c] for c in CLASSES])
    for c in [*CLASSES, 'mean']:
        values = np.array([per_seed[s][c] for s in sorted(runs)])
        assert stats[c]['mean'] == pytest.approx(values.mean(), rel=1e-12)
        assert stats[c]['std'] == pytest.approx(values.std(ddof=1), rel=1e-12)
        assert stats[c]['n_seeds'] == 3
        assert [stats[c]['per_seed'][s] for s in sorted(runs)] == pytest.approx(list(values), rel=1e-12)
    one_seed = ab_real.seed_statistics({0: runs[0]}, CLASSES)
    assert math.isnan(one_seed['liver']['std']) and one_seed['liver']['mean'] == pytest.approx(per_seed[0]['liver'])


def test_paired_statistics_equal_scipy_on_seed_averaged_cases(dice):
    tests = ab_real.paired_statistics(dice, CLASSES)
    assert list(tests) == ['nnUNetTrainerGODC']
    ref, other = dice['nnUNetTrainer'], dice['nnUNetTrainerGODC']
    for c in CLASSES:
        keys = [k for k in CASES if not math.isnan(_case_mean_over_seeds(ref, k, c))
                and not math.isnan(_case_mean_over_seeds(other, k, c))]
        y = np.array([_case_mean_over_seeds(ref, k, c) for k in keys])
        x = np.array([_case_mean_over_seeds(other, k, c) for k in keys])
        t = tests['nnUNetTrainerGODC'][c]
        assert t['n_pairs'] == len(keys) == (8 if c == 'liver' else 7)  # case5 has no tumour anywhere
        assert t['mean_difference'] == pytest.approx((x - y).mean(), rel=1e-12)
        assert t['median_difference'] == pytest.approx(np.median(x - y), rel=1e-12)
        expected = wilcoxon(x, y)
        assert t['p'] == pytest.approx(float(expected.pvalue), rel=1e-12)
        assert t['statistic'] == pytest.approx(float(expected.statistic))
    # the mean over classes per case: the seed-averaged class values, averaged over the classes defined
    y = [np.nanmean([_case_mean_over_seeds(ref, k, c) for c in CLASSES]) for k in CASES]
    x = [np.nanmean([_case_mean_over_seeds(other, k, c) for c in CLASSES]) for k in CASES]
    assert tests['nnUNetTrainerGODC']['mean']['p'] == pytest.approx(float(wilcoxon(x, y).pvalue), rel=1e-12)


def test_identical_trainers_give_no_test(dice):
    tests = ab_real.paired_statistics({'nnUNetTrainer': dice['nnUNetTrainer'], 'X': dice['nnUNetTrainer']}, CLASSES)
    assert all(t['p'] is None and 'zero' in t['note'] for t in tests['X'].values())


def test_timing_statistics():
    timings = {'nnUNetTrainer': {0: {'step_seconds': [5.0, 0.2, 0.2, 0.3], 'run_training_seconds': 8.0},
                                 1: {'step_seconds': [0.1, 0.3, 0.2], 'run_training_seconds': 3.0}},
               'X': {0: {'step_seconds': [0.5, 0.4, 0.6, 0.5], 'run_training_seconds': 4.0}}}
    out = ab_real.timing_statistics(timings)
    ref = np.mean([np.median([5.0, 0.2, 0.2, 0.3]), 0.2])
    assert out['nnUNetTrainer']['step_s'] == pytest.approx(ref)
    assert out['nnUNetTrainer']['step_s_std'] == pytest.approx(np.std([0.25, 0.2], ddof=1))
    assert out['nnUNetTrainer']['wall_s'] == pytest.approx(np.mean([8.0 / 4, 3.0 / 3]))
    assert out['X']['ratio'] == pytest.approx(0.5 / ref) and out['nnUNetTrainer']['ratio'] == pytest.approx(1.0)


def test_split_is_seeded_disjoint_and_sized():
    cases = [f'c{i:02d}' for i in range(20)]
    split = ab_real.split_cases(cases, None, None, None, 12345)
    assert split == ab_real.split_cases(list(reversed(cases)), None, None, None, 12345)  # order-independent
    assert split != ab_real.split_cases(cases, None, None, None, 1)
    assert (len(split['test']), len(split['val']), len(split['train'])) == (4, 2, 14)  # 20%, 10% of the rest
    assert set(split['test']).isdisjoint(split['train'] + split['val'])
    assert set(split['val']).isdisjoint(split['train'])
    assert sorted(split['test'] + split['val'] + split['train']) == cases
    explicit = ab_real.split_cases(cases, None, 5, 0, 12345)
    assert len(explicit['test']) == 5 and explicit['val'] == explicit['train'] and len(explicit['train']) == 15
    labelled = ab_real.split_cases(cases, ['t1', 't0'], None, 3, 12345)
    assert labelled['test'] == ['t0', 't1'] and len(labelled['val']) == 3 and len(labelled['train']) == 17


@pytest.mark.parametrize('cases, test, holdout, val, message', [
    (4, None, None, None, 'too few cases: 4 in imagesTr, 2 held out'),
    (10, None, 9, None, 'too few cases: 10 in imagesTr, 9 held out'),
    (10, ['t0'], None, None, 'too few test cases: 1'),
    (3, ['t0', 't1'], None, 2, 'too few cases: 3 training cases, 2 for validation'),
    (5, ['c1', 't1'], None, None, 'test cases also in imagesTr: c1'),
])
def test_split_refuses_too_few_cases(cases, test, holdout, val, message):
    with pytest.raises(ab_real.ABError, match=message):
        ab_real.split_cases([f'c{i}' for i in range(cases)], test, holdout, val, 0)


@pytest.mark.parametrize('options, message', [
    (['--demo', '--dataset', '5', '-tr', 'A'], 'exactly one of --dataset and --demo'),
    (['-tr', 'A'], 'exactly one of --dataset and --demo'),
    (['--demo', '-tr', 'nnUNetTrainer'], 'nnUNetTrainer is the reference'),
    (['--demo', '-tr', 'A', 'A'], 'a trainer is listed twice'),
    (['--demo', '-tr', 'A', '--seeds', '1', '1'], 'a seed is listed twice'),
    (['--demo', '-tr', 'A', '--seeds', '-1'], '--seeds must be in'),
    (['--demo', '-tr', 'A', '--epochs', '0'], '--epochs must be >= 1'),
    (['--demo', '-tr', 'A', '--val-iterations', '0'], '--val-iterations must be >= 1'),
    (['--demo', '-tr', 'A', '--jobs', '0'], '--jobs must be >= 1'),
    (['--demo', '-tr', 'A', '--holdout', '1'], '--holdout must be >= 2'),
    (['--demo', '-tr', 'A', '--holdout', '3', '--test-set', 'labelsTs'], 'contradicts --test-set labelsTs'),
    (['--demo', '-tr', 'A', '--val-cases', '-1'], '--val-cases must be >= 0'),
    (['--demo', '-tr', 'A', '--plans', 'nnUNetPlansX'], 'leave out --plans'),
    (['--demo', '-tr', 'A', '--demo-cases', '2', '5'], '--demo-cases: need'),
    (['--demo', '-tr', 'A', '--demo-shape', '16', '16'], '--demo-shape'),
    (['--demo', '-tr', 'A', '--device', 'tpu'], 'invalid choice'),
])
def test_argument_validation(options, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        ab_real.parse_args([*options, '--out', str(tmp_path / 'out')])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_out_must_be_new_or_empty(tmp_path, capsys):
    (tmp_path / 'out').mkdir()
    assert ab_real.parse_args(['--demo', '-tr', 'A', '--out', str(tmp_path / 'out')]).out == str(tmp_path / 'out')
    (tmp_path / 'out' / 'x').write_text('')
    with pytest.raises(SystemExit):
        ab_real.parse_args(['--demo', '-tr', 'A', '--out', str(tmp_path / 'out')])
    assert 'exists and is not an empty folder' in capsys.readouterr().err


def test_report_shows_the_numbers(dice, tmp_path):
    summary = {t: ab_real.seed_statistics(runs, CLASSES) for t, runs in dice.items()}
    paired = ab_real.paired_statistics(dice, CLASSES)
    timings = {t: {s: {'step_seconds': [0.2, 0.25 + 0.1 * (t != 'nnUNetTrainer')], 'run_training_seconds': 1.0}
                   for s in runs} for t, runs in dice.items()}
    curves = {t: {s: {'ema_fg_dice': [0.1, 0.3 + s / 10, 0.5]} for s in runs} for t, runs in dice.items()}
    timing = ab_real.timing_statistics(timings)
    dice_table = ab_real.dice_table(summary, timing, CLASSES)
    godc = summary['nnUNetTrainerGODC']
    assert (f"| nnUNetTrainerGODC | 3 | {godc['liver']['mean']:.4f} ± {godc['liver']['std']:.4f} | "
            f"{godc['tumour']['mean']:.4f} ± {godc['tumour']['std']:.4f} | {godc['mean']['mean']:.4f} ± "
            f"{godc['mean']['std']:.4f} | 0.2750 | {0.275 / 0.225:.3f} |") in dice_table  # medians of 2 steps
    paired_table = ab_real.paired_table(paired, CLASSES)
    t = paired['nnUNetTrainerGODC']['tumour']
    assert f"| nnUNetTrainerGODC | tumour | 7 | {t['mean_difference']:+.4f} | {t['median_difference']:+.4f} | " \
           f"{t['statistic']:.1f} | {t['p']:.4g} |" in paired_table
    runs_table = ab_real.runs_table(summary, curves, timings, CLASSES)
    assert f"| nnUNetTrainer | 1 | {summary['nnUNetTrainer']['liver']['per_seed'][1]:.4f} |" in runs_table
    assert runs_table.count('\n') == 2 + 6 - 1
    content = dict(dataset='Dataset001_X', command='python bench/ab_real.py ...', date='today', machine='here',
                   versions={'torch': '1', 'nnunetv2': '2'}, classes=CLASSES, test_source='imagesTs/labelsTs',
                   split={'train': ['a', 'b'], 'val': ['c'], 'test': CASES}, wilcoxon='scipy', notes=['a note'],
                   settings=dict(configuration='2d', plans='nnUNetPlans', seeds=[0, 1, 2], epochs=3, iterations=4,
                                 val_iterations=2, device='cpu', jobs=1, n_proc_DA='0'),
                   tables=dict(dice=dice_table, paired=paired_table, runs=runs_table))
    report = ab_real.render_report(content)
    assert '3 epochs x 4 iterations = 12 training iterations' in report
    assert '2 training, 1 validation (pseudo-Dice), 8 test (imagesTs/labelsTs)' in report
    assert dice_table in report and paired_table in report and '![pseudo-Dice](pseudo_dice.png)' in report
    assert '- a note' in report
    ab_real.plot_pseudo_dice(curves, str(tmp_path / 'p.png'), 'title')
    assert (tmp_path / 'p.png').read_bytes()[:8] == PNG_SIGNATURE


FAKE_WORKER = """
import json, os, sys, time
spec_path = sys.argv[2]
spec = json.load(open(spec_path))
folder = os.path.dirname(spec_path)
open(os.path.join(folder, 'pid'), 'w').write(str(os.getpid()))
if spec['trainer'] == 'fail':
    time.sleep(0.5)
    print('boom: the training failed')
    sys.exit(3)
if spec['trainer'] == 'slow':
    time.sleep(60)
json.dump({'trainer': spec['trainer'], 'seed': spec['seed'], 'classes': ['a'], 'per_case': {'c': {'a': 0.5}},
           'run_training_seconds': 1.0}, open(os.path.join(folder, 'run.json'), 'w'))
"""


def _fake_runs(tmp_path, monkeypatch, trainers):
    worker = tmp_path / 'fake_worker.py'
    worker.write_text(FAKE_WORKER)
    monkeypatch.setattr(ab_real, 'HERE', str(worker))
    specs = []
    for i, trainer in enumerate(trainers):
        folder = tmp_path / f'run{i}'
        folder.mkdir()
        spec = {'trainer': trainer, 'seed': i, 'spec_path': str(folder / 'spec.json')}
        (folder / 'spec.json').write_text(json.dumps(spec))
        specs.append(spec)
    (tmp_path / 'logs').mkdir()
    return specs


def test_launch_runs_keeps_order_and_stops_all_on_failure(tmp_path, monkeypatch):
    import time
    specs = _fake_runs(tmp_path, monkeypatch, ['A', 'B', 'C'])
    results = ab_real.launch_runs(specs, dict(os.environ), 2, str(tmp_path / 'logs'))
    assert [(r['trainer'], r['seed']) for r in results] == [('A', 0), ('B', 1), ('C', 2)]
    assert sorted(os.listdir(tmp_path / 'logs')) == ['A__seed0.log', 'B__seed1.log', 'C__seed2.log']

    (tmp_path / 'second').mkdir()
    specs = _fake_runs(tmp_path / 'second', monkeypatch, ['slow', 'fail', 'never'])
    start = time.perf_counter()
    with pytest.raises(ab_real.RunFailed, match=r'fail seed 1 failed \(exit 3\)[\s\S]*boom: the training failed'):
        ab_real.launch_runs(specs, dict(os.environ), 2, str(tmp_path / 'second' / 'logs'))
    assert time.perf_counter() - start < 30  # the slow run was ended, not waited for
    slow_pid = int((tmp_path / 'second' / 'run0' / 'pid').read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(slow_pid, 0)
    assert not (tmp_path / 'second' / 'run2' / 'pid').exists()  # the third run never started


def test_augmentation_workers_get_seeds_from_the_run_seed(monkeypatch):
    """nnU-Net builds its worker augmenters with seeds=None; after the patch they get seed-derived seeds
    (distinct per augmenter and worker). Construction starts no process (the workers start lazily)."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as module
    original = module.NonDetMultiThreadedAugmenter
    monkeypatch.setattr(module, 'NonDetMultiThreadedAugmenter', original)  # restored after the test
    ab_real._seed_augmentation_workers(5)
    patched = module.NonDetMultiThreadedAugmenter
    assert issubclass(patched, original) and patched is not original
    train = patched(data_loader=None, transform=None, num_processes=3, num_cached=6, seeds=None, pin_memory=False,
                    wait_time=0.002)
    val = patched(data_loader=None, transform=None, num_processes=1, num_cached=3, seeds=None, pin_memory=False)
    assert train.seeds == [5 * 1000003 + i for i in range(3)] and val.seeds == [5 * 1000003 + 1000]
    assert patched(None, None, 2, seeds=[1, 2]).seeds == [1, 2]  # explicit seeds are kept
    assert train._processes == []


# ---------------------------------------------------------------------- data errors (subprocesses, fast)

def _raw_dataset(root, dataset_id, n_train, test_labels):
    """A raw dataset of empty files (enough for every check made before training)."""
    folder = root / 'nnUNet_raw' / f'Dataset{dataset_id:03d}_Fake'
    for sub in ('imagesTr', 'labelsTr', 'imagesTs', 'labelsTs'):
        (folder / sub).mkdir(parents=True)
    for i in range(n_train):
        (folder / 'imagesTr' / f'tr{i}_0000.nii.gz').write_bytes(b'')
        (folder / 'labelsTr' / f'tr{i}.nii.gz').write_bytes(b'')
    for i in range(3):
        (folder / 'imagesTs' / f'ts{i}_0000.nii.gz').write_bytes(b'')
        if test_labels:
            (folder / 'labelsTs' / f'ts{i}.nii.gz').write_bytes(b'')
    (folder / 'dataset.json').write_text(json.dumps({'channel_names': {'0': 'CT'}, 'labels': {'background': 0, 'a': 1},
                                                     'numTraining': n_train, 'file_ending': '.nii.gz'}))
    (root / 'nnUNet_preprocessed' / folder.name).mkdir(parents=True)


def test_dataset_errors_exit_2_and_leave_nothing(tmp_path):
    _raw_dataset(tmp_path, 901, 10, test_labels=False)
    _raw_dataset(tmp_path, 902, 3, test_labels=False)
    _raw_dataset(tmp_path, 903, 10, test_labels=True)
    out = tmp_path / 'reports'
    out.mkdir()
    cases = [(['--dataset', '901', '--test-set', 'labelsTs'], 'Dataset901_Fake has no test labels'),
             (['--dataset', '902'], 'too few cases: 3 in imagesTr, 2 held out for testing leaves 1'),
             (['--dataset', '903'], 'nnUNetPlans.json does not exist: plan and preprocess first'),
             (['--dataset', '903', '-tr', 'nnUNetTrainerGDOC'], 'no trainer class nnUNetTrainerGDOC'),
             (['--dataset', '904'], '--dataset 904: ')]
    environment = {k: v for k, v in os.environ.items() if not k.startswith('nnUNet')}

    def run(options):
        return subprocess.run([sys.executable, os.path.join(BENCH, 'ab_real.py'), '--root', str(tmp_path),
                               '-tr', 'nnUNetTrainerGODC', *options, '--out', str(out / 'ab')],
                              capture_output=True, text=True, timeout=120, env=environment)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, [options for options, _ in cases]))
    for (options, message), result in zip(cases, results):
        assert result.returncode == 2, (options, result.stderr)
        assert message in result.stderr and 'Traceback' not in result.stderr, (options, result.stderr)
    assert os.listdir(out) == []  # no report, no temporary folder
    assert sorted(os.listdir(tmp_path / 'nnUNet_preprocessed' / 'Dataset903_Fake')) == []  # the user's: untouched
