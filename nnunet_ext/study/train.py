"""One training job of a study: nnU-Net's training of one fold, resumable and preemption-safe.

    python -m nnunet_ext.study.train DATASET CONFIGURATION FOLD TRAINER [-p PLANS] [--seed S]
        [--epochs E] [--iterations I] [--val-iterations V] [--device cpu|cuda|mps] [--npz]

``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` come from the environment (a study points
``nnUNet_results`` at a per-seed folder). The trainer is built as ``nnUNetv2_train`` builds it
(``get_trainer_from_args``), the seed applied to ``random``, ``numpy``, ``torch`` and to nnU-Net's
augmentation workers (``docs/commands/study.md``, "Seeds"), the training length set on the trainer instance before the
learning-rate schedule is built (the same for nnU-Net's trainers and ours).

What one run does, from the files in the fold folder:

* ``checkpoint_final.pth`` and ``validation/summary.json``: finished; prints so, exits 0, touches nothing;
* ``checkpoint_final.pth`` only: nnU-Net's final validation only (as ``nnUNetv2_train --val``);
* ``checkpoint_latest.pth`` (or ``checkpoint_best.pth``; the one of the later epoch, latest on a tie):
  continues the training from it (as ``nnUNetv2_train --c``), then validates;
* nothing: trains from the start, then validates.

Signals (``nnunet_ext.study.preemption``): ``SIGUSR1`` finishes the epoch in progress and saves
``checkpoint_latest.pth`` so that the next run starts at the next epoch; ``SIGTERM``, ``SIGINT`` or a
second signal stop after the current training iteration and save ``checkpoint_latest.pth`` so that the
next run restarts the epoch in progress (its weights and optimiser state as they are, its entries removed
from nnU-Net's log lists); a signal during the final validation leaves the validation to the next run.
Checkpoints are written to a temporary name and renamed, so a kill while saving keeps the previous one.

Exit status: 0 finished (now or before), 75 stopped by a signal (run the same command again), 2 a user
error (settings that differ from those the training started with), anything else an error (traceback).
Every run ends with one line starting ``study train:`` that says what happened.

Each run appends an attempt to ``study_training.json`` in the fold folder (:func:`read_training_record`).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import socket
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple, Union

from nnunet_ext.errors import UserInputError, positive_int
from nnunet_ext.study.files import write_json_atomically
from nnunet_ext.study.preemption import PREEMPTED_STATUS, Interrupted, SignalFlags, check_before

RECORD_NAME = 'study_training.json'
FINAL, LATEST, BEST = 'checkpoint_final.pth', 'checkpoint_latest.pth', 'checkpoint_best.pth'
VALIDATION_SUMMARY = os.path.join('validation', 'summary.json')
PREFIX = 'study train: '

# what a run does (next_action)
FINISHED, VALIDATE, RESUME, FRESH = 'finished', 'validate', 'resume', 'fresh'
# attempt outcomes in the record ('running': the attempt is running, or ended without a word: killed)
OUTCOME_FINISHED, OUTCOME_VALIDATED, OUTCOME_PREEMPTED, OUTCOME_FAILED, OUTCOME_RUNNING = \
    'finished', 'validated', 'preempted', 'failed', 'running'

# command-line option -> nnU-Net trainer attribute; the record stores the attribute names
LENGTH_ATTRIBUTES = {'epochs': 'num_epochs', 'iterations': 'num_iterations_per_epoch',
                     'val_iterations': 'num_val_iterations_per_epoch'}
SETTINGS = ('seed', *LENGTH_ATTRIBUTES.values())


@dataclasses.dataclass(frozen=True)
class TrainingJob:
    """The command line. ``None``: not given (the trainer's own length; no seeding on a fresh start; the
    recorded value when continuing)."""
    dataset: str
    configuration: str
    fold: Union[int, str]
    trainer: str
    plans: str = 'nnUNetPlans'
    seed: Optional[int] = None
    epochs: Optional[int] = None
    iterations: Optional[int] = None
    val_iterations: Optional[int] = None
    device: str = 'cuda'
    npz: bool = False

    def requested(self) -> Dict[str, Optional[int]]:
        """``{seed, num_epochs, num_iterations_per_epoch, num_val_iterations_per_epoch}`` as given."""
        return dict(seed=self.seed, **{a: getattr(self, o) for o, a in LENGTH_ATTRIBUTES.items()})


# ------------------------------------------------------------------------------- reading the fold folder

def training_finished(fold_folder: str) -> bool:
    """The training of ``fold_folder`` is done: ``checkpoint_final.pth`` and ``validation/summary.json``."""
    return os.path.isfile(os.path.join(fold_folder, FINAL)) and \
        os.path.isfile(os.path.join(fold_folder, VALIDATION_SUMMARY))


def read_training_record(fold_folder: str) -> Optional[dict]:
    """``study_training.json`` of ``fold_folder`` (``None`` when there is none): the job (dataset,
    configuration, fold, trainer, plans) and ``attempts``, one dict per run, oldest first: ``attempt``
    (1, 2, ...), ``action`` (fresh, resume, validate), ``resumed_from`` (a checkpoint name or null),
    ``start_epoch`` (the first epoch it trained, 0-based), ``end_epoch`` (the epoch the next run starts
    at; null after a failure), ``outcome`` (finished, validated, preempted, failed; running while it
    runs, or if it was killed without a word), ``signal``, ``message`` (its last line, without
    ``study train:``), ``error`` (after a failure), ``median_train_step_seconds`` (of nnU-Net's
    ``train_step`` in this run; null without steps),
    ``train_steps``, ``seed``, ``num_epochs``, ``num_iterations_per_epoch``,
    ``num_val_iterations_per_epoch`` (in force), ``device``, ``host``, ``slurm_job_id``, ``started``,
    ``ended`` (ISO times)."""
    try:
        with open(os.path.join(fold_folder, RECORD_NAME), encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def next_action(fold_folder: str) -> Tuple[str, Optional[str]]:
    """``(action, checkpoint name)``: ``(finished, None)``, ``(validate, checkpoint_final.pth)``,
    ``(resume, checkpoint_latest.pth or checkpoint_best.pth)`` or ``(fresh, None)``."""
    if training_finished(fold_folder):
        return FINISHED, None
    if os.path.isfile(os.path.join(fold_folder, FINAL)):
        return VALIDATE, FINAL
    present = [name for name in (LATEST, BEST) if os.path.isfile(os.path.join(fold_folder, name))]
    if not present:
        return FRESH, None
    if len(present) == 2 and checkpoint_epoch(os.path.join(fold_folder, BEST)) > \
            checkpoint_epoch(os.path.join(fold_folder, LATEST)):
        return RESUME, BEST  # killed (no warning) after a best checkpoint newer than the periodic latest
    return RESUME, present[0]


def checkpoint_epoch(path: str) -> int:
    """The epoch a training continued from the nnU-Net checkpoint ``path`` starts at (its ``current_epoch``)."""
    import torch
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=False, mmap=True)
    except RuntimeError:  # not a zip-format checkpoint: no memory mapping
        checkpoint = torch.load(path, map_location='cpu', weights_only=False)
    return int(checkpoint['current_epoch'])


def fold_folder_of(job: TrainingJob) -> str:
    """The fold folder nnU-Net trains ``job`` into (computed without building the trainer)."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    return get_output_folder(job.dataset, job.trainer, job.plans, job.configuration, job.fold)


