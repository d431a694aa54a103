"""A/B test on real data: ``nnUNetTrainer`` against the trainers given with ``-tr``, trained for the same
budget with several seeds each, scored by test-set Dice with the stock nnU-Net predictor: a thin wrapper
over ``nnunet-ext study`` (``docs/commands/study.md`` explains its split, jobs, files and report).

    python bench/ab_real.py --demo -tr nnUNetTrainerGODC            # phantom, 12 x 50 iterations, seeds 0 1 2
    python bench/ab_real.py --dataset 501 -tr nnUNetTrainerGODC nnUNetTrainerMLL --device cuda \\
        --epochs 100 --iterations 250 --val-iterations 50 --seeds 0 1 2 --out ab_501

It writes the spec ``OUT/ab_real.toml`` (``--dataset -c -p`` -> ``[data]``; ``-tr`` -> ``[trainers] compare``,
baseline ``nnUNetTrainer``; ``--seeds --epochs --iterations --val-iterations --device`` -> ``[runs]``, fold
0; ``--test-set --holdout --val-cases --split-seed`` -> ``[split] test holdout val_cases seed``; ``--jobs``
-> ``[executor] jobs``), runs it here as ``nnunet-ext study run OUT/ab_real.toml`` would (the study plans an
unplanned dataset first) and prints ``OUT/report/DATASET/report.md``. Data: ``--root DIR`` (``DIR/nnUNet_raw``,
``DIR/nnUNet_preprocessed``) or the environment's; ``--demo`` writes the demo phantom (CT-like 2D slices,
liver and small tumours; 40 + 10 test cases of 96x96) to ``--root`` (default ``OUT/data``) once.

Test set: ``labelsTs`` if the dataset has test labels, else (or ``--test-set holdout``) ``--holdout`` cases of
``imagesTr`` (default 20%) of a permutation seeded by ``--split-seed``; ``--val-cases`` of the rest (default
10%; 0: the training cases) feed nnU-Net's pseudo-Dice. Every trainer trains fold 0 of a private
``splits_final.json``, so no test case is trained on (the plans did see held-out ones).

What the seed fixes: each training seeds ``random``, ``numpy`` and ``torch`` and builds the trainer as
``nnUNetv2_train`` does, the budget set on the instance (``nnUNetTrainer`` and ours alike). On a CPU with
``nnUNet_n_proc_DA=0`` (the default here) that fixes initialisation, sampled patches and all augmentation: a
run repeats exactly on the same machine, whatever ``--jobs`` (checked: identical losses and test Dice), and
for a seed every trainer with nnU-Net's network starts from the same weights and sees the same batches until
it draws random numbers of its own. With augmentation workers (GPU) the workers get seeds derived from the
run's, but batch order, cuDNN autotuning and ``torch.compile`` are not deterministic: the seeds measure that.

Statistics (``nnunet_ext.study.statistics``): test Dice per class, mean over test cases (NaN skipped), then
mean and sample std (ddof=1) over seeds; per test case the Dice averaged over seeds, paired with
``nnUNetTrainer``'s in scipy's two-sided Wilcoxon signed-rank test; median ``train_step`` seconds and ratio.

``--out`` (default ``./ab_real``) is the study folder (``results/`` keeps the models, ``test/``, ``logs/``,
``report/``): new, empty or an earlier run, which the same options (``--jobs`` may differ) resume, skipping
what is done; other options are refused once a job has run. A CPU run sets ``nnUNet_n_proc_DA=0`` and
``OMP_WAIT_POLICY=PASSIVE`` unless they are set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Optional, Sequence

from nnunet_ext.errors import UserInputError

REFERENCE, SPEC_NAME = 'nnUNetTrainer', 'ab_real.toml'
DEMO_ID, DEMO_NAME = 978, 'ABRealPhantom'
DEMO = f'Dataset{DEMO_ID:03d}_{DEMO_NAME}'
# the spec's keys in the study's messages -> this script's options
OPTIONS = {'study spec: ': '', 'split.holdout': '--holdout', 'split.val_cases': '--val-cases', 'split.test':
           '--test-set', 'trainers.compare': '-tr', 'data.datasets': '--dataset', 'data.configurations': '-c'}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parses and checks the options that need no data; errors exit with code 2 (argparse)."""
    parser = argparse.ArgumentParser(prog='bench/ab_real.py', description=__doc__.split('\n\n')[0])
    add = parser.add_argument
    add('--dataset', help='dataset id or name; or use --demo')
    add('--demo', action='store_true', help='make the demo phantom dataset and run on it')
    add('-c', '--configuration', default='2d', help='nnU-Net configuration (default: 2d)')
    add('-tr', nargs='+', required=True, metavar='TRAINER', help=f'trainers compared with {REFERENCE} (always trained)')
    add('-p', '--plans', default='nnUNetPlans', help='plans identifier (default: nnUNetPlans)')
    add('--seeds', nargs='+', type=int, default=[0, 1, 2], help='seeds (default: 0 1 2)')
    add('--epochs', type=int, default=12, help='epochs per run (default: 12)')
    add('--iterations', type=int, default=50, help='training iterations per epoch (default: 50)')
    add('--val-iterations', type=int, default=10, help='validation iterations per epoch (pseudo-Dice; default: 10)')
    add('--device', default='cpu', choices=['cpu', 'cuda', 'mps'], help='default: cpu')
    add('--jobs', type=int, default=1, help='jobs run at a time (default: 1)')
    add('--out', default='ab_real', help='the study folder (default: ./ab_real); an earlier run there is resumed')
    add('--root', help="DIR/nnUNet_raw, DIR/nnUNet_preprocessed (default: the environment's; --demo: OUT/data)")
    add('--test-set', default='auto', choices=['auto', 'labelsTs', 'holdout'], help='auto: labelsTs or holdout')
    add('--holdout', type=int, help='held-out test cases taken from imagesTr (default: 20%%, >= 2)')
    add('--val-cases', type=int, help='validation cases (default: 10%%, >= 1; 0: validate on the training cases)')
    add('--split-seed', type=int, default=12345, help='seed of the case permutation (default: 12345)')
    add('--demo-cases', nargs=2, type=int, default=[40, 10], metavar=('TRAIN', 'TEST'), help='--demo: cases (40 10)')
    add('--demo-shape', nargs='+', type=int, default=[96, 96], help='--demo: phantom shape, 2 or 3 axes (96 96)')
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    checks = [(args.demo == (args.dataset is not None), 'give exactly one of --dataset and --demo'),
              (REFERENCE in args.tr, f'-tr: {REFERENCE} is the reference and always trained; list only the others'),
              (len(set(args.tr)) != len(args.tr), '-tr: a trainer is listed twice'),
              (len(set(args.seeds)) != len(args.seeds), '--seeds: a seed is listed twice'),
              (any(s < 0 or s >= 2 ** 31 for s in args.seeds), '--seeds must be in 0 .. 2**31-1'),
              *[(getattr(args, o) < 1, f"--{o.replace('_', '-')} must be >= 1, got {getattr(args, o)}")
                for o in ('epochs', 'iterations', 'val_iterations', 'jobs')],
              (args.holdout is not None and args.holdout < 2, f'--holdout must be >= 2, got {args.holdout}'),
              (args.holdout is not None and args.test_set == 'labelsTs', '--holdout contradicts --test-set labelsTs'),
              ((args.val_cases or 0) < 0, f'--val-cases must be >= 0, got {args.val_cases}'),
              (args.split_seed < 0, f'--split-seed must be >= 0, got {args.split_seed}'),
              (args.demo and args.plans != 'nnUNetPlans', "--demo plans with nnU-Net's planner: leave out --plans"),
              (args.demo and (args.demo_cases[0] < 3 or args.demo_cases[1] < 2),
               '--demo-cases: need >= 3 training and >= 2 test cases'),
              (args.demo and (len(args.demo_shape) not in (2, 3) or min(args.demo_shape[-2:]) < 24),
               '--demo-shape: 2 or 3 axes, in-plane sizes >= 24'),
              (os.path.exists(out) and not os.path.isdir(out), f'--out {args.out} is not a folder'),
              (os.path.isdir(out) and bool(os.listdir(out)) and not os.path.isfile(os.path.join(out, SPEC_NAME)),
               f'--out {args.out} is neither empty nor an earlier ab_real run (no {SPEC_NAME})'),
              (not os.path.isdir(os.path.dirname(out)), f'the parent folder of --out {args.out} does not exist'),
              (args.root and not args.demo and not os.path.isdir(args.root), f'--root {args.root} is not a folder')]
    for failed, message in checks:
        if failed:
            parser.error(message)
    if len(args.seeds) < 3:
        print(f'note: {len(args.seeds)} seed(s); use >= 3 for a spread over seeds', file=sys.stderr)
    return args


