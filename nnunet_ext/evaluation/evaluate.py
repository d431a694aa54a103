"""``nnunet-ext evaluate``: a folder of predictions against a folder of references, per case and class.

Files are read with nnU-Net's own reader for the file ending (``.nii.gz``, ``.png``, ``.tif``, ...) and
matched by name; the voxel spacing is the reader's ``spacing`` property of the reference (the
prediction's must agree). The classes and the ignore label come from ``nnUNet_raw/DATASET/dataset.json``
(labels, or regions in region-based datasets) when a dataset is given; otherwise the classes are the
label values > 0 found in the references, or the labels the caller names. Cases run in parallel. The
summary JSON (per case and class metrics, per class statistics, the conventions, the arguments) is
written atomically: a failed run leaves no file behind.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_ext import __version__
from nnunet_ext.errors import UserInputError, name_some
from nnunet_ext.evaluation.metrics import EvaluatedClass, case_metrics, conventions
from nnunet_ext.evaluation.summary import aggregate, nan_to_none
from nnunet_ext.parallel import run_cases

__all__ = ["DEFAULT_SUMMARY_NAME", "DatasetLabels", "evaluate_folders", "dataset_labels", "hd95_conventions",
           "write_json_atomic"]

DEFAULT_SUMMARY_NAME = "summary_nnunet_ext.json"
SPACING_RTOL = 1e-3


@dataclass(frozen=True)
class DatasetLabels:
    """What ``dataset.json`` says about evaluation: the classes (labels or regions), the ignore
    label and the file ending."""
    name: str
    classes: Tuple[EvaluatedClass, ...]
    ignore_label: Optional[int]
    file_ending: str
    has_regions: bool
    dataset_json: dict


def dataset_labels(dataset: str) -> DatasetLabels:
    """Reads ``$nnUNet_raw/DatasetNNN_NAME/dataset.json`` of a dataset id or name."""
    if not os.environ.get('nnUNet_raw'):
        raise UserInputError('nnUNet_raw is not set (needed for -d); run: eval "$(nnunet-ext env --root DIR)", '
                             'or leave out -d')
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:
        raise UserInputError(f"-d {dataset}: {e}") from None
    path = os.path.join(os.environ['nnUNet_raw'], name, 'dataset.json')
    if not os.path.isfile(path):
        raise UserInputError(f"-d {dataset}: {path} does not exist (evaluate reads the raw dataset's dataset.json)")
    with open(path, encoding='utf-8') as f:
        dataset_json = json.load(f)
    for key in ('labels', 'file_ending'):
        if key not in dataset_json:
            raise UserInputError(f"{path} has no {key!r} entry")
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    try:
        manager = LabelManager(dataset_json['labels'], dataset_json.get('regions_class_order'))
    except (AssertionError, RuntimeError, ValueError, TypeError) as e:
        raise UserInputError(f"{path}: nnU-Net rejects its labels: {e}") from None
    classes = []
    for key, value in dataset_json['labels'].items():
        if key == 'ignore':
            continue
        labels = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)
        if set(labels) == {0}:
            continue  # background
        classes.append(EvaluatedClass(str(key), labels if manager.has_regions else labels[:1]))
    if not manager.has_regions:
        classes.sort(key=lambda c: c.labels[0])
    return DatasetLabels(name, tuple(classes), manager.ignore_label, dataset_json['file_ending'],
                         manager.has_regions, dataset_json)


def _supported_endings() -> List[str]:
    from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES
    endings = {e.lower() for rw in LIST_OF_IO_CLASSES for e in rw.supported_file_endings}
    return sorted(endings, key=len, reverse=True)  # '.nii.gz' before '.gz'


def _infer_file_ending(folder: str) -> str:
    endings = _supported_endings()
    found = {}
    for name in sorted(os.listdir(folder)):
        if os.path.isfile(os.path.join(folder, name)):
            ending = next((e for e in endings if name.lower().endswith(e)), None)
            if ending is not None:
                found.setdefault(name[-len(ending):], []).append(name)  # as spelled in the folder
    if not found:
        raise UserInputError(f"{folder} holds no image files nnU-Net can read (endings: {', '.join(endings)})")
    if len(found) > 1:
        raise UserInputError(f"{folder} holds files of several endings ({', '.join(sorted(found))}); give -d "
                             f"DATASET to take the file ending from its dataset.json")
    return next(iter(found))


def case_files(folder: str, file_ending: str) -> Dict[str, str]:
    """``{case: path}`` of the files in ``folder`` ending in ``file_ending``."""
    return {name[:-len(file_ending)]: os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if name.endswith(file_ending) and len(name) > len(file_ending)
            and os.path.isfile(os.path.join(folder, name))}


def _match_cases(pred_folder: str, ref_folder: str, file_ending: str) -> List[Tuple[str, str, str]]:
    preds, refs = case_files(pred_folder, file_ending), case_files(ref_folder, file_ending)
    if not refs:
        raise UserInputError(f"no {file_ending} files in the reference folder {ref_folder}")
    if not preds:
        raise UserInputError(f"no {file_ending} files in the prediction folder {pred_folder}")
    problems = []
    if set(preds) - set(refs):
        problems.append(f"predictions without a reference in {ref_folder}: {name_some(set(preds) - set(refs))}")
    if set(refs) - set(preds):
        problems.append(f"references without a prediction in {pred_folder}: {name_some(set(refs) - set(preds))}")
    if problems:
        raise UserInputError("cases do not match (by file name, ending " + file_ending + "): " + "; ".join(problems))
    return [(case, preds[case], refs[case]) for case in sorted(refs)]


def _read(reader_class, path: str) -> Tuple[np.ndarray, Tuple[float, ...]]:
    segmentation, properties = reader_class().read_seg(path)
    if segmentation.shape[0] != 1:
        raise UserInputError(f"{path}: a segmentation must have one channel, got shape {segmentation.shape}")
    return segmentation[0], tuple(float(s) for s in properties['spacing'])


def _reference_labels(reader_class, path: str) -> List[int]:
    return [int(v) for v in np.unique(_read(reader_class, path)[0])]


def evaluate_case(case: str, pred_file: str, ref_file: str, reader_class, classes: Sequence[EvaluatedClass],
                   ignore_label: Optional[int], hd95: str = "pooled") -> dict:
    pred, pred_spacing = _read(reader_class, pred_file)
    ref, spacing = _read(reader_class, ref_file)
    if pred.shape != ref.shape:
        raise UserInputError(f"case {case}: prediction {pred_file} has shape {pred.shape}, reference {ref_file} "
                             f"has shape {ref.shape}")
    if not np.allclose(pred_spacing, spacing, rtol=SPACING_RTOL, atol=0):
        raise UserInputError(f"case {case}: prediction spacing {pred_spacing} != reference spacing {spacing} "
                             f"(relative tolerance {SPACING_RTOL})")
    return {"case": case, "prediction_file": os.path.abspath(pred_file),
            "reference_file": os.path.abspath(ref_file), "shape": list(ref.shape), "spacing": list(spacing),
            "metrics": case_metrics(pred, ref, classes, spacing, ignore_label, hd95)}


def hd95_conventions(hd95: str) -> dict:
    """The summary's conventions for the HD95 definition ``hd95``; an unknown one is the user's error."""
    try:
        return conventions(hd95)
    except ValueError as e:
        raise UserInputError(f"--hd95: {e}") from None


def write_json_atomic(content: dict, path: str) -> None:
    """Writes strict JSON (NaN as null) to a temporary file beside ``path``, then renames it."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(handle, 'w', encoding='utf-8') as f:
            json.dump(nan_to_none(content), f, indent=2, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _classes_from_labels(labels: Sequence[int], known: Optional[DatasetLabels]) -> Tuple[EvaluatedClass, ...]:
    if len(set(labels)) != len(labels):
        raise UserInputError(f"--labels {' '.join(map(str, labels))}: a label is given twice")
    if any(v <= 0 for v in labels):
        raise UserInputError(f"--labels {' '.join(map(str, labels))}: labels must be > 0 (0 is background)")
    if known is None:
        return tuple(EvaluatedClass(str(v), (v,)) for v in labels)
    names = {c.labels[0]: c.name for c in known.classes if len(c.labels) == 1}
    valid = {label for c in known.classes for label in c.labels}
    unknown = [v for v in labels if v not in valid]
    if unknown:
        raise UserInputError(f"--labels: {unknown} not among the labels of {known.name} ({sorted(valid)})")
    return tuple(EvaluatedClass(names.get(v, str(v)), (v,)) for v in labels)


def evaluate_folders(pred_folder: str, ref_folder: str, dataset: Optional[str] = None,
                     output_file: Optional[str] = None, num_processes: int = 2,
                     labels: Optional[Sequence[int]] = None, arguments: Optional[dict] = None,
                     progress: bool = True, log=print, hd95: str = "pooled") -> dict:
    """Evaluates every case of ``pred_folder`` against ``ref_folder``; writes and returns the summary.

    Args:
        dataset: nnU-Net dataset id or name: classes (labels or regions), ignore label and file ending
            from ``$nnUNet_raw/<dataset>/dataset.json``. Without it: the file ending is inferred from
            the reference folder, there is no ignore label, and the classes are ``labels`` or else the
            label values > 0 found in the references.
        output_file: the summary JSON (default ``pred_folder/summary_nnunet_ext.json``).
        labels: evaluate these labels (each its own class) instead of the dataset's classes.
        arguments: recorded in the summary as ``arguments`` (the command line's options).
        log: receives the lines to show the user (which classes, which reader).
        hd95: ``'pooled'`` (MedPy) or ``'max'`` (MONAI, surface-distance); recorded as ``hd95``.
    """
    for role, folder in (('prediction', pred_folder), ('reference', ref_folder)):
        if not os.path.isdir(folder):
            raise UserInputError(f"{role} folder {folder} does not exist or is not a folder")
    if num_processes < 1:
        raise UserInputError(f"-np must be >= 1, got {num_processes}")
    summary_conventions = hd95_conventions(hd95)
    output_file = output_file or os.path.join(pred_folder, DEFAULT_SUMMARY_NAME)
    if os.path.isdir(output_file):
        raise UserInputError(f"output {output_file} is a folder; give a file name (-o summary.json)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(output_file))):
        raise UserInputError(f"the folder of the output {output_file} does not exist")

    known = dataset_labels(dataset) if dataset is not None else None
    file_ending = known.file_ending if known is not None else _infer_file_ending(ref_folder)
    cases = _match_cases(pred_folder, ref_folder, file_ending)

    from nnunetv2.imageio.reader_writer_registry import (determine_reader_writer_from_dataset_json,
                                                         determine_reader_writer_from_file_ending)
    try:
        if known is not None:
            reader_class = determine_reader_writer_from_dataset_json(known.dataset_json, cases[0][2], verbose=False)
        else:
            reader_class = determine_reader_writer_from_file_ending(file_ending, cases[0][2], verbose=False)
    except RuntimeError as e:
        raise UserInputError(f"no nnU-Net reader opens {cases[0][2]}: {e}") from None
    log(f"{len(cases)} cases, file ending {file_ending}, reader {reader_class.__name__}")

    ignore_label = known.ignore_label if known is not None else None
    if labels:
        classes = _classes_from_labels([int(v) for v in labels], known)
        source = "--labels"
    elif known is not None:
        classes = known.classes
        source = f"dataset.json of {known.name} ({'regions' if known.has_regions else 'labels'})"
    else:
        found = run_cases(_reference_labels, [(reader_class, ref) for _, _, ref in cases], num_processes, 'labels',
                          progress)
        values = sorted({v for case_values in found for v in case_values if v > 0})
        if not values:
            raise UserInputError(f"the references in {ref_folder} hold no label > 0; give --labels to evaluate "
                                 f"some anyway")
        classes = tuple(EvaluatedClass(str(v), (v,)) for v in values)
        source = "label values > 0 found in the references (no -d DATASET, no --labels)"
    described = [c.name if c.name == str(c.labels[0]) and not c.is_region
                 else f"{c.name} ({'+'.join(map(str, c.labels))})" for c in classes]
    log(f"classes: {', '.join(described)} [{source}]"
        + (f"; voxels with the ignore label {ignore_label} are not evaluated" if ignore_label is not None else ""))

    per_case = run_cases(evaluate_case, [(case, pred, ref, reader_class, classes, ignore_label, hd95)
                                          for case, pred, ref in cases], num_processes, 'evaluate', progress)
    class_names = [c.name for c in classes]
    summary = {
        "nnunet_ext_version": __version__,
        "arguments": arguments if arguments is not None else {
            "pred_folder": pred_folder, "ref_folder": ref_folder, "dataset": dataset, "output_file": output_file,
            "num_processes": num_processes, "labels": list(labels) if labels else None, "hd95": hd95},
        "output_file": os.path.abspath(output_file),
        "prediction_folder": os.path.abspath(pred_folder),
        "reference_folder": os.path.abspath(ref_folder),
        "dataset": known.name if known is not None else None,
        "file_ending": file_ending,
        "reader": reader_class.__name__,
        "classes": [{"name": c.name, "labels": list(c.labels), "region": c.is_region} for c in classes],
        "classes_source": source,
        "ignore_label": ignore_label,
        "hd95": hd95,
        "conventions": summary_conventions,
        "per_class": aggregate([c["metrics"] for c in per_case], class_names),
        "metric_per_case": per_case,
    }
    write_json_atomic(summary, output_file)
    return summary
