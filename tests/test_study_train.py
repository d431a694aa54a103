"""``python -m nnunet_ext.study.train``: resumable, preemption-safe training of one fold, run as a study job
runs it (real subprocesses, a tiny planned 2D phantom, 4 epochs of a few iterations, on the CPU).

Three independent lanes, each in its own ``nnUNet_results`` and run at the same time:

* plain (``nnUNetTrainer``): (a) an uninterrupted run; (d) the same command again on the finished fold;
* usr1 (``nnUNetTrainer``): (b) SIGUSR1 in epoch 1 -> exit 75 after the epoch; the same command resumes
  at epoch 2 and finishes;
* term (our ``nnUNetTrainerGODC``): (c) SIGTERM in epoch 1 -> exit 75 at once; the same command restarts
  epoch 1, gets SIGUSR1 in the last epoch -> exit 75 with ``checkpoint_final.pth``; the third run runs the
  final validation only.

The oracles are nnU-Net's own files: the checkpoints' ``current_epoch`` and per-epoch ``logging`` lists,
the learning rates nnU-Net logged (its poly schedule over the whole run), the epochs each run printed,
``validation/summary.json``; the training record is checked against them.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

import pytest

from cli_helpers import planned_phantom, user_environment

from nnunet_ext.errors import UserInputError
from nnunet_ext.study import train as study_train
from nnunet_ext.study.files import write_json_atomically

pytestmark = pytest.mark.cli

DATASET_ID, DATASET = 251, 'Dataset251_StudyTrain'
EPOCHS = 4
ITERATIONS = 4
TERM_ITERATIONS = 8  # the SIGTERM lane: a longer epoch to send the signal into
PREEMPTED = 75
LOG_KEYS = ('mean_fg_dice', 'ema_fg_dice', 'dice_per_class_or_region', 'train_losses', 'val_losses', 'lrs',
            'epoch_start_timestamps', 'epoch_end_timestamps')


class Run:
    """A finished subprocess: exit status, combined output, the time the signal was sent (if any)."""

    def __init__(self, returncode: int, output: str, signal_sent_at: Optional[float]):
        self.returncode, self.output, self.signal_sent_at = returncode, output, signal_sent_at

    def lines(self, prefix: str = 'study train: ') -> List[str]:
        return [line for line in self.output.splitlines() if line.startswith(prefix)]

    def epochs(self) -> List[int]:
        """The epochs nnU-Net started in this run (its ``Epoch N`` lines)."""
        return [int(m.group(1)) for m in re.finditer(r': Epoch (\d+)$', self.output, re.MULTILINE)]

    def __repr__(self) -> str:
        return f"exit {self.returncode}\n{self.output[-6000:]}"


def _command(trainer: str, iterations: int = ITERATIONS) -> List[str]:
    return [sys.executable, '-m', 'nnunet_ext.study.train', str(DATASET_ID), '2d', '0', trainer, '--seed', '0',
            '--device', 'cpu', '--epochs', str(EPOCHS), '--iterations', str(iterations), '--val-iterations', '1']


def _run(command: List[str], env: Dict[str, str], when: Optional[str] = None, send: Optional[int] = None,
         delay: float = 0.0, timeout: float = 300) -> Run:
    """Runs ``command``; with ``when``, sends ``send`` ``delay`` seconds after the first output line matching
    the regex ``when``."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               encoding='utf-8', errors='replace')
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    lines, sent_at = [], None
    try:
        for line in process.stdout:
            lines.append(line)
            if when is not None and sent_at is None and re.search(when, line):
                time.sleep(delay)
                process.send_signal(send)
                sent_at = time.time()
        returncode = process.wait()
    finally:
        watchdog.cancel()
    return Run(returncode, ''.join(lines), sent_at)


def _fold(results: str, trainer: str) -> str:
    return os.path.join(results, DATASET, f'{trainer}__nnUNetPlans__2d', 'fold_0')


