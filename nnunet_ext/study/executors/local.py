"""The local executor: the jobs as subprocesses of this command, ``executor.jobs`` at a time, each with one
GPU of ``executor.gpus`` (``CUDA_VISIBLE_DEVICES``) when listed. A job starts when every job it needs is
done; the report when every other job has ended. SIGINT/SIGTERM to the command reach the running jobs as
SIGTERM (a training saves its state after the iteration in progress and exits 75); running the study
again continues them."""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import subprocess
import time
from typing import Dict, List, Optional, Tuple

from nnunet_ext.study.executors.base import Executor, carried_environment
from nnunet_ext.study.files import write_text_atomically
from nnunet_ext.study.graph import Job
from nnunet_ext.study.state import PREEMPTED_STATUS, RUNNING

GRACE_SECONDS = 120  # after SIGTERM, how long a job may take to save before it is killed
POLL_SECONDS = 0.5


def _header(spec_name: str, job: Job, how: str) -> str:
    now = datetime.datetime.now().isoformat(timespec='seconds')
    return f'=== study {spec_name} job {job.id} ({how}) on {socket.gethostname()} at {now} ===\n'


class LocalExecutor(Executor):
    name = 'local'

    def _environment(self, job: Job, slot: int) -> Dict[str, str]:
        env = {**os.environ, **carried_environment(), **dict(job.env)}
        if self.spec.gpus:
            env['CUDA_VISIBLE_DEVICES'] = str(self.spec.gpus[slot % len(self.spec.gpus)])
        if self.spec.device == 'cpu' and self.spec.jobs > 1:
            env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # concurrent CPU trainings: no spinning threads
        return env

    def _cores(self, slot: int) -> Optional[List[int]]:
        """On a CPU with several job slots, the cores of ``slot``: this process's cores dealt out to the slots,
        so that concurrent trainings do not oversubscribe them (each uses one thread per core it may run on,
        as within a SLURM allocation). None: no pinning."""
        if self.spec.device != 'cpu' or self.spec.jobs < 2 or not hasattr(os, 'sched_setaffinity'):
            return None
        cores = sorted(os.sched_getaffinity(0))
        return cores[slot::self.spec.jobs] or [cores[slot % len(cores)]]

    def _running_file(self, job: Job) -> str:
        return os.path.join(self.layout.state, f'{job.id}.running')

    def _start(self, job: Job, slot: int) -> Tuple[subprocess.Popen, object]:
        log = open(self.layout.log(job.id), 'a', encoding='utf-8')
        log.write(_header(self.spec.name, job, f'local, slot {slot}'))
        log.flush()
        cores = self._cores(slot)
        process = subprocess.Popen(list(job.argv), env=self._environment(job, slot), stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                   preexec_fn=None if cores is None else lambda: os.sched_setaffinity(0, cores))
        with open(self._running_file(job), 'w', encoding='utf-8') as f:
            f.write(f'{process.pid} {socket.gethostname()}\n')
        return process, log

    def _ended(self, job: Job, status: int, log) -> None:
        log.close()
        write_text_atomically(self.layout.exit_file(job.id), f'{status}\n')
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._running_file(job))

    def run(self, jobs: List[Job], done: Dict[str, bool], dry_run: bool = False) -> int:
        todo = [job for job in jobs if not done[job.id]]
        if not todo:
            print('nothing to run: every job is done')
            return 0
        if dry_run:
            for job in todo:
                print(f'would run: {job.id}: {" ".join(job.argv)}')
            return 0
        self.layout.make_folders()
        ended: Dict[str, int] = {job.id: 0 for job in jobs if done[job.id]}
        running: Dict[str, Tuple[Job, subprocess.Popen, object, int]] = {}
        pending = list(todo)
        free_slots = list(range(self.spec.jobs))
        total, started = len(todo), 0
        try:
            while pending or running:
                for job in list(pending):
                    if not free_slots:
                        break
                    verdict = self._ready(job, ended)
                    if verdict is None:
                        continue
                    pending.remove(job)
                    if verdict is False:  # something it needs failed
                        ended[job.id] = -1
                        print(f'skipped {job.id}: a job it needs did not finish', flush=True)
                        continue
                    slot = free_slots.pop(0)
                    process, log = self._start(job, slot)
                    running[job.id] = (job, process, log, slot)
                    started += 1
                    print(f'[{started}/{total}] {job.description} '
                          f'(log: {self.layout.log(job.id)})', flush=True)
                time.sleep(POLL_SECONDS)
                for job_id, (job, process, log, slot) in list(running.items()):
                    status = process.poll()
                    if status is None:
                        continue
                    del running[job_id]
                    free_slots.append(slot)
                    self._ended(job, status, log)
                    ended[job_id] = status
                    print(f'    {"done" if status == 0 else _failure(status)}: {job.id}', flush=True)
        except KeyboardInterrupt:
            self._stop(running)
            raise
        failed = [j for j, status in ended.items() if status != 0]
        if failed:
            print(f'{len(failed)} of {len(jobs)} jobs did not finish: nnunet-ext study status {self.spec.path}')
            return 1
        return 0

    @staticmethod
    def _ready(job: Job, ended: Dict[str, int]) -> Optional[bool]:
        """True: start it; False: a job it needs failed (never for the report); None: wait."""
        if any(need not in ended for need in job.needs):
            return None
        return job.after_any or all(ended[need] == 0 for need in job.needs)

    def _stop(self, running: Dict[str, Tuple[Job, subprocess.Popen, object, int]]) -> None:
        """SIGTERM to every running job's process group, then SIGKILL after the grace period."""
        for job, process, log, _ in running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_SECONDS
        for job, process, log, _ in running.values():
            try:
                status = process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                status = process.wait()
            self._ended(job, status, log)

    def active(self, jobs: List[Job]) -> Dict[str, str]:
        """Jobs whose ``state/JOB.running`` names a live process of this host."""
        active = {}
        host = socket.gethostname()
        for job in jobs:
            try:
                with open(self._running_file(job), encoding='utf-8') as f:
                    pid, where = f.read().split()
                os.kill(int(pid), 0)
            except (OSError, ValueError):
                continue
            if where == host:
                active[job.id] = RUNNING
        return active


def _failure(status: int) -> str:
    if status == PREEMPTED_STATUS:
        return 'interrupted (its state is saved; run the study again to continue it)'
    if status < 0:
        return f'killed by {signal.Signals(-status).name}'
    return f'failed (exit {status})'
