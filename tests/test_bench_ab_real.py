"""``bench/ab_real.py``, a thin wrapper over ``nnunet-ext study``: argument checks (exit 2), the study spec
it writes read back with the package's ``load_spec`` against the argument list, resuming and refusing
other options, data errors refused before anything runs (exit 2, the user's data untouched), and one
end-to-end run on a tiny demo phantom (marked ``cli``) whose report names both trainers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from nnunet_ext.errors import UserInputError
from nnunet_ext.study.spec import SplitSettings, load_spec

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench')
sys.path.insert(0, BENCH)

import ab_real  # noqa: E402

DEMO = 'Dataset978_ABRealPhantom'


@pytest.fixture(autouse=True)
def environment_restored():
    """``ab_real.main`` sets nnU-Net's variables in this process (``nnUNet_n_proc_DA=0`` on a CPU, the data
    folders): put the environment back as it was, so that later tests of this worker do not inherit them
    (nnU-Net's planner fails with ``nnUNet_n_proc_DA=0``)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize('options, message', [
    (['--demo', '--dataset', '5', '-tr', 'A'], 'exactly one of --dataset and --demo'),
    (['-tr', 'A'], 'exactly one of --dataset and --demo'),
    (['--demo', '-tr', 'nnUNetTrainer'], 'nnUNetTrainer is the reference'),
    (['--demo', '-tr', 'A', 'A'], 'a trainer is listed twice'),
    (['--demo', '-tr', 'A', '--seeds', '1', '1'], 'a seed is listed twice'),
    (['--demo', '-tr', 'A', '--seeds', '-1'], '--seeds must be in'),
    (['--demo', '-tr', 'A', '--epochs', '0'], '--epochs must be >= 1'),
    (['--demo', '-tr', 'A', '--iterations', '0'], '--iterations must be >= 1'),
    (['--demo', '-tr', 'A', '--val-iterations', '0'], '--val-iterations must be >= 1'),
    (['--demo', '-tr', 'A', '--jobs', '0'], '--jobs must be >= 1'),
    (['--demo', '-tr', 'A', '--holdout', '1'], '--holdout must be >= 2'),
    (['--demo', '-tr', 'A', '--holdout', '0'], '--holdout must be >= 2'),
    (['--demo', '-tr', 'A', '--holdout', '3', '--test-set', 'labelsTs'], 'contradicts --test-set labelsTs'),
    (['--demo', '-tr', 'A', '--val-cases', '-1'], '--val-cases must be >= 0'),
    (['--demo', '-tr', 'A', '--split-seed', '-1'], '--split-seed must be >= 0'),
    (['--demo', '-tr', 'A', '--plans', 'nnUNetPlansX'], 'leave out --plans'),
    (['--demo', '-tr', 'A', '--demo-cases', '2', '5'], '--demo-cases: need'),
    (['--demo', '-tr', 'A', '--demo-shape', '16', '16'], '--demo-shape'),
    (['--demo', '-tr', 'A', '--device', 'tpu'], 'invalid choice'),
    (['--demo', '-tr', 'A', '--keep-models'], 'unrecognized arguments: --keep-models'),
])
def test_argument_validation(options, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        ab_real.parse_args([*options, '--out', str(tmp_path / 'out')])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_out_must_be_new_empty_or_an_earlier_run(tmp_path, capsys):
    (tmp_path / 'file').write_text('')
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'x').write_text('')
    for options, message in ((['--demo', '--out', str(tmp_path / 'file')], '--out'),
                             (['--demo', '--out', str(tmp_path / 'other')], 'neither empty nor an earlier ab_real run'),
                             (['--demo', '--out', str(tmp_path / 'no' / 'out')], 'the parent folder of --out'),
                             (['--dataset', '5', '--root', str(tmp_path / 'no')], 'no is not a folder')):
        with pytest.raises(SystemExit) as exit_info:
            ab_real.parse_args(['-tr', 'A', *options])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    (tmp_path / 'other' / 'ab_real.toml').write_text('')  # an earlier run's folder: resumed
    (tmp_path / 'empty').mkdir()
    for out in ('other', 'empty', 'new'):
        assert ab_real.parse_args(['--demo', '-tr', 'A', '--out', str(tmp_path / out)]).out == str(tmp_path / out)