def spec_text(args: argparse.Namespace) -> str:
    """The study spec (TOML) of the options."""
    from nnunet_ext.study.spec import render_spec
    text = render_spec('ab_real', [DEMO if args.demo else args.dataset], args.tr, [args.configuration], [0],
                       args.seeds, args.plans, REFERENCE, args.device, args.epochs, args.iterations,
                       args.val_iterations, predict_test=True, executor='local', jobs=args.jobs)
    split = [f'test = "{args.test_set}"', f'seed = {args.split_seed}'] + [
        f'{k} = {v}' for k, v in (('holdout', args.holdout), ('val_cases', args.val_cases)) if v is not None]
    return ('# written by bench/ab_real.py from its options; the same options resume it (--jobs may differ)\n'
            + text.replace('folder = "ab_real"', 'folder = "."') + '\n'.join(['', '[split]', *split, '']))


def write_spec(args: argparse.Namespace, out: str) -> str:
    """``OUT/ab_real.toml``; refused when a study with other options (but ``jobs``) has run jobs there."""
    path, text = os.path.join(out, SPEC_NAME), spec_text(args)
    os.makedirs(out, exist_ok=True)
    if os.path.isfile(path) and os.path.isdir(os.path.join(out, 'state')):  # a job has run
        with open(path, encoding='utf-8') as f:
            old, new = ([x for x in t.splitlines() if not x.startswith(('#', 'jobs ='))] for t in (f.read(), text))
        if old != new:
            raise UserInputError(f'--out {out} holds a run with other options ({path}): run it again with those, '
                                 'or use another --out')
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        f.write(text)
    os.replace(path + '.tmp', path)
    return path


