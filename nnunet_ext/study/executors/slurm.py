"""The SLURM executor: one generated ``sbatch`` script per group of jobs (a job array: one planning per
dataset; the folds x seeds of one (dataset, configuration, trainer); the seeds of its test-set prediction;
the report), submitted with ``--dependency=afterok`` from trainings to predictions and ``afterany`` to the
report (which lists what is missing), ``--kill-on-invalid-dep=yes`` so that a failed training cancels the
predictions waiting for it instead of leaving them pending for ever.

Plain scripts rather than a library (submitit): the user can read, edit and resubmit them
(``slurm/submit.sh`` chains them), every option of the spec is one visible ``#SBATCH`` line, and the jobs
are ordinary command lines (``python -m nnunet_ext.study.train ...``) instead of pickled Python calls that
need the same interpreter and package versions on both sides.

Preemption: a training job is submitted with ``--requeue`` and ``--signal=B:USR1@N``; the script passes
USR1 and SIGTERM on to the training, which saves its state and exits 75; the script then requeues the job
(``scontrol requeue``), and the next attempt continues from the checkpoint."""
from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import subprocess
from typing import Dict, List, Optional

from nnunet_ext.errors import UserInputError
from nnunet_ext.study.executors.base import Executor, carried_environment
from nnunet_ext.parallel import signals_deferred
from nnunet_ext.study.files import write_json_atomically
from nnunet_ext.study.graph import REPORT, TRAIN, Job
from nnunet_ext.study.state import PENDING, PREEMPTED_STATUS, RUNNING

SUBMITTED = 'submitted.json'
_ACTIVE_STATES = {'PENDING': PENDING, 'REQUEUED': PENDING, 'REQUEUE_HOLD': PENDING, 'REQUEUE_FED': PENDING,
                  'CONFIGURING': PENDING, 'SUSPENDED': PENDING, 'RESIZING': PENDING, 'RUNNING': RUNNING,
                  'COMPLETING': RUNNING, 'STAGE_OUT': RUNNING, 'SIGNALING': RUNNING}


def _q(value: object) -> str:
    return shlex.quote(str(value))


