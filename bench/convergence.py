"""Validation Dice against training iterations: ``nnUNetTrainer`` and a chosen trainer, trained for the
same number of iterations on the same data.

Dataset: the demo phantom by default (``nnunet_ext.demo``: 40 + 10 CT-like 2D slices of 96x96, liver
and small tumours, planned and preprocessed by nnU-Net as ``nnunet-ext demo`` does), or any planned
dataset (``--dataset ID``, with ``nnUNet_raw``/``nnUNet_preprocessed`` set). Each trainer is built by
nnU-Net's ``get_trainer_from_args`` for fold ``--fold`` (nnU-Net's 5-fold split) with
``num_iterations_per_epoch = --eval-every`` and ``num_epochs = --iterations / --eval-every``, so
nnU-Net's own learning-rate schedule spans the whole run; the same seed is set before each trainer.
Its results go to a private ``nnUNet_results`` under the output folder (checkpointing off), never to
the user's.

Evaluation, at iteration 0 and after every ``--eval-every`` iterations: the fold's validation cases,
preprocessed, predicted by nnU-Net's ``nnUNetPredictor`` (sliding window, tile step 0.5, Gaussian;
no mirroring, to keep it quick) with the current weights loaded into a network built without deep
supervision; Dice per foreground class (label, or region with sigmoid > 0.5) against the
preprocessed reference on the preprocessed grid (voxels of the ignore label left out), NaN when
prediction and reference are both empty, averaged over the cases that are not NaN. Writes
``convergence.png`` (Dice per class against iterations, one line per trainer), ``convergence.json``
and ``convergence.md`` (the table, also printed; its last row: seconds spent in ``train_step``).

    python bench/convergence.py -tr nnUNetTrainerGODC                         # 600 iterations, every 50
    python bench/convergence.py -tr nnUNetTrainerGODC --iterations 20 --eval-every 10   # a smoke run
    python bench/convergence.py -tr nnUNetTrainerMLL --dataset 501 -c 2d --device cuda --iterations 5000
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np
from tqdm import tqdm

from nnunet_ext.evaluation.summary import nan_to_none

REFERENCE = 'nnUNetTrainer'
PHANTOM_ID = 989
PHANTOM_NAME = 'ConvergencePhantom'


@contextlib.contextmanager
def _quiet(log_path: str):
    """nnU-Net prints a lot per epoch: its stdout goes to a log file."""
    with open(log_path, 'a', encoding='utf-8') as log, contextlib.redirect_stdout(log):
        yield


@contextlib.contextmanager
def _environment(**values):
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def prepare_phantom(root: str, log_path: str) -> str:
    """The demo's phantom dataset (``DemoSettings`` defaults), planned and preprocessed for 2d; reused
    when ``root`` already holds it from an earlier run."""
    from nnunet_ext.demo.pipeline import DemoSettings
    from nnunet_ext.demo.phantom import write_phantom_dataset
    from nnunet_ext.planning import plan_and_preprocess
    name = f'Dataset{PHANTOM_ID:03d}_{PHANTOM_NAME}'
    if os.path.isfile(os.path.join(os.environ['nnUNet_preprocessed'], name, 'nnUNetPlans.json')):
        return str(PHANTOM_ID)
    if os.path.exists(os.path.join(os.environ['nnUNet_raw'], name)):
        raise SystemExit(f"{os.path.join(os.environ['nnUNet_raw'], name)} exists but was never preprocessed (an "
                         f"interrupted run?): remove it, or use another --root")
    demo = DemoSettings(root=root)
    write_phantom_dataset(os.environ['nnUNet_raw'], PHANTOM_ID, PHANTOM_NAME, demo.num_train, demo.num_test,
                          demo.shape, demo.seed, progress=False)
    with _quiet(log_path), _environment(nnUNet_n_proc_DA='1'):  # nnU-Net's planner fails with 0
        plan_and_preprocess(PHANTOM_ID, 'ExperimentPlanner', configurations=['2d'], num_processes=[2],
                            fingerprint_processes=2, verify_dataset_integrity=True, progress=False)
    return str(PHANTOM_ID)


class ValidationDice:
    """Dice per foreground class of a trainer's current weights on its fold's validation cases."""

    def __init__(self, trainer):
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        self.trainer = trainer
        _, val_keys = trainer.do_split()
        dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, sorted(val_keys))
        self.cases = []
        for key in sorted(val_keys):
            data, seg, _, _ = dataset.load_case(key)
            self.cases.append((key, np.asarray(data, dtype=np.float32), np.asarray(seg)[0]))
        manager = trainer.label_manager
        self.has_regions = manager.has_regions
        self.classes = [tuple(r) if isinstance(r, (list, tuple)) else (r,)
                        for r in (manager.foreground_regions if manager.has_regions else manager.foreground_labels)]
        self.names = self._class_names(trainer.dataset_json)
        self.ignore_label = manager.ignore_label
        self.network = type(trainer).build_network_architecture(
            trainer.plans_manager, trainer.configuration_manager, trainer.num_input_channels,
            manager.num_segmentation_heads, enable_deep_supervision=False).to(trainer.device)
        self.predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                         perform_everything_on_device=True, device=trainer.device,
                                         verbose=False, allow_tqdm=False)
        self.predictor.manual_initialization(self.network, trainer.plans_manager, trainer.configuration_manager, None,
                                             trainer.dataset_json, type(trainer).__name__,
                                             trainer.inference_allowed_mirroring_axes)

    def _class_names(self, dataset_json: dict) -> List[str]:
        names = {}
        for name, value in dataset_json['labels'].items():
            key = tuple(value) if isinstance(value, (list, tuple)) else (value,)
            names[key] = name
        return [names.get(c, '+'.join(map(str, c))) for c in self.classes]

    def __call__(self) -> Dict[str, float]:
        import torch
        state = getattr(self.trainer.network, '_orig_mod', self.trainer.network).state_dict()
        self.network.load_state_dict(state, strict=True)
        per_class = {name: [] for name in self.names}
        for _, data, seg in self.cases:
            logits = self.predictor.predict_sliding_window_return_logits(torch.from_numpy(data)).float()
            if self.has_regions:
                masks = [(torch.sigmoid(logits[i]) > 0.5).numpy() for i in range(len(self.classes))]
            else:
                labels = logits.argmax(0).numpy()
                masks = [labels == c[0] for c in self.classes]
            evaluated = np.ones(seg.shape, bool) if self.ignore_label is None else seg != self.ignore_label
            for name, c, mask in zip(self.names, self.classes, masks):
                reference = np.isin(seg, c) & evaluated
                predicted = mask & evaluated
                total = int(reference.sum() + predicted.sum())
                per_class[name].append(float('nan') if total == 0 else
                                       2.0 * int(np.logical_and(reference, predicted).sum()) / total)
        return {name: (float(np.nanmean(v)) if not all(math.isnan(x) for x in v) else float('nan'))
                for name, v in per_class.items()}


def train_with_evaluation(name: str, dataset: str, configuration: str, fold: int, args, device,
                          log_path: str) -> dict:
    """Trains ``name`` for ``args.iterations`` iterations, evaluating every ``args.eval_every``."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    with _quiet(log_path):
        trainer = get_trainer_from_args(dataset, configuration, fold, name, device=device)
    trainer.num_iterations_per_epoch = args.eval_every
    trainer.num_epochs = args.iterations // args.eval_every
    trainer.num_val_iterations_per_epoch = args.val_iterations
    trainer.disable_checkpointing = True
    curve = {'iterations': [], 'dice': [], 'train_seconds': 0.0}
    state = {'evaluator': None}
    bar = tqdm(total=trainer.num_epochs, desc=f'{name}', unit='eval', disable=args.no_pbar)
    nnunet_on_train_start, nnunet_train_step, nnunet_on_epoch_end = (trainer.on_train_start, trainer.train_step,
                                                                     trainer.on_epoch_end)

    def evaluate(iteration: int) -> None:
        dice = state['evaluator']()
        curve['iterations'].append(iteration)
        curve['dice'].append(dice)
        bar.set_postfix({k: f'{v:.3f}' for k, v in dice.items()})

    def on_train_start():  # instance-level hooks: nnU-Net's bookkeeping first, then ours
        nnunet_on_train_start()
        state['evaluator'] = ValidationDice(trainer)
        evaluate(0)

    def train_step(batch):
        start = time.perf_counter()
        try:
            return nnunet_train_step(batch)
        finally:
            curve['train_seconds'] += time.perf_counter() - start

    def on_epoch_end():
        nnunet_on_epoch_end()  # nnU-Net's logging (after its validation iterations)
        evaluate(trainer.current_epoch * args.eval_every)
        bar.update(1)

    trainer.on_train_start, trainer.train_step, trainer.on_epoch_end = on_train_start, train_step, on_epoch_end
    try:
        with _quiet(log_path):
            trainer.run_training()
    finally:
        bar.close()
    curve['classes'] = state['evaluator'].names
    curve['validation_cases'] = [key for key, _, _ in state['evaluator'].cases]
    return curve


