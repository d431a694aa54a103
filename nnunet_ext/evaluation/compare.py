"""``nnunet-ext compare``: trainers side by side over their cross-validation folds.

For one dataset, configuration and plans, every requested fold of every trainer is inspected
(:mod:`nnunet_ext.evaluation.results_folders`); the fold's validation predictions are evaluated against
``$nnUNet_preprocessed/DATASET/gt_segmentations`` per case and class with the metrics of
``nnunet-ext evaluate`` (same reader, same conventions; classes and ignore label from the raw
dataset's ``dataset.json``). Then, per trainer and class:

* statistics over all evaluated cases of all its folds, pooled (cross-validation folds are disjoint,
  so each training case counts once): ``aggregate`` of :mod:`nnunet_ext.evaluation.summary` (mean,
  population std, median over the non-NaN values);
* per fold, the mean Dice over the fold's cases, and mean ± std (population) of those fold means;
* the paired Wilcoxon signed-rank test of its per-case Dice against ``nnUNetTrainer``'s
  (:mod:`nnunet_ext.evaluation.paired_test`), pairs keyed by (fold, case);
* the training curves of every fold from its checkpoint.

Missing folds, predictions and checkpoints are listed in the report and on stderr. A trainer with no
evaluable fold is an error. The outputs (``report.md``, ``report.html``, ``compare.json``, the PNGs)
are written into a temporary folder beside the output folder and moved into place at the end; a
previous report in the output folder is replaced, any other content is refused.
"""
from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_ext import __version__
from nnunet_ext.errors import UserInputError
from nnunet_ext.evaluation.paired_test import WILCOXON_CONVENTION, paired_wilcoxon
from nnunet_ext.evaluation.results_folders import (FoldRun, find_trainers, inspect_fold, read_training_curves,
                                                   read_validation_splits, trainer_folder)
from nnunet_ext.evaluation.summary import aggregate, nan_to_none

__all__ = ["REFERENCE_TRAINER", "TEST_METRIC", "REPORT_FILES", "CompareResult", "compare", "write_report",
           "check_output_folder", "default_output_folder", "run_compare"]

REFERENCE_TRAINER = "nnUNetTrainer"
TEST_METRIC = "Dice"
DEFAULT_FOLDS = (0, 1, 2, 3, 4)
REPORT_FILES = {"markdown": "report.md", "html": "report.html", "json": "compare.json",
                "boxplot": "dice_boxplot.png", "curves": "training_curves.png"}
TOOL = "nnunet-ext compare"

COMPARE_CONVENTIONS = {
    "references": "$nnUNet_preprocessed/DATASET/gt_segmentations (what nnU-Net's own validation uses)",
    "predictions": "fold_F/validation of each trainer folder: nnU-Net's final validation of that fold, on the "
                   "fold's validation cases of splits_final.json",
    "pooled": "per trainer and class: mean, std (population) and median over all evaluated cases of all its "
              "folds pooled (folds are disjoint, each case counts once); NaN values left out (n_nan)",
    "per_fold": "mean Dice over the cases of one fold (NaN left out); 'over folds': mean and population std of "
                "those fold means",
    "wilcoxon": WILCOXON_CONVENTION + "; metric: Dice; reference trainer: " + REFERENCE_TRAINER,
    "curves": "from each fold's checkpoint_final.pth (checkpoint_latest.pth if training is unfinished), "
              "'logging' entry: one line per fold, x = epoch (nnU-Net's epoch: num_iterations_per_epoch "
              "training iterations, which trainers may set differently)",
}


@dataclass
class CompareResult:
    """What :func:`compare` found and computed; ``content`` is the JSON written as compare.json."""
    content: dict
    runs: Dict[str, List[FoldRun]]

    @property
    def problems(self) -> List[str]:
        return self.content["problems"]


def _dataset_name(dataset: str) -> str:
    for variable in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
        if not os.environ.get(variable):
            raise UserInputError(f'{variable} is not set; run: eval "$(nnunet-ext env --root DIR)"')
    from nnunet_ext.evaluation.evaluate import find_dataset
    return find_dataset(dataset, f"dataset {dataset}")


