"""The job graph of a study: plan/preprocess where missing -> one training per (dataset, configuration,
trainer, fold, seed) -> per (dataset, configuration, trainer, seed) the test-set prediction with the fold
ensemble and its evaluation -> one report. Each job is a command line (what the executors run, what the
SLURM scripts show), the environment it adds, and the jobs it needs."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from nnunet_ext.study.layout import StudyLayout
from nnunet_ext.study.spec import StudySpec

PLAN, TRAIN, TEST, REPORT = 'plan', 'train', 'test', 'report'


@dataclass(frozen=True)
class Job:
    id: str                       # also its log's and state file's name
    kind: str                     # plan, train, test, report
    group: str                    # jobs of one group form one SLURM job array
    argv: Tuple[str, ...]
    description: str
    needs: Tuple[str, ...] = ()
    env: Tuple[Tuple[str, str], ...] = ()   # added to the environment
    # report: runs once what it needs has ended, done or not (it lists what is missing)
    after_any: bool = False
    # where its results are; what the state and the report read
    info: Dict[str, object] = field(default_factory=dict, compare=False, hash=False)


def _python(*args: object) -> Tuple[str, ...]:
    """``python -m nnunet_ext.study JOB ARGS`` (``__main__.py``) with this interpreter (the user's environment)."""
    return (sys.executable, '-m', __package__, *(str(a) for a in args))


def resolve_datasets(spec: StudySpec) -> List[str]:
    """``DatasetNNN_NAME`` of each dataset of the spec (a ``UserInputError`` naming it when nnU-Net cannot
    find it)."""
    from nnunet_ext.errors import UserInputError
    from nnunet_ext.nnunet_glue import dataset_name
    names = []
    for dataset in spec.datasets:
        try:
            names.append(dataset_name(dataset))
        except UserInputError as e:
            raise UserInputError(f"study spec: data.datasets: {str(e).splitlines()[0].split('. ')[0]} (nnUNet_raw: "
                                 f"{os.environ.get('nnUNet_raw')}); fix the dataset or the nnUNet_* folders") from None
    return names


def plans_file(dataset: str, plans: str) -> str:
    return os.path.join(os.environ['nnUNet_preprocessed'], dataset, f'{plans}.json')


def planned_configurations(dataset: str, plans: str) -> Optional[Dict[str, dict]]:
    """The ``configurations`` of the plans file, or None when there is no plans file."""
    import json
    path = plans_file(dataset, plans)
    if not os.path.isfile(path):
        return None
    with open(path, encoding='utf-8') as f:
        return json.load(f).get('configurations', {})


def data_folder(dataset: str, plans: str, configuration: dict) -> str:
    """A planned configuration's preprocessed data folder."""
    return os.path.join(os.path.dirname(plans_file(dataset, plans)), configuration['data_identifier'])


def preprocessed(dataset: str, spec: StudySpec) -> bool:
    """The plans file and the preprocessed data of each configuration are there."""
    configurations = planned_configurations(dataset, spec.plans)
    if configurations is None:
        return False
    return all('data_identifier' in configurations.get(c, {}) and
               os.path.isdir(data_folder(dataset, spec.plans, configurations[c])) for c in spec.configurations)


def needs_planning(dataset: str, spec: StudySpec) -> bool:
    """The plans, the preprocessed data, ``splits_final.json`` or the study's own split (``[split]``) is missing:
    the plan job makes what is."""
    from nnunet_ext.study.split import SPLIT_FILE, private_dataset
    if spec.split is not None and not os.path.isfile(os.path.join(private_dataset(spec, dataset), SPLIT_FILE)):
        return True
    splits = os.path.join(os.path.dirname(plans_file(dataset, spec.plans)), 'splits_final.json')
    return not (preprocessed(dataset, spec) and os.path.isfile(splits))


def build_graph(spec: StudySpec, datasets: Optional[List[str]] = None) -> List[Job]:
    """Every job of the study in an order that respects ``needs`` (done or not: the executors skip what
    is done)."""
    layout = StudyLayout(spec.folder)
    datasets = resolve_datasets(spec) if datasets is None else datasets
    jobs: List[Job] = []
    # a study with its own split trains and predicts from its own preprocessed folder (links to the user's)
    preprocessed = (('nnUNet_preprocessed', layout.preprocessed),) if spec.split is not None else ()
    length = [a for key, value in spec.training_length().items() for a in (f"--{key.replace('_', '-')}", value)]
    for dataset in datasets:
        plan_needed = needs_planning(dataset, spec)
        plan_id = f'plan__{dataset}'
        if plan_needed:
            jobs.append(Job(plan_id, PLAN, PLAN, _python('plan', spec.path, dataset),
                            f'plan and preprocess {dataset} ({spec.plans}: {", ".join(spec.configurations)})',
                            info=dict(dataset=dataset)))
        for configuration in spec.configurations:
            for trainer in spec.trainers:
                model = f'{dataset}__{configuration}__{trainer}'
                trainings = {seed: [] for seed in spec.seeds}
                for seed in spec.seeds:
                    for fold in spec.folds:
                        job_id = f'train__{model}__fold_{fold}__seed_{seed}'
                        trainings[seed].append(job_id)
                        argv = _python('train', dataset, configuration, fold, trainer, '-p',
                                       spec.plans, '--seed', seed, *length, '--device', spec.device,
                                       *(['--npz'] if spec.npz else []))
                        jobs.append(Job(job_id, TRAIN, f'train__{model}', argv,
                                        f'train {trainer} {configuration} fold {fold} seed {seed} on {dataset}',
                                        needs=(plan_id,) if plan_needed else (),
                                        env=(('nnUNet_results', layout.results(seed)), *preprocessed),
                                        info=dict(dataset=dataset, configuration=configuration, trainer=trainer,
                                                  fold=fold, seed=seed, plans=spec.plans,
                                                  folder=layout.fold_folder(seed, dataset, trainer, spec.plans,
                                                                            configuration, fold))))
                if spec.predict_test:
                    for seed in spec.seeds:
                        jobs.append(Job(
                            f'test__{model}__seed_{seed}', TEST, f'test__{model}',
                            _python('test', spec.path, dataset, configuration, trainer,
                                    seed),
                            f'predict and score the test set: {trainer} {configuration} seed {seed} on {dataset}',
                            needs=tuple(trainings[seed]),
                            env=(('nnUNet_results', layout.results(seed)), *preprocessed),
                            info=dict(dataset=dataset, configuration=configuration, trainer=trainer, seed=seed,
                                      plans=spec.plans, folder=layout.test_folder(seed, dataset, trainer,
                                                                                  spec.plans, configuration))))
    others = tuple(j.id for j in jobs if j.kind in (TRAIN, TEST))
    jobs.append(Job('report', REPORT, REPORT, _python('report', spec.path),
                    f'report: {os.path.join(layout.report, "report.md")}', needs=others, after_any=True))
    return jobs