def settings_in_force(job: TrainingJob, attempts: List[dict], continuing: bool, record_path: str
                      ) -> Dict[str, Optional[int]]:
    """Seed and training length for this run: as given; when continuing a training that has a record,
    the values not given are the recorded ones, and a value given that differs is refused."""
    settings = job.requested()
    recorded = next((a for a in reversed(attempts) if all(k in a for k in SETTINGS)), None)
    if not continuing or recorded is None:
        return settings
    options = {'seed': '--seed', **{a: f"--{o.replace('_', '-')}" for o, a in LENGTH_ATTRIBUTES.items()}}
    for key, value in settings.items():
        if value is None:
            settings[key] = recorded[key]
        elif recorded[key] is not None and value != recorded[key]:
            raise UserInputError(f"{options[key]} {value} differs from the {recorded[key]} this training started "
                                 f"with ({record_path}); run it with the same settings, or delete its fold "
                                 f"folder to start over")
    return settings


# ------------------------------------------------------------------------------------- nnU-Net set-up

def seed_everything(seed: Optional[int]) -> None:
    """``random``, ``numpy``, ``torch`` and nnU-Net's augmentation workers (if any)."""
    if seed is None:
        return
    import random

    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
    if get_allowed_n_proc_DA() > 0:
        seed_augmentation_workers(seed)