def _checkpoint(fold: str, name: str) -> Optional[dict]:
    """What nnU-Net stored in the checkpoint ``name`` (``None`` if there is none)."""
    if not os.path.isfile(os.path.join(fold, name)):
        return None
    import torch
    checkpoint = torch.load(os.path.join(fold, name), map_location='cpu', weights_only=False)
    return dict(current_epoch=checkpoint['current_epoch'], trainer_name=checkpoint['trainer_name'],
                logging={k: list(v) for k, v in checkpoint['logging'].items()})


def _digest(path: str) -> str:
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def _files(folder: str) -> Dict[str, tuple]:
    """Every file under ``folder``: (size, modification time in ns)."""
    found = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(directory, name)
            status = os.stat(path)
            found[os.path.relpath(path, folder)] = (status.st_size, status.st_mtime_ns)
    return found


# ------------------------------------------------------------------------------------------------ lanes

def _lane_plain(env: Dict[str, str]) -> dict:
    trainer = 'nnUNetTrainer'
    fold = _fold(env['nnUNet_results'], trainer)
    result = dict(fold=fold, a=_run(_command(trainer), env))
    result['final'] = _checkpoint(fold, study_train.FINAL)
    result['before_d'] = _files(env['nnUNet_results'])
    time.sleep(0.05)  # a file the rerun touched would get a later modification time
    result['d'] = _run(_command(trainer), env)
    result['after_d'] = _files(env['nnUNet_results'])
    return result


def _lane_usr1(env: Dict[str, str]) -> dict:
    trainer = 'nnUNetTrainer'
    fold = _fold(env['nnUNet_results'], trainer)
    result = dict(fold=fold, b1=_run(_command(trainer), env, when=r': Epoch 1$', send=signal.SIGUSR1))
    result['latest'] = _checkpoint(fold, study_train.LATEST)
    result['final_after_b1'] = os.path.isfile(os.path.join(fold, study_train.FINAL))
    result['b2'] = _run(_command(trainer), env)
    return result


def _lane_term(env: Dict[str, str]) -> dict:
    trainer, command = 'nnUNetTrainerGODC', _command('nnUNetTrainerGODC', TERM_ITERATIONS)
    fold = _fold(env['nnUNet_results'], trainer)
    # in epoch 1, a moment after it started: mid-way through its training iterations
    result = dict(fold=fold, c1=_run(command, env, when=r': Epoch 1$', send=signal.SIGTERM, delay=0.2))
    result['latest'] = _checkpoint(fold, study_train.LATEST)
    # the resumed run gets SIGUSR1 in its last epoch: it saves checkpoint_final.pth and leaves the validation
    result['c2'] = _run(command, env, when=rf': Epoch {EPOCHS - 1}$', send=signal.SIGUSR1)
    final = os.path.join(fold, study_train.FINAL)
    result['final'] = _checkpoint(fold, study_train.FINAL)
    result['final_digest'] = _digest(final) if os.path.isfile(final) else None
    result['summary_after_c2'] = os.path.isfile(os.path.join(fold, 'validation', 'summary.json'))
    result['latest_after_c2'] = os.path.isfile(os.path.join(fold, study_train.LATEST))
    result['c3'] = _run(command, env)
    result['final_digest_after_c3'] = _digest(final) if os.path.isfile(final) else None
    return result


@pytest.fixture(scope='module')
def lanes(tmp_path_factory):
    root = tmp_path_factory.mktemp('study_train')
    env = user_environment(str(root / 'data'))
    env.update(nnUNet_n_proc_DA='0', nnUNet_def_n_proc='1', OMP_WAIT_POLICY='PASSIVE', PYTHONUNBUFFERED='1')
    planned_phantom(env, DATASET_ID, 'StudyTrain', '2d', (32, 32), num_train=5)  # writes splits_final.json
    lanes = {'term': _lane_term, 'usr1': _lane_usr1, 'plain': _lane_plain}
    with ThreadPoolExecutor(max_workers=2) as pool:  # the longest lane first; 3 at once on 2 cores is slower
        futures = {name: pool.submit(lane, {**env, 'nnUNet_results': str(root / f'results_{name}')})
                   for name, lane in lanes.items()}
        return {name: future.result() for name, future in futures.items()}