def _given(argv, option, default):
    """The values after ``option`` in the argument list (one value unless the default is a list)."""
    if option not in argv:
        return default
    values = []
    for token in argv[argv.index(option) + 1:]:
        if token.startswith('-') and not token.lstrip('-').isdigit():
            break
        values.append(token)
    return values if isinstance(default, list) else values[0]


@pytest.mark.parametrize('argv', [
    ['--demo', '-tr', 'nnUNetTrainerGODC'],
    ['--dataset', '501', '-tr', 'nnUNetTrainerGODC', 'nnUNetTrainerMLL', '--seeds', '3', '7', '--epochs', '100',
     '--iterations', '250', '--val-iterations', '50', '--device', 'cuda', '--jobs', '2', '-c', '3d_fullres'],
    ['--dataset', 'Dataset502_Liver', '-tr', 'X', '-p', 'nnUNetResEncUNetMPlans', '--test-set', 'holdout',
     '--holdout', '7', '--val-cases', '0', '--split-seed', '9'],
    ['--dataset', '7', '-tr', 'X', '--test-set', 'labelsTs', '--val-cases', '3', '--seeds', '0'],
])
def test_spec_is_the_options(argv, tmp_path):
    out = tmp_path / 'study'
    path = ab_real.write_spec(ab_real.parse_args([*argv, '--out', str(out)]), str(out))
    assert path == str(out / 'ab_real.toml')
    spec = load_spec(path)
    dataset = DEMO if '--demo' in argv else _given(argv, '--dataset', None)
    holdout, val_cases = _given(argv, '--holdout', None), _given(argv, '--val-cases', None)
    assert (spec.folder, spec.datasets, spec.configurations, spec.plans) == (
        str(out), (dataset,), (_given(argv, '-c', '2d'),), _given(argv, '-p', 'nnUNetPlans'))
    assert (spec.baseline, spec.trainers) == ('nnUNetTrainer', ('nnUNetTrainer', *_given(argv, '-tr', [])))
    assert spec.folds == (0,) and spec.seeds == tuple(int(s) for s in _given(argv, '--seeds', ['0', '1', '2']))
    assert (spec.epochs, spec.iterations, spec.val_iterations) == (
        int(_given(argv, '--epochs', 12)), int(_given(argv, '--iterations', 50)),
        int(_given(argv, '--val-iterations', 10)))
    assert (spec.device, spec.predict_test, spec.executor, spec.jobs, spec.gpus) == (
        _given(argv, '--device', 'cpu'), True, 'local', int(_given(argv, '--jobs', 1)), ())
    assert spec.split == SplitSettings(test=_given(argv, '--test-set', 'auto'),
                                       holdout=None if holdout is None else int(holdout),
                                       val_cases=None if val_cases is None else int(val_cases),
                                       seed=int(_given(argv, '--split-seed', 12345)))


def test_the_same_options_resume_and_others_are_refused_once_a_job_ran(tmp_path):
    out = str(tmp_path / 'study')
    options = ['--dataset', '501', '-tr', 'X', '--out', out]
    ab_real.write_spec(ab_real.parse_args([*options, '--epochs', '3']), out)
    path = ab_real.write_spec(ab_real.parse_args([*options, '--epochs', '4']), out)  # nothing ran: rewritten
    assert load_spec(path).epochs == 4
    os.mkdir(os.path.join(out, 'state'))  # what the executor makes before the first job
    assert load_spec(ab_real.write_spec(ab_real.parse_args([*options, '--epochs', '4', '--jobs', '3']), out)).jobs == 3
    for other in (['--epochs', '5'], ['--epochs', '4', '--seeds', '0'], ['--epochs', '4', '--split-seed', '1']):
        with pytest.raises(UserInputError, match='holds a run with other options'):
            ab_real.write_spec(ab_real.parse_args([*options, *other]), out)
    assert load_spec(path).epochs == 4 and load_spec(path).jobs == 3


