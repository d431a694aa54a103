"""The real one-node SLURM test cluster (tests/slurm_helpers.py, .ci/slurm_cluster.sh) does what `nnunet-ext study`
relies on: job arrays, dependencies on a whole array, failed dependencies, and requeue on a signal."""
from __future__ import annotations

import sys
import time

from slurm_helpers import slurm_cluster  # noqa: F401  (the module-scoped fixture)


def _script(path, text):
    path.write_text(text, encoding='utf-8')
    path.chmod(0o755)
    return str(path)


def _wait_for_file(cluster, path, job_id, timeout=30):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f'{path} not written within {timeout} s: {cluster.job_states(job_id)}\n'
                                 + cluster.diagnostics())
        time.sleep(0.1)


def test_node_is_up(slurm_cluster):  # noqa: F811
    states = slurm_cluster.run(['sinfo', '-h', '-N', '-o', '%t']).stdout.split()
    assert states and all(s in ('idle', 'mix', 'alloc') for s in states), states


def test_array_tasks_run_with_their_index(slurm_cluster, tmp_path):  # noqa: F811
    array = slurm_cluster.sbatch('--array=0-2', f'--chdir={tmp_path}', f'--output={tmp_path}/log_%A_%a.out',
                                 '--wrap', 'echo "$SLURM_ARRAY_TASK_ID" > "task_$SLURM_ARRAY_TASK_ID"; echo done')
    states = slurm_cluster.wait_finished([array], timeout=60)
    assert states == {f'{array}_{i}': 'COMPLETED' for i in range(3)}
    for i in range(3):
        assert (tmp_path / f'task_{i}').read_text().strip() == str(i)
        assert (tmp_path / f'log_{array}_{i}.out').read_text() == 'done\n'  # %A_%a: array id, task index


def test_afterok_on_an_array_waits_for_all_its_tasks(slurm_cluster, tmp_path):  # noqa: F811
    array = slurm_cluster.sbatch('--array=0-2', f'--chdir={tmp_path}', '--output=/dev/null',
                                 '--wrap', 'sleep "$SLURM_ARRAY_TASK_ID"; touch "done_$SLURM_ARRAY_TASK_ID"')
    after = slurm_cluster.sbatch(f'--dependency=afterok:{array}', f'--chdir={tmp_path}', '--output=/dev/null',
                                 '--wrap', 'ls done_* > seen')
    states = slurm_cluster.wait_finished([array, after], timeout=60)
    assert set(states.values()) == {'COMPLETED'} and len(states) == 4, states
    assert (tmp_path / 'seen').read_text().split() == ['done_0', 'done_1', 'done_2']


def test_a_failed_job_cancels_its_afterok_dependents_and_runs_its_afterany_ones(slurm_cluster, tmp_path):  # noqa: F811
    common = [f'--chdir={tmp_path}', '--output=/dev/null']
    failing = slurm_cluster.sbatch(*common, '--wrap', 'exit 3')
    killed = slurm_cluster.sbatch(*common, f'--dependency=afterok:{failing}', '--kill-on-invalid-dep=yes',
                                  '--wrap', 'touch afterok_ran')
    stuck = slurm_cluster.sbatch(*common, f'--dependency=afterok:{failing}', '--wrap', 'touch stuck_ran')
    anyway = slurm_cluster.sbatch(*common, f'--dependency=afterany:{failing}', '--wrap', 'touch afterany_ran')
    try:
        states = slurm_cluster.wait_finished([failing, killed, stuck, anyway], timeout=60)
        jobs = slurm_cluster.jobs([failing, killed, stuck])
    finally:
        slurm_cluster.run(['scancel', stuck], check=False)
    assert states == {failing: 'FAILED', killed: 'CANCELLED', stuck: 'PENDING', anyway: 'COMPLETED'}
    assert jobs[failing]['ExitCode'] == '3:0'
    # without --kill-on-invalid-dep the dependent stays pending for ever (wait_finished counts it as finished)
    assert jobs[killed]['Reason'] == jobs[stuck]['Reason'] == 'DependencyNeverSatisfied'
    assert jobs[stuck]['Dependency'] == f'afterok:{failing}(failed)'
    assert (tmp_path / 'afterany_ran').exists()
    assert not (tmp_path / 'afterok_ran').exists() and not (tmp_path / 'stuck_ran').exists()


def test_a_job_that_requeues_itself_on_usr1_runs_again(slurm_cluster, tmp_path):  # noqa: F811
    """The batch script forwards USR1 to its Python child (which would save a checkpoint), then requeues the job
    and exits; the second run sees SLURM_RESTART_COUNT=1. The test cluster's cred_expire=5 puts a requeued job's
    begin time 6 s after the requeue (the default, 120 s, would make this test take minutes)."""
    child = _script(tmp_path / 'child.py', '''import os, signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
open('ready', 'w').close()
if os.environ.get('SLURM_RESTART_COUNT') == '1':
    sys.exit(0)
deadline = time.monotonic() + 60
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
print('child got USR1' if got else 'child timed out', flush=True)
sys.exit(42 if got else 1)
''')
    batch = _script(tmp_path / 'job.sh', f'''#!/bin/bash
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={tmp_path}/job_%j.out
echo "run restart=${{SLURM_RESTART_COUNT:-0}}"
forward() {{ kill -USR1 "$child"; }}
trap forward USR1
{sys.executable} {child} & child=$!
wait "$child"; rc=$?
# a trapped signal cuts wait short (status 128+10): wait again for the child's own status (bash keeps it)
if [ "$rc" -gt 128 ]; then wait "$child"; rc=$?; fi
echo "child exited $rc"
if [ "$rc" -eq 42 ]; then
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$rc"
''')
    job = slurm_cluster.sbatch(f'--chdir={tmp_path}', batch)
    _wait_for_file(slurm_cluster, tmp_path / 'ready', job)
    (tmp_path / 'ready').unlink()
    slurm_cluster.run(['scancel', '--signal=USR1', '--batch', job])
    assert slurm_cluster.wait_finished([job], timeout=60) == {job: 'COMPLETED'}
    assert slurm_cluster.jobs(job)[job]['Restarts'] == '1'
    log = (tmp_path / f'job_{job}.out').read_text()
    lines = [line for line in log.splitlines() if not line.startswith('slurmstepd')]
    assert lines == ['run restart=0', 'child got USR1', 'child exited 42', 'run restart=1', 'child exited 0'], log
