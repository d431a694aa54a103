"""``nnunet-ext evaluate``: a folder of predictions against a folder of references, per case and class.

Files are read with nnU-Net's own reader for the file ending (``.nii.gz``, ``.png``, ``.tif``, ...) and
matched by name; the voxel spacing is the reader's ``spacing`` property of the reference (the
prediction's must agree). The classes and the ignore label come from ``nnUNet_raw/DATASET/dataset.json``
(labels, or regions in region-based datasets) when a dataset is given; otherwise the classes are the
label values > 0 found in the references, or the labels the caller names. Cases run in parallel. The
summary JSON (per case and class metrics, per class statistics, the conventions, the arguments) is
written atomically: a failed run leaves no file behind.

Every file is checked before it is scored (:mod:`nnunet_ext.evaluation.segmentation_files`): complete (a
truncated ``.nii.gz`` is refused, not read half-zero), readable, integer-valued, and, with a dataset, holding
only the label values its ``dataset.json`` lists; every mistake of the user is a ``UserInputError``.
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
from nnunet_ext.evaluation.segmentation_files import (LabelRule, allowed_values, check_label_values, choose_reader,
                                                      one_line, read_segmentation)
from nnunet_ext.evaluation.summary import aggregate, nan_to_none
from nnunet_ext.parallel import run_cases

__all__ = ["DEFAULT_SUMMARY_NAME", "DatasetLabels", "evaluate_folders", "evaluate_case", "dataset_labels",
           "find_dataset", "hd95_conventions", "write_json_atomic"]

DEFAULT_SUMMARY_NAME = "summary_nnunet_ext.json"
SPACING_RTOL = 1e-3


@dataclass(frozen=True)
class DatasetLabels:
    """What ``dataset.json`` says about evaluation: the classes (labels or regions), the ignore
    label, the file ending, and every label value it lists (``values``: background, classes, region
    members, the ignore label: what a segmentation of the dataset may hold)."""
    name: str
    classes: Tuple[EvaluatedClass, ...]
    ignore_label: Optional[int]
    file_ending: str
    has_regions: bool
    dataset_json: dict
    values: Tuple[int, ...] = ()

    def label_rule(self, hint: str) -> LabelRule:
        return LabelRule(self.values, f"the dataset.json of {self.name}", hint)


_DATASET_VARIABLES = ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')


def find_dataset(dataset: str, what: str) -> str:
    """nnU-Net's ``DatasetNNN_NAME`` of a dataset id or name; a ``UserInputError`` starting with ``what``
    (and naming the datasets there) when nnU-Net finds none."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        return maybe_convert_to_dataset_name(dataset)
    except Exception:  # RuntimeError (no such id), ValueError (neither an id nor a name), ...
        found = {name for variable in _DATASET_VARIABLES if os.path.isdir(os.environ.get(variable) or '')
                 for name in os.listdir(os.environ[variable]) if name.startswith('Dataset')}
        raise UserInputError(f"{what}: no dataset {dataset} in $nnUNet_raw, $nnUNet_preprocessed or $nnUNet_results "
                             f"(datasets there: {name_some(found) or 'none'}); give a dataset id (501) or name "
                             f"(Dataset501_NAME)") from None


def _read_dataset_json(path: str, what: str) -> dict:
    if not os.path.exists(path):
        raise UserInputError(f"{what}: {path} does not exist (the raw dataset's dataset.json lists the labels)")
    if not os.path.isfile(path):
        raise UserInputError(f"{what}: {path} is not a file (the raw dataset's dataset.json lists the labels)")
    try:
        with open(path, encoding='utf-8') as f:
            content = json.load(f)
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserInputError(f"{path} is not readable JSON ({one_line(e)}); fix it (nnU-Net reads it too)") from None
    if not isinstance(content, dict):
        raise UserInputError(f"{path} holds a JSON {type(content).__name__}, not nnU-Net's dataset.json (an object "
                             f"with 'labels', 'file_ending', ...)")
    return content


def dataset_labels(dataset: str, option: str = '-d') -> DatasetLabels:
    """Reads ``$nnUNet_raw/DatasetNNN_NAME/dataset.json`` of a dataset id or name; ``option`` names the
    argument in messages (``-d`` of evaluate, ``dataset`` of compare)."""
    if not os.environ.get('nnUNet_raw'):
        if option == '-d':
            raise UserInputError('nnUNet_raw is not set (needed for -d); run: eval "$(nnunet-ext env --root DIR)", '
                                 'or leave out -d')
        raise UserInputError('nnUNet_raw is not set (the classes come from the raw dataset\'s dataset.json); run: '
                             'eval "$(nnunet-ext env --root DIR)"')
    what = f"{option} {dataset}"
    name = find_dataset(dataset, what)
    path = os.path.join(os.environ['nnUNet_raw'], name, 'dataset.json')
    dataset_json = _read_dataset_json(path, what)
    if 'labels' not in dataset_json:
        raise UserInputError(f"{path} has no 'labels' entry; nnU-Net's dataset.json lists the labels as "
                             f'"labels": {{"background": 0, "CLASS": 1, ...}}')
    if 'file_ending' not in dataset_json:
        raise UserInputError(f"{path} has no 'file_ending' entry (the ending of its image files, e.g. \".nii.gz\")")
    labels, file_ending = dataset_json['labels'], dataset_json['file_ending']
    if not isinstance(labels, dict) or not labels:
        raise UserInputError(f"{path}: 'labels' must map names to label values, as "
                             f"{{\"background\": 0, \"CLASS\": 1}}; it is {one_line(json.dumps(labels))[:80]}")
    if not isinstance(file_ending, str) or not file_ending.startswith('.'):
        raise UserInputError(f"{path}: 'file_ending' must be a file ending such as \".nii.gz\", it is "
                             f"{json.dumps(file_ending)[:40]}")
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    try:
        manager = LabelManager(labels, dataset_json.get('regions_class_order'))
        values = allowed_values(labels.values())
        classes = []
        for key, value in labels.items():
            if key == 'ignore':
                continue
            members = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)
            if set(members) == {0}:
                continue  # background
            classes.append(EvaluatedClass(str(key), members if manager.has_regions else members[:1]))
    except MemoryError:
        raise
    except Exception as e:  # nnU-Net's checks raise AssertionError, RuntimeError, ...; int() ValueError, TypeError
        raise UserInputError(f"{path}: nnU-Net rejects its labels: {one_line(e) or type(e).__name__}") from None
    if not classes:
        raise UserInputError(f"{path} lists no label besides background{' and ignore' if 'ignore' in labels else ''}: "
                             f"nothing to evaluate; list the classes in its 'labels'")
    if not manager.has_regions:
        classes.sort(key=lambda c: c.labels[0])
    return DatasetLabels(name, tuple(classes), manager.ignore_label, file_ending, manager.has_regions, dataset_json,
                         values)


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