def _raw_dataset(root, dataset_id, n_train, test_labels):
    """A raw dataset of empty files (enough for every check made before a job runs)."""
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


@pytest.mark.parametrize('options, message', [
    (['--dataset', '901', '--test-set', 'labelsTs'], '--test-set labelsTs: Dataset901_Fake has no labelsTs cases'),
    (['--dataset', '902'], '--holdout: too few cases: 3 in imagesTr, 2 held out for testing leaves 1'),
    (['--dataset', '903', '-c', '3d_fullres'], '-c: 3d_fullres not in nnUNetPlans of Dataset903_Fake (it has 2d)'),
    (['--dataset', '903', '-tr', 'nnUNetTrainerGDOC'], '-tr: no trainer nnUNetTrainerGDOC'),
    (['--dataset', '904'], '--dataset: Could not find a dataset with the ID 904'),
])
def test_data_errors_exit_2_before_any_job(options, message, tmp_path, monkeypatch, capsys):
    for variable in {v for v in os.environ if v.startswith('nnUNet')} | {'OMP_WAIT_POLICY'}:
        monkeypatch.delenv(variable, raising=False)  # the fixture above restores the environment
    _raw_dataset(tmp_path, 901, 10, test_labels=False)
    _raw_dataset(tmp_path, 902, 3, test_labels=False)
    _raw_dataset(tmp_path, 903, 10, test_labels=True)
    plans = tmp_path / 'nnUNet_preprocessed' / 'Dataset903_Fake' / 'nnUNetPlans.json'
    plans.write_text(json.dumps({'configurations': {'2d': {}}}))
    out = tmp_path / 'out'
    trainers = [] if '-tr' in options else ['-tr', 'nnUNetTrainerGODC']
    assert ab_real.main(['--root', str(tmp_path), *trainers, *options, '--out', str(out)]) == 2
    err = capsys.readouterr().err
    assert f'bench/ab_real.py: error: {message}' in err and 'study spec' not in err, err
    assert sorted(os.listdir(out)) == ['ab_real.toml']  # no job ran; the next run may change every option
    assert sorted(os.listdir(plans.parent)) == ['nnUNetPlans.json']  # the user's data: untouched


@pytest.mark.cli
def test_demo_end_to_end_and_again(tmp_path):
    """The tiny demo: phantom written, planned by the study's plan job, both trainers trained and scored, the
    report printed; running again runs nothing."""
    out = tmp_path / 'ab'
    environment = {k: v for k, v in os.environ.items() if not k.startswith('nnUNet')}
    environment.update(OMP_WAIT_POLICY='PASSIVE', nnUNet_n_proc_DA='0', nnUNet_def_n_proc='1')
    command = [sys.executable, os.path.join(BENCH, 'ab_real.py'), '--demo', '--demo-cases', '6', '3', '--demo-shape',
               '32', '32', '--seeds', '0', '--epochs', '1', '--iterations', '2', '--val-iterations', '1', '-tr',
               'nnUNetTrainerGODC', '--out', str(out)]
    result = subprocess.run([*command, '--jobs', '2'], capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = out / 'report' / DEMO / 'report.md'
    text = report.read_text(encoding='utf-8')
    for trainer in ('nnUNetTrainer', 'nnUNetTrainerGODC'):
        assert f'| {trainer} | 1 | ' in text  # its row in the test-set table: one seed
    assert text in result.stdout and f'written: {report}' in result.stdout
    assert (out / 'data' / 'nnUNet_raw' / DEMO / 'labelsTs').is_dir()  # the phantom, in OUT/data by default
    assert json.loads((out / 'preprocessed' / DEMO / 'study_split.json').read_text())['test_source'] == 'labelsTs'
    start = time.perf_counter()
    again = subprocess.run([*command, '--jobs', '1'], capture_output=True, text=True, timeout=300, env=environment)
    assert again.returncode == 0 and 'reusing the demo phantom' in again.stdout, again.stdout + again.stderr
    assert 'nothing to run: every job is done' in again.stdout and text in again.stdout
    assert time.perf_counter() - start < 60
