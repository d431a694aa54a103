"""``nnunet-ext study`` on a real one-node SLURM cluster (``slurm_helpers``): 2 trainers x 2 folds, their
test-set predictions and the report as job arrays with dependencies, end to end; submitting the finished
study again submits nothing; a training sent the scheduler's warning signal mid-run saves, is requeued,
continues from its checkpoint and ends with as many epochs as an uninterrupted one; the dry run writes
readable scripts and submits nothing. Skipped without SLURM on a developer's machine; fails in CI
(``NNUNET_EXT_REQUIRE_SLURM=1``)."""
from __future__ import annotations

import glob
import json
import os
import re
import time

import pytest

from cli_helpers import run
from slurm_helpers import slurm_cluster  # noqa: F401  (the fixture)
from study_helpers import (DATASET, FOLDS, TRAINERS, checkpoint_epochs, file_times, fold_folder, init_study,
                           numpy_mean_dice, prediction_folder, report_test_rows, reported_mean, study_environment)

pytestmark = pytest.mark.cli


def submitted_ids(study_folder: str) -> list:
    with open(os.path.join(study_folder, 'slurm', 'submitted.json'), encoding='utf-8') as f:
        return [record['array_job_id'] for record in json.load(f)]


@pytest.fixture(scope='module')
def cluster_env(slurm_cluster, tmp_path_factory):  # noqa: F811
    root = str(tmp_path_factory.mktemp('study_slurm'))
    env = {**study_environment(root), **slurm_cluster.env}
    # the planned phantom is shared by the studies below: plan it once, through a study's plan job
    return dict(root=root, env=env, cluster=slurm_cluster)


@pytest.fixture(scope='module')
def study(cluster_env):
    env, root, cluster = cluster_env['env'], cluster_env['root'], cluster_env['cluster']
    spec = init_study(env, os.path.join(root, 'ab.toml'), 'slurm')
    with open(spec, encoding='utf-8') as f:
        text = f.read().replace('cpus = 4', 'cpus = 1')
    with open(spec, 'w', encoding='utf-8') as f:
        f.write(text)
    folder = os.path.join(root, 'ab')
    dry = run(['nnunet-ext', 'study', 'run', spec, '--dry-run'], env)
    scripts = {os.path.basename(p): open(p, encoding='utf-8').read()
               for p in glob.glob(os.path.join(folder, 'slurm', '*'))}
    submitted = run(['nnunet-ext', 'study', 'run', spec], env)
    states = cluster.wait_finished(submitted_ids(folder), timeout=900)
    return dict(env=env, spec=spec, folder=folder, dry=dry, scripts=scripts, submitted=submitted, states=states,
                cluster=cluster)


def test_dry_run_writes_readable_scripts_and_submits_nothing(study):
    assert 'nothing submitted' in study['dry'].stdout
    scripts = study['scripts']
    train = scripts[f'train__{DATASET}__2d__nnUNetTrainerGODC.sbatch']
    assert '#SBATCH --array=0-1' in train and '#SBATCH --requeue' in train and '#SBATCH --signal=B:USR1@300' in train
    assert '#SBATCH --cpus-per-task=1' in train and '--dependency' not in train  # the dry run's ids are unknown
    assert f"export nnUNet_raw={study['env']['nnUNet_raw']}" in train
    assert re.search(r"-m nnunet_ext\.study train Dataset941_StudyPhantom 2d 1 nnUNetTrainerGODC -p nnUNetPlans "
                     r"--seed 0 --epochs 2 --iterations 2 --val-iterations 1 --device cpu", train)
    chain = scripts['submit.sh']
    assert re.search(r'job_test__\w+=\$\(sbatch --parsable --dependency=afterok:\$job_train__\w+ ', chain), chain
    assert re.search(r'job_report=\$\(sbatch --parsable --dependency=afterany:', chain), chain


def test_every_job_ran_on_the_cluster_with_its_dependencies(study):
    assert set(study['states'].values()) == {'COMPLETED'}, study['states']
    out = study['submitted'].stdout
    assert re.search(r'submitted test__\S+GODC: SLURM job \d+ \(1 task\(s\), afterok:\d+\)', out), out
    assert re.search(r'submitted report: SLURM job \d+ \(1 task\(s\), afterany:[\d:]+\)', out), out
    for trainer in TRAINERS:
        for fold in FOLDS:
            assert checkpoint_epochs(os.path.join(fold_folder(study['folder'], trainer, fold),
                                                  'checkpoint_final.pth')) == 2
            log = os.path.join(study['folder'], 'logs', f'train__{DATASET}__2d__{trainer}__fold_{fold}__seed_0.log')
            with open(log, encoding='utf-8') as f:
                header = f.readline()
            assert re.match(rf'=== study ab job train__{DATASET}__2d__{trainer}__fold_{fold}__seed_0 \(SLURM job \d+, '
                            r'array task \d+_\d, attempt 1\)', header), header
    with open(os.path.join(study['folder'], 'report', DATASET, 'report.md'), encoding='utf-8') as f:
        rows = report_test_rows(f.read())
    labels = os.path.join(study['env']['nnUNet_raw'], DATASET, 'labelsTs')
    for trainer in TRAINERS:
        liver = numpy_mean_dice(os.path.join(prediction_folder(study['folder'], trainer), 'predictions'), labels, 1)
        assert reported_mean(rows[trainer][2]) == pytest.approx(liver, abs=6e-5)


