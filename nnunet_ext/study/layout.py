"""Where a study keeps its files (``study.folder`` of the spec):

    results/seed_S/           nnUNet_results of the trainings with seed S (nnU-Net's own layout inside)
    test/DATASET/TRAINER__PLANS__CONFIG/seed_S/   the fold ensemble's test-set predictions, evaluation.json
    logs/JOB.log              one log per job (every attempt appended, each starting with a header line)
    logs/slurm/               SLURM's own output files (what happens before a job's log is opened)
    state/JOB.exit            the exit status of a job's last attempt (written by the executor)
    slurm/*.sbatch            the generated batch scripts; slurm/submitted.json: the job ids submitted
    report/                   the report (report.md, report.html, PNG), per dataset
    preprocessed/DATASET/     with [split]: links to the user's preprocessed dataset, the study's splits_final.json
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from nnunet_ext.study.spec import Fold


@dataclass(frozen=True)
class StudyLayout:
    folder: str

    def results(self, seed: int) -> str:
        return os.path.join(self.folder, 'results', f'seed_{seed}')

    def model_folder(self, seed: int, dataset: str, trainer: str, plans: str, configuration: str) -> str:
        return os.path.join(self.results(seed), dataset, f'{trainer}__{plans}__{configuration}')

    def fold_folder(self, seed: int, dataset: str, trainer: str, plans: str, configuration: str, fold: Fold) -> str:
        return os.path.join(self.model_folder(seed, dataset, trainer, plans, configuration), f'fold_{fold}')

    def test_folder(self, seed: int, dataset: str, trainer: str, plans: str, configuration: str) -> str:
        return os.path.join(self.folder, 'test', dataset, f'{trainer}__{plans}__{configuration}', f'seed_{seed}')

    @property
    def logs(self) -> str:
        return os.path.join(self.folder, 'logs')

    def log(self, job_id: str) -> str:
        return os.path.join(self.logs, f'{job_id}.log')

    @property
    def state(self) -> str:
        return os.path.join(self.folder, 'state')

    def exit_file(self, job_id: str) -> str:
        return os.path.join(self.state, f'{job_id}.exit')

    @property
    def slurm(self) -> str:
        return os.path.join(self.folder, 'slurm')

    @property
    def preprocessed(self) -> str:
        """nnUNet_preprocessed of a study with its own split (``nnunet_ext.study.split``)."""
        return os.path.join(self.folder, 'preprocessed')

    @property
    def report(self) -> str:
        return os.path.join(self.folder, 'report')

    def make_folders(self) -> None:
        for folder in (self.logs, os.path.join(self.logs, 'slurm'), self.state):
            os.makedirs(folder, exist_ok=True)
