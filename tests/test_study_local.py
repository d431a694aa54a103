"""``nnunet-ext study`` through the local executor, as README tells users: init -> plan -> run -> status ->
report on an unplanned phantom (the study plans it), 2 trainers x 2 folds at a tiny equal budget, test-set
prediction with the fold ensembles, the report; running again runs nothing; a failing trainer shows up in
``status`` with its error and in the report; bad specs are refused before anything runs."""
from __future__ import annotations

import json
import os
import re

import pytest

from cli_helpers import run
from study_helpers import (DATASET, FOLDS, TRAINERS, checkpoint_epochs, file_times, fold_folder, init_study,
                           numpy_mean_dice, reported_mean, study_environment, prediction_folder, report_test_rows)

pytestmark = pytest.mark.cli

BROKEN_TRAINER = '''
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerBrokenOnPurpose(nnUNetTrainer):
    def initialize(self):
        raise RuntimeError('this trainer is broken on purpose')
'''


@pytest.fixture(scope='module')
def study(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('study_local'))
    env = study_environment(root)
    spec = init_study(env, os.path.join(root, 'ab.toml'), 'local', ['--jobs', '2'])
    plan = run(['nnunet-ext', 'study', 'plan', spec], env).stdout
    ran = run(['nnunet-ext', 'study', 'run', spec], env)
    return dict(env=env, root=root, spec=spec, folder=os.path.join(root, 'ab'), plan=plan, ran=ran)


def test_plan_lists_every_job_before_anything_runs(study):
    plan = study['plan']
    assert 'study ab: 8 jobs, 0 done' in plan  # plan + 2 trainers x 2 folds + 2 tests + report
    assert plan.count('[todo] train ') == 4 and plan.count('[todo] predict and score') == 2
    assert f'[todo] plan and preprocess {DATASET}' in plan


def test_every_training_ran_the_budget_and_was_validated_by_nnunet(study):
    for trainer in TRAINERS:
        for fold in FOLDS:
            folder = fold_folder(study['folder'], trainer, fold)
            assert checkpoint_epochs(os.path.join(folder, 'checkpoint_final.pth')) == 2
            with open(os.path.join(folder, 'validation', 'summary.json'), encoding='utf-8') as f:
                assert json.load(f)['metric_per_case']
    splits = os.path.join(study['env']['nnUNet_preprocessed'], DATASET, 'splits_final.json')
    with open(splits, encoding='utf-8') as f:
        assert len(json.load(f)) == 5  # nnU-Net's default split, written once by the plan job


def test_report_test_table_is_the_numpy_dice_of_the_predictions(study):
    with open(os.path.join(study['folder'], 'report', DATASET, 'report.md'), encoding='utf-8') as f:
        rows = report_test_rows(f.read())
    labels = os.path.join(study['env']['nnUNet_raw'], DATASET, 'labelsTs')
    for trainer in TRAINERS:
        predictions = os.path.join(prediction_folder(study['folder'], trainer), 'predictions')
        liver = numpy_mean_dice(predictions, labels, 1)
        assert reported_mean(rows[trainer][2]) == pytest.approx(liver, abs=6e-5), (trainer, rows[trainer])
    for name in ('report.html', 'pseudo_dice_2d.png', 'qualitative_2d.png'):
        assert os.path.getsize(os.path.join(study['folder'], 'report', DATASET, name)) > 0


def test_status_says_done_and_running_again_runs_nothing(study):
    status = run(['nnunet-ext', 'study', 'status', study['spec']], study['env']).stdout
    assert status.strip().splitlines()[-1] == '7 done', status  # the plan job is no job once planned
    before = file_times(study['folder'])
    again = run(['nnunet-ext', 'study', 'run', study['spec']], study['env'])
    assert 'nothing to run' in again.stdout
    assert file_times(study['folder']) == before


def test_failed_training_shows_in_status_and_report(study, tmp_path):
    env = dict(study['env'])
    trainers = tmp_path / 'my_trainers'
    trainers.mkdir()
    (trainers / 'broken_trainers.py').write_text(BROKEN_TRAINER)
    env['nnUNet_extTrainer'] = env['nnUNet_extTrainer'] + os.pathsep + str(trainers)
    spec = str(tmp_path / 'broken.toml')
    run(['nnunet-ext', 'study', 'init', spec, '-d', DATASET, '-tr', 'nnUNetTrainerBrokenOnPurpose', '--baseline',
         'nnUNetTrainerBrokenOnPurpose', '-f', '0', '--device', 'cpu', '--epochs', '1'], env)
    failed = run(['nnunet-ext', 'study', 'run', spec], env, check=False)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert 'skipped test__' in failed.stdout  # its test prediction needs the training
    status = run(['nnunet-ext', 'study', 'status', spec], env).stdout
    line = next(x for x in status.splitlines() if x.startswith('train__'))
    assert ' failed ' in line and 'RuntimeError: this trainer is broken on purpose' in line, status
    report = (tmp_path / 'broken' / 'report' / 'report.md').read_text()
    assert 'this trainer is broken on purpose' in report and '## Not done' in report


@pytest.mark.parametrize('edit, message', [
    (('compare = ["nnUNetTrainerGODC"]', 'compare = ["nnUNetTrainerNope"]'),
     r'trainers\.compare: no trainer nnUNetTrainerNope'),
    (('datasets = [941]', 'datasets = [942]'), r'data\.datasets: .*942'),
    (('configurations = ["2d"]', 'configurations = ["2d", "3d_lowres"]'), r'data\.configurations: 3d_lowres'),
    (('folds = [0, 1]', 'folds = [0, 7]'), r'runs\.folds: .* 5 folds'),
])
def test_bad_spec_is_refused_before_anything_runs(study, tmp_path, edit, message):
    with open(study['spec'], encoding='utf-8') as f:
        text = f.read()
    assert edit[0] in text
    spec = tmp_path / 'bad.toml'
    spec.write_text(text.replace(edit[0], edit[1]).replace('folder = "ab"', 'folder = "bad"'))
    for step in ('plan', 'run'):
        result = run(['nnunet-ext', 'study', step, str(spec)], study['env'], check=False)
        assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / 'bad').exists()
