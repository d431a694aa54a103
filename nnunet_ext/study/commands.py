"""``nnunet-ext study init|plan|run|status|report`` (``docs/commands/study.md``)."""
from __future__ import annotations

import dataclasses
import os
from collections import Counter
from typing import List, Tuple

from nnunet_ext.errors import UserInputError, positive_int


def add_parser(sub) -> None:
    """Adds ``study`` and its steps to the ``nnunet-ext`` subcommands."""
    p = sub.add_parser('study', help='trainers x configurations x folds x seeds from one spec, locally or on SLURM',
                       description='A study: every training of a spec (trainers x configurations x folds x seeds), '
                                   'the fold ensembles\' test-set predictions and one report, run here or on a '
                                   'SLURM cluster, resumable. docs/commands/study.md explains the spec.')
    steps = p.add_subparsers(dest='study_command', required=True, metavar='STEP')

    q = steps.add_parser('init', help='write a commented spec from these options')
    q.add_argument('spec', metavar='SPEC.toml')
    q.add_argument('-d', nargs='+', required=True, metavar='DATASET', help='dataset ids or names')
    q.add_argument('-tr', nargs='+', required=True, metavar='TRAINER', help='trainers compared with the baseline')
    q.add_argument('--baseline', default='nnUNetTrainer', help='default: nnUNetTrainer')
    q.add_argument('-c', nargs='+', default=['2d'], metavar='CONFIG', help='configurations (default: 2d)')
    q.add_argument('-p', default='nnUNetPlans', metavar='PLANS', help='plans identifier (default: nnUNetPlans)')
    q.add_argument('-f', nargs='+', default=['0', '1', '2', '3', '4'], metavar='FOLD',
                   help='folds (default: 0 1 2 3 4; or all)')
    q.add_argument('--seeds', nargs='+', type=int, default=[0], help='default: 0')
    q.add_argument('--epochs', type=positive_int, help="equal budget: epochs (default: each trainer's own)")
    q.add_argument('--iterations', type=positive_int, help='training iterations per epoch')
    q.add_argument('--val-iterations', type=positive_int, help='validation iterations per epoch')
    q.add_argument('--device', choices=['cuda', 'cpu', 'mps'], default='cuda')
    q.add_argument('--no-test', action='store_true', help='do not predict and score imagesTs/labelsTs')
    q.add_argument('--executor', choices=['local', 'slurm'], default='local')
    q.add_argument('--jobs', type=positive_int, default=1, help='local: jobs at a time (default: 1)')
    q.add_argument('--partition', default='', help='slurm: partition')
    q.add_argument('--time', default='', help='slurm: --time of a job, e.g. 24:00:00')
    q.add_argument('--force', action='store_true', help='replace an existing spec file')
    q.set_defaults(func=_init)

    for name, func, text in (('plan', _plan, 'print the jobs and what is done; runs nothing'),
                             ('run', _run, 'run (local) or submit (slurm) every job not done'),
                             ('status', _status, 'per job: done, pending, running, interrupted, failed (with its '
                                                 'error), not run'),
                             ('report', _report, 'write the report now from what is done')):
        q = steps.add_parser(name, help=text)
        q.add_argument('spec', metavar='SPEC.toml')
        if name in ('run', 'status'):
            q.add_argument('--executor', choices=['local', 'slurm'], help="default: the spec's executor.kind")
        if name == 'run':
            q.add_argument('--jobs', type=positive_int, help="local: jobs at a time (default: the spec's)")
            q.add_argument('--dry-run', action='store_true',
                           help='slurm: write the scripts, submit nothing; local: list the commands')
        q.set_defaults(func=func)