def seed_augmentation_workers(seed: int) -> None:
    """nnU-Net starts its augmentation workers with ``seeds=None`` (OS entropy): give them seeds derived
    from the run's seed instead (this process only)."""
    import itertools

    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as module
    base = module.NonDetMultiThreadedAugmenter
    counter = itertools.count()

    class SeededNonDetMultiThreadedAugmenter(base):
        def __init__(self, data_loader, transform, num_processes, *args, seeds=None, **kwargs):
            if seeds is None:
                k = next(counter)
                seeds = [(seed * 1000003 + 1000 * k + i) % 2 ** 32 for i in range(num_processes)]
            super().__init__(data_loader, transform, num_processes, *args, seeds=seeds, **kwargs)

    module.NonDetMultiThreadedAugmenter = SeededNonDetMultiThreadedAugmenter


def configure_torch(device_name: str):
    """The device and torch's threads as ``nnUNetv2_train -device`` sets them (on a CPU, one thread per
    core this process may run on: a SLURM allocation, not the whole node)."""
    import torch
    if device_name == 'cuda' and not torch.cuda.is_available():
        raise UserInputError("--device cuda: PyTorch sees no CUDA GPU here; use --device cpu")
    if device_name == 'mps' and not torch.backends.mps.is_available():
        raise UserInputError("--device mps: PyTorch sees no MPS device here; use --device cpu")
    device = torch.device(device_name)
    if device.type == 'cpu':
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores))
    elif device.type == 'cuda':
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    if torch.cuda.is_available():  # as nnU-Net's run_training
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    return device


def shut_down_dataloaders(trainer) -> None:
    """Stops nnU-Net's augmentation workers, as its ``on_train_end`` does."""
    from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    old_stdout = sys.stdout
    with open(os.devnull, 'w') as devnull:
        sys.stdout = devnull
        try:
            for loader in (trainer.dataloader_train, trainer.dataloader_val):
                if isinstance(loader, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
                    loader._finish()
        finally:
            sys.stdout = old_stdout


def _logging_lists(trainer) -> Dict[str, list]:
    """nnU-Net's per-epoch log lists (2.8.1: ``MetaLogger.local_logger``; before: the logger itself)."""
    return getattr(trainer.logger, 'local_logger', trainer.logger).my_fantastic_logging


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec='seconds')


# --------------------------------------------------------------------------------------- one attempt