def plot(curves: Dict[str, dict], path: str, title: str) -> None:
    import matplotlib.style
    with matplotlib.style.context('default'):  # nnU-Net's progress plot leaves seaborn's style set
        _plot(curves, path, title)


def _plot(curves: Dict[str, dict], path: str, title: str) -> None:
    from matplotlib.figure import Figure
    classes = next(iter(curves.values()))['classes']
    figure = Figure(figsize=(5 * (len(classes) + 1), 4.2), layout='constrained')
    axes = figure.subplots(1, len(classes) + 1)
    for trainer, curve in curves.items():
        for ax, name in zip(axes, classes):
            ax.plot(curve['iterations'], [d[name] for d in curve['dice']], marker='o', markersize=3, label=trainer)
        ax = axes[-1]
        ax.plot(curve['iterations'], [np.nanmean([d[n] for n in classes]) for d in curve['dice']], marker='o',
                markersize=3, label=trainer)
    for ax, name in zip(axes, [*classes, 'mean over classes']):
        ax.set(title=f'{name}', xlabel='training iterations', ylabel='validation Dice', ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.savefig(path, format='png', dpi=100)


def table(curves: Dict[str, dict]) -> str:
    trainers = list(curves)
    classes = curves[trainers[0]]['classes']
    header = ['iterations', *[f'{t} {c}' for t in trainers for c in classes]]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for i, iteration in enumerate(curves[trainers[0]]['iterations']):
        cells = [f"{curves[t]['dice'][i][c]:.4f}" for t in trainers for c in classes]
        lines.append(f'| {iteration} | ' + ' | '.join(cells) + ' |')
    lines.append('| train_step s | '
                 + ' | '.join(f"{curves[t]['train_seconds']:.0f}" for t in trainers for _ in classes)
                 + ' |')
    return '\n'.join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-tr', required=True, help='the trainer to compare with nnUNetTrainer')
    parser.add_argument('--iterations', type=int, default=600, help='training iterations per trainer (default: 600)')
    parser.add_argument('--eval-every', type=int, default=50, help='evaluate every K iterations (default: 50); '
                                                                   'must divide --iterations')
    parser.add_argument('--val-iterations', type=int, default=5,
                        help="nnU-Net's own validation iterations per evaluation interval (its pseudo-Dice; default 5)")
    parser.add_argument('--dataset', default=None, help='a planned dataset id or name (default: the demo phantom, '
                                                        'made in --root)')
    parser.add_argument('-c', default='2d', help='configuration (default: 2d)')
    parser.add_argument('--fold', type=int, default=0, help='fold of nnU-Net\'s 5-fold split (default: 0)')
    parser.add_argument('--root', default=None, help='where to make the phantom dataset (default: a temporary folder)')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda', 'mps'])
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('-o', default='convergence', help='output folder (default: ./convergence; must not exist '
                                                          'or be empty)')
    parser.add_argument('--no_pbar', action='store_true')
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.eval_every < 1 or args.val_iterations < 1:
        parser.error('--iterations, --eval-every and --val-iterations must be >= 1')
    if args.iterations % args.eval_every:
        parser.error(f'--eval-every {args.eval_every} must divide --iterations {args.iterations}')
    if args.tr == REFERENCE:
        parser.error(f'-tr: choose a trainer other than {REFERENCE} (it is always trained)')
    if args.dataset is None and args.c != '2d':
        parser.error('the demo phantom is 2D: use -c 2d, or give --dataset')
    if args.dataset is not None and not (os.environ.get('nnUNet_raw') and os.environ.get('nnUNet_preprocessed')):
        parser.error('--dataset needs nnUNet_raw and nnUNet_preprocessed: eval "$(nnunet-ext env --root DIR)"')
    output = os.path.abspath(args.o)
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        parser.error(f'-o {args.o} exists and is not an empty folder')
    if not os.path.isdir(os.path.dirname(output)):
        parser.error(f'the parent folder of -o {args.o} does not exist')

    import warnings
    import torch
    warnings.filterwarnings('ignore', category=FutureWarning)
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: PyTorch sees no CUDA GPU')
    device = torch.device(args.device)
    parent = os.path.dirname(output)
    work = tempfile.mkdtemp(prefix='.' + os.path.basename(output) + '.', suffix='.tmp', dir=parent)
    phantom_root = None
    started = datetime.datetime.now()
    try:
        log_path = os.path.join(work, 'nnunet_output.log')
        environment = {'nnUNet_results': os.path.join(work, 'nnUNet_results')}
        if args.dataset is None:
            phantom_root = args.root or tempfile.mkdtemp(prefix='nnunet_ext_convergence_')
            environment.update(nnUNet_raw=os.path.join(phantom_root, 'nnUNet_raw'),
                               nnUNet_preprocessed=os.path.join(phantom_root, 'nnUNet_preprocessed'))
            for folder in ('nnUNet_raw', 'nnUNet_preprocessed'):
                os.makedirs(environment[folder], exist_ok=True)
        from nnunet_ext.environment import TRAINER_VARIABLE, nnunet_environment
        os.makedirs(environment['nnUNet_results'])
        environment[TRAINER_VARIABLE] = nnunet_environment(environ={**os.environ, **environment})[TRAINER_VARIABLE]
        with _environment(**environment):
            dataset = args.dataset if args.dataset is not None else prepare_phantom(phantom_root, log_path)
            curves = {}
            with _environment(nnUNet_n_proc_DA=os.environ.get('nnUNet_n_proc_DA', '0' if args.device == 'cpu' else
                                                               '2')):
                for name in (REFERENCE, args.tr):
                    curves[name] = train_with_evaluation(name, dataset, args.c, args.fold, args, device, log_path)
        shutil.rmtree(os.path.join(work, 'nnUNet_results'))
        title = (f'dataset {dataset if args.dataset else "demo phantom"}, {args.c}, fold {args.fold}: '
                 f'{args.iterations} iterations, evaluated every {args.eval_every}, device {device}')
        plot(curves, os.path.join(work, 'convergence.png'), title)
        text = table(curves)
        command = 'python bench/convergence.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
        header = (f'# Validation Dice against iterations\n\n- command: `{command}`\n- {title}\n- date: '
                  f'{started.isoformat(timespec="seconds")}; machine: {platform.platform()}, {os.cpu_count()} '
                  f'logical CPUs\n- validation cases: {", ".join(curves[REFERENCE]["validation_cases"])}\n\n')
        with open(os.path.join(work, 'convergence.md'), 'w', encoding='utf-8') as f:
            f.write(header + text + '\n\n![validation Dice](convergence.png)\n')
        with open(os.path.join(work, 'convergence.json'), 'w', encoding='utf-8') as f:
            json.dump(nan_to_none({'command': command, 'title': title, 'curves': curves}), f, indent=2,
                      allow_nan=False)
        if os.path.isdir(output):
            os.rmdir(output)  # empty, checked above
        os.replace(work, output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if phantom_root is not None and args.root is None:
            shutil.rmtree(phantom_root, ignore_errors=True)
    print(text)
    print(f'\nwritten: {output} (convergence.png, convergence.md, convergence.json, nnunet_output.log)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