class SlurmExecutor(Executor):
    name = 'slurm'

    # ------------------------------------------------------------------------------------- scripts
    def _options(self, group: List[Job], dependency: Optional[str]) -> List[str]:
        settings, kind = self.spec.slurm, group[0].kind
        lines = [f'--job-name={self.spec.name}.{group[0].group}', f'--array=0-{len(group) - 1}',
                 f'--output={os.path.join(self.layout.logs, "slurm", "%x_%A_%a.out")}', '--open-mode=append',
                 f'--cpus-per-task={settings.cpus}', '--kill-on-invalid-dep=yes']
        if settings.partition:
            lines.append(f'--partition={settings.partition}')
        if settings.account:
            lines.append(f'--account={settings.account}')
        if settings.gpus and kind != REPORT and self.spec.device == 'cuda':
            lines.append(f'--gres=gpu:{settings.gpus}')
        if settings.mem:
            lines.append(f'--mem={settings.mem}')
        if settings.time:
            lines.append(f'--time={settings.time}')
        if kind == TRAIN:
            lines += ['--requeue', f'--signal=B:USR1@{settings.signal_seconds}']
        if dependency:
            lines.append(f'--dependency={dependency}')
        return [f'#SBATCH {line}' for line in lines] + list(settings.extra)

    def script(self, group: List[Job], dependency: Optional[str] = None) -> str:
        """The batch script of one group (a job array, one task per job)."""
        environment = carried_environment()
        cases = []
        for index, job in enumerate(group):
            exports = ''.join(f'\n     export {k}={_q(v)}' for k, v in job.env)
            cases.append(f'  {index}) JOB={_q(job.id)}{exports}\n     set -- {" ".join(_q(a) for a in job.argv)} ;;')
        logs, state = _q(self.layout.logs), _q(self.layout.state)
        return '\n'.join([
            '#!/bin/bash',
            f'# nnunet-ext study {self.spec.name}: {group[0].group}, {len(group)} job(s); written by '
            f'`nnunet-ext study run {self.spec.path}`',
            *self._options(group, dependency),
            '',
            'set -u',
            '# the environment of the shell that ran the study (Python, nnU-Net\'s folders)',
            *[f'export {k}={_q(v)}' for k, v in sorted(environment.items())],
            '',
            'case "${SLURM_ARRAY_TASK_ID:-0}" in',
            *cases,
            '  *) echo "no job for array task ${SLURM_ARRAY_TASK_ID:-}" >&2; exit 2 ;;',
            'esac',
            f'exec >>{logs}/"$JOB".log 2>&1',
            f'echo "=== study {self.spec.name} job $JOB (SLURM job ${{SLURM_JOB_ID:-?}}, array task '
            '${SLURM_ARRAY_JOB_ID:-?}_${SLURM_ARRAY_TASK_ID:-?}, attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 ))) '
            'on $(hostname) at $(date -Iseconds) ==="',
            '# the warning before the time limit (--signal=B:USR1@N) and SIGTERM reach this shell: pass them on',
            'child=""',
            'trap \'[ -n "$child" ] && kill -USR1 "$child" 2>/dev/null\' USR1',
            'trap \'[ -n "$child" ] && kill -TERM "$child" 2>/dev/null\' TERM',
            '"$@" &',
            'child=$!',
            'wait "$child"; status=$?',
            'while [ "$status" -gt 128 ] && kill -0 "$child" 2>/dev/null; do  # a trapped signal ended the wait',
            '  wait "$child"; status=$?',
            'done',
            'if [ "$status" -gt 128 ]; then wait "$child"; status=$?; fi  # the job ended with the signal: its status',
            f'echo "$status" > {state}/"$JOB".exit.tmp && mv {state}/"$JOB".exit.tmp {state}/"$JOB".exit',
            f'if [ "$status" -eq {PREEMPTED_STATUS} ] && [ -n "${{SLURM_JOB_ID:-}}" ]; then',
            '  echo "=== state saved; requeueing SLURM job $SLURM_JOB_ID to continue ==="',
            '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
            'fi',
            'exit "$status"',
            ''])

    # ------------------------------------------------------------------------------------- submitting
    def _groups(self, jobs: List[Job]) -> Dict[str, List[Job]]:
        groups: Dict[str, List[Job]] = {}
        for job in jobs:
            groups.setdefault(job.group, []).append(job)
        return groups

    def run(self, jobs: List[Job], done: Dict[str, bool], dry_run: bool = False) -> int:
        if not dry_run and shutil.which('sbatch') is None:
            raise UserInputError("executor slurm: sbatch not found on this machine's PATH; run the study where SLURM's "
                                 "commands are (a login node), or write the scripts with --dry-run")
        active = {} if dry_run else self.active_slurm_ids(jobs)
        todo = [job for job in jobs if not done[job.id] and job.id not in active]
        if not todo:
            print('nothing to submit: every job is done' + (' or in flight' if active else ''))
            return 0
        self.layout.make_folders()
        os.makedirs(self.layout.slurm, exist_ok=True)
        group_of = {job.id: job.group for job in todo}
        submitted: Dict[str, str] = {}   # group -> array job id
        variables: Dict[str, str] = {}   # group -> its shell variable in submit.sh
        chain = ['#!/bin/bash', f'# submits study {self.spec.name} (what `nnunet-ext study run` did)', 'set -eu',
                 f'cd {_q(self.layout.slurm)}']
        for name, group in self._groups(todo).items():
            needs = {n for job in group for n in job.needs}
            now = sorted({group_of[n] for n in needs if n in group_of})
            earlier = sorted({active[n] for n in needs if n in active})
            kind = 'afterany' if group[0].after_any else 'afterok'
            ids = [submitted.get(g, '') for g in now] + earlier
            dependency = f'{kind}:' + ':'.join(ids) if ids else None
            shown = f'{kind}:' + ':'.join([f'${variables[g]}' for g in now] + earlier) if ids else None
            path = os.path.join(self.layout.slurm, f'{name}.sbatch')
            variables[name] = 'job_' + ''.join(c if c.isalnum() else '_' for c in name)
            with open(path, 'w', encoding='utf-8') as f:
                f.write(self.script(group, None if dry_run else dependency))
            chain.append(f'{variables[name]}=$(sbatch --parsable{" --dependency=" + shown if shown else ""} '
                         f'{_q(os.path.basename(path))})')
            if dry_run:
                print(f'wrote {path} ({len(group)} job(s))')
                continue
            with signals_deferred():  # a job SLURM accepted is recorded, even when the command is interrupted
                job_id = self._sbatch(path)
                self._record([dict(group=name, array_job_id=job_id, jobs=[j.id for j in group], script=path,
                                   submitted=datetime.datetime.now().isoformat(timespec='seconds'))])
            submitted[name] = job_id
            print(f'submitted {name}: SLURM job {job_id} ({len(group)} task(s)'
                  f'{", " + dependency if dependency else ""})', flush=True)
        with open(os.path.join(self.layout.slurm, 'submit.sh'), 'w', encoding='utf-8') as f:
            f.write('\n'.join(chain) + '\n')
        if dry_run:
            print(f'dry run: nothing submitted; {os.path.join(self.layout.slurm, "submit.sh")} submits the scripts')
        return 0

    @staticmethod
    def _sbatch(path: str) -> str:
        result = subprocess.run(['sbatch', '--parsable', path], capture_output=True, text=True)
        if result.returncode != 0:
            raise UserInputError(f"sbatch refused {path}: {' '.join(result.stderr.split())}")
        return result.stdout.strip().split(';')[0]

    def _submitted_file(self) -> str:
        return os.path.join(self.layout.slurm, SUBMITTED)

    def _record(self, records: List[dict]) -> None:
        write_json_atomically(self._submitted_file(), self._submissions() + records)

    def _submissions(self) -> List[dict]:
        try:
            with open(self._submitted_file(), encoding='utf-8') as f:
                return json.load(f)
        except (OSError, ValueError):
            return []

    # ------------------------------------------------------------------------------------- in flight
    def _squeue(self) -> Dict[tuple, str]:
        """``{(array job id, task index): SLURM state}`` of every array task in the queue."""
        if shutil.which('squeue') is None:
            raise UserInputError("executor slurm: squeue not found on this machine's PATH; ask where SLURM's "
                                 "commands are (a login node)")
        result = subprocess.run(['squeue', '-h', '-r', '-o', '%F|%K|%T'], capture_output=True, text=True)
        if result.returncode != 0:
            raise UserInputError(f"squeue failed: {' '.join(result.stderr.split())}")
        queue = {}
        for line in result.stdout.splitlines():
            parts = line.strip().split('|')
            if len(parts) == 3 and parts[1].isdigit():
                queue[(parts[0], int(parts[1]))] = parts[2]
        return queue

    def _in_flight(self) -> Dict[str, tuple]:
        """``{job id: (SLURM state, 'ARRAY_TASK' id)}`` of this study's jobs in the queue (the latest
        submission of each job)."""
        queue = self._squeue()
        found = {}
        for record in self._submissions():
            for index, job_id in enumerate(record['jobs']):
                state = queue.get((record['array_job_id'], index))
                if state in _ACTIVE_STATES:
                    found[job_id] = (_ACTIVE_STATES[state], f"{record['array_job_id']}_{index}")
                else:
                    found.pop(job_id, None)
        return found

    def active(self, jobs: List[Job]) -> Dict[str, str]:
        return {job_id: state for job_id, (state, _) in self._in_flight().items()}

    def active_slurm_ids(self, jobs: List[Job]) -> Dict[str, str]:
        """``{job id: SLURM id}`` of the jobs in flight (what a new submission depends on)."""
        return {job_id: slurm_id for job_id, (_, slurm_id) in self._in_flight().items()}
