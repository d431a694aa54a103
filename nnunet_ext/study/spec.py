"""The study spec: one TOML file (``docs/commands/study.md`` lists every key).

TOML because Python reads it without a dependency (``tomllib``), it has comments, and its types are the
ones a spec needs (strings, integers, lists, tables); YAML's implicit types turn ``no`` into ``False``
and ``1e3`` into a string. ``load_spec`` checks every key that needs no data (types, ranges, unknown
keys: a typo is refused, never ignored); ``check_against_data`` checks what needs nnU-Net's folders
(datasets, trainers, planned configurations, folds, test labels). Both raise ``UserInputError`` naming the
key and the fix, before anything runs or is submitted.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from nnunet_ext.errors import UserInputError

BASELINE = 'nnUNetTrainer'
EXECUTORS = ('local', 'slurm')
DEVICES = ('cuda', 'cpu', 'mps')
Fold = Union[int, str]  # 0, 1, ... or 'all'

#: every key the spec may have, per table (a key outside this is a typo)
KEYS = {
    'study': {'name', 'folder'},
    'data': {'datasets', 'configurations', 'plans', 'planner'},
    'trainers': {'baseline', 'compare'},
    'runs': {'folds', 'seeds', 'epochs', 'iterations', 'val_iterations', 'device', 'npz'},
    'test': {'predict'},
    'split': {'test', 'holdout', 'val_cases', 'seed'},
    'executor': {'kind', 'jobs', 'gpus', 'slurm'},
    'executor.slurm': {'partition', 'account', 'gpus', 'cpus', 'mem', 'time', 'signal_seconds', 'extra'},
}
_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]*$')
_TIME = re.compile(r'^(\d+-)?\d+(:\d{1,2}){0,2}$')  # SLURM's --time: minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]


@dataclass(frozen=True)
class SlurmSettings:
    partition: str = ''
    account: str = ''
    gpus: int = 0             # --gres=gpu:N per job
    cpus: int = 4             # --cpus-per-task
    mem: str = ''             # --mem (e.g. "32G"); empty: the partition's default
    time: str = ''            # --time of a training job (e.g. "24:00:00"); empty: the partition's default
    signal_seconds: int = 300  # --signal=B:USR1@N: the warning before the time limit
    extra: Tuple[str, ...] = ()  # further '#SBATCH ...' lines, verbatim


@dataclass(frozen=True)
class SplitSettings:
    """The study's own split (``[split]``; what ``bench/ab_real.py`` uses): one fold 0 of ``train``/``val`` cases
    and a test set of ``labelsTs`` or of held-out ``imagesTr`` cases (``nnunet_ext.study.split``)."""
    test: str = 'auto'                 # auto (labelsTs if there are any, else holdout), labelsTs, holdout
    holdout: Optional[int] = None      # held-out test cases (default 20 %, >= 2)
    val_cases: Optional[int] = None    # nnU-Net's validation cases (default 10 %, >= 1; 0: the training cases)
    seed: int = 12345                  # of the case permutation


@dataclass(frozen=True)
class StudySpec:
    """A checked spec. ``folder`` is absolute; ``datasets`` as written (ids or names)."""
    path: str
    name: str
    folder: str
    datasets: Tuple[str, ...]
    configurations: Tuple[str, ...]
    plans: str
    planner: str
    baseline: str
    trainers: Tuple[str, ...]          # the baseline first, then the compared ones
    folds: Tuple[Fold, ...]
    seeds: Tuple[int, ...]
    epochs: Optional[int] = None
    iterations: Optional[int] = None
    val_iterations: Optional[int] = None
    device: str = 'cuda'
    npz: bool = False
    predict_test: bool = True
    executor: str = 'local'
    jobs: int = 1
    gpus: Tuple[int, ...] = ()
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    split: Optional[SplitSettings] = None

    def training_length(self) -> Dict[str, int]:
        return {k: v for k, v in (('epochs', self.epochs), ('iterations', self.iterations),
                                  ('val_iterations', self.val_iterations)) if v is not None}


# ------------------------------------------------------------------------------------------- reading

def _refuse(key: str, problem: str, fix: str) -> UserInputError:
    return UserInputError(f"study spec: {key}: {problem}; {fix}")


def _table(document: dict, name: str) -> dict:
    value = document.get(name, {})
    if not isinstance(value, dict):
        raise _refuse(name, 'must be a table', f'write it as [{name}]')
    return value


def _check_keys(table: dict, name: str) -> None:
    allowed = KEYS[name]
    for key in table:
        if key not in allowed and not (name == 'executor' and key == 'slurm'):
            raise _refuse(f'{name}.{key}', 'unknown key', f"the keys of [{name}] are {', '.join(sorted(allowed))}")


def _typed(table: dict, table_name: str, key: str, kind, default=None, required: bool = False):
    full = f'{table_name}.{key}'
    if key not in table:
        if required:
            raise _refuse(full, 'missing', 'add it (nnunet-ext study init writes a complete spec)')
        return default
    value = table[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise _refuse(full, f'{value!r} is not an integer', 'write a whole number')
    if kind is bool and not isinstance(value, bool):
        raise _refuse(full, f'{value!r} is not true or false', 'write true or false')
    if kind is str and not isinstance(value, str):
        raise _refuse(full, f'{value!r} is not a string', 'quote it')
    if kind is list and not isinstance(value, list):
        raise _refuse(full, f'{value!r} is not a list', f'write {key} = [...]')
    return value


def _positive(table: dict, table_name: str, key: str, default=None, minimum: int = 1):
    value = _typed(table, table_name, key, int, default)
    if value is not None and value < minimum:
        raise _refuse(f'{table_name}.{key}', f'must be >= {minimum}, got {value}', 'fix the number')
    return value


def _strings(table: dict, table_name: str, key: str, default=None, required: bool = False) -> Tuple[str, ...]:
    values = _typed(table, table_name, key, list, default, required)
    if values is None:
        return ()
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise _refuse(f'{table_name}.{key}', f'{value!r} is neither a name nor a number', 'quote names')
        out.append(str(value))
    if len(set(out)) != len(out):
        raise _refuse(f'{table_name}.{key}', f'repeats an entry ({", ".join(out)})', 'list each once')
    return tuple(out)


def _folds(runs: dict) -> Tuple[Fold, ...]:
    values = _typed(runs, 'runs', 'folds', list, [0, 1, 2, 3, 4])
    folds: List[Fold] = []
    for value in values:
        if value == 'all':
            folds.append('all')
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            folds.append(value)
        else:
            raise _refuse('runs.folds', f'{value!r} is not a fold', 'write fold numbers (0 1 2 3 4) or "all"')
    if not folds or len(set(folds)) != len(folds):
        raise _refuse('runs.folds', f'needs distinct folds, got {values}', 'list each fold once')
    return tuple(folds)


def _seeds(runs: dict) -> Tuple[int, ...]:
    values = _typed(runs, 'runs', 'seeds', list, [0])
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values) \
            or len(set(values)) != len(values):
        raise _refuse('runs.seeds', f'needs distinct whole numbers >= 0, got {values}', 'e.g. seeds = [0, 1, 2]')
    return tuple(values)


def _slurm(executor: dict) -> SlurmSettings:
    table = executor.get('slurm', {})
    if not isinstance(table, dict):
        raise _refuse('executor.slurm', 'must be a table', 'write it as [executor.slurm]')
    _check_keys(table, 'executor.slurm')
    name = 'executor.slurm'
    time_limit = _typed(table, name, 'time', str, '')
    if time_limit and not _TIME.match(time_limit):
        raise _refuse('executor.slurm.time', f'{time_limit!r} is not a SLURM time', 'e.g. "24:00:00" or "2-00:00:00"')
    extra = _typed(table, name, 'extra', list, [])
    for line in extra:
        if not isinstance(line, str) or not line.startswith('#SBATCH '):
            raise _refuse('executor.slurm.extra', f'{line!r} is not an "#SBATCH ..." line',
                          'write each as "#SBATCH --option=value"')
    return SlurmSettings(partition=_typed(table, name, 'partition', str, ''),
                         account=_typed(table, name, 'account', str, ''),
                         gpus=_positive(table, name, 'gpus', 0, minimum=0),
                         cpus=_positive(table, name, 'cpus', 4),
                         mem=_typed(table, name, 'mem', str, ''), time=time_limit,
                         signal_seconds=_positive(table, name, 'signal_seconds', 300, minimum=0),
                         extra=tuple(extra))


def _split(document: dict, runs: dict) -> Optional[SplitSettings]:
    if 'split' not in document:
        return None
    table = _table(document, 'split')
    test = _typed(table, 'split', 'test', str, 'auto')
    if test not in ('auto', 'labelsTs', 'holdout'):
        raise _refuse('split.test', f'{test!r} is not a test set', 'use auto, labelsTs or holdout')
    holdout = _positive(table, 'split', 'holdout', None, minimum=2)
    if holdout is not None and test == 'labelsTs':
        raise _refuse('split.holdout', 'holds out cases of imagesTr, which contradicts test = "labelsTs"',
                      'remove one of them')
    if runs.get('folds', [0]) != [0]:
        raise _refuse('runs.folds', 'a study with [split] trains fold 0 of its own split', 'set folds = [0]')
    return SplitSettings(test=test, holdout=holdout, val_cases=_positive(table, 'split', 'val_cases', None, minimum=0),
                         seed=_positive(table, 'split', 'seed', 12345, minimum=0))


def parse_spec(document: Dict[str, Any], path: str) -> StudySpec:
    """A spec from a parsed TOML document; ``path`` (the spec file) anchors a relative ``study.folder``."""
    for name in document:
        if name not in ('study', 'data', 'trainers', 'runs', 'test', 'split', 'executor'):
            raise _refuse(name, 'unknown table',
                          'the tables are [study] [data] [trainers] [runs] [test] [split] [executor]')
    tables = {name: _table(document, name) for name in ('study', 'data', 'trainers', 'runs', 'test', 'executor')}
    for name, table in tables.items():
        _check_keys(table, name)
    _check_keys(_table(document, 'split'), 'split')
    study, data, trainers, runs, test, executor = (tables[n] for n in
                                                   ('study', 'data', 'trainers', 'runs', 'test', 'executor'))
    default_name = os.path.splitext(os.path.basename(path))[0]
    name = _typed(study, 'study', 'name', str, default_name)
    if not _NAME.match(name):
        raise _refuse('study.name', f'{name!r} has characters a job name cannot have', 'use letters, digits, _ . -')
    folder = _typed(study, 'study', 'folder', str, name)
    folder = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(path)), os.path.expanduser(folder)))
    baseline = _typed(trainers, 'trainers', 'baseline', str, BASELINE)
    compared = tuple(t for t in _strings(trainers, 'trainers', 'compare', required=True) if t != baseline)
    device = _typed(runs, 'runs', 'device', str, 'cuda')
    if device not in DEVICES:
        raise _refuse('runs.device', f'{device!r} is not a device', f"use one of {', '.join(DEVICES)}")
    kind = _typed(executor, 'executor', 'kind', str, 'local')
    if kind not in EXECUTORS:
        raise _refuse('executor.kind', f'{kind!r} is not an executor', f"use one of {', '.join(EXECUTORS)}")
    gpus = _typed(executor, 'executor', 'gpus', list, [])
    if any(isinstance(g, bool) or not isinstance(g, int) or g < 0 for g in gpus):
        raise _refuse('executor.gpus', f'{gpus!r} are not GPU numbers', 'e.g. gpus = [0, 1] (CUDA device ids)')
    folds = (0,) if 'split' in document and 'folds' not in runs else _folds(runs)
    return StudySpec(
        path=os.path.abspath(path), name=name, folder=folder,
        datasets=_strings(data, 'data', 'datasets', required=True),
        configurations=_strings(data, 'data', 'configurations', ['2d']),
        plans=_typed(data, 'data', 'plans', str, 'nnUNetPlans'),
        planner=_typed(data, 'data', 'planner', str, ''),
        baseline=baseline, trainers=(baseline, *compared), folds=folds, seeds=_seeds(runs),
        epochs=_positive(runs, 'runs', 'epochs'), iterations=_positive(runs, 'runs', 'iterations'),
        val_iterations=_positive(runs, 'runs', 'val_iterations'), device=device,
        npz=_typed(runs, 'runs', 'npz', bool, False), predict_test=_typed(test, 'test', 'predict', bool, True),
        executor=kind, jobs=_positive(executor, 'executor', 'jobs', 1), gpus=tuple(gpus), slurm=_slurm(executor),
        split=_split(document, runs))


def load_spec(path: str) -> StudySpec:
    if not os.path.isfile(path):
        raise UserInputError(f"study spec {path!r} does not exist; write one with: nnunet-ext study init ...")
    try:
        with open(path, 'rb') as f:
            document = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserInputError(f"study spec {path}: not valid TOML ({e})") from None
    except UnicodeDecodeError:
        raise UserInputError(f"study spec {path}: not a text file") from None
    if not document:
        raise UserInputError(f"study spec {path} is empty; write one with: nnunet-ext study init ...")
    if 'data' not in document or 'trainers' not in document:
        raise _refuse('data' if 'data' not in document else 'trainers', 'missing table',
                      'nnunet-ext study init writes a complete spec')
    return parse_spec(document, path)


# ---------------------------------------------------------------------------------------- writing

def _toml_list(values: Sequence) -> str:
    return '[' + ', '.join(f'"{v}"' if isinstance(v, str) else str(v) for v in values) + ']'


def render_spec(name: str, datasets: Sequence[str], trainers: Sequence[str], configurations: Sequence[str] = ('2d',),
                folds: Sequence[Fold] = (0, 1, 2, 3, 4), seeds: Sequence[int] = (0,), plans: str = 'nnUNetPlans',
                baseline: str = BASELINE, device: str = 'cuda', epochs: Optional[int] = None,
                iterations: Optional[int] = None, val_iterations: Optional[int] = None, predict_test: bool = True,
                executor: str = 'local', jobs: int = 1, partition: str = '', time_limit: str = '',
                gpus_per_job: int = 1, cpus: int = 4) -> str:
    """A commented spec (what ``nnunet-ext study init`` writes)."""
    def length(key, value, comment):
        return f'{key} = {value}' if value is not None else f'# {key} = {comment}'

    datasets_toml = _toml_list([int(d) if str(d).isdigit() else d for d in datasets])
    return f'''# nnunet-ext study spec: docs/commands/study.md explains every key.
# nnunet-ext study plan THIS_FILE shows the jobs; nnunet-ext study run THIS_FILE runs them.

[study]
name = "{name}"            # names the jobs (SLURM job names) and the default folder
folder = "{name}"          # results, logs, scripts and the report; relative to this file

[data]
datasets = {datasets_toml}  # ids or names in nnUNet_raw
configurations = {_toml_list(configurations)}
plans = "{plans}"          # plans identifier; planned by the study when its plans file is missing
# planner = "ExperimentPlanner"   # how to plan when the plans file is missing (default: nnU-Net's planner)

[trainers]
baseline = "{baseline}"    # every other trainer is compared with it
compare = {_toml_list([t for t in trainers if t != baseline])}

[runs]
folds = {_toml_list(folds)}     # fold numbers of splits_final.json, or ["all"]
seeds = {_toml_list(seeds)}     # one training per fold and seed; nnUNet_results/seed_S per seed
{length('epochs', epochs, "1000        # equal budget for every trainer (default: each trainer's own)")}
{length('iterations', iterations, '250     # training iterations per epoch')}
{length('val_iterations', val_iterations, '50  # validation iterations per epoch (pseudo-Dice)')}
device = "{device}"        # cuda, cpu or mps
npz = false                # keep the validation probabilities (nnUNetv2_train --npz), for ensembling

[test]
predict = {str(predict_test).lower()}             # predict imagesTs with each fold ensemble, score against labelsTs

[executor]
kind = "{executor}"        # local or slurm (nnunet-ext study run --executor overrides it)
jobs = {jobs}                   # local: jobs at a time
gpus = []                  # local: CUDA devices, one per job slot (e.g. [0, 1]); empty: as the environment says

[executor.slurm]
partition = "{partition}"
account = ""
gpus = {gpus_per_job}                   # --gres=gpu:N per job
cpus = {cpus}                   # --cpus-per-task
mem = ""                   # --mem, e.g. "32G"
time = "{time_limit}"                  # --time of a job, e.g. "24:00:00"; a training requeues itself before it
signal_seconds = 300       # --signal=B:USR1@N: the warning that makes a training save and requeue
extra = []                 # further lines, e.g. ["#SBATCH --qos=normal"]
'''
