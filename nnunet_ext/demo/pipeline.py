"""``nnunet-ext demo``: phantom dataset -> plan/preprocess -> train nnUNetTrainer and
nnUNetTrainerGODC for the same number of iterations -> predict held-out cases -> Dice table.

Everything runs through nnU-Net's own Python API (the same code its commands call); the demo only
chooses the training length, which nnU-Net's CLI cannot shorten for its own trainer.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Sequence

from tqdm import tqdm

from nnunet_ext.demo.phantom import FILE_ENDING, LABELS, write_phantom_dataset
from nnunet_ext.errors import UserInputError

DEMO_NAME = 'DemoPhantom'
CONFIGURATION = '2d'
FOLD = 'all'


@dataclass
class DemoSettings:
    root: str
    dataset_id: int = 990
    budget: int = 600  # training iterations per trainer
    iterations_per_epoch: int = 50
    device: str = 'cpu'
    trainers: Sequence[str] = ('nnUNetTrainer', 'nnUNetTrainerGODC')
    num_train: int = 40
    num_test: int = 10
    shape: Sequence[int] = (96, 96)
    seed: int = 0

    def validate(self) -> None:
        if self.budget < 1:
            raise UserInputError(f"--budget must be >= 1 training iteration, got {self.budget}")
        if self.iterations_per_epoch < 1:
            raise UserInputError(f"--iterations-per-epoch must be >= 1, got {self.iterations_per_epoch}")
        if not 1 <= self.dataset_id <= 999:
            raise UserInputError(f"--id must be in 1..999, got {self.dataset_id}")

    @property
    def num_epochs(self) -> int:
        return max(1, math.ceil(self.budget / self.iterations_per_epoch))


@dataclass
class TrainerResult:
    trainer: str
    epochs: int
    iterations: int
    train_seconds: float
    dice: Dict[str, float] = field(default_factory=dict)  # label name -> mean Dice over test cases


def _existing_dataset_folders(dataset_id: int) -> List[str]:
    prefix = f'Dataset{dataset_id:03d}_'
    found = []
    for variable in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        base = os.environ[variable]
        found += [os.path.join(base, d) for d in sorted(os.listdir(base)) if d.startswith(prefix)]
    return found


def _remove_previous_demo(dataset_id: int) -> None:
    """A previous demo run's folders are ours to replace; any other dataset with this id is not."""
    ours = f'Dataset{dataset_id:03d}_{DEMO_NAME}'
    folders = _existing_dataset_folders(dataset_id)
    foreign = [f for f in folders if os.path.basename(f) != ours]
    if foreign:
        raise UserInputError(f"dataset id {dataset_id} is taken by {foreign[0]}; choose another with --id")
    for f in folders:
        shutil.rmtree(f)


@contextlib.contextmanager
def _augmentation_processes(settings: DemoSettings):
    """On a CPU, train without augmentation worker processes (they compete with the training
    threads for 2 cores) unless the user set ``nnUNet_n_proc_DA``. Not while planning: nnU-Net's
    planner fails with 0."""
    if settings.device != 'cpu' or 'nnUNet_n_proc_DA' in os.environ:
        yield
        return
    os.environ['nnUNet_n_proc_DA'] = '0'
    try:
        yield
    finally:
        del os.environ['nnUNet_n_proc_DA']


@contextlib.contextmanager
def _quiet(log_path: str):
    """nnU-Net prints a lot per epoch; send its stdout to a log file while our progress bar runs."""
    with open(log_path, 'a') as log, contextlib.redirect_stdout(log):
        yield