def default_output_folder(dataset_name: str, configuration: str, plans: str) -> str:
    """``$nnUNet_results/DATASET/compare_CONFIG`` (``compare_PLANS__CONFIG`` for plans other than nnUNetPlans)."""
    suffix = configuration if plans == "nnUNetPlans" else f"{plans}__{configuration}"
    return os.path.join(os.environ["nnUNet_results"], dataset_name, f"compare_{suffix}")


def _trainer_order(trainers: Sequence[str]) -> List[str]:
    """The reference first, the others in the given order."""
    return sorted(trainers, key=lambda t: t != REFERENCE_TRAINER)


def _evaluate_cases(runs: Dict[str, List[FoldRun]], references: Dict[str, str], labels, num_processes: int,
                    progress: bool, hd95: str) -> List[dict]:
    # the case evaluation of `nnunet-ext evaluate` (same reader, file and label checks, spacing check, metrics),
    # over all folds
    from nnunet_ext.evaluation.evaluate import evaluate_case
    from nnunet_ext.evaluation.segmentation_files import choose_reader
    from nnunet_ext.parallel import run_cases
    jobs, keys = [], []
    for trainer, fold_runs in runs.items():
        for run in fold_runs:
            for case, prediction in sorted(run.predictions.items()):
                keys.append((trainer, run.fold))
                jobs.append((case, prediction, references[case]))
    reader_class = choose_reader(labels.file_ending, jobs[0][2], f"case {jobs[0][0]}: reference", labels.dataset_json)
    rule = labels.label_rule("files of another dataset, or its dataset.json edited after training?")
    arguments = [(*job, reader_class, labels.classes, labels.ignore_label, hd95, rule) for job in jobs]
    results = run_cases(evaluate_case, arguments, num_processes, "evaluate", progress)
    return [{"trainer": trainer, "fold": fold, **result} for (trainer, fold), result in zip(keys, results)]


def _fold_means(per_case: List[dict], folds: Sequence[int], class_names: Sequence[str]) -> dict:
    out = {}
    for name in class_names:
        means = {}
        for fold in folds:
            values = np.array([c["metrics"][name][TEST_METRIC] for c in per_case if c["fold"] == fold], float)
            means[str(fold)] = float(np.nanmean(values)) if (~np.isnan(values)).any() else float("nan")
        defined = np.array([v for v in means.values() if not np.isnan(v)], float)
        out[name] = {"per_fold": means,
                     "mean_over_folds": float(defined.mean()) if defined.size else float("nan"),
                     "std_over_folds": float(defined.std()) if defined.size else float("nan"),
                     "n_folds": int(defined.size)}
    return out


def _wilcoxon(per_case: List[dict], trainers: Sequence[str], class_names: Sequence[str]) -> dict:
    if REFERENCE_TRAINER not in trainers:
        return {"skipped": f"{REFERENCE_TRAINER} is not among the compared trainers ({', '.join(trainers)}): "
                           f"no paired tests"}
    if len(trainers) == 1:
        return {"skipped": f"only {REFERENCE_TRAINER}: nothing to test against it"}

    def values(trainer, name):
        return {(c["fold"], c["case"]): c["metrics"][name][TEST_METRIC] for c in per_case if c["trainer"] == trainer}

    return {"reference": REFERENCE_TRAINER, "metric": TEST_METRIC,
            "tests": {trainer: {name: paired_wilcoxon(values(REFERENCE_TRAINER, name), values(trainer, name))
                                for name in class_names}
                      for trainer in trainers if trainer != REFERENCE_TRAINER}}


