"""Executors run a study's job graph: ``local`` (subprocesses on this machine, N at a time, one GPU each)
and ``slurm`` (generated ``sbatch`` scripts: job arrays and dependencies). Another scheduler (LSF, PBS) is
one more :class:`~nnunet_ext.study.executors.base.Executor` subclass, listed in :data:`EXECUTORS`."""
from __future__ import annotations

from typing import Dict, Type

from nnunet_ext.study.executors.base import Executor
from nnunet_ext.study.executors.local import LocalExecutor
from nnunet_ext.study.executors.slurm import SlurmExecutor

EXECUTORS: Dict[str, Type[Executor]] = {'local': LocalExecutor, 'slurm': SlurmExecutor}
