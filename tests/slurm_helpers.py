"""A real one-node SLURM cluster for the tests (``.ci/slurm_cluster.sh``), as the module-scoped fixture
``slurm_cluster``: a test module takes it with ``from slurm_helpers import slurm_cluster  # noqa: F401``.

The fixture uses a cluster that is already running when ``SLURM_CONF`` is set and ``sinfo`` answers (it never
stops that one); otherwise it starts one in a fresh folder under the temp folder and stops it, and removes the
folder, at teardown: the fixture stops what it started. Without the SLURM programs, without root, or when the
cluster does not come up, the module's tests are skipped, or fail where ``NNUNET_EXT_REQUIRE_SLURM=1`` (CI, which
installs the programs: ``.ci/slurm_cluster.sh install``). Each fixture instance gets its own folder and free ports
(picked by the script), so two pytest-xdist workers could each run one.

The cluster has no accounting (no ``sacct``): job states come from ``scontrol show job`` (finished jobs stay there
for an hour: ``MinJobAge=3600``) and ``squeue``.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, '.ci', 'slurm_cluster.sh')
REQUIRE = 'NNUNET_EXT_REQUIRE_SLURM'

# a job in one of these states has not finished (``scontrol``'s JobState names; squeue's %T prints the same)
ACTIVE_STATES = frozenset({
    'PENDING', 'CONFIGURING', 'RUNNING', 'COMPLETING', 'SUSPENDED', 'STOPPED', 'RESIZING', 'SIGNALING',
    'STAGE_OUT', 'REQUEUED', 'REQUEUE_HOLD', 'REQUEUE_FED', 'RESV_DEL_HOLD', 'SPECIAL_EXIT'})
# a pending job whose dependency can never be met (submitted without --kill-on-invalid-dep=yes) never runs
NEVER_RUNS = 'DependencyNeverSatisfied'


def _job_id(record: dict) -> str:
    """The job's id as ``squeue -o %i`` prints it: ``12``, an array task ``10_1``, pending tasks ``10_[2-5]``."""
    array_job, task = record.get('ArrayJobId'), record.get('ArrayTaskId')
    if not array_job or task in (None, '', 'N/A'):
        return record['JobId']
    if task.isdigit():
        return f'{array_job}_{task}'
    return f'{array_job}_[{task}]'


def parse_jobs(text: str) -> list[dict]:
    """Records of ``scontrol show job -o`` (one line a job, ``Key=Value`` fields; a value may hold spaces: a word
    that does not look like ``Key=`` continues the value before it)."""
    records = []
    for line in text.splitlines():
        if not line.startswith('JobId='):
            continue
        record, key = {}, None
        for word in line.split(' '):
            name, sep, value = word.partition('=')
            if sep and name and name[0].isalpha() and all(c.isalnum() or c in ':/_' for c in name):
                key = name
                record[key] = value
            elif key is not None:
                record[key] += ' ' + word
        records.append({k: v.strip() for k, v in record.items()})
    return records


