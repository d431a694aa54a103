"""Reading the segmentations that ``nnunet-ext evaluate`` and ``compare`` score, and refusing, as a
:class:`~nnunet_ext.errors.UserInputError` naming the case and the file, those that cannot be scored
(``docs/commands/evaluate-compare.md``, "What is refused"):

* :func:`~nnunet_ext.file_checks.check_complete_file` (shared with the converters): an empty, truncated or
  corrupt file.
* :func:`read_segmentation`: nnU-Net's reader's failure, more than one channel, a spacing that is not
  positive and finite.
* :func:`check_label_values`: non-integer values (NaN and infinity included; nnU-Net's readers return
  float32 arrays, so a float file holding whole numbers only, 1.0, is accepted as those labels), and, where
  the labels are known (``dataset.json``), values it does not list.
* :func:`choose_reader`: nnU-Net's choice of reader for a file ending, which tries an example file and
  prints a traceback for every reader that fails; here silenced, and a failure is one line.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from nnunet_ext.errors import UserInputError
from nnunet_ext.file_checks import allowed_values, check_complete_file, last_line, one_line

__all__ = ["LabelRule", "one_line", "check_complete_file", "read_segmentation", "check_label_values",
           "choose_reader", "allowed_values"]



@dataclass(frozen=True)
class LabelRule:
    """The label values a segmentation may hold: ``allowed`` (every value of ``dataset.json``'s labels:
    background, classes, region members, the ignore label), named in messages as ``listed_by``, with
    ``hint`` (what to do) at the end of the message."""
    allowed: Tuple[int, ...]
    listed_by: str
    hint: str


def read_segmentation(reader_class, path: str, what: str) -> Tuple[np.ndarray, Tuple[float, ...]]:
    """``(label map, spacing)`` of one file, complete (:func:`check_complete_file`), read with nnU-Net's
    ``reader_class`` (one channel; the spacing positive and finite)."""
    check_complete_file(path, what)
    try:
        segmentation, properties = reader_class().read_seg(path)
        spacing = tuple(float(s) for s in properties["spacing"])
    except MemoryError:
        raise
    except Exception as e:  # the readers (SimpleITK, nibabel, tifffile, scikit-image) raise anything
        raise UserInputError(f"{what} {path}: nnU-Net's {reader_class.__name__} cannot read it ({last_line(e)}); "
                             f"is it an image of this file type?") from None
    if segmentation.ndim < 1 or segmentation.shape[0] != 1:
        raise UserInputError(f"{what} {path}: a segmentation must have one channel, got shape {segmentation.shape}")
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise UserInputError(f"{what} {path} has the voxel spacing {spacing}: every spacing must be a positive "
                             f"finite number (mm); fix the file's header")
    return segmentation[0], spacing


def _values(values: np.ndarray) -> str:
    return ", ".join(f"{v:g}" for v in values)


def _voxels(count: int) -> str:
    return f"{count} voxel{'' if count == 1 else 's'}"


def check_label_values(segmentation: np.ndarray, path: str, what: str, rule: Optional[LabelRule] = None) -> None:
    """Refuses non-integer values, and values that ``rule`` does not allow (module docstring)."""
    values = segmentation
    if segmentation.dtype.kind == "f":
        with np.errstate(invalid="ignore"):  # NaN and infinity become some integer: they differ from it
            values = segmentation.astype(np.int32)
            whole = values == segmentation
        if not whole.all():
            bad = segmentation[~whole]
            raise UserInputError(f"{what} {path} holds {_voxels(bad.size)} with non-integer values (e.g. "
                                 f"{_values(np.unique(bad)[:3])}): not a label map (probabilities? resampled with "
                                 f"linear interpolation?); give it integer labels")
    if rule is None or values.size == 0:
        return
    low, high = int(values.min()), int(values.max())
    if low >= 0 and high < 1 << 16:  # label maps: one counting pass instead of a sort
        counts = np.bincount(values.ravel().astype(np.intp, copy=False), minlength=high + 1)
        present = np.flatnonzero(counts)
    else:
        present, counts = np.unique(values, return_counts=True)
        counts = dict(zip(present.tolist(), counts.tolist()))
    unexpected = [int(v) for v in present if int(v) not in rule.allowed]
    if unexpected:
        voxels = sum(int(counts[v]) for v in unexpected)
        raise UserInputError(f"{what} {path} holds label values {_values(np.array(unexpected))} ({_voxels(voxels)}) "
                             f"that {rule.listed_by} does not list (it lists {_values(np.array(rule.allowed))}); "
                             f"{rule.hint}")


def choose_reader(file_ending: str, example: str, what: str, dataset_json: Optional[dict] = None):
    """nnU-Net's reader class for ``file_ending`` (or ``dataset_json``'s choice), tried on the complete file
    ``example``: nnU-Net's own choice, without the tracebacks it prints for every reader that fails."""
    check_complete_file(example, what)
    from nnunetv2.imageio.reader_writer_registry import (determine_reader_writer_from_dataset_json,
                                                         determine_reader_writer_from_file_ending)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed), contextlib.redirect_stdout(printed):
            if dataset_json is not None:
                return determine_reader_writer_from_dataset_json(dataset_json, example, verbose=False)
            return determine_reader_writer_from_file_ending(file_ending, example, verbose=False)
    except RuntimeError:
        lines = [line.strip() for line in printed.getvalue().splitlines() if line.strip()]
        reason = f" (the last one: {lines[-1]})" if lines else ""
        raise UserInputError(f"{what} {example}: no nnU-Net reader for {file_ending} opens it{reason}; is it an "
                             f"image of this file type?") from None