def _assert_epochs_logged(checkpoint: dict, epochs: int) -> None:
    assert checkpoint['current_epoch'] == epochs
    assert {k: len(v) for k, v in checkpoint['logging'].items()} == {k: epochs for k in LOG_KEYS}


def _poly_lrs(epochs: int, initial_lr: float = 1e-2) -> List[float]:
    """nnU-Net's PolyLRScheduler over ``epochs`` epochs, the rate of each epoch."""
    return [initial_lr * (1 - e / epochs) ** 0.9 for e in range(epochs)]


# ------------------------------------------------------------------------------------------------ tests

def test_uninterrupted_run_trains_all_epochs_and_validates(lanes):
    plain = lanes['plain']
    a = plain['a']
    assert a.returncode == 0, a
    assert a.epochs() == list(range(EPOCHS)), a
    assert re.fullmatch(r'study train: finished: 4 epochs trained \(epochs 0 to 3 in attempt 1\) and validated: .*',
                        a.lines()[-1]), a
    final = plain['final']
    assert final is not None and final['trainer_name'] == 'nnUNetTrainer'
    _assert_epochs_logged(final, EPOCHS)
    assert final['logging']['lrs'] == pytest.approx(_poly_lrs(EPOCHS))  # the schedule spans --epochs
    fold = plain['fold']
    assert study_train.training_finished(fold)
    assert not os.path.exists(os.path.join(fold, study_train.LATEST))
    record = study_train.read_training_record(fold)
    assert record['trainer'] == 'nnUNetTrainer' and record['dataset'] == DATASET and record['fold'] == 0
    (attempt,) = record['attempts']
    assert (attempt['outcome'], attempt['start_epoch'], attempt['end_epoch'], attempt['seed']) == \
        ('finished', 0, EPOCHS, 0)
    assert (attempt['num_epochs'], attempt['num_iterations_per_epoch'], attempt['num_val_iterations_per_epoch']) \
        == (EPOCHS, ITERATIONS, 1)
    assert attempt['train_steps'] == EPOCHS * ITERATIONS and attempt['median_train_step_seconds'] > 0


def test_sigusr1_finishes_the_epoch_then_the_next_run_resumes_at_the_next(lanes):
    usr1, plain = lanes['usr1'], lanes['plain']
    b1, b2 = usr1['b1'], usr1['b2']
    assert b1.signal_sent_at is not None and b1.returncode == PREEMPTED, b1
    assert b1.epochs() == [0, 1], b1
    assert b1.lines()[-1] == ('study train: preempted by SIGUSR1 after epoch 1: saved checkpoint_latest.pth, the '
                              'next attempt starts at epoch 2 (exit 75)'), b1
    assert 'Traceback' not in b1.output
    latest = usr1['latest']
    assert latest is not None and not usr1['final_after_b1']
    _assert_epochs_logged(latest, 2)  # nnU-Net's continue: epochs 0 and 1 done, starts at 2
    # same seed, same settings: the epochs before the signal are those of the uninterrupted run
    assert latest['logging']['train_losses'] == pytest.approx(plain['final']['logging']['train_losses'][:2],
                                                              rel=1e-4)

    assert b2.returncode == 0, b2
    assert 'study train: resuming from checkpoint_latest.pth at epoch 2 (attempt 2)' in b2.lines(), b2
    assert b2.epochs() == [2, 3], b2
    assert 'maybe some logging issue' not in b2.output
    final = _checkpoint(usr1['fold'], study_train.FINAL)
    _assert_epochs_logged(final, EPOCHS)
    assert {k: len(v) for k, v in final['logging'].items()} == \
        {k: len(v) for k, v in plain['final']['logging'].items()}
    assert final['logging']['lrs'] == pytest.approx(plain['final']['logging']['lrs'])
    assert final['logging']['train_losses'][:2] == latest['logging']['train_losses']  # the history is kept
    assert study_train.training_finished(usr1['fold'])
    assert not os.path.exists(os.path.join(usr1['fold'], study_train.LATEST))
    attempts = study_train.read_training_record(usr1['fold'])['attempts']
    assert [(a['outcome'], a['start_epoch'], a['end_epoch'], a['signal'], a['action']) for a in attempts] == \
        [('preempted', 0, 2, 'SIGUSR1', 'fresh'), ('finished', 2, EPOCHS, None, 'resume')]
    assert [a['seed'] for a in attempts] == [0, 0]
    assert attempts[1]['train_steps'] == 2 * ITERATIONS


