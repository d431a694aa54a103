"""Training length of our trainers, shortened through environment variables.

nnU-Net's default is 1000 epochs of 250 iterations (+ 50 validation iterations). To try a trainer
on a CPU, or in tests, set any of

    nnUNet_ext_num_epochs                     (default: the trainer's, 1000)
    nnUNet_ext_num_iterations_per_epoch       (default: 250)
    nnUNet_ext_num_val_iterations_per_epoch   (default: 50)

before the stock ``nnUNetv2_train``. Only trainers of this package read them; the values in force
are printed to the training log. Unset them for real runs.
"""
from __future__ import annotations

import os

import torch

from nnunet_ext.conversion.slice_stack import check_training_configuration
from nnunet_ext.training.memory_check import DEFAULT_THRESHOLD, check_memory_target

TRAINING_LENGTH_VARIABLES = {
    'nnUNet_ext_num_epochs': 'num_epochs',
    'nnUNet_ext_num_iterations_per_epoch': 'num_iterations_per_epoch',
    'nnUNet_ext_num_val_iterations_per_epoch': 'num_val_iterations_per_epoch',
}


def training_length_overrides(environ=os.environ) -> dict:
    """``{trainer attribute: value}`` for the variables set in ``environ``; positive integers only."""
    overrides = {}
    for variable, attribute in TRAINING_LENGTH_VARIABLES.items():
        raw = environ.get(variable)
        if raw is None or raw.strip() == '':
            continue
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"environment variable {variable}={raw!r} is not an integer") from None
        if value < 1:
            raise ValueError(f"environment variable {variable}={raw!r} must be >= 1")
        overrides[attribute] = value
    return overrides


class TrainingLengthFromEnvMixin:
    """Applies ``training_length_overrides()`` right after nnU-Net's ``__init__`` (before the
    learning-rate schedule is built, which depends on ``num_epochs``), and, once at training start,
    checks the built network against the memory its plans were sized for
    (:func:`nnunet_ext.training.memory_check.check_memory_target`: a warning in the training log and
    on stderr, naming the planner to run, when it needs more than ``memory_check_threshold`` times
    that; ``None`` turns the check off). It also refuses a 2.5D-stacked dataset on a configuration that
    does not slice along its stacking axis (``slice_stack.check_training_configuration``). Every trainer
    of this package includes this mixin."""

    memory_check_threshold = DEFAULT_THRESHOLD

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        # exact signature of nnUNetTrainer.__init__: it records its arguments by inspecting it
        super().__init__(plans, configuration, fold, dataset_json, device)
        check_training_configuration(dataset_json, self.plans_manager.transpose_forward,
                                     len(self.configuration_manager.patch_size), configuration)
        overrides = training_length_overrides()
        for attribute, value in overrides.items():
            setattr(self, attribute, value)
        if overrides:
            self.print_to_log_file(f"nnunet-ext: training length from environment: {overrides}")

    def on_train_start(self):
        super().on_train_start()  # nnU-Net's: initialize() (builds the network), data loaders, plans printed
        if self.memory_check_threshold is not None:
            check_memory_target(self, self.memory_check_threshold)