class Attempt:
    """One run of a training job: builds the trainer, wraps its hooks on the instance, trains and/or
    validates, and keeps the record of the run up to date."""

    def __init__(self, job: TrainingJob, folder: str, flags: SignalFlags, say: Callable[[str], None]):
        self.job, self.folder, self.flags, self._say = job, folder, flags, say
        self.trainer = None
        self.record: Optional[dict] = None
        self.entry: Dict[str, object] = {}
        self.steps: List[float] = []
        self.start_epoch = 0
        self.next_epoch = 0           # where the next attempt starts if this one ends now
        self._epoch_of_steps = None   # the epoch self.epoch_steps counts
        self.epoch_steps = 0

    def say(self, message: str) -> None:
        """One line on stdout (and in nnU-Net's log file once there is one)."""
        self._say(PREFIX + message)
        if self.trainer is not None:
            self.trainer.print_to_log_file(PREFIX + message, also_print_to_console=False)

    # ---- record

    def _record_path(self) -> str:
        return os.path.join(self.folder, RECORD_NAME)

    def begin(self, action: str, checkpoint: Optional[str], settings: Dict[str, Optional[int]]) -> None:
        job, trainer = self.job, self.trainer
        self.record = read_training_record(self.folder) or dict(
            dataset=trainer.plans_manager.dataset_name, configuration=job.configuration, fold=job.fold,
            trainer=job.trainer, plans=job.plans, attempts=[])
        self.entry = dict(
            attempt=len(self.record['attempts']) + 1, action=action,
            resumed_from=checkpoint if action == RESUME else None, start_epoch=self.start_epoch,
            end_epoch=None, outcome=OUTCOME_RUNNING, signal=None, message=None,
            median_train_step_seconds=None, train_steps=0, seed=settings['seed'],
            **{a: getattr(trainer, a) for a in LENGTH_ATTRIBUTES.values()},
            device=job.device, host=socket.gethostname(), slurm_job_id=os.environ.get('SLURM_JOB_ID'),
            started=_now(), ended=None)
        self.record['attempts'].append(self.entry)
        write_json_atomically(self._record_path(), self.record)

    def end(self, outcome: str, message: str, end_epoch: Optional[int], error: Optional[str] = None) -> None:
        if self.record is None:
            return
        self.entry.update(outcome=outcome, message=message, end_epoch=end_epoch, ended=_now(),
                          signal=self.flags.name or None, train_steps=len(self.steps),
                          median_train_step_seconds=statistics.median(self.steps) if self.steps else None)
        if error is not None:
            self.entry['error'] = error
        write_json_atomically(self._record_path(), self.record)

    # ---- trainer

    def build(self, action: str, settings: Dict[str, Optional[int]], device) -> None:
        from nnunetv2.run.run_training import get_trainer_from_args
        job = self.job
        trainer = get_trainer_from_args(job.dataset, job.configuration, job.fold, job.trainer, job.plans,
                                        continue_training=action == RESUME, device=device)
        self.trainer = trainer
        if os.path.abspath(trainer.output_folder) != os.path.abspath(self.folder):
            raise RuntimeError(f"{job.trainer} trains into {trainer.output_folder}, not {self.folder} (the plans' "
                               f"plans_name or dataset_name differ from -p {job.plans} / {job.dataset})")
        for attribute in LENGTH_ATTRIBUTES.values():  # before initialize(): the LR schedule spans the run
            if settings[attribute] is not None:
                setattr(trainer, attribute, settings[attribute])
        self._wrap_hooks()

    def _wrap_hooks(self) -> None:
        """Instance-level wrappers of nnU-Net's ``train_step`` (timed; signals
        checked before and after), ``validation_step`` and ``on_epoch_end`` (signals checked), and
        ``save_checkpoint`` (written to a temporary name, then renamed)."""
        trainer = self.trainer
        nnunet_train_step, nnunet_validation_step = trainer.train_step, trainer.validation_step
        nnunet_on_epoch_end, nnunet_save_checkpoint = trainer.on_epoch_end, trainer.save_checkpoint

        def train_step(batch):
            self._stop_if_asked()
            start = time.perf_counter()
            try:
                result = nnunet_train_step(batch)
            finally:
                self.steps.append(time.perf_counter() - start)
            if self._epoch_of_steps != trainer.current_epoch:
                self._epoch_of_steps, self.epoch_steps = trainer.current_epoch, 0
            self.epoch_steps += 1
            self._stop_if_asked()
            return result

        def validation_step(batch):
            self._stop_if_asked()
            return nnunet_validation_step(batch)

        def on_epoch_end():
            self._stop_if_asked()
            nnunet_on_epoch_end()  # logs the epoch, saves best (and latest every save_every), then current_epoch += 1
            if self.flags.any and trainer.current_epoch < trainer.num_epochs:
                done = trainer.current_epoch - 1
                self._save_latest(trainer.current_epoch)
                verb = 'stopped' if self.flags.stop_now else 'preempted'
                raise Interrupted(f"{verb} by {self.flags.name} after epoch {done}: saved {LATEST}, the next "
                                  f"attempt starts at epoch {trainer.current_epoch} (exit {PREEMPTED_STATUS})")
            # in the last epoch: on_train_end writes checkpoint_final.pth next; the caller stops after it

        def save_checkpoint(filename: str) -> None:
            partial = f'{filename}.partial'
            if os.path.exists(partial):
                os.remove(partial)
            nnunet_save_checkpoint(partial)
            if os.path.isfile(partial):  # not written when checkpointing is disabled
                os.replace(partial, filename)

        trainer.train_step = train_step
        trainer.validation_step = validation_step
        trainer.on_epoch_end = on_epoch_end
        trainer.save_checkpoint = save_checkpoint

    def _save_latest(self, start_epoch: int) -> None:
        """``checkpoint_latest.pth`` from which the next attempt starts at ``start_epoch``
        (nnU-Net's ``save_checkpoint`` stores ``current_epoch + 1``)."""
        trainer = self.trainer
        current = trainer.current_epoch
        trainer.current_epoch = start_epoch - 1
        try:
            trainer.save_checkpoint(os.path.join(trainer.output_folder, LATEST))
        finally:
            trainer.current_epoch = current
        self.next_epoch = start_epoch

    def _stop_if_asked(self) -> None:
        """Inside an epoch: on a stop signal, save a checkpoint that restarts this epoch and leave."""
        if not self.flags.stop_now:
            return
        trainer = self.trainer
        epoch = trainer.current_epoch
        if not self.steps:  # nothing trained in this attempt: the checkpoint it started from still holds
            raise Interrupted(f"stopped by {self.flags.name} before the first training iteration of this attempt: "
                              f"nothing to save, the next attempt starts at epoch {self.next_epoch} "
                              f"(exit {PREEMPTED_STATUS})")
        for values in _logging_lists(trainer).values():  # this epoch's entries (lrs, start time, ...) go
            del values[epoch:]
        self._save_latest(epoch)
        done = self.epoch_steps if self._epoch_of_steps == epoch else 0
        raise Interrupted(f"stopped by {self.flags.name} in epoch {epoch} after {done} of "
                          f"{trainer.num_iterations_per_epoch} training iterations: saved {LATEST}, the next "
                          f"attempt restarts epoch {epoch} (exit {PREEMPTED_STATUS})")

    # ---- the work

    def train(self, checkpoint: Optional[str]) -> None:
        trainer = self.trainer
        if checkpoint is not None:  # as nnUNetv2_train --c (maybe_load_checkpoint)
            trainer.load_checkpoint(os.path.join(self.folder, checkpoint))
        self.start_epoch = self.next_epoch = trainer.current_epoch

    def run_training(self) -> None:
        trainer = self.trainer
        check_before(self.flags, 'training started', f'starts at epoch {self.start_epoch}')()
        trainer.run_training()
        self.next_epoch = trainer.current_epoch
        if self.flags.any:
            verb = 'stopped' if self.flags.stop_now else 'preempted'
            raise Interrupted(f"{verb} by {self.flags.name} at the end of training: saved {FINAL}, the next "
                              f"attempt runs the final validation only (exit {PREEMPTED_STATUS})")

    def validate(self) -> None:
        """nnU-Net's final validation; a signal during it ends the attempt (the handler raises)."""
        check_before(self.flags, 'the final validation', 'runs the validation only')()
        self.flags.raise_now = True
        try:
            self.trainer.perform_actual_validation(self.job.npz)
        finally:
            self.flags.raise_now = False


