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

from nnunet_ext.training.composition import TrainerMixin

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


class TrainingLengthFromEnvMixin(TrainerMixin):
    """Applies ``training_length_overrides()`` right after nnU-Net's ``__init__`` (before the learning-rate
    schedule is built, which depends on ``num_epochs``), on top of the trainer's own length
    (``_default_training_length()``: nnU-Net's, left as its ``__init__`` set it; a paper recipe's, which
    refines this hook by subclassing, so the environment wins in any order of the bases)."""

    cooperative_hooks = frozenset({'__init__'})

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        # exact signature of nnUNetTrainer.__init__: it records its arguments by inspecting it
        super().__init__(plans, configuration, fold, dataset_json, device)
        for attribute, value in self._default_training_length().items():
            setattr(self, attribute, value)
        overrides = training_length_overrides()
        for attribute, value in overrides.items():
            setattr(self, attribute, value)
        if overrides:
            self.print_to_log_file(f"nnunet-ext: training length from environment: {overrides}")

    def _default_training_length(self) -> dict:
        """``{trainer attribute: value}`` of the trainer's own training length before the environment's
        overrides; empty: nnU-Net's (1000 epochs of 250 + 50 iterations)."""
        return {}