def compare(dataset: str, configuration: str, trainers: Optional[Sequence[str]] = None, plans: str = "nnUNetPlans",
            folds: Sequence[int] = DEFAULT_FOLDS, num_processes: int = 2, arguments: Optional[dict] = None,
            progress: bool = True, log: Callable[[str], None] = print, hd95: str = "pooled") -> CompareResult:
    """Gathers, evaluates and compares (see the module docstring); writes nothing.

    Args:
        trainers: trainer class names (default: every ``TRAINER__PLANS__CONFIG`` folder of the dataset).
        log: receives the lines for the user (what is compared, and every missing item).
        hd95: ``'pooled'`` (MedPy) or ``'max'`` (MONAI, surface-distance); recorded as ``hd95``.
    """
    if num_processes < 1:
        raise UserInputError(f"-np must be >= 1, got {num_processes}")
    from nnunet_ext.evaluation.evaluate import case_files, dataset_labels, hd95_conventions
    metric_conventions = hd95_conventions(hd95)
    folds = list(dict.fromkeys(int(f) for f in folds))
    if not folds or any(f < 0 for f in folds):
        raise UserInputError(f"-f takes fold numbers >= 0, got {folds}")
    name = _dataset_name(dataset)
    labels = dataset_labels(name, option="dataset")
    results_folder = os.path.join(os.environ["nnUNet_results"], name)
    preprocessed_folder = os.path.join(os.environ["nnUNet_preprocessed"], name)
    found = find_trainers(results_folder, plans, configuration)
    if trainers:
        trainers = list(dict.fromkeys(trainers))
    elif found:
        trainers = found
    else:
        raise UserInputError(f"no trainer folder *__{plans}__{configuration} in {results_folder}; train first "
                             f"(nnUNetv2_train {dataset} {configuration} FOLD -tr TRAINER -p {plans})")
    trainers = _trainer_order(trainers)
    reference_folder = os.path.join(preprocessed_folder, "gt_segmentations")
    if not os.path.isdir(reference_folder):
        raise UserInputError(f"{reference_folder} does not exist (nnUNetv2_plan_and_preprocess writes it; compare "
                             f"evaluates against it)")
    references = case_files(reference_folder, labels.file_ending)
    if not references:
        raise UserInputError(f"{reference_folder} holds no {labels.file_ending} file (nnUNetv2_plan_and_preprocess "
                             f"writes the references there; compare evaluates against them)")
    splits = read_validation_splits(preprocessed_folder)
    log(f"{name}, configuration {configuration}, plans {plans}: trainers {', '.join(trainers)}; folds "
        f"{' '.join(map(str, folds))}; references {reference_folder}")
    problems = [] if splits is not None else [f"{os.path.join(preprocessed_folder, 'splits_final.json')} not found: "
                                              f"the expected validation cases are unknown"]

    runs = {trainer: [inspect_fold(os.path.join(trainer_folder(results_folder, trainer, plans, configuration),
                                                f"fold_{fold}"), trainer, fold,
                                   splits[fold] if splits is not None and fold < len(splits) else None,
                                   references, labels.file_ending) for fold in folds]
            for trainer in trainers}
    problems += [line for trainer in trainers for run in runs[trainer] for line in run.problems()]
    empty = [t for t in trainers if not any(r.evaluated for r in runs[t])]
    if empty:
        detail = "; ".join(line for t in empty for r in runs[t] for line in r.problems()[:1])
        raise UserInputError(f"no validation predictions to evaluate for {', '.join(empty)} in folds "
                             f"{' '.join(map(str, folds))} ({detail}); trainer folders found for {configuration}/"
                             f"{plans}: {', '.join(found) or 'none'}")
    for line in problems:
        log(f"missing: {line}")

    per_case = _evaluate_cases(runs, references, labels, num_processes, progress, hd95)
    class_names = [c.name for c in labels.classes]
    per_trainer = {}
    for trainer in trainers:
        cases = [c for c in per_case if c["trainer"] == trainer]
        evaluated_folds = [r.fold for r in runs[trainer] if r.evaluated]
        per_trainer[trainer] = {"folds": evaluated_folds, "cases": len(cases),
                                "per_class": aggregate([c["metrics"] for c in cases], class_names),
                                "fold_dice": _fold_means(cases, evaluated_folds, class_names)}
    curves = {trainer: {str(r.fold): {"checkpoint": r.checkpoint, **read_training_curves(r.checkpoint)}
                        for r in runs[trainer] if r.checkpoint is not None} for trainer in trainers}
    content = {
        "tool": TOOL, "version": __version__, "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "dataset": name, "configuration": configuration, "plans": plans, "folds": folds, "trainers": trainers,
        "reference_trainer": REFERENCE_TRAINER, "reference_folder": reference_folder,
        "classes": [{"name": c.name, "labels": list(c.labels), "region": c.is_region} for c in labels.classes],
        "ignore_label": labels.ignore_label, "hd95": hd95, "problems": problems,
        "runs": {t: [{"fold": r.fold, "folder": r.folder, "exists": r.exists, "evaluated_cases": sorted(r.predictions),
                      "expected_cases": None if r.expected is None else list(r.expected),
                      "missing_predictions": list(r.missing_predictions), "checkpoint": r.checkpoint,
                      "problems": r.problems()} for r in runs[t]] for t in trainers},
        "per_trainer": per_trainer,
        "wilcoxon": _wilcoxon(per_case, trainers, class_names),
        "curves": curves,
        "per_case": per_case,
        "conventions": {**metric_conventions, **COMPARE_CONVENTIONS},
        "arguments": arguments or {},
    }
    if "skipped" in content["wilcoxon"]:
        log(f"note: {content['wilcoxon']['skipped']}")
    return CompareResult(nan_to_none(content), runs)