@dataclass
class SlurmCluster:
    """A SLURM cluster the tests submit to. ``env`` holds what a client needs (``SLURM_CONF``): merge it into the
    environment of a subprocess that calls SLURM (``cluster.environ()`` does). ``folder`` is the cluster's folder
    (None for a cluster the fixture did not start); ``slurmctld_log`` / ``slurmd_log`` the daemons' logs."""
    env: dict[str, str]
    folder: str | None = None
    slurmctld_log: str | None = None
    slurmd_log: str | None = None
    started: bool = False
    _log_lines: int = field(default=40, repr=False)

    def environ(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """``os.environ`` with ``env`` (and ``extra``) on top, for ``subprocess.run(..., env=...)``."""
        return {**os.environ, **self.env, **(extra or {})}

    def run(self, args: Sequence[str], *, check: bool = True, timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        """Run a SLURM client command (``['squeue', '-h']``) with the cluster's environment; text output captured.
        A non-zero exit status fails (AssertionError with the command's output) unless ``check=False``."""
        kwargs.setdefault('env', self.environ())
        result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f'{" ".join(args)} exited {result.returncode}\nstdout: {result.stdout}\n'
                                 f'stderr: {result.stderr}')
        return result

    def sbatch(self, *args: str, **kwargs) -> str:
        """``sbatch --parsable ARGS``; the job id (of an array: the array's id)."""
        return self.run(['sbatch', '--parsable', *args], **kwargs).stdout.strip().split(';')[0]

    def jobs(self, job_ids: Iterable[str | int] | str | int) -> dict[str, dict]:
        """``scontrol show job`` records of the given jobs, keyed by id as squeue prints it (``12``; an array's
        tasks ``10_0``, ``10_1``, its pending rest ``10_[2-5]``). An id matches its job, an array task's own job
        id, or (an array's id) all the array's tasks. Unknown ids (never submitted, or purged) are left out."""
        wanted = {str(j) for j in ([job_ids] if isinstance(job_ids, (str, int)) else job_ids)}
        out = self.run(['scontrol', 'show', 'job', '-o'], check=False)
        if out.returncode != 0 and 'No jobs' not in out.stdout + out.stderr:
            raise AssertionError(f'scontrol show job failed: {out.stderr}')
        return {_job_id(r): r for r in parse_jobs(out.stdout)
                if {r.get('JobId'), r.get('ArrayJobId'), _job_id(r)} & wanted}

    def job_states(self, job_ids: Iterable[str | int] | str | int) -> dict[str, str]:
        """``{job id: JobState}`` (``PENDING``, ``RUNNING``, ``COMPLETING``, ``COMPLETED``, ``FAILED``,
        ``CANCELLED``, ``TIMEOUT``, ...) for the given jobs, keyed as in ``jobs``."""
        return {k: r.get('JobState', 'UNKNOWN') for k, r in self.jobs(job_ids).items()}

    def wait_finished(self, job_ids: Iterable[str | int] | str | int, timeout: float = 60,
                      poll: float = 0.25) -> dict[str, str]:
        """Wait until none of the jobs is pending, running, completing or requeued; their final states
        (``job_states``). A job pending on a dependency that can never be met (reason ``DependencyNeverSatisfied``:
        submitted without ``--kill-on-invalid-dep=yes``) counts as finished and keeps the state ``PENDING``. On
        timeout the test fails with squeue's listing and the slurmctld log's tail."""
        wanted = [str(j) for j in ([job_ids] if isinstance(job_ids, (str, int)) else job_ids)]
        deadline = time.monotonic() + timeout
        while True:
            records = self.jobs(wanted)
            waiting = {k: r.get('JobState') for k, r in records.items()
                       if r.get('JobState') in ACTIVE_STATES
                       and not (r.get('JobState') == 'PENDING' and r.get('Reason') == NEVER_RUNS)}
            found = set(wanted) & {v for r in records.values()
                                   for v in (r.get('JobId'), r.get('ArrayJobId'), _job_id(r))}
            if not waiting and found == set(wanted):
                return {k: r.get('JobState', 'UNKNOWN') for k, r in records.items()}
            if time.monotonic() > deadline:
                missing = sorted(set(wanted) - found)
                pytest.fail(f'SLURM jobs not finished after {timeout:g} s: {waiting}'
                            + (f'; unknown: {missing}' if missing else '') + '\n' + self.diagnostics())
            time.sleep(poll)

    def diagnostics(self) -> str:
        """squeue's listing of all jobs and the tails of the daemons' logs."""
        queue = self.run(['squeue', '-t', 'all', '-o', '%.12i %.12T %.24r %.10M %.20S %j'], check=False)
        parts = [f'squeue -t all:\n{queue.stdout}{queue.stderr}']
        for log in (self.slurmctld_log, self.slurmd_log):
            if log and os.path.isfile(log):
                with open(log, encoding='utf-8', errors='replace') as f:
                    tail = f.readlines()[-self._log_lines:]
                parts.append(f'last lines of {log}:\n{"".join(tail)}')
        return '\n'.join(parts)


def _unavailable(reason: str):
    if os.environ.get(REQUIRE) == '1':
        pytest.fail(f'{reason} ({REQUIRE}=1)', pytrace=False)
    pytest.skip(reason)


def _running_cluster() -> SlurmCluster | None:
    """The cluster ``SLURM_CONF`` names, if ``sinfo`` reaches it. Without ``SLURM_CONF`` a system cluster
    (``/etc/slurm``, a login node's) is not used: the tests would submit jobs to it."""
    conf = os.environ.get('SLURM_CONF')
    if not conf or shutil.which('sinfo') is None:
        return None
    try:
        ok = subprocess.run(['sinfo', '-h'], capture_output=True, text=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    if not ok:
        return None
    cluster = SlurmCluster(env={'SLURM_CONF': conf})
    config = cluster.run(['scontrol', 'show', 'config'], check=False).stdout
    for line in config.splitlines():
        name, _, value = (s.strip() for s in line.partition('='))
        if name in ('SlurmctldLogFile', 'SlurmdLogFile') and value.startswith('/'):
            setattr(cluster, 'slurmctld_log' if name == 'SlurmctldLogFile' else 'slurmd_log', value)
    return cluster


def _searchable_temp() -> str:
    """The temp folder if every folder above it can be searched by all (munged's check on its socket), else /tmp."""
    base = os.path.realpath(tempfile.gettempdir())
    d = base
    while d != os.path.dirname(d):
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return '/tmp'
        d = os.path.dirname(d)
    return base


def _stop(folder: str) -> str:
    """``slurm_cluster.sh stop FOLDER``; its error output ('' when it stopped cleanly)."""
    try:
        result = subprocess.run(['bash', SCRIPT, 'stop', folder], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return 'slurm_cluster.sh stop timed out'
    return '' if result.returncode == 0 else result.stderr


@pytest.fixture(scope='module')
def slurm_cluster():
    """A reachable SLURM cluster (``SlurmCluster``) for the module: the running one ``SLURM_CONF`` names, else
    one started here in its own folder and stopped at teardown. Skips without SLURM, fails instead where
    ``NNUNET_EXT_REQUIRE_SLURM=1``."""
    running = _running_cluster()
    if running is not None:
        yield running
        return
    missing = [p for p in ('sbatch', 'squeue', 'scontrol', 'sinfo', 'slurmctld', 'slurmd', 'munged')
               if shutil.which(p) is None]
    if missing:
        _unavailable(f'SLURM is not installed (no {", ".join(missing)}; `sudo .ci/slurm_cluster.sh install` '
                     'installs Debian\'s slurm-wlm and munge)')
    if os.geteuid() != 0:
        _unavailable('starting the test SLURM cluster needs root (its slurmd runs jobs as their users)')
    folder = tempfile.mkdtemp(prefix='nnunet-ext-slurm-', dir=_searchable_temp())
    os.chmod(folder, 0o755)
    started = False
    try:
        try:
            result = subprocess.run(['bash', SCRIPT, 'start', folder], capture_output=True, text=True,
                                    timeout=180)
            error = result.stderr.strip() if result.returncode != 0 else ''
        except subprocess.TimeoutExpired:
            error = 'slurm_cluster.sh start timed out after 180 s'
        if error:
            _unavailable(f'the test SLURM cluster did not start: {error}')
        started = True
        yield SlurmCluster(env={'SLURM_CONF': os.path.join(folder, 'slurm.conf')}, folder=folder,
                           slurmctld_log=os.path.join(folder, 'log', 'slurmctld.log'),
                           slurmd_log=os.path.join(folder, 'log', 'slurmd.log'), started=True)
    finally:
        error = _stop(folder)  # also after a failed start: whatever it did start
        shutil.rmtree(folder, ignore_errors=True)
        if error and started:
            pytest.fail(f'the test SLURM cluster did not stop cleanly: {error}', pytrace=False)
