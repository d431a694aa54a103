"""Signals end a command the way an error does (issue 27): a real ``nnunet-ext convert lits`` (and
``evaluate``, ``stack-slices``) subprocess, sent SIGTERM (to it alone, as ``kill PID`` or a batch system) or
SIGINT (to its whole process group, as a terminal's Ctrl-C) while its workers convert: exit status 143 / 130,
one line on stderr and no traceback, nothing left in nnUNet_raw, no worker left running. A partial folder left
by a SIGKILL is removed by the next conversion of the id, one of a running conversion is not; an
all-background dataset is refused unless --allow-empty-labels.

Oracles: the process table (/proc: the command's children recorded while it ran, looked up after it
ended), exit codes, stderr, the folders on disk."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import nibabel as nib
import numpy as np
import pytest

from cli_helpers import BIN, run
from nnunet_ext.cli import main

pytestmark = pytest.mark.skipif(not os.path.isdir('/proc/self') or sys.platform == 'win32',
                                reason='reads the process table from /proc; POSIX signals')

SHAPE = (96, 96, 40)  # x, y, z: a case takes a worker some 50 ms, so 400 of them run for half a minute
SLOW_CASES = 400
PROGRESS = re.compile(r'^[^:|]+:\s+\d+%\|')  # a tqdm progress bar ("LiTS:  20%|██  | 39/200 [...]")


# ------------------------------------------------------------------ fixtures: sources made of links to one case
def _label(shape=SHAPE, foreground: bool = True) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    if foreground:  # a box over the middle half of every axis, a smaller one inside
        label[tuple(slice(n // 4, n - n // 4) for n in shape)] = 1
        label[tuple(slice(n // 2 - n // 8, n // 2 + n // 8 + 1) for n in shape)] = 2
    return label


def _image(label: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.normal(-300, 150, label.shape) + 300 * (label > 0)).astype(np.int16)


def _lits_source(folder: str, cases: int, shape=SHAPE, foreground: bool = True) -> str:
    """A LiTS layout of ``cases`` cases, each a hard link to one volume and one segmentation (.nii)."""
    os.makedirs(folder)
    label = _label(shape, foreground)
    nib.save(nib.Nifti1Image(_image(label), np.eye(4)), os.path.join(folder, 'volume-0.nii'))
    nib.save(nib.Nifti1Image(label, np.eye(4)), os.path.join(folder, 'segmentation-0.nii'))
    for i in range(1, cases):
        for kind in ('volume', 'segmentation'):
            os.link(os.path.join(folder, f'{kind}-0.nii'), os.path.join(folder, f'{kind}-{i}.nii'))
    return folder


# ------------------------------------------------------------------ the process table
def _stat(pid: int) -> Optional[Tuple[str, int, str]]:
    """(state, parent pid, start time in clock ticks) of a process, None if there is none."""
    try:
        with open(f'/proc/{pid}/stat', encoding='ascii', errors='replace') as f:
            fields = f.read().rsplit(')', 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return fields[0], int(fields[1]), fields[19]


def _cmdline(pid: int) -> str:
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            return f.read().replace(b'\0', b' ').decode(errors='replace')
    except OSError:
        return ''


def _children(pid: int) -> Dict[int, Tuple[str, str]]:
    """``{child pid: (start time, command line)}`` of the processes whose parent is ``pid``."""
    found = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[1] == pid:
                found[int(entry)] = (stat[2], _cmdline(int(entry)))
    return found


def _still_running(children: Dict[int, Tuple[str, str]]) -> List[str]:
    """The recorded children that still run (same pid and start time; a zombie does not run)."""
    running = []
    for pid, (started, cmdline) in children.items():
        stat = _stat(pid)
        if stat is not None and stat[2] == started and stat[0] not in ('Z', 'X'):
            running.append(f'{pid} {cmdline}')
    return running


def _assert_no_orphans(children: Dict[int, Tuple[str, str]], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while _still_running(children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _still_running(children), _still_running(children)


# ------------------------------------------------------------------ a command in the background
class Background:
    """``nnunet-ext ARGS`` in its own process group (a terminal's foreground job), output to files (an orphaned
    worker holding the pipes open must not hang the test)."""

    def __init__(self, args: List[str], env: Dict[str, str], folder: str):
        self.out_path, self.err_path = os.path.join(folder, 'stdout'), os.path.join(folder, 'stderr')
        with open(self.out_path, 'w') as out, open(self.err_path, 'w') as err:
            self.process = subprocess.Popen([os.path.join(BIN, 'nnunet-ext'), *args], env=env, stdout=out,
                                            stderr=err, start_new_session=True)
        self.pid = self.process.pid

    def stderr(self) -> str:
        with open(self.err_path, encoding='utf-8', errors='replace') as f:
            return f.read()

    def wait_until(self, condition, what: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"nnunet-ext exited {self.process.returncode} before {what}:\n{self.stderr()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"no {what} after {timeout} s:\n{self.stderr()}")
            time.sleep(0.05)

    def workers(self) -> Dict[int, Tuple[str, str]]:
        return {pid: v for pid, v in _children(self.pid).items() if 'spawn_main' in v[1]}

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def _partials(raw: str) -> List[str]:
    return sorted(os.path.join(raw, f) for f in os.listdir(raw) if '.partial-' in f) if os.path.isdir(raw) else []


def _writing(raw: str, subfolder: str = 'imagesTr'):
    """A condition: a partial folder of nnUNet_raw has a file in ``subfolder`` (the workers convert)."""
    def condition() -> bool:
        return any(os.listdir(os.path.join(p, subfolder)) for p in _partials(raw)
                   if os.path.isdir(os.path.join(p, subfolder)))
    return condition


def _interrupt(job: Background, how: str) -> Dict[int, Tuple[str, str]]:
    """Sends SIGTERM to the command alone, or SIGINT to its process group (Ctrl-C); returns its children as
    they were just before."""
    job.wait_until(lambda: len(job.workers()) >= 2, 'two workers')
    children = _children(job.pid)
    if how == 'SIGTERM':
        os.kill(job.pid, signal.SIGTERM)
    else:
        os.killpg(job.pid, signal.SIGINT)
    try:
        job.process.wait(60)
    finally:
        if job.process.poll() is None:
            job.kill()
    return children


def _assert_one_line(err: str, expected: str, only: bool = True) -> None:
    """``expected`` is stderr's one line besides the progress bars (with ``only=False``: its one interrupt line,
    and its last), and there is no traceback."""
    assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err
    lines = [line for line in re.split(r'[\r\n]+', err) if line.strip() and not PROGRESS.match(line)]
    if only:
        assert lines == [expected], err
    else:
        assert lines[-1] == expected and sum('interrupted' in line for line in lines) == 1, err


# ------------------------------------------------------------------ convert, interrupted
@pytest.mark.parametrize('how, status', [('SIGTERM', 143), ('SIGINT', 130)])
def test_an_interrupted_conversion_stops_its_workers_and_leaves_nothing(tmp_path, env, how, status):
    source = _lits_source(str(tmp_path / 'LiTS'), SLOW_CASES)
    raw = env['nnUNet_raw']
    job = Background(['convert', 'lits', source, '--id', '701', '-np', '2'], env, str(tmp_path))
    job.wait_until(_writing(raw), 'case written into the partial folder')
    children = _interrupt(job, how)

    assert job.process.returncode == status, job.stderr()
    _assert_one_line(job.stderr(), f'nnunet-ext convert: interrupted ({how}); partial output removed')
    assert os.listdir(raw) == []  # no .partial-* folder, no Dataset701_*
    assert any('spawn_main' in cmdline for _, cmdline in children.values()), children
    _assert_no_orphans(children)


# ------------------------------------------------------------------ partial folders of earlier runs
def test_a_partial_folder_left_by_a_killed_conversion_is_removed_by_the_next_one(tmp_path, env):
    raw = env['nnUNet_raw']
    job = Background(['convert', 'lits', _lits_source(str(tmp_path / 'big'), SLOW_CASES), '--id', '702', '-np', '2'],
                     env, str(tmp_path))
    job.wait_until(_writing(raw), 'case written into the partial folder')
    job.kill()  # SIGKILL to the group: no handler runs, as after a power loss
    (left,) = _partials(raw)

    small = _lits_source(str(tmp_path / 'small'), 2, shape=(20, 18, 6))
    result = run(['nnunet-ext', 'convert', 'lits', small, '--id', '702', '-np', '1'], env)
    assert f'removed a partial conversion left by an earlier run: {left}' in result.stderr
    assert sorted(os.listdir(raw)) == ['Dataset702_LiTS']
    with open(os.path.join(raw, 'Dataset702_LiTS', 'dataset.json')) as f:
        assert json.load(f)['numTraining'] == 2


def test_the_partial_folder_of_a_running_conversion_is_left_alone(tmp_path, env):
    raw = env['nnUNet_raw']
    job = Background(['convert', 'lits', _lits_source(str(tmp_path / 'big'), SLOW_CASES), '--id', '703', '-np', '2'],
                     env, str(tmp_path))
    try:
        job.wait_until(_writing(raw), 'case written into the partial folder')
        os.killpg(job.pid, signal.SIGSTOP)  # it runs (stopped, not dead) however long the second one takes
        (partial,) = _partials(raw)
        small = _lits_source(str(tmp_path / 'small'), 2, shape=(20, 18, 6))
        result = run(['nnunet-ext', 'convert', 'lits', small, '--id', '703', '-np', '1'], env, check=False)
        assert result.returncode == 2, result.stderr
        assert f'is being written by process {job.pid}' in result.stderr and 'Traceback' not in result.stderr
        assert _partials(raw) == [partial] and any(os.listdir(os.path.join(partial, 'imagesTr')))
        assert not [f for f in os.listdir(raw) if f.startswith('Dataset')]
    finally:
        os.killpg(job.pid, signal.SIGCONT)
    os.kill(job.pid, signal.SIGTERM)
    job.process.wait(60)
    assert job.process.returncode == 143, job.stderr()
    assert os.listdir(raw) == []


def _fake_partial(raw: str, pid: int, host: str, mtime: Optional[float] = None) -> str:
    from nnunet_ext.conversion.raw_dataset import this_host
    path = os.path.join(raw, f'.Dataset704_LiTS.partial-{pid}@{host or this_host()}-abcd1234')
    os.makedirs(os.path.join(path, 'imagesTr'))
    open(os.path.join(path, 'imagesTr', 'lits_000_0000.nii.gz'), 'wb').close()
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_a_live_pid_that_started_after_the_partial_folder_was_reused_and_the_folder_is_removed(tmp_path, raw,
                                                                                             capsys):
    source = _lits_source(str(tmp_path / 'LiTS'), 2, shape=(20, 18, 6))
    # our parent process runs, and started before now: a folder of 1 January 1971 cannot be its
    stale = _fake_partial(raw, os.getppid(), '', mtime=365 * 86400.0)
    assert main(['convert', 'lits', source, '--id', '704', '-np', '1']) == 0
    assert f'removed a partial conversion left by an earlier run: {stale}' in capsys.readouterr().err
    assert sorted(os.listdir(raw)) == ['Dataset704_LiTS']


@pytest.mark.parametrize('host, message', [('', r'is being written by process \d+'),
                                           ('another-node.cluster', r'may be being written by process \d+ on host '
                                                                    r'another-node\.cluster')])
def test_a_partial_folder_whose_owner_runs_or_may_run_elsewhere_is_kept(tmp_path, raw, capsys, host, message):
    source = _lits_source(str(tmp_path / 'LiTS'), 2, shape=(20, 18, 6))
    live = _fake_partial(raw, os.getppid(), host)  # our parent: it runs, and started before the folder
    assert main(['convert', 'lits', source, '--id', '704', '-np', '1']) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and live in err and 'Traceback' not in err, err
    assert _partials(raw) == [live] and os.listdir(os.path.join(live, 'imagesTr')) == ['lits_000_0000.nii.gz']


# ------------------------------------------------------------------ all-background datasets
def test_an_all_background_dataset_is_refused_unless_allowed(tmp_path, raw, capsys):
    source = _lits_source(str(tmp_path / 'LiTS'), 2, shape=(20, 18, 6), foreground=False)
    argv = ['convert', 'lits', source, '--id', '705', '-np', '1']
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in re.split(r'[\r\n]+', err) if 'error:' in line]
    assert len(errors) == 1 and 'Traceback' not in err, err
    assert 'background only' in errors[0] and '--allow-empty-labels' in errors[0], err
    assert os.listdir(raw) == []

    assert main([*argv, '--allow-empty-labels']) == 0
    out = capsys.readouterr().out
    assert 'label 0 (background)' in out and 'label 1' not in out, out
    with open(os.path.join(raw, 'Dataset705_LiTS', 'dataset.json')) as f:
        assert json.load(f)['numTraining'] == 2
    labels = nib.load(os.path.join(raw, 'Dataset705_LiTS', 'labelsTr', 'lits_000.nii.gz')).get_fdata()
    assert not labels.any()


def test_one_labelled_case_is_enough(tmp_path, raw, capsys):
    source = _lits_source(str(tmp_path / 'LiTS'), 3, shape=(20, 18, 6), foreground=False)
    os.unlink(os.path.join(source, 'segmentation-2.nii'))
    label = np.zeros((20, 18, 6), np.uint8)
    label[5, 5, 3] = 2
    nib.save(nib.Nifti1Image(label, np.eye(4)), os.path.join(source, 'segmentation-2.nii'))
    assert main(['convert', 'lits', source, '--id', '706', '-np', '1']) == 0, capsys.readouterr().err
    assert os.listdir(raw) == ['Dataset706_LiTS']


def test_main_restores_the_signal_handlers(tmp_path, raw, capsys):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    main(['convert', 'lits', str(tmp_path / 'missing'), '--id', '707'])
    assert {s: signal.getsignal(s) for s in before} == before


# ------------------------------------------------------------------ other commands
def test_evaluate_stops_on_sigterm(tmp_path, env):
    pred, gt = tmp_path / 'pred', tmp_path / 'gt'
    pred.mkdir()
    gt.mkdir()
    label = _label((64, 64, 48))
    moved = np.roll(label, 3, axis=0)
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(gt / 'case_000.nii.gz'))
    nib.save(nib.Nifti1Image(moved, np.eye(4)), str(pred / 'case_000.nii.gz'))
    for i in range(1, SLOW_CASES):
        os.link(gt / 'case_000.nii.gz', gt / f'case_{i:03d}.nii.gz')
        os.link(pred / 'case_000.nii.gz', pred / f'case_{i:03d}.nii.gz')
    before = sorted(os.listdir(pred))
    job = Background(['evaluate', str(pred), str(gt), '-np', '2'], env, str(tmp_path))
    job.wait_until(lambda: 'classes:' in job.stderr(), 'evaluation started')
    children = _interrupt(job, 'SIGTERM')
    assert job.process.returncode == 143, job.stderr()
    _assert_one_line(job.stderr(), 'nnunet-ext evaluate: interrupted (SIGTERM); partial output removed', only=False)
    assert sorted(os.listdir(pred)) == before  # no summary, no temporary file
    _assert_no_orphans(children)


def test_stack_slices_stops_on_sigterm(tmp_path, env):
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    raw = env['nnUNet_raw']
    source = os.path.join(raw, 'Dataset708_Source')
    for sub in ('imagesTr', 'labelsTr'):
        os.makedirs(os.path.join(source, sub))
    label = _label((64, 64, 40))
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    first_image = os.path.join(source, 'imagesTr', 'case_000_0000.nii.gz')
    nib.save(nib.Nifti1Image(_image(label), affine), first_image)
    nib.save(nib.Nifti1Image(label, affine), os.path.join(source, 'labelsTr', 'case_000.nii.gz'))
    for i in range(1, SLOW_CASES):
        os.link(first_image, os.path.join(source, 'imagesTr', f'case_{i:03d}_0000.nii.gz'))
        os.link(os.path.join(source, 'labelsTr', 'case_000.nii.gz'), os.path.join(source, 'labelsTr',
                                                                                  f'case_{i:03d}.nii.gz'))
    generate_dataset_json(source, {0: 'CT'}, {'background': 0, 'liver': 1, 'tumor': 2}, SLOW_CASES, '.nii.gz')
    job = Background(['stack-slices', '708', '--id', '709', '-np', '2'], env, str(tmp_path))
    job.wait_until(_writing(raw), 'case written into the partial folder')
    children = _interrupt(job, 'SIGTERM')
    assert job.process.returncode == 143, job.stderr()
    _assert_one_line(job.stderr(), 'nnunet-ext stack-slices: interrupted (SIGTERM); partial output removed')
    assert os.listdir(raw) == ['Dataset708_Source']
    _assert_no_orphans(children)


def test_a_forked_child_of_the_command_dies_of_sigterm_as_by_default():
    """nnU-Net's fork pools (fingerprint extraction, preprocessing) inherit the command's SIGTERM handler; a pool's
    terminate() sends SIGTERM, and a worker that raised an interrupt instead of dying could deadlock on a lock it
    holds (seen in CI: `nnunet-ext plan` hung for 900 s). The oracle: the kernel's report of how the child ended."""
    import signal
    import time
    from nnunet_ext.cli import _signals_raise_interrupted
    with _signals_raise_interrupted():
        pid = os.fork()
        if pid == 0:  # the child: wait to be killed
            time.sleep(30)
            os._exit(0)
        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
