"""The ``nnunet-ext`` command: what nnU-Net has no command for.

    nnunet-ext env [--root DIR]          shell exports for nnU-Net and our trainers
    nnunet-ext trainers                  the trainers this package provides
    nnunet-ext plan ID -pl PLANNER       plan (and preprocess) with one of our planners
    nnunet-ext demo [--budget N]         phantom dataset, nnUNetTrainer vs nnUNetTrainerGODC, Dice table
    nnunet-ext evaluate PRED GT [-d ID]  Dice, IoU, precision, recall, HD95, ASD, RVD per case and class
    nnunet-ext cascade-predict -i IN -o OUT --coarse D C TR --fine D C TR   coarse model -> crops -> fine model
    nnunet-ext compare ID -c CONFIG      trainers over their cross-validation folds: tables, Wilcoxon tests, plots
    nnunet-ext fuse-views -i A C S -o OUT   predictions of 2D models of different views -> majority vote (or mean)
    nnunet-ext prune MODEL --level L -o OUT   an ANU-Net model folder pruned to level L
    nnunet-ext convert SOURCE IN --id N  a dataset (lits, ircadb, nih-pancreas, msd, chaos, folder2d) -> nnUNet_raw
    nnunet-ext stack-slices ID --id N    2.5D: a copy of a raw dataset with each slice's neighbours as channels
    nnunet-ext preprocess-images IN OUT  a dataset's CT window / histogram equalisation / slice stacking on new images
    nnunet-ext study init|plan|run|status|report   trainers x configurations x folds x seeds, locally or on SLURM
    nnunet-ext export MODEL_DIR -o OUT    ONNX files (one per fold) + model.json
    nnunet-ext deploy-predict OUT -i IN -o PRED   predict like nnUNetv2_predict with ONNX Runtime, without PyTorch
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator, List, Optional

from nnunet_ext import __version__
from nnunet_ext.environment import EnvironmentSetupError
from nnunet_ext.errors import UserInputError, positive_float, positive_int
from nnunet_ext.signals import acted_as_default_in_forked_child


def _cmd_env(args) -> None:
    from nnunet_ext.environment import nnunet_environment, shell_exports
    print(shell_exports(nnunet_environment(args.root)))


def _cmd_trainers(args) -> None:
    from nnunet_ext.registry import describe, trainer_classes
    rows = describe(trainer_classes())
    width = max(len(name) for name, _ in rows)
    for name, line in rows:
        print(f'{name.ljust(width)}  {line}')


def _cmd_planners(args) -> None:
    from nnunet_ext.registry import describe, planner_classes
    rows = describe(planner_classes())
    width = max(len(name) for name, _ in rows)
    for name, line in rows:
        print(f'{name.ljust(width)}  {line}')


def _cmd_plan(args) -> None:
    from nnunet_ext.nnunet_glue import dataset_name
    from nnunet_ext.planning import plan_and_preprocess_all
    from nnunet_ext.registry import find_planner

    dataset_name(args.dataset_id)
    try:
        find_planner(args.pl)
    except LookupError as e:
        raise UserInputError(str(e)) from None
    if args.np is not None and len(args.np) not in (1, len(args.c)):
        raise UserInputError(f"-np takes one number or one per configuration ({len(args.c)}), got {args.np}")
    num_processes = None if args.np is None else (args.np * len(args.c) if len(args.np) == 1 else args.np)
    written = plan_and_preprocess_all(args.dataset_id, args.pl, args.c, num_processes, args.npfp,
                                      args.verify_dataset_integrity, args.clean, not args.no_pp, args.gpu_memory_target,
                                      args.overwrite_plans_name, progress=not args.no_pbar)
    for plans in written:
        print(f'plans written: {plans} (train with: nnUNetv2_train {args.dataset_id} CONFIG FOLD -p {plans} '
              f'-tr TRAINER)')


def _cmd_demo(args) -> None:
    from nnunet_ext.demo.pipeline import DemoSettings, run_demo
    import torch
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device == 'cuda' and not torch.cuda.is_available():
        raise UserInputError("--device cuda: PyTorch sees no CUDA GPU here; use --device cpu")
    if device == 'mps' and not torch.backends.mps.is_available():
        raise UserInputError("--device mps: PyTorch sees no MPS device here; use --device cpu")
    run_demo(DemoSettings(root=args.root, dataset_id=args.id, budget=args.budget,
                          iterations_per_epoch=args.iterations_per_epoch, device=device))


def _add_hd95_argument(parser) -> None:
    parser.add_argument('--hd95', choices=['pooled', 'max'], default='pooled',
                        help='pooled (default): 95th percentile of both directed surface distances pooled '
                             '(MedPy\'s hd95); max: the larger of the two directed 95th percentiles (MONAI, '
                             'DeepMind surface-distance). Recorded in the summary as "hd95".')


def _cmd_evaluate(args) -> None:
    from nnunet_ext.evaluation.evaluate import evaluate_folders
    from nnunet_ext.evaluation.summary import format_table
    arguments = {k: v for k, v in vars(args).items() if k != 'func'}
    summary = evaluate_folders(args.pred, args.gt, args.d, args.o, args.np, args.labels, arguments,
                               progress=not args.no_pbar, log=lambda line: print(line, file=sys.stderr),
                               hd95=args.hd95)
    print(format_table(summary['per_class']))
    print(f"summary: {summary['output_file']}")


def _cmd_compare(args) -> None:
    from nnunet_ext.evaluation.compare import run_compare
    from nnunet_ext.evaluation.report import markdown_table, pooled_table
    arguments = {k: v for k, v in vars(args).items() if k != 'func'}
    result, files = run_compare(args.dataset, args.c, args.tr, args.p, args.f, args.o, args.np, arguments,
                                progress=not args.no_pbar, log=lambda line: print(line, file=sys.stderr),
                                hd95=args.hd95)
    print(markdown_table(pooled_table(result.content)))
    print(f"report: {files['markdown']} (and {files['html']}; per-case numbers: {files['json']})")


def _cmd_fuse_views(args) -> None:
    from nnunet_ext.inference.fuse_views import SUMMARY_NAME, fuse_view_folders
    summary = fuse_view_folders(args.i, args.o, args.method, args.tie_break, args.np, progress=not args.no_pbar)
    rule = 'mean probability' if args.method == 'mean' else f'majority vote, ties by {args.tie_break}'
    print(f"{len(summary['cases'])} cases fused ({rule}) from "
          f"{', '.join(v['view'] for v in summary['inputs'])}: {summary['output_folder']} "
          f"(details in {SUMMARY_NAME})")


def _cmd_prune(args) -> None:
    from nnunet_ext.inference.prune import prune_model_folder
    prune_model_folder(args.model_folder, args.level, args.o, args.f, args.chk)
    print(f"pruned model: {args.o} (predict with: nnUNetv2_predict_from_modelfolder -m {args.o} -i IN -o OUT)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='nnunet-ext', description=__doc__.split('\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog='Training, prediction and ensembling use the stock nnUNetv2_* commands '
                                            '(-tr nnUNetTrainerGODC ...) after: eval "$(nnunet-ext env --root DIR)"')
    parser.add_argument('--version', action='version', version=f'nnunet-ext {__version__}')
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

    p = sub.add_parser('env', help='print the shell exports nnU-Net needs (eval "$(nnunet-ext env --root DIR)")')
    p.add_argument('--root', help='data root: sets nnUNet_raw/_preprocessed/_results to ROOT/nnUNet_raw etc. '
                                  '(default: keep the variables already set)')
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser('trainers', help='list the trainers this package provides')
    p.set_defaults(func=_cmd_trainers)

    p = sub.add_parser('planners', help='list the experiment planners this package provides')
    p.set_defaults(func=_cmd_planners)

    p = sub.add_parser('plan', help='fingerprint, plan with one of our planners (-pl) and preprocess',
                       description='Like nnUNetv2_plan_and_preprocess, for planners that nnU-Net cannot find '
                                   '(those of this package; nnU-Net\'s own names work too).')
    p.add_argument('dataset_id', type=int)
    p.add_argument('-pl', required=True, help='planner class name (see: nnunet-ext planners)')
    p.add_argument('-c', nargs='+', default=['2d', '3d_fullres', '3d_lowres'], help='configurations to preprocess')
    p.add_argument('-np', type=positive_int, nargs='+', default=None,
                   help='preprocessing processes (one, or one per -c)')
    p.add_argument('-npfp', type=positive_int, default=8, help='fingerprint extraction processes')
    p.add_argument('-gpu_memory_target', type=positive_float, default=None,
                   help='GPU memory target in GB (planner default)')
    p.add_argument('-overwrite_plans_name', default=None, help='custom plans identifier')
    p.add_argument('--verify_dataset_integrity', action='store_true')
    p.add_argument('--clean', action='store_true', help='re-extract the fingerprint')
    p.add_argument('--no_pp', action='store_true', help='plan only, no preprocessing')
    p.add_argument('--no_pbar', action='store_true')
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser('demo', help='phantom dataset: train nnUNetTrainer and nnUNetTrainerGODC, print Dice',
                       description='Makes a synthetic 2D CT-like phantom dataset (liver + small tumours), plans and '
                                   'preprocesses it, trains nnUNetTrainer and nnUNetTrainerGODC for the same number '
                                   'of iterations, predicts 10 held-out cases and prints Dice per class.')
    p.add_argument('--root', default='nnunet_ext_demo', help='data root (default: ./nnunet_ext_demo)')
    p.add_argument('--budget', type=int, default=600,
                   help='training iterations per trainer (default: 600, about 3 min each on 2 CPU cores)')
    p.add_argument('--iterations-per-epoch', type=int, default=50, help='(default: 50)')
    p.add_argument('--device', choices=['cpu', 'cuda', 'mps'], default=None, help='default: cuda if available')
    p.add_argument('--id', type=int, default=990, help='dataset id of the phantom dataset (default: 990)')
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser('evaluate', help='Dice, IoU, precision, recall, HD95, ASD, RVD per case and class',
                       description='Evaluates the segmentations in PRED against the references in GT (matched by '
                                   'file name), per case and class (or region), and writes a summary JSON; prints '
                                   'mean ± std per class. HD95 and ASD in mm (image spacing). Conventions (empty '
                                   'masks, ignore label) are in the JSON under "conventions".')
    p.add_argument('pred', metavar='PRED', help='folder of predicted segmentations')
    p.add_argument('gt', metavar='GT', help='folder of reference segmentations (same file names)')
    p.add_argument('-d', metavar='DATASET', default=None,
                   help='dataset id or name: labels/regions, ignore label and file ending from '
                        '$nnUNet_raw/DATASET/dataset.json (default: labels > 0 found in GT)')
    p.add_argument('-o', metavar='JSON', default=None, help='summary file (default: PRED/summary_nnunet_ext.json)')
    p.add_argument('-np', type=int, default=2, help='processes (default: 2)')
    p.add_argument('--labels', type=int, nargs='+', default=None, help='evaluate these labels (one class each)')
    _add_hd95_argument(p)
    p.add_argument('--no_pbar', action='store_true')
    p.set_defaults(func=_cmd_evaluate)

    from nnunet_ext.inference.cascade_command import add_cascade_parser
    add_cascade_parser(sub)

    p = sub.add_parser('compare', help='trainers over their cross-validation folds: tables, Wilcoxon tests, plots',
                       description='Evaluates the validation predictions of every fold of each trainer (nnU-Net\'s '
                                   'results folders) against $nnUNet_preprocessed/DATASET/gt_segmentations with the '
                                   'metrics of "evaluate", and writes report.md, report.html, compare.json and PNG '
                                   'plots: mean ± std per trainer and class over all cases of its folds, Dice per '
                                   'fold, a paired Wilcoxon signed-rank test of per-case Dice against nnUNetTrainer '
                                   'per class, a box plot of per-case Dice and the training curves of every fold. '
                                   'Missing folds, predictions and checkpoints are listed in the report and on '
                                   'stderr.')
    p.add_argument('dataset', metavar='DATASET', help='dataset id or name')
    p.add_argument('-c', required=True, metavar='CONFIG', help='configuration (2d, 3d_fullres, ...)')
    p.add_argument('-tr', nargs='+', default=None, metavar='TRAINER',
                   help='trainers (default: every TRAINER__PLANS__CONFIG folder of the dataset)')
    p.add_argument('-p', default='nnUNetPlans', metavar='PLANS', help='plans identifier (default: nnUNetPlans)')
    p.add_argument('-f', type=int, nargs='+', default=[0, 1, 2, 3, 4], metavar='FOLD',
                   help='folds (default: 0 1 2 3 4)')
    p.add_argument('-o', default=None, metavar='OUT',
                   help='output folder (default: $nnUNet_results/DATASET/compare_CONFIG; a previous report there '
                        'is replaced)')
    p.add_argument('-np', type=int, default=2, help='processes for the evaluation (default: 2)')
    _add_hd95_argument(p)
    p.add_argument('--no_pbar', action='store_true')
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser('fuse-views', help='fuse predictions of 2D models of different views (majority vote or mean)',
                       description='Fuses, case by case, the nnUNetv2_predict output folders of 2D models trained '
                                   'along different axes (plans of: nnunet-ext plan ID -pl MultiView2DPlanner; any '
                                   'trainer), as the multi-level structural loss paper fuses its axial, coronal and '
                                   'sagittal models. vote: per voxel the label most views predicted, over their '
                                   'segmentation files; mean: average of their probabilities (.npz), as '
                                   'nnUNetv2_ensemble. Output in the original image geometry, with dataset.json, '
                                   'plans.json and fuse_views.json; nothing is written if a check fails.')
    p.add_argument('-i', nargs='+', required=True, metavar='DIR',
                   help='prediction folders, one per view (e.g. axial coronal sagittal; any order)')
    p.add_argument('-o', required=True, metavar='OUT', help='output folder (must not exist, or be empty)')
    p.add_argument('--method', choices=['vote', 'mean'], default='vote',
                   help='vote: majority vote over the views\' label maps (the paper; default); mean: average '
                        'probabilities (needs --save_probabilities)')
    p.add_argument('--tie_break', choices=['probability', 'lowest'], default='probability',
                   help='vote ties (no label with a strict plurality): probability: the tied label with the highest '
                        'mean probability over the views (needs --save_probabilities; default); lowest: the lowest '
                        'tied label (reads the segmentations only)')
    p.add_argument('-np', type=positive_int, default=2, help='processes (default: 2)')
    p.add_argument('--no_pbar', action='store_true')
    p.set_defaults(func=_cmd_fuse_views)

    p = sub.add_parser('prune', help='ANU-Net / UNet++ model folder -> model folder of one pruned level',
                       description='Writes an nnU-Net model folder whose plans build only levels 1..LEVEL of the '
                                   'nested U-Net and whose checkpoints hold only their weights (ANU-Net paper, '
                                   'Section 3.5). Predict with the stock nnUNetv2_predict_from_modelfolder -m OUT '
                                   '(or name OUT $nnUNet_results/DATASET/TRAINER__PLANSL3__CONFIG and use '
                                   'nnUNetv2_predict -p PLANSL3). Without exporting, NNUNET_EXT_ANUNET_PRUNE_LEVEL=L '
                                   'nnUNetv2_predict ... runs level L of the full model.')
    p.add_argument('model_folder', metavar='MODEL_DIR', help='trained model folder (TRAINER__PLANS__CONFIG)')
    p.add_argument('--level', type=int, required=True, help='level to keep (1..L; L = n_stages - 1 is the full model)')
    p.add_argument('-o', required=True, metavar='OUT', help='output model folder (must not exist)')
    p.add_argument('-f', nargs='+', default=None, metavar='FOLD',
                   help='folds (default: every fold_* with the checkpoint)')
    p.add_argument('-chk', default='checkpoint_final.pth', help='checkpoint file name (default: checkpoint_final.pth)')
    p.set_defaults(func=_cmd_prune)

    from nnunet_ext.conversion.commands import add_convert_parsers
    add_convert_parsers(sub)
    from nnunet_ext.study.commands import add_parser as add_study_parser
    add_study_parser(sub)
    from nnunet_ext.export.commands import add_parser as add_export_parser
    add_export_parser(sub)
    from nnunet_ext.deploy.commands import add_parser as add_deploy_parser
    add_deploy_parser(sub)
    return parser


class Interrupted(KeyboardInterrupt):
    """A signal that ends the command (SIGTERM: a batch system's time limit, ``timeout``, ``kill``; SIGINT:
    Ctrl-C), raised in the main thread by the handler :func:`main` installs. A ``KeyboardInterrupt``, so no
    ``except Exception`` swallows it and whatever handles Ctrl-C handles it: ``with``/``finally`` clean-up
    removes temporary and partial outputs, :func:`nnunet_ext.parallel.run_cases` terminates its workers."""

    def __init__(self, signal_number: int):
        super().__init__(signal_number)
        self.signal_number = signal_number

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name


#: commands that write all-or-nothing: an interrupt leaves no partial output of theirs behind
_ALL_OR_NOTHING = {'convert', 'stack-slices', 'preprocess-images', 'evaluate', 'compare', 'fuse-views', 'prune',
                   'cascade-predict', 'export', 'deploy-predict'}


def _interrupt_in_flight() -> bool:
    """Whether the code that runs is handling an interrupt (an ``except``/``finally``/``__exit__`` of one, or of
    an error raised while handling one)."""
    error, seen = sys.exc_info()[1], set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__context__
    return False


@contextlib.contextmanager
def _signals_raise_interrupted() -> Iterator[Callable[[], None]]:
    """SIGTERM and SIGINT raise :class:`Interrupted` while the block runs (main thread only; a signal ignored
    when we start, as under ``nohup`` or in a background job, stays ignored). A signal that comes while an
    interrupt is being handled (a second Ctrl-C, or SIGTERM after it, during the clean-up) is ignored, so the
    clean-up finishes; one that comes after an interrupt was swallowed (a library's bare ``except:``) raises
    again. The block gets a function that disarms the handler (signals are ignored from then on: the command
    has ended). The previous handlers come back after the block."""
    armed = [threading.current_thread() is threading.main_thread()]

    def disarm() -> None:
        armed[0] = False

    if not armed[0]:
        yield disarm
        return

    owner = os.getpid()

    def handler(signal_number, frame):
        # A forked child (nnU-Net's fork pools) inherited this handler: it must act as without us. SIGINT raises
        # KeyboardInterrupt, Python's default; SIGTERM ends it, or the pool's terminate() would deadlock on a
        # lock the worker holds.
        if signal_number == signal.SIGINT and os.getpid() != owner:
            signal.default_int_handler(signal_number, frame)
        if acted_as_default_in_forked_child(owner, signal_number):
            return
        if armed[0] and not _interrupt_in_flight():
            raise Interrupted(signal_number)

    previous = {}
    for name in ('SIGINT', 'SIGTERM'):
        number = getattr(signal, name, None)
        if number is None or signal.getsignal(number) is signal.SIG_IGN:
            continue
        previous[number] = signal.getsignal(number)
        signal.signal(number, handler)
    try:
        yield disarm
    finally:
        for number, old in previous.items():
            signal.signal(number, signal.SIG_DFL if old is None else old)


def _interrupted_line(command: Optional[str], signal_name: str) -> str:
    what = f'nnunet-ext {command}' if command else 'nnunet-ext'
    if command in _ALL_OR_NOTHING:
        return f'{what}: interrupted ({signal_name}); partial output removed'
    if command == 'plan':
        return f'{what}: interrupted ({signal_name}); nnU-Net\'s preprocessed output may be incomplete: run it again'
    return f'{what}: interrupted ({signal_name})'


def main(argv: Optional[List[str]] = None) -> int:
    """The ``nnunet-ext`` command. A user's mistake: one line on stderr, exit status 2. SIGINT / SIGTERM
    (:class:`Interrupted`): workers stopped, temporary and partial outputs removed, one line on stderr, exit
    status 128 + the signal's number (130, 143). No traceback for either."""
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 locale (LANG=C on old systems) must not crash
        if hasattr(stream, 'reconfigure'):   # printing '±' or a progress bar: escape what it cannot encode
            stream.reconfigure(errors='backslashreplace')
    command, line, status = None, None, 0
    with _signals_raise_interrupted() as disarm:
        try:  # the outer try catches an interrupt that comes while the inner one handles an error
            try:
                args = build_parser().parse_args(argv)
                command = args.command
                args.func(args)
            except (UserInputError, EnvironmentSetupError, FileExistsError) as e:
                line, status = f'nnunet-ext {command}: error: {e}', 2
            disarm()  # a signal from here on finds the command ended: ignored
        except KeyboardInterrupt as e:  # Interrupted (SIGTERM, SIGINT), or Python's own Ctrl-C handler
            disarm()
            number = e.signal_number if isinstance(e, Interrupted) else int(signal.SIGINT)
            line, status = _interrupted_line(command, signal.Signals(number).name), 128 + number
        # printed after the exception is gone: its frames (and an unfinished progress bar's close) are released
        if line is not None:
            print(line, file=sys.stderr)
    return status


def _ignore_sigint_in_spawned_workers() -> None:
    """A worker process that ``multiprocessing`` spawns from the ``nnunet-ext`` command (nnU-Net's own
    preprocessing and export workers under cascade-predict and plan, ours in parallel.run_cases) imports this
    module while it re-runs the command's main script: there SIGINT is ignored, as in run_cases' workers, so
    that a Ctrl-C, which the terminal sends to every process of the group, does not make each worker print a
    traceback; the command terminates its workers itself (or multiprocessing does when it exits)."""
    from multiprocessing import process
    if getattr(process.current_process(), '_inheriting', False) and '__mp_main__' in sys.modules:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


_ignore_sigint_in_spawned_workers()


if __name__ == '__main__':
    sys.exit(main())
