"""The spec against the data, before anything runs: datasets that nnU-Net finds, trainers it finds, planned
configurations, folds its splits have, test labels when the test set is to be scored. Each problem is a
``UserInputError`` naming the spec key and the fix."""
from __future__ import annotations

import importlib.util
import json
import os
import re
from typing import List, Set

from nnunet_ext.errors import UserInputError, name_some
from nnunet_ext.study.graph import planned_configurations
from nnunet_ext.study.spec import StudySpec

_CLASS = re.compile(r'^\s*class\s+(\w+)\s*[(:]', re.M)


def trainer_names() -> Set[str]:
    """Class names defined where ``nnUNetv2_train`` looks for trainers: nnU-Net's trainer tree and each folder
    of ``nnUNet_extTrainer``. A text search: importing nnU-Net's trainer tree takes ~15 s, and each training
    imports its trainer anyway (and fails there if it must)."""
    folders = [os.path.join(p, 'training', 'nnUNetTrainer')
               for p in importlib.util.find_spec('nnunetv2').submodule_search_locations]
    folders += [p for p in os.environ.get('nnUNet_extTrainer', '').split(os.pathsep) if p and os.path.isdir(p)]
    names: Set[str] = set()
    for folder in folders:
        for parent, _, files in os.walk(folder):
            for file in files:
                if file.endswith('.py'):
                    with open(os.path.join(parent, file), encoding='utf-8', errors='replace') as f:
                        names.update(_CLASS.findall(f.read()))
    return names


def check_trainers(spec: StudySpec) -> None:
    known = trainer_names()
    for key, names in (('trainers.baseline', [spec.baseline]), ('trainers.compare', spec.trainers[1:])):
        unknown = [n for n in names if n not in known]
        if unknown:
            ours = [n for n in known if n.startswith('nnUNetTrainer')]
            hint = ('set nnUNet_extTrainer (eval "$(nnunet-ext env)")' if not os.environ.get('nnUNet_extTrainer')
                    else f'known trainers include {name_some(ours, 8)} (nnunet-ext trainers lists ours)')
            raise UserInputError(f"study spec: {key}: no trainer {', '.join(unknown)}; {hint}")


def _splits_count(dataset: str) -> int:
    path = os.path.join(os.environ['nnUNet_preprocessed'], dataset, 'splits_final.json')
    if not os.path.isfile(path):
        return 5  # what nnU-Net's first training (or the study's plan job) writes
    with open(path, encoding='utf-8') as f:
        return len(json.load(f))


def check_data(spec: StudySpec, datasets: List[str]) -> None:
    """Configurations, folds and test labels of each dataset."""
    for dataset in datasets:
        configurations = planned_configurations(dataset, spec.plans)
        if configurations is not None:
            planned = sorted(configurations)
            missing = [c for c in spec.configurations if c not in planned]
            if missing:
                raise UserInputError(f"study spec: data.configurations: {', '.join(missing)} not in {spec.plans} of "
                                     f"{dataset} (it has {', '.join(planned)}); remove it or use other plans")
        elif spec.plans != 'nnUNetPlans' and not spec.planner:
            raise UserInputError(f"study spec: data.plans: {dataset} has no {spec.plans}.json; plan it (nnunet-ext "
                                 f"plan) or name the planner that writes it in data.planner")
        folds = _splits_count(dataset)
        wrong = [f for f in spec.folds if f != 'all' and f >= folds]
        if wrong:
            raise UserInputError(f"study spec: runs.folds: {dataset} has {folds} folds (0-{folds - 1}), not "
                                 f"{', '.join(map(str, wrong))}; fix runs.folds")
        if spec.predict_test and (spec.split is None or spec.split.test == 'labelsTs'):
            raw = os.path.join(os.environ['nnUNet_raw'], dataset)
            if not os.path.isdir(os.path.join(raw, 'labelsTs')) or not os.path.isdir(os.path.join(raw, 'imagesTs')):
                raise UserInputError(f"study spec: test.predict: {dataset} has no imagesTs and labelsTs to score; "
                                     f"set predict = false in [test]")


def check_spec(spec: StudySpec, datasets: List[str]) -> None:
    check_trainers(spec)
    check_data(spec, datasets)
