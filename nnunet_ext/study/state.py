"""What is done, read from the files the jobs leave (nnU-Net's own where there are): a training is done
when its fold folder has ``checkpoint_final.pth`` and ``validation/summary.json``; a plan when the plans
file, each configuration's preprocessed data and ``splits_final.json`` are there; a test when its
``evaluation.json`` is; the report when it was written from the jobs done now. A job not done is failed when
its last attempt exited with an error (``state/JOB.exit``), interrupted when it was preempted (exit 75: it
continues when run again), else not run yet; the executors add pending and running."""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Iterable, List, Optional

from nnunet_ext.study.graph import PLAN, REPORT, TEST, TRAIN, Job, needs_planning
from nnunet_ext.study.layout import StudyLayout
from nnunet_ext.study.spec import StudySpec

DONE, FAILED, INTERRUPTED, NOT_RUN, PENDING, RUNNING = 'done', 'failed', 'interrupted', 'not run', 'pending', \
    'running'
PREEMPTED_STATUS = 75  # EX_TEMPFAIL: the training saved its state and wants to run again
REPORT_INPUTS = 'inputs.json'  # in the report folder: the jobs done when it was written


def evaluation_file(job: Job) -> str:
    return os.path.join(str(job.info['folder']), 'evaluation.json')


def jobs_done(jobs: Iterable[Job], spec: StudySpec) -> Dict[str, bool]:
    """``{job id: done}`` for every job."""
    from nnunet_ext.study.train import training_finished
    done: Dict[str, bool] = {}
    report = None
    for job in jobs:
        if job.kind == PLAN:
            done[job.id] = not needs_planning(str(job.info['dataset']), spec)
        elif job.kind == TRAIN:
            done[job.id] = training_finished(str(job.info['folder']))
        elif job.kind == TEST:
            done[job.id] = os.path.isfile(evaluation_file(job))
        else:
            report = job
    if report is not None:
        done[report.id] = report_inputs(spec) == done_results(jobs, done)
    return done


def done_results(jobs: Iterable[Job], done: Dict[str, bool]) -> List[str]:
    """The trainings and tests done: what a report is written from."""
    return sorted(job.id for job in jobs if job.kind in (TRAIN, TEST) and done.get(job.id))


def report_inputs(spec: StudySpec) -> Optional[List[str]]:
    path = os.path.join(StudyLayout(spec.folder).report, REPORT_INPUTS)
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def last_exit_status(layout: StudyLayout, job_id: str) -> Optional[int]:
    try:
        with open(layout.exit_file(job_id), encoding='utf-8') as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


_ERROR_LINE = re.compile(r'(error|exception|traceback|killed|out of memory|cannot|refused|failed)', re.I)


def last_error_line(log_path: str) -> str:
    """The log's last line that reads like an error (a traceback's last line, ``nnunet-ext ...: error: ...``),
    else its last non-empty line."""
    try:
        with open(log_path, encoding='utf-8', errors='replace') as f:
            lines = [line.rstrip() for line in f.read()[-20000:].splitlines() if line.strip()]
    except OSError:
        return 'no log'
    lines = [line for line in lines if not line.startswith('=== ')]  # our attempt headers
    for line in reversed(lines):
        if _ERROR_LINE.search(line) and not line.startswith(' '):
            return line[:300]
    return lines[-1][:300] if lines else 'empty log'


def job_states(jobs: List[Job], spec: StudySpec, active: Optional[Dict[str, str]] = None) -> Dict[str, dict]:
    """``{job id: {'state': ..., 'error': line or None}}``; ``active`` (from the executor: pending or running
    job ids) takes precedence over the files, except over done."""
    layout = StudyLayout(spec.folder)
    done = jobs_done(jobs, spec)
    active = active or {}
    states = {}
    for job in jobs:
        error = None
        if done[job.id]:
            state = DONE
        elif job.id in active:
            state = active[job.id]
        else:
            status = last_exit_status(layout, job.id)
            if status is None:
                state = NOT_RUN
            elif status == PREEMPTED_STATUS:
                state = INTERRUPTED
            else:
                state = FAILED
                error = f'exit {status}: {last_error_line(layout.log(job.id))}'
                if status == 0 and job.kind != REPORT:  # ended "well" without its results
                    error = f'exit 0 but its results are missing: {last_error_line(layout.log(job.id))}'
        states[job.id] = dict(state=state, error=error)
    return states