def test_sigterm_stops_mid_epoch_and_the_next_run_restarts_that_epoch(lanes):
    term = lanes['term']
    c1, c2 = term['c1'], term['c2']
    assert c1.signal_sent_at is not None and c1.returncode == PREEMPTED, c1
    assert re.fullmatch(r'study train: stopped by SIGTERM in epoch 1 after [0-8] of 8 training iterations: saved '
                        r'checkpoint_latest\.pth, the next attempt restarts epoch 1 \(exit 75\)', c1.lines()[-1]), c1
    assert 'Traceback' not in c1.output
    latest = term['latest']
    assert latest is not None
    _assert_epochs_logged(latest, 1)  # epoch 1's entries (learning rate, start time) were removed

    assert 'study train: resuming from checkpoint_latest.pth at epoch 1 (attempt 2)' in c2.lines(), c2
    assert c2.epochs() == [1, 2, 3], c2
    assert 'maybe some logging issue' not in c2.output
    final = term['final']
    assert final is not None and final['trainer_name'] == 'nnUNetTrainerGODC'
    _assert_epochs_logged(final, EPOCHS)
    assert final['logging']['lrs'] == pytest.approx(_poly_lrs(EPOCHS))
    assert final['logging']['epoch_start_timestamps'][1] > c1.signal_sent_at  # epoch 1 is the restarted one
    assert final['logging']['train_losses'][0] == latest['logging']['train_losses'][0]
    attempts = study_train.read_training_record(term['fold'])['attempts']
    assert [(a['outcome'], a['start_epoch'], a['end_epoch'], a['signal']) for a in attempts[:1]] == \
        [('preempted', 0, 1, 'SIGTERM')]


def test_sigusr1_in_the_last_epoch_leaves_the_validation_to_the_next_run(lanes):
    term = lanes['term']
    c2, c3 = term['c2'], term['c3']
    assert c2.returncode == PREEMPTED, c2
    assert c2.lines()[-1] == ('study train: preempted by SIGUSR1 at the end of training: saved checkpoint_final.pth, '
                              'the next attempt runs the final validation only (exit 75)'), c2
    assert not term['summary_after_c2'] and not term['latest_after_c2']

    assert c3.returncode == 0, c3
    assert 'study train: checkpoint_final.pth without validation/summary.json: running the final validation only ' \
           '(attempt 3)' in c3.lines(), c3
    assert c3.epochs() == [], c3
    assert c3.lines()[-1].startswith('study train: validated: '), c3
    assert term['final_digest_after_c3'] == term['final_digest']  # validation only: the checkpoint is untouched
    assert study_train.training_finished(term['fold'])
    attempts = study_train.read_training_record(term['fold'])['attempts']
    assert [(a['outcome'], a['start_epoch'], a['end_epoch'], a['signal']) for a in attempts] == \
        [('preempted', 0, 1, 'SIGTERM'), ('preempted', 1, EPOCHS, 'SIGUSR1'), ('validated', EPOCHS, EPOCHS, None)]


