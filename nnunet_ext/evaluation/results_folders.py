"""What nnU-Net's training left in ``$nnUNet_results``: the trainer folders of a dataset, and per fold
its validation predictions, its checkpoint and the training curves stored in that checkpoint.

nnU-Net 2.8.1 writes, per trainer, plans and configuration,
``$nnUNet_results/DatasetNNN_NAME/TRAINER__PLANS__CONFIG/fold_F/`` with

* ``validation/CASE<file ending>``: the final validation predictions of the fold's validation cases
  (``splits_final.json`` in ``$nnUNet_preprocessed/DatasetNNN_NAME``), at the original geometry;
  their references are ``$nnUNet_preprocessed/DatasetNNN_NAME/gt_segmentations`` (what nnU-Net's own
  validation compares with);
* ``checkpoint_final.pth`` after training (``checkpoint_latest.pth`` while it runs); its ``'logging'``
  entry is ``nnUNetLogger``'s per-epoch lists (``train_losses``, ``val_losses``, ``mean_fg_dice``: the
  pseudo-Dice on validation patches, ``ema_fg_dice``: its moving average, ...).

Nothing is skipped silently: :class:`FoldRun` lists what is missing, and the report prints it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from nnunet_ext.errors import UserInputError, name_some
from nnunet_ext.evaluation.evaluate import case_files

__all__ = ["CURVE_KEYS", "FoldRun", "trainer_folder", "find_trainers", "read_validation_splits", "inspect_fold",
           "read_training_curves"]

#: The per-epoch lists of nnU-Net's logger that the report plots.
CURVE_KEYS = ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice")
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth")


def trainer_folder(results_dataset_folder: str, trainer: str, plans: str, configuration: str) -> str:
    return os.path.join(results_dataset_folder, f"{trainer}__{plans}__{configuration}")


def find_trainers(results_dataset_folder: str, plans: str, configuration: str) -> List[str]:
    """Names of the trainers with a ``TRAINER__PLANS__CONFIG`` folder, sorted."""
    suffix = f"__{plans}__{configuration}"
    if not os.path.isdir(results_dataset_folder):
        return []
    return sorted(name[:-len(suffix)] for name in os.listdir(results_dataset_folder)
                  if name.endswith(suffix) and len(name) > len(suffix)
                  and os.path.isdir(os.path.join(results_dataset_folder, name)))


def read_validation_splits(preprocessed_dataset_folder: str) -> Optional[List[List[str]]]:
    """The validation cases of each fold from ``splits_final.json``, or None when there is none."""
    path = os.path.join(preprocessed_dataset_folder, "splits_final.json")
    if not os.path.exists(path):
        return None
    if not os.path.isfile(path):
        raise UserInputError(f"{path} is not a file (nnU-Net's splits of the cross-validation); remove it, or put "
                             f"the splits file there")
    try:
        with open(path, encoding="utf-8") as f:
            splits = json.load(f)
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserInputError(f"{path} is not readable JSON ({' '.join(str(e).split())}); nnU-Net writes it at the "
                             f"first training (remove it to have it written again)") from None
    if not isinstance(splits, list) or not all(isinstance(s, dict) and isinstance(s.get("val"), list)
                                               and all(isinstance(c, str) for c in s["val"]) for s in splits):
        raise UserInputError(f"{path} is not nnU-Net's splits file (a list of {{'train': [...], 'val': [...]}} "
                             f"with case names)")
    return [sorted(s["val"]) for s in splits]


@dataclass
class FoldRun:
    """One fold of one trainer: what exists, what will be evaluated, what is missing."""
    trainer: str
    fold: int
    folder: str
    exists: bool
    #: case -> validation prediction file, for the cases that will be evaluated
    predictions: Dict[str, str] = field(default_factory=dict)
    #: the fold's validation cases (splits_final.json), None when the split file does not list this fold
    expected: Optional[Tuple[str, ...]] = None
    #: expected cases without a prediction
    missing_predictions: Tuple[str, ...] = ()
    #: predictions of cases that are not validation cases of this fold (not evaluated)
    unexpected_predictions: Tuple[str, ...] = ()
    #: predictions without a reference in gt_segmentations (not evaluated)
    without_reference: Tuple[str, ...] = ()
    has_validation_folder: bool = False
    checkpoint: Optional[str] = None

    @property
    def checkpoint_name(self) -> Optional[str]:
        return None if self.checkpoint is None else os.path.basename(self.checkpoint)

    @property
    def evaluated(self) -> bool:
        return bool(self.predictions)

    def problems(self) -> List[str]:
        """One line per thing that is missing or left out (empty when the fold is complete)."""
        where = f"{self.trainer} fold {self.fold}"
        if not self.exists:
            return [f"{where}: missing (no folder {self.folder})"]
        lines = []
        if not self.has_validation_folder:
            lines.append(f"{where}: no validation predictions (no folder {os.path.join(self.folder, 'validation')}; "
                         f"training unfinished, or validation not run: nnUNetv2_train ... --val)")
        elif not (self.predictions or self.missing_predictions or self.unexpected_predictions
                  or self.without_reference):
            lines.append(f"{where}: the validation folder holds no prediction")
        if self.has_validation_folder and self.missing_predictions:
            total = len(self.expected) if self.expected is not None else len(self.missing_predictions)
            lines.append(f"{where}: validation predictions missing for {len(self.missing_predictions)} of {total} "
                         f"validation cases: {name_some(self.missing_predictions, 8)}")
        if self.expected is None and self.has_validation_folder:
            lines.append(f"{where}: splits_final.json does not list this fold; evaluated the predictions found "
                         f"without knowing which cases were expected")
        if self.unexpected_predictions:
            lines.append(f"{where}: not evaluated, not validation cases of this fold (splits_final.json): "
                         f"{name_some(self.unexpected_predictions, 8)}")
        if self.without_reference:
            lines.append(f"{where}: not evaluated, no reference in gt_segmentations: "
                         f"{name_some(self.without_reference, 8)}")
        if self.checkpoint is None:
            lines.append(f"{where}: no checkpoint ({' / '.join(CHECKPOINTS)}): no training curves")
        elif self.checkpoint_name != CHECKPOINTS[0]:
            lines.append(f"{where}: training unfinished (no {CHECKPOINTS[0]}): curves from {self.checkpoint_name}")
        return lines


def inspect_fold(folder: str, trainer: str, fold: int, expected: Optional[Sequence[str]], references: Dict[str, str],
                 file_ending: str) -> FoldRun:
    """What ``folder`` (``.../TRAINER__PLANS__CONFIG/fold_F``) holds.

    Args:
        expected: the fold's validation cases (None: unknown, every prediction with a reference counts).
        references: case -> reference file (gt_segmentations).
    """
    run = FoldRun(trainer, fold, folder, os.path.isdir(folder),
                  expected=None if expected is None else tuple(sorted(expected)))
    if not run.exists:
        return run
    run.checkpoint = next((os.path.join(folder, name) for name in CHECKPOINTS
                           if os.path.isfile(os.path.join(folder, name))), None)
    validation = os.path.join(folder, "validation")
    run.has_validation_folder = os.path.isdir(validation)
    found = case_files(validation, file_ending) if run.has_validation_folder else {}
    wanted = set(found) if expected is None else set(expected)
    run.unexpected_predictions = tuple(sorted(set(found) - wanted))
    run.missing_predictions = tuple(sorted(wanted - set(found)))
    usable = sorted(set(found) & wanted)
    run.without_reference = tuple(case for case in usable if case not in references)
    run.predictions = {case: found[case] for case in usable if case in references}
    return run


def read_training_curves(checkpoint: str) -> Dict[str, List[float]]:
    """``{key: per-epoch values}`` for :data:`CURVE_KEYS` from a checkpoint's ``'logging'`` entry.

    The checkpoint is a pickle (nnU-Net saves and loads it with ``weights_only=False``); read only
    checkpoints of your own trainings."""
    import torch
    try:
        content = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except MemoryError:
        raise
    except Exception as e:  # a truncated or foreign file: say which one, in one line
        raise UserInputError(f"cannot read the checkpoint {checkpoint}: {type(e).__name__}: "
                             f"{' '.join(str(e).split())[:300]}; remove it (no curves) or copy it again") from None
    logging = content.get("logging") if isinstance(content, dict) else None
    if not isinstance(logging, dict):
        raise UserInputError(f"{checkpoint} has no 'logging' entry (not an nnU-Net v2 checkpoint?)")
    missing = [key for key in CURVE_KEYS if key not in logging]
    if missing:
        raise UserInputError(f"{checkpoint}: its 'logging' entry lacks {', '.join(missing)}")
    curves = {}
    for key in CURVE_KEYS:
        try:
            curves[key] = [float(v) for v in logging[key]]
        except (TypeError, ValueError):
            raise UserInputError(f"{checkpoint}: its 'logging' entry {key!r} is not a list of numbers (not an "
                                 f"nnU-Net v2 checkpoint?)") from None
    return curves