def run_job(job: TrainingJob, say: Callable[[str], None] = lambda line: print(line, flush=True)) -> int:
    """One run of ``job`` (see the module's docstring); returns the exit status (0 or 75; raises on errors,
    ``UserInputError`` for settings that differ from the recorded ones)."""
    flags = SignalFlags().install()
    try:
        return _run_job(job, flags, say)
    finally:
        flags.uninstall()


def _run_job(job: TrainingJob, flags: SignalFlags, say: Callable[[str], None]) -> int:
    folder = fold_folder_of(job)
    action, checkpoint = next_action(folder)
    if action == FINISHED:
        say(f"{PREFIX}already finished ({FINAL} and {VALIDATION_SUMMARY} in {folder}): nothing to do")
        return 0
    record = read_training_record(folder)
    attempts = record['attempts'] if record else []
    settings = settings_in_force(job, attempts, continuing=action != FRESH,
                                 record_path=os.path.join(folder, RECORD_NAME))
    attempt = Attempt(job, folder, flags, say)
    number = len(attempts) + 1
    try:
        device = configure_torch(job.device)
        seed_everything(settings['seed'])
        attempt.build(action, settings, device)
        trainer = attempt.trainer
        if action == VALIDATE:  # as nnUNetv2_train --val
            trainer.load_checkpoint(os.path.join(folder, FINAL))
            attempt.start_epoch = attempt.next_epoch = trainer.current_epoch
            attempt.begin(action, checkpoint, settings)
            attempt.say(f"{FINAL} without {VALIDATION_SUMMARY}: running the final validation only (attempt {number})")
            attempt.validate()
            message = f"validated: nnU-Net's final validation of {folder} is done (attempt {number})"
            attempt.say(message)
            attempt.end(OUTCOME_VALIDATED, message, trainer.current_epoch)
            return 0
        attempt.train(checkpoint)
        attempt.begin(action, checkpoint, settings)
        if action == RESUME:
            attempt.say(f"resuming from {checkpoint} at epoch {attempt.start_epoch} (attempt {number})")
        else:
            attempt.say(f"starting {job.trainer} {job.configuration} fold {job.fold} of "
                        f"{trainer.plans_manager.dataset_name} (seed {settings['seed']}, {trainer.num_epochs} epochs "
                        f"of {trainer.num_iterations_per_epoch} + {trainer.num_val_iterations_per_epoch} iterations; "
                        f"attempt {number}) in {folder}")
        attempt.run_training()
        attempt.validate()
        trained = f"epochs {attempt.start_epoch} to {trainer.num_epochs - 1}" \
            if attempt.start_epoch < trainer.num_epochs else "none"
        message = (f"finished: {trainer.num_epochs} epochs trained ({trained} in attempt {number}) and validated: "
                   f"{folder}")
        attempt.say(message)
        attempt.end(OUTCOME_FINISHED, message, trainer.current_epoch)
        return 0
    except Interrupted as interrupted:
        if attempt.trainer is not None:
            shut_down_dataloaders(attempt.trainer)
        attempt.say(interrupted.message)
        attempt.end(OUTCOME_PREEMPTED, interrupted.message, attempt.next_epoch)
        return PREEMPTED_STATUS
    except UserInputError:
        raise
    except BaseException as error:  # nnU-Net's behaviour: the traceback follows this line
        message = f"failed: {type(error).__name__}: {error}"
        if attempt.record is not None:
            attempt.say(message)
        attempt.end(OUTCOME_FAILED, message, None, error=f"{type(error).__name__}: {error}")
        raise