def test_a_finished_training_is_left_alone(lanes):
    plain = lanes['plain']
    d = plain['d']
    assert d.returncode == 0, d
    assert d.output.strip().splitlines() == [
        f"study train: already finished (checkpoint_final.pth and validation/summary.json in {plain['fold']}): "
        f"nothing to do"], d
    assert plain['after_d'] == plain['before_d']


# ------------------------------------------------------------------------- in-process, no training

def test_finished_rule_record_and_next_action(tmp_path):
    fold = str(tmp_path)
    assert not study_train.training_finished(fold) and study_train.read_training_record(fold) is None
    assert study_train.next_action(fold) == ('fresh', None)
    import torch
    torch.save({'current_epoch': 7}, os.path.join(fold, 'checkpoint_best.pth'))
    assert study_train.next_action(fold) == ('resume', 'checkpoint_best.pth')
    torch.save({'current_epoch': 5}, os.path.join(fold, 'checkpoint_latest.pth'))
    assert study_train.next_action(fold) == ('resume', 'checkpoint_best.pth')  # killed after a newer best
    torch.save({'current_epoch': 7}, os.path.join(fold, 'checkpoint_latest.pth'))
    assert study_train.next_action(fold) == ('resume', 'checkpoint_latest.pth')  # a tie: the latest
    shutil.copy(os.path.join(fold, 'checkpoint_latest.pth'), os.path.join(fold, 'checkpoint_final.pth'))
    assert study_train.next_action(fold) == ('validate', 'checkpoint_final.pth')
    assert not study_train.training_finished(fold)
    os.makedirs(os.path.join(fold, 'validation'))
    with open(os.path.join(fold, 'validation', 'summary.json'), 'w', encoding='utf-8') as f:
        f.write('{}')
    assert study_train.training_finished(fold) and study_train.next_action(fold) == ('finished', None)
    write_json_atomically(os.path.join(fold, study_train.RECORD_NAME), {'attempts': []})
    assert study_train.read_training_record(fold) == {'attempts': []}
    assert [n for n in os.listdir(fold) if n.endswith('.tmp')] == []


def test_continuing_refuses_other_settings_and_inherits_missing_ones(tmp_path, monkeypatch, capsys):
    attempts = [dict(seed=3, num_epochs=4, num_iterations_per_epoch=5, num_val_iterations_per_epoch=2)]
    job = study_train.parse_args([DATASET, '2d', '0', 'nnUNetTrainer', '--epochs', '4'])
    assert job.fold == 0 and job.seed is None and job.device == 'cuda'
    assert study_train.settings_in_force(job, attempts, True, 'r') == attempts[0]
    assert study_train.settings_in_force(job, attempts, False, 'r') == dict(
        seed=None, num_epochs=4, num_iterations_per_epoch=None, num_val_iterations_per_epoch=None)
    with pytest.raises(UserInputError, match=r'--seed 1 differs from the 3 this training started with'):
        study_train.settings_in_force(study_train.parse_args([DATASET, '2d', 'all', 'X', '--seed', '1']),
                                      attempts, True, 'r')
    # the command: exit 2 and one line, before anything is imported or written
    monkeypatch.setenv('nnUNet_results', str(tmp_path))
    fold = _fold(str(tmp_path), 'nnUNetTrainer')
    os.makedirs(fold)
    open(os.path.join(fold, 'checkpoint_latest.pth'), 'wb').close()
    write_json_atomically(os.path.join(fold, study_train.RECORD_NAME), dict(attempts=attempts))
    before = _files(str(tmp_path))
    assert study_train.main([DATASET, '2d', '0', 'nnUNetTrainer', '--iterations', '6']) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"study train: error: --iterations 6 differs from the 5 this training started with "
        f"({os.path.join(fold, study_train.RECORD_NAME)}); run it with the same settings, or delete its fold "
        f"folder to start over"]
    assert _files(str(tmp_path)) == before