def _init(args) -> None:
    from nnunet_ext.study.spec import load_spec, render_spec
    if os.path.exists(args.spec) and not args.force:
        raise UserInputError(f"{args.spec} exists; choose another name or pass --force to replace it")
    folds = [f if f == 'all' else _fold(f) for f in args.f]
    name = os.path.splitext(os.path.basename(args.spec))[0]
    text = render_spec(name, args.d, args.tr, args.c, folds, args.seeds, args.p, args.baseline, args.device,
                       args.epochs, args.iterations, args.val_iterations, not args.no_test, args.executor, args.jobs,
                       args.partition, args.time)
    folder = os.path.dirname(os.path.abspath(args.spec))
    if not os.path.isdir(folder):
        raise UserInputError(f"the folder of {args.spec} does not exist")
    temporary = f'{args.spec}.{os.getpid()}.tmp'
    with open(temporary, 'w', encoding='utf-8') as f:
        f.write(text)
    try:
        load_spec(temporary)  # what we write must read back
    except BaseException:
        os.remove(temporary)
        raise
    os.replace(temporary, args.spec)
    print(f'wrote {args.spec}; next: nnunet-ext study plan {args.spec}')


def _fold(text: str) -> int:
    if not text.isdigit():
        raise UserInputError(f"-f: {text!r} is not a fold (a number, or all)")
    return int(text)


def _load(args, check: bool = True):
    """The spec (with the command line's overrides), its datasets, job graph and what is done."""
    from nnunet_ext.nnunet_glue import require_paths
    from nnunet_ext.study.checks import check_spec
    from nnunet_ext.study.graph import build_graph, resolve_datasets
    from nnunet_ext.study.spec import load_spec
    from nnunet_ext.study.state import jobs_done
    spec = load_spec(args.spec)
    overrides = {k: v for k, v in (('executor', getattr(args, 'executor', None)), ('jobs', getattr(args, 'jobs', None)))
                 if v is not None}
    spec = dataclasses.replace(spec, **overrides)
    require_paths('nnUNet_raw', 'nnUNet_preprocessed')
    datasets = resolve_datasets(spec)
    if check:
        check_spec(spec, datasets)
    jobs = build_graph(spec, datasets)
    return spec, jobs, jobs_done(jobs, spec)


def _executor(spec):
    from nnunet_ext.study.executors import EXECUTORS
    return EXECUTORS[spec.executor](spec)


def _plan(args) -> None:
    spec, jobs, done = _load(args)
    print(f'study {spec.name}: {len(jobs)} jobs, {sum(done.values())} done; folder {spec.folder}')
    for group, members in _grouped(jobs):
        finished = sum(done[j.id] for j in members)
        needs = sorted({n.split('__')[0] for j in members for n in j.needs})
        print(f'{group}: {finished}/{len(members)} done' + (f' (after: {", ".join(needs)})' if needs else ''))
        for job in members:
            print(f'  [{"done" if done[job.id] else "todo"}] {job.description}')
            if not done[job.id]:
                print(f'         {" ".join(job.argv)}')


def _grouped(jobs) -> List[Tuple[str, list]]:
    groups: dict = {}
    for job in jobs:
        groups.setdefault(job.group, []).append(job)
    return list(groups.items())


def _run(args) -> None:
    spec, jobs, done = _load(args)
    status = _executor(spec).run(jobs, done, dry_run=args.dry_run)
    if status:
        raise SystemExit(status)


def _status(args) -> None:
    from nnunet_ext.study.state import job_states
    spec, jobs, _ = _load(args, check=False)
    states = job_states(jobs, spec, _executor(spec).active(jobs))
    width = max(len(j.id) for j in jobs)
    for job in jobs:
        state = states[job.id]
        line = f'{job.id:<{width}}  {state["state"]}'
        if state['error']:
            line += f'  {state["error"]}'
        print(line)
    counts = Counter(s['state'] for s in states.values())
    print('; '.join(f'{n} {s}' for s, n in sorted(counts.items())))


def _report(args) -> None:
    from nnunet_ext.study.collect import write_study_report
    spec, jobs, _ = _load(args, check=False)
    for path in write_study_report(spec):
        print(f'wrote {path}')