def _is_previous_report(folder: str) -> bool:
    entries = os.listdir(folder)
    if not entries:
        return True
    path = os.path.join(folder, REPORT_FILES["json"])
    if not os.path.isfile(path) or not set(entries) <= set(REPORT_FILES.values()):
        return False
    import json
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("tool") == TOOL
    except (OSError, ValueError):
        return False


def check_output_folder(output_folder: str) -> str:
    """The absolute path of a usable output folder: its parent exists, and it does not exist, is empty
    or holds a previous compare report (which will be replaced)."""
    output_folder = os.path.abspath(output_folder)
    if not os.path.isdir(os.path.dirname(output_folder)):
        raise UserInputError(f"the parent folder of the output {output_folder} does not exist")
    if os.path.exists(output_folder) and (not os.path.isdir(output_folder) or not _is_previous_report(output_folder)):
        raise UserInputError(f"{output_folder} exists and is not a previous compare report; choose another -o or "
                             f"remove it")
    if not os.access(os.path.dirname(output_folder), os.W_OK | os.X_OK):
        raise UserInputError(f"cannot write the report {output_folder}: no write permission in its parent folder; "
                             f"choose another -o")
    return output_folder


def write_report(result: CompareResult, output_folder: str) -> Dict[str, str]:
    """Writes the report files into ``output_folder`` (all or nothing); returns ``{kind: path}``."""
    from nnunet_ext.evaluation.report import render_report
    output_folder = check_output_folder(output_folder)
    parent = os.path.dirname(output_folder)
    try:
        temporary = tempfile.mkdtemp(prefix="." + os.path.basename(output_folder) + ".", suffix=".tmp", dir=parent)
    except OSError as e:
        raise UserInputError(f"cannot write the report {output_folder}: {e.strerror or e}") from None
    try:
        for kind, content in render_report(result.content, REPORT_FILES).items():
            with open(os.path.join(temporary, REPORT_FILES[kind]), "wb") as f:
                f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
        if os.path.exists(output_folder):  # replace the previous report; put it back if that fails
            previous = tempfile.mkdtemp(prefix="." + os.path.basename(output_folder) + ".", suffix=".old", dir=parent)
            os.replace(output_folder, os.path.join(previous, "report"))
            try:
                os.replace(temporary, output_folder)
            except BaseException:
                os.replace(os.path.join(previous, "report"), output_folder)
                raise
            finally:
                shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(temporary, output_folder)
    except OSError as e:  # a full disk, a folder made read-only meanwhile: nothing is left behind
        shutil.rmtree(temporary, ignore_errors=True)
        raise UserInputError(f"cannot write the report {output_folder}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return {kind: os.path.join(output_folder, name) for kind, name in REPORT_FILES.items()}


def run_compare(dataset: str, configuration: str, trainers: Optional[Sequence[str]] = None,
                plans: str = "nnUNetPlans", folds: Sequence[int] = DEFAULT_FOLDS, output_folder: Optional[str] = None,
                num_processes: int = 2, arguments: Optional[dict] = None, progress: bool = True,
                log: Callable[[str], None] = print, hd95: str = "pooled") -> Tuple[CompareResult, Dict[str, str]]:
    """``nnunet-ext compare``: checks the output folder first (default :func:`default_output_folder`),
    then :func:`compare` and :func:`write_report`. Returns the result and ``{kind: path}``."""
    output_folder = check_output_folder(output_folder or default_output_folder(_dataset_name(dataset), configuration,
                                                                               plans))
    result = compare(dataset, configuration, trainers, plans, folds, num_processes, arguments, progress, log, hd95)
    return result, write_report(result, output_folder)
