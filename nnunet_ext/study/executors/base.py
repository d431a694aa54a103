"""What every executor provides, and what they share: the environment a job runs in and its log header."""
from __future__ import annotations

import os
from typing import Dict, List

from nnunet_ext.study.graph import Job
from nnunet_ext.study.layout import StudyLayout
from nnunet_ext.study.spec import StudySpec

#: variables carried from the submitting shell into every job (besides the job's own, e.g. nnUNet_results)
CARRIED_PREFIXES = ('nnUNet', 'OMP_', 'MKL_', 'TORCH', 'CUDA_HOME')
CARRIED_NAMES = ('PATH', 'PYTHONPATH', 'VIRTUAL_ENV', 'LD_LIBRARY_PATH', 'HOME', 'LANG', 'LC_ALL')


def carried_environment() -> Dict[str, str]:
    """The user's Python environment and nnU-Net variables, as they are in the shell that runs the study."""
    return {k: v for k, v in os.environ.items() if k in CARRIED_NAMES or k.startswith(CARRIED_PREFIXES)}


class Executor:
    """Runs (``run``) or submits the jobs of a study that are not done, and says which are in flight."""

    name = 'executor'

    def __init__(self, spec: StudySpec):
        self.spec = spec
        self.layout = StudyLayout(spec.folder)

    def run(self, jobs: List[Job], done: Dict[str, bool], dry_run: bool = False) -> int:
        """Runs or submits every job not done (in the order of ``jobs``, which respects ``needs``); returns
        an exit status for the command."""
        raise NotImplementedError

    def active(self, jobs: List[Job]) -> Dict[str, str]:
        """``{job id: 'pending' | 'running'}`` of the jobs in flight."""
        raise NotImplementedError