# ------------------------------------------------------------------------------------------ command

def parse_args(argv: Optional[List[str]] = None) -> TrainingJob:
    parser = argparse.ArgumentParser(
        prog='python -m nnunet_ext.study.train',
        description="Train one fold as nnUNetv2_train does, resumable: run the same command again after an "
                    "interruption. SIGUSR1: finish the epoch, save, exit 75; SIGTERM: save now, exit 75.")
    parser.add_argument('dataset', help='dataset name or id')
    parser.add_argument('configuration')
    parser.add_argument('fold', type=_fold, help="an integer or 'all'")
    parser.add_argument('trainer', help='trainer class name (nnU-Net\'s or ours)')
    parser.add_argument('-p', dest='plans', default='nnUNetPlans', help='plans identifier (default: nnUNetPlans)')
    parser.add_argument('--seed', type=int, default=None, help='seeds random, numpy, torch and the augmentation '
                        'workers (default: none on a fresh start, the recorded seed when continuing)')
    parser.add_argument('--epochs', type=positive_int, default=None, help="num_epochs (default: the trainer's)")
    parser.add_argument('--iterations', type=positive_int, default=None, help='num_iterations_per_epoch')
    parser.add_argument('--val-iterations', type=positive_int, default=None, help='num_val_iterations_per_epoch')
    parser.add_argument('--device', choices=('cpu', 'cuda', 'mps'), default='cuda')
    parser.add_argument('--npz', action='store_true', help='save the validation probabilities (nnUNetv2_train --npz)')
    args = parser.parse_args(argv)
    return TrainingJob(dataset=args.dataset, configuration=args.configuration, fold=args.fold, trainer=args.trainer,
                       plans=args.plans, seed=args.seed, epochs=args.epochs, iterations=args.iterations,
                       val_iterations=args.val_iterations, device=args.device, npz=args.npz)


def _fold(text: str) -> Union[int, str]:
    if text == 'all':
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an integer nor 'all'") from None


def main(argv: Optional[List[str]] = None) -> int:
    job = parse_args(argv)
    try:
        return run_job(job)
    except UserInputError as e:
        print(f"{PREFIX}error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == '__main__':
    sys.exit(main())
