"""The executors without running anything: the local executor's GPU per job slot and readiness rules, the
SLURM script's options from the spec, the carried environment, and the forwarding of signals in bash (run
for real: the script's tail with a stand-in job)."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import textwrap
import time

import pytest

from nnunet_ext.study.graph import Job
from nnunet_ext.study.spec import load_spec


def spec_file(tmp_path, executor: str = '') -> str:
    path = tmp_path / 's.toml'
    path.write_text(textwrap.dedent('''
        [data]
        datasets = [978]
        [trainers]
        compare = ["nnUNetTrainerGODC"]
        [runs]
        device = "cuda"
        ''') + executor)
    return str(path)


def job(job_id='train__D__2d__T__fold_0__seed_0', kind='train', needs=(), after_any=False, argv=('true',)):
    return Job(job_id, kind, 'train__D__2d__T', tuple(argv), 'a job', needs=tuple(needs), after_any=after_any,
               env=(('nnUNet_results', '/r/seed 0'),))


def test_local_jobs_get_one_gpu_per_slot(tmp_path):
    from nnunet_ext.study.executors.local import LocalExecutor
    executor = LocalExecutor(load_spec(spec_file(tmp_path, '[executor]\njobs = 3\ngpus = [2, 5]\n')))
    devices = [executor._environment(job(), slot)['CUDA_VISIBLE_DEVICES'] for slot in range(3)]
    assert devices == ['2', '5', '2']
    assert executor._environment(job(), 0)['nnUNet_results'] == '/r/seed 0'


def test_local_readiness_waits_for_needs_and_skips_after_a_failure():
    from nnunet_ext.study.executors.local import LocalExecutor
    ready = LocalExecutor._ready
    assert ready(job(needs=['a', 'b']), {'a': 0}) is None             # b not ended: wait
    assert ready(job(needs=['a', 'b']), {'a': 0, 'b': 0}) is True
    assert ready(job(needs=['a', 'b']), {'a': 0, 'b': 1}) is False    # b failed: skipped
    assert ready(job(needs=['a', 'b'], after_any=True), {'a': 0, 'b': 1}) is True  # the report runs anyway


def test_slurm_script_has_the_specs_options(tmp_path, monkeypatch):
    from nnunet_ext.study.executors.slurm import SlurmExecutor
    monkeypatch.setenv('nnUNet_raw', "/data/it's raw")
    spec = load_spec(spec_file(tmp_path, textwrap.dedent('''
        [executor.slurm]
        partition = "gpu"
        account = "lab"
        gpus = 2
        cpus = 8
        mem = "32G"
        time = "1-00:00:00"
        signal_seconds = 120
        extra = ["#SBATCH --qos=high", "#SBATCH --constraint=a100"]
        ''')))
    script = SlurmExecutor(spec).script([job(), job('train__D__2d__T__fold_1__seed_0', argv=('echo', 'a b'))],
                                        dependency='afterok:17')
    for line in ('#SBATCH --array=0-1', '#SBATCH --partition=gpu', '#SBATCH --account=lab', '#SBATCH --gres=gpu:2',
                 '#SBATCH --cpus-per-task=8', '#SBATCH --mem=32G', '#SBATCH --time=1-00:00:00', '#SBATCH --requeue',
                 '#SBATCH --signal=B:USR1@120', '#SBATCH --dependency=afterok:17', '#SBATCH --qos=high',
                 '#SBATCH --constraint=a100', '#SBATCH --open-mode=append', '#SBATCH --kill-on-invalid-dep=yes'):
        assert line in script.splitlines(), line
    assert 'export nnUNet_raw=\'/data/it\'"\'"\'s raw\'' in script  # quoted for bash
    case = "  1) JOB=train__D__2d__T__fold_1__seed_0\n     export nnUNet_results='/r/seed 0'\n     set -- echo 'a b' ;;"
    assert case in script


def run_tail(tmp_path, child: str, send=None):
    """The SLURM script's signal forwarding and exit handling (its tail after the job's ``case``), run by bash
    with ``child`` as the job; ``send`` is signalled to bash (as SLURM's --signal=B: does) once it started."""
    from nnunet_ext.study.executors.slurm import SlurmExecutor
    spec = load_spec(spec_file(tmp_path))
    script = SlurmExecutor(spec).script([job(argv=('python3', '-c', child))])
    state = os.path.join(spec.folder, 'state')
    os.makedirs(os.path.join(spec.folder, 'logs'))
    os.makedirs(state)
    path = tmp_path / 'job.sh'
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM')}
    process = subprocess.Popen(['bash', str(path)], env=env)
    if send is not None:
        log = os.path.join(spec.folder, 'logs', 'train__D__2d__T__fold_0__seed_0.log')
        deadline = time.monotonic() + 30
        while 'child ready' not in (open(log).read() if os.path.exists(log) else ''):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(send)
    status = process.wait(timeout=60)
    with open(os.path.join(state, 'train__D__2d__T__fold_0__seed_0.exit')) as f:
        return status, int(f.read())


CHILD = '''
import signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append('USR1'))
signal.signal(signal.SIGTERM, lambda *a: got.append('TERM'))
print('child ready', flush=True)
deadline = time.time() + 20
while not got and time.time() < deadline:
    time.sleep(0.05)
print('child got', got, flush=True)
sys.exit({'USR1': 75, 'TERM': 76}.get(got[0] if got else None, 3))
'''


@pytest.mark.parametrize('signal_number, expected', [(signal.SIGUSR1, 75), (signal.SIGTERM, 76)])
def test_slurm_script_passes_signals_on_and_records_the_jobs_status(tmp_path, signal_number, expected):
    status, recorded = run_tail(tmp_path, CHILD, send=signal_number)
    assert recorded == expected  # the child's own status, not bash's 128 + signal
    assert status == expected    # outside SLURM (no SLURM_JOB_ID) a preempted job is not requeued


def test_slurm_script_exit_status_of_a_failing_job(tmp_path):
    assert run_tail(tmp_path, 'import sys; sys.exit(4)') == (4, 4)


def test_local_cpu_jobs_get_disjoint_cores(tmp_path, monkeypatch):
    from nnunet_ext.study.executors.local import LocalExecutor
    monkeypatch.setattr('os.sched_getaffinity', lambda pid: {0, 1, 2, 3})
    spec = spec_file(tmp_path, '[executor]\njobs = 2\n')
    cpu = dataclasses.replace(load_spec(spec), device='cpu')
    executor = LocalExecutor(cpu)
    assert [executor._cores(slot) for slot in (0, 1)] == [[0, 2], [1, 3]]
    three = LocalExecutor(dataclasses.replace(cpu, jobs=5))
    assert [three._cores(slot) for slot in range(5)] == [[0], [1], [2], [3], [0]]  # more slots than cores: shared
    assert LocalExecutor(load_spec(spec))._cores(0) is None  # cuda: the GPU is the slot's resource