def _json(path: str) -> dict:
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def prepare_demo(args: argparse.Namespace) -> None:
    """The demo phantom in ``nnUNet_raw`` unless an earlier run wrote it with the same size (the study plans it)."""
    from nnunet_ext.demo.phantom import write_phantom_dataset
    raw, (n_train, n_test) = os.environ['nnUNet_raw'], args.demo_cases
    if os.path.isdir(os.path.join(raw, DEMO)):
        made = _json(os.path.join(raw, DEMO, 'dataset.json'))
        if (made.get('numTraining'), made.get('nnunet_ext_demo_shape'), made.get('nnunet_ext_demo_test')) != \
                (n_train, args.demo_shape, n_test):
            raise UserInputError(f'{raw}/{DEMO} has other --demo-cases/--demo-shape: use those, or another --root')
        return print(f'reusing the demo phantom {raw}/{DEMO}', flush=True)
    print(f'writing the demo phantom ({n_train} + {n_test} cases of {"x".join(map(str, args.demo_shape))})', flush=True)
    with tempfile.TemporaryDirectory(prefix='.ab_real_demo.', dir=raw) as temporary:  # marked with its size, moved
        folder = write_phantom_dataset(temporary, DEMO_ID, DEMO_NAME, n_train, n_test, args.demo_shape, progress=False)
        made = _json(os.path.join(folder, 'dataset.json'))
        with open(os.path.join(folder, 'dataset.json'), 'w', encoding='utf-8') as f:
            json.dump(dict(made, nnunet_ext_demo_shape=args.demo_shape, nnunet_ext_demo_test=n_test), f, indent=4)
        os.replace(folder, os.path.join(raw, DEMO))