def test_status_and_submitting_the_finished_study_again(study):
    status = run(['nnunet-ext', 'study', 'status', study['spec']], study['env']).stdout
    assert status.strip().splitlines()[-1] == '7 done', status
    before = file_times(study['folder'])
    again = run(['nnunet-ext', 'study', 'run', study['spec']], study['env'])
    assert 'nothing to submit' in again.stdout
    after = file_times(study['folder'])
    assert {p: t for p, t in after.items() if '/slurm/' not in p} == {p: t for p, t in before.items()
                                                                      if '/slurm/' not in p}
    assert len(submitted_ids(study['folder'])) == 6  # the first submission's arrays only


EPOCHS = 8  # the warning signal must come before the last epoch, whatever the machine's speed


def test_warning_signal_saves_requeues_and_continues_from_the_checkpoint(study, cluster_env):
    env, cluster = cluster_env['env'], cluster_env['cluster']
    spec = os.path.join(cluster_env['root'], 'long.toml')
    run(['nnunet-ext', 'study', 'init', spec, '-d', DATASET, '-tr', 'nnUNetTrainer', '-f', '0', '--device', 'cpu',
         '--executor', 'slurm', '--epochs', str(EPOCHS), '--iterations', '12', '--val-iterations', '1',
         '--no-test'], env)
    with open(spec, encoding='utf-8') as f:
        text = f.read().replace('cpus = 4', 'cpus = 1')
    with open(spec, 'w', encoding='utf-8') as f:
        f.write(text)
    folder = os.path.join(cluster_env['root'], 'long')
    run(['nnunet-ext', 'study', 'run', spec], env)
    train_array = submitted_ids(folder)[0]
    log = os.path.join(folder, 'logs', f'train__{DATASET}__2d__nnUNetTrainer__fold_0__seed_0.log')

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + 300
        while not (os.path.isfile(log) and text in open(log, encoding='utf-8', errors='replace').read()):
            assert time.monotonic() < deadline, cluster.diagnostics()
            time.sleep(0.2)

    wait_for('Epoch 0')
    status = run(['nnunet-ext', 'study', 'status', spec], env).stdout
    assert re.search(r'train__\S+\s+running', status), status
    wait_for('Epoch 1')  # an epoch takes about 1.5 s here: the signal may come in epoch 1 or a later one
    cluster.run(['scancel', '--signal=USR1', '--batch', f'{train_array}_0'])  # what --signal=B:USR1@N sends
    states = cluster.wait_finished(submitted_ids(folder), timeout=600)
    assert set(states.values()) == {'COMPLETED'}, (states, cluster.diagnostics())
    with open(log, encoding='utf-8', errors='replace') as f:
        text = f.read()
    assert re.search(r'attempt 1\)', text) and re.search(r'attempt 2\)', text), text[-3000:]
    # the epoch in progress when the signal came was finished and saved; the next attempt starts after it
    preempted = re.search(r'preempted by SIGUSR1 after epoch (\d+): saved checkpoint_latest\.pth, the next attempt '
                          r'starts at epoch (\d+)', text)
    assert preempted, text[-3000:]
    done, next_epoch = int(preempted.group(1)), int(preempted.group(2))
    assert 1 <= done < EPOCHS - 1 and next_epoch == done + 1, text[-3000:]
    resumed = re.search(r'resuming from checkpoint_latest\.pth at epoch (\d+) \(attempt 2\)', text)
    assert resumed and int(resumed.group(1)) == next_epoch, text[-3000:]
    assert 'requeueing SLURM job' in text
    fold = fold_folder(folder, 'nnUNetTrainer', 0)
    assert checkpoint_epochs(os.path.join(fold, 'checkpoint_final.pth')) == EPOCHS  # as an uninterrupted run
    with open(os.path.join(fold, 'study_training.json'), encoding='utf-8') as f:
        attempts = json.load(f)['attempts']
    assert [a['outcome'] for a in attempts] == ['preempted', 'finished']
    assert [(a['start_epoch'], a['end_epoch']) for a in attempts] == [(0, next_epoch), (next_epoch, EPOCHS)]