def _reference_labels(case: str, reader_class, path: str) -> List[int]:
    reference, _ = read_segmentation(reader_class, path, f"case {case}: reference")
    check_label_values(reference, path, f"case {case}: reference")
    return [int(v) for v in np.unique(reference)]


def _mm(spacing: Sequence[float]) -> str:
    return "(" + ", ".join(f"{s:.6g}" for s in spacing) + ")"


def evaluate_case(case: str, pred_file: str, ref_file: str, reader_class, classes: Sequence[EvaluatedClass],
                  ignore_label: Optional[int], hd95: str = "pooled", rule: Optional[LabelRule] = None) -> dict:
    """Metrics of one case; both files complete, readable, integer-valued and (with ``rule``) holding only
    the listed label values, of one shape and spacing (else a ``UserInputError`` naming case and file)."""
    files = {"prediction": pred_file, "reference": ref_file}
    read = {}
    for role, path in files.items():
        what = f"case {case}: {role}"
        read[role] = read_segmentation(reader_class, path, what)
        check_label_values(read[role][0], path, what, rule)
    (pred, pred_spacing), (ref, spacing) = read["prediction"], read["reference"]
    if pred.shape != ref.shape:
        raise UserInputError(f"case {case}: prediction {pred_file} has shape {pred.shape}, reference {ref_file} "
                             f"has shape {ref.shape}")
    if not np.allclose(pred_spacing, spacing, rtol=SPACING_RTOL, atol=0):
        raise UserInputError(f"case {case}: prediction spacing {_mm(pred_spacing)} != reference spacing "
                             f"{_mm(spacing)} (relative tolerance {SPACING_RTOL}): {pred_file} is not on the grid of "
                             f"{ref_file}")
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
    output_folder = os.path.dirname(os.path.abspath(output_file))
    if not os.path.isdir(output_folder):
        raise UserInputError(f"the folder of the output {output_file} does not exist")
    if not os.access(output_folder, os.W_OK | os.X_OK):
        raise UserInputError(f"cannot write the summary {output_file}: no write permission in {output_folder}; "
                             f"give another -o")

    known = dataset_labels(dataset) if dataset is not None else None
    if labels:  # before any file is read: a wrong option is refused at once
        classes = _classes_from_labels([int(v) for v in labels], known)
        source = "--labels"
    file_ending = known.file_ending if known is not None else _infer_file_ending(ref_folder)
    cases = _match_cases(pred_folder, ref_folder, file_ending)
    inputs = {os.path.realpath(path) for _, pred, ref in cases for path in (pred, ref)}
    if os.path.realpath(output_file) in inputs:
        raise UserInputError(f"-o {output_file} is one of the segmentations to evaluate; give another file name "
                             f"(-o summary.json)")
    reader_class = choose_reader(file_ending, cases[0][2], f"case {cases[0][0]}: reference",
                                 known.dataset_json if known is not None else None)
    rule = None if known is None else known.label_rule("segmentations of another dataset, or the wrong -d?")
    log(f"{len(cases)} cases, file ending {file_ending}, reader {reader_class.__name__}")

    ignore_label = known.ignore_label if known is not None else None
    if not labels and known is not None:
        classes = known.classes
        source = f"dataset.json of {known.name} ({'regions' if known.has_regions else 'labels'})"
    elif not labels:
        found = run_cases(_reference_labels, [(case, reader_class, ref) for case, _, ref in cases], num_processes,
                          'labels', progress)
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

    per_case = run_cases(evaluate_case, [(case, pred, ref, reader_class, classes, ignore_label, hd95, rule)
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
        "label_values": list(known.values) if known is not None else None,
        "hd95": hd95,
        "conventions": summary_conventions,
        "per_class": aggregate([c["metrics"] for c in per_case], class_names),
        "metric_per_case": per_case,
    }
    try:
        write_json_atomic(summary, output_file)
    except OSError as e:  # a full disk, a folder made read-only meanwhile: nothing is left behind
        raise UserInputError(f"cannot write the summary {output_file}: {e.strerror or e}") from None
    return summary