def check_split(spec, dataset: str) -> None:
    """The split's case counts, checked before anything runs (else the study's plan job would refuse them)."""
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder
    from nnunet_ext.study.split import labels_ts_cases, split_cases, uses_labels_ts
    raw = os.path.join(os.environ['nnUNet_raw'], dataset)
    if not os.path.isfile(os.path.join(raw, 'dataset.json')):
        raise UserInputError(f'{raw}/dataset.json does not exist: the test set and the evaluation need the raw dataset')
    labelled = sorted(labels_ts_cases(dataset)) if uses_labels_ts(spec, dataset) else None
    if labelled == []:
        raise UserInputError(f'--test-set labelsTs: {dataset} has no labelsTs cases; leave it out to hold out cases')
    ending = _json(os.path.join(raw, 'dataset.json'))['file_ending']
    training = get_identifiers_from_splitted_dataset_folder(os.path.join(raw, 'imagesTr'), ending)
    split_cases(training, labelled, spec.split.holdout, spec.split.val_cases, spec.split.seed)


def set_environment(args: argparse.Namespace, out: str) -> None:
    """nnU-Net's folders, our trainers (``nnUNet_extTrainer``) and the CPU settings, for the study's jobs too."""
    from nnunet_ext.environment import TRAINER_VARIABLE, trainers_folder
    root = os.path.abspath(args.root) if args.root else os.path.join(out, 'data') if args.demo else None
    for variable in ('nnUNet_raw', 'nnUNet_preprocessed'):
        folder = os.path.join(root, variable) if root else os.environ.get(variable)
        if args.demo:
            os.makedirs(folder, exist_ok=True)
        elif not folder or not os.path.isdir(folder):
            raise UserInputError(f'{variable} ' + (f'{folder} is not a folder' if folder else 'is not set') +
                                 ': give --root DIR (DIR/nnUNet_raw, DIR/nnUNet_preprocessed) or set it')
        os.environ[variable] = os.path.abspath(folder)
    os.environ['nnUNet_results'] = os.path.join(out, 'results')  # each training and test job sets its seed's own
    ours = trainers_folder()
    others = [p for p in os.environ.get(TRAINER_VARIABLE, '').split(os.pathsep) if p and os.path.abspath(p) != ours]
    os.environ[TRAINER_VARIABLE] = os.pathsep.join([ours, *others])
    if args.device == 'cpu':
        os.environ.setdefault('nnUNet_n_proc_DA', '0')
        os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')


def run(args: argparse.Namespace) -> int:
    """The spec, the study (as ``nnunet-ext study run``), the report; returns the exit status."""
    from nnunet_ext.study.checks import check_spec
    from nnunet_ext.study.executors.local import LocalExecutor
    from nnunet_ext.study.graph import build_graph, resolve_datasets
    from nnunet_ext.study.spec import load_spec
    from nnunet_ext.study.state import jobs_done
    out = os.path.abspath(args.out)
    set_environment(args, out)
    path = write_spec(args, out)
    if args.demo:
        prepare_demo(args)
    if args.device != 'cpu':
        import torch
        if not (torch.cuda.is_available() if args.device == 'cuda' else torch.backends.mps.is_available()):
            raise UserInputError(f'--device {args.device}: PyTorch sees no such device')
    spec = load_spec(path)
    datasets = resolve_datasets(spec)
    check_split(spec, datasets[0])
    check_spec(spec, datasets)
    jobs = build_graph(spec, datasets)
    status = LocalExecutor(spec).run(jobs, jobs_done(jobs, spec))
    report = os.path.join(out, 'report', datasets[0], 'report.md')
    if os.path.isfile(report):
        with open(report, encoding='utf-8') as f:
            print('\n' + f.read())
    print(f'not every job finished: nnunet-ext study status {path}; run this again to continue' if status else
          f'written: {report}')
    return 1 if status else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserInputError as e:
        message = str(e)
        for key, option in OPTIONS.items():
            message = message.replace(key, option)
        print(f'bench/ab_real.py: error: {message}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