def train(settings: DemoSettings, trainer_name: str, log_path: str) -> TrainerResult:
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    device = torch.device(settings.device)
    with _quiet(log_path):
        trainer = get_trainer_from_args(str(settings.dataset_id), CONFIGURATION, FOLD, trainer_name, device=device)
    trainer.num_epochs = settings.num_epochs
    trainer.num_iterations_per_epoch = settings.iterations_per_epoch
    trainer.num_val_iterations_per_epoch = max(1, settings.iterations_per_epoch // 5)

    bar = tqdm(total=settings.num_epochs, desc=f'training {trainer_name}', unit='epoch')
    nnunet_on_epoch_end = trainer.on_epoch_end

    def on_epoch_end():  # instance-level hook: nnU-Net's bookkeeping, then our progress bar
        nnunet_on_epoch_end()
        value = lambda key: trainer.logger.get_value(key, step=-1)
        bar.set_postfix(loss=f"{value('train_losses'):.3f}", pseudo_dice=f"{value('ema_fg_dice'):.3f}")
        bar.update(1)

    trainer.on_epoch_end = on_epoch_end
    start = time.perf_counter()
    try:
        with _quiet(log_path), _augmentation_processes(settings):
            trainer.run_training()
    finally:
        bar.close()
    return TrainerResult(trainer_name, settings.num_epochs, settings.num_epochs * settings.iterations_per_epoch,
                         time.perf_counter() - start)


def predict(settings: DemoSettings, trainer_name: str, images: str, output: str, log_path: str) -> None:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.paths import nnUNet_results
    from nnunet_ext.nnunet_glue import file_listing_in_process

    model_folder = os.path.join(str(nnUNet_results), f'Dataset{settings.dataset_id:03d}_{DEMO_NAME}',
                                f'{trainer_name}__nnUNetPlans__{CONFIGURATION}')
    predictor = nnUNetPredictor(device=torch.device(settings.device), allow_tqdm=False)
    os.makedirs(output, exist_ok=True)
    with _quiet(log_path), file_listing_in_process():  # a folder: nnU-Net lists it with a fork pool
        predictor.initialize_from_trained_model_folder(model_folder, use_folds=(FOLD,))
        predictor.predict_from_files_sequential(images, output, save_probabilities=False, overwrite=True)


def mean_dice(labels_dir: str, predictions_dir: str) -> Dict[str, float]:
    """Mean Dice per foreground label over the test cases, by nnU-Net's own evaluation."""
    import numpy as np
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    foreground = {name: value for name, value in LABELS.items() if value > 0}
    cases = sorted(f for f in os.listdir(labels_dir) if f.endswith(FILE_ENDING))
    per_case = [compute_metrics(os.path.join(labels_dir, c), os.path.join(predictions_dir, c), SimpleITKIO(),
                                list(foreground.values()))['metrics'] for c in cases]
    return {name: float(np.nanmean([m[value]['Dice'] for m in per_case])) for name, value in foreground.items()}


def format_table(results: Sequence[TrainerResult]) -> str:
    names = [n for n, v in LABELS.items() if v > 0]
    header = ['trainer', 'epochs', 'iterations', 'train s'] + [f'Dice {n}' for n in names] + ['mean']
    rows = [[r.trainer, str(r.epochs), str(r.iterations), f'{r.train_seconds:.0f}']
            + [f'{r.dice[n]:.4f}' for n in names] + [f'{sum(r.dice[n] for n in names) / len(names):.4f}']
            for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: '| ' + ' | '.join(c.ljust(w) for c, w in zip(row, widths)) + ' |'
    return '\n'.join([line(header), '|' + '|'.join('-' * (w + 2) for w in widths) + '|', *map(line, rows)])


def run_demo(settings: DemoSettings) -> List[TrainerResult]:
    from nnunet_ext.environment import nnunet_environment
    from nnunet_ext.planning import plan_and_preprocess

    settings.validate()
    os.environ.update(nnunet_environment(settings.root))
    _remove_previous_demo(settings.dataset_id)
    work = os.path.join(os.path.abspath(settings.root), 'demo')
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    log_path = os.path.join(work, 'nnunet_output.log')
    labels_test = os.path.join(work, 'labelsTs')

    dataset = write_phantom_dataset(os.environ['nnUNet_raw'], settings.dataset_id, DEMO_NAME, settings.num_train,
                                    settings.num_test, settings.shape, settings.seed, labels_test_dir=labels_test)
    print(f'planning and preprocessing {os.path.basename(dataset)} ...', flush=True)
    with _quiet(log_path):
        plan_and_preprocess(settings.dataset_id, 'ExperimentPlanner', configurations=[CONFIGURATION],
                            num_processes=[2], fingerprint_processes=2, verify_dataset_integrity=True,
                            progress=False)
    results = []
    for trainer_name in settings.trainers:
        result = train(settings, trainer_name, log_path)
        predictions = os.path.join(work, 'predictions', trainer_name)
        print(f'predicting {settings.num_test} held-out cases with {trainer_name} ...', flush=True)
        predict(settings, trainer_name, os.path.join(dataset, 'imagesTs'), predictions, log_path)
        result.dice = mean_dice(labels_test, predictions)
        results.append(result)
    table = format_table(results)
    with open(os.path.join(work, 'results.json'), 'w') as f:
        json.dump({'settings': asdict(settings), 'results': [asdict(r) for r in results]}, f, indent=2)
    print(f'\nDice on {settings.num_test} held-out phantoms ({settings.budget} training iterations each, '
          f'device {settings.device}):\n{table}\n\nnnU-Net output: {log_path}\nresults: {work}')
    return results
