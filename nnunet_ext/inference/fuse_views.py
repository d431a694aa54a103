"""``nnunet-ext fuse-views``: fuse predictions of 2D models trained along different axes (views).

The multi-level structural loss paper (Section 4.1.2) trains one 2D network per view (axial,
coronal, sagittal) and fuses the three segmentations by majority voting. Here each view is an
``nnUNetv2_predict`` output folder (plans of ``nnunet-ext plan ID -pl MultiView2DPlanner``, any
trainer). nnU-Net writes both the segmentations and the ``--save_probabilities`` ``.npz`` files in
the original image geometry (transposed back with ``transpose_backward``, cropping reverted), so the
views are fused voxel by voxel without any reorientation.

Methods:

- ``vote`` (the paper): per voxel, the label that most views predicted, counted over the views'
  segmentation files (nnU-Net's own label maps). Ties (no label with a strict plurality: three views
  predicting three different labels, or two views that disagree) are broken by ``tie_break``:

  - ``probability`` (default): among the tied labels, the one with the highest mean (equivalently
    summed) softmax probability over the views, read from the ``.npz`` files; labels with exactly equal
    means go to the lowest label. Needs ``--save_probabilities`` and label-based (not region-based)
    training.
  - ``lowest``: the lowest tied label. Reads the segmentation files only (no ``.npz`` needed).

  With three views and one foreground class this is the paper's rule: foreground where at least two
  views say so; no tie can occur.
- ``mean``: average the views' probabilities (float32) and convert them as nnU-Net does
  (``LabelManager.convert_probabilities_to_segmentation``: argmax, or regions over 0.5): the result of
  ``nnUNetv2_ensemble`` on the same folders.

Checks before anything is written: the folders were predicted for the same dataset (plans
``dataset_name``), with the same labels and file ending (``dataset.json``), along different slicing
axes (``plans.json`` ``transpose_forward[0]``), and hold the same cases; per case, every view's
segmentation has the same shape and geometry (spacing, origin, direction), probabilities match that
shape, and label values are the dataset's. The output folder is written as a hidden sibling and
renamed into place when every case is fused: an error leaves nothing behind.

Output: ``CASE<file_ending>`` per case (written with the dataset's reader/writer and the geometry of
the first view's segmentation), ``dataset.json`` and ``plans.json`` of the first view (so nnU-Net's
post-processing and ``nnunet-ext evaluate`` read the folder), and ``fuse_views.json`` (method, tie
rule, inputs and their slicing axes, per case the voxels where views disagree and the ties).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from nnunet_ext import __version__
from nnunet_ext.errors import UserInputError, name_some
from nnunet_ext.evaluation.evaluate import case_files
from nnunet_ext.parallel import run_cases

__all__ = ['METHODS', 'TIE_BREAKS', 'VIEW_AXES', 'FusionRule', 'ViewFolder', 'check_views', 'fuse_case',
           'fuse_view_folders', 'majority_vote', 'mean_probabilities', 'output_values', 'read_view_folder',
           'tie_voxels']

# array axes (z, y, x as nnU-Net's SimpleITK/NIfTI readers return them) sliced by each view
VIEW_AXES: Dict[str, int] = {'Axial': 0, 'Coronal': 1, 'Sagittal': 2}
METHODS = ('vote', 'mean')
TIE_BREAKS = ('probability', 'lowest')
GEOMETRY_TOLERANCE = 1e-4
SUMMARY_NAME = 'fuse_views.json'


def majority_vote(label_maps: Sequence[np.ndarray], labels: Sequence[int],
                  tie_scores: Optional[np.ndarray] = None) -> np.ndarray:
    """Per voxel, the label that most of ``label_maps`` hold.

    Args:
        label_maps: one label map per view, all of the same shape.
        labels: the possible label values (every map value must be one of them).
        tie_scores: optional, shape ``(len(labels), *shape)``: among the labels tied for the most votes,
            the one with the highest score wins (e.g. the mean probability of ``labels[i]`` in channel i).
            Labels still tied (equal scores, or no scores) go to the lowest label.
    Returns:
        the fused label map (dtype of ``labels`` as a NumPy array).
    """
    labels = np.asarray(sorted(labels))
    shape = label_maps[0].shape
    votes = np.zeros((len(labels),) + shape, dtype=np.uint8)
    for label_map in label_maps:
        if label_map.shape != shape:
            raise ValueError(f"label maps differ in shape: {label_map.shape} vs {shape}")
        for i, label in enumerate(labels):
            votes[i] += label_map == label
    counted = votes.sum(0)
    if np.any(counted != len(label_maps)):
        values = sorted(set(np.unique(np.concatenate([m.ravel() for m in label_maps])).tolist()) - set(labels.tolist()))
        raise ValueError(f"label maps hold values {values} outside the labels {labels.tolist()}")
    if tie_scores is None:
        return labels[votes.argmax(0)]  # argmax takes the first (lowest) label among equal counts
    if tie_scores.shape != votes.shape:
        raise ValueError(f"tie_scores must have shape {votes.shape} (labels, *map shape), got {tie_scores.shape}")
    most = votes.max(0)
    lowest_score = np.array(-np.inf, dtype=np.result_type(tie_scores.dtype, np.float32))  # float32 stays float32
    scores = np.where(votes == most, tie_scores, lowest_score)
    return labels[scores.argmax(0)]


def tie_voxels(label_maps: Sequence[np.ndarray], labels: Sequence[int]) -> int:
    """How many voxels have no label with a strict plurality of the votes."""
    votes = np.stack([sum((m == label).astype(np.uint8) for m in label_maps) for label in labels])
    return int(((votes == votes.max(0)).sum(0) > 1).sum())


def mean_probabilities(npz_files: Sequence[str], shape: Sequence[int], num_channels: int) -> np.ndarray:
    """The mean of the ``probabilities`` arrays in ``npz_files`` (float32, as nnU-Net's
    ``average_probabilities``), each checked to be ``(num_channels, *shape)``."""
    total = None
    for path in npz_files:
        probabilities = np.load(path)['probabilities']
        if probabilities.shape != (num_channels, *shape):
            raise UserInputError(f"{path}: probabilities of shape {probabilities.shape}, expected "
                                 f"{(num_channels, *tuple(shape))} (channels, shape of the segmentation)")
        total = probabilities.astype(np.float32) if total is None else total + probabilities
    return total / len(npz_files)


@dataclass(frozen=True)
class ViewFolder:
    """An ``nnUNetv2_predict`` output folder: its plans (slicing axis), dataset.json and cases."""
    folder: str
    plans: dict
    dataset_json: dict
    cases: Dict[str, str]  # case -> segmentation file

    @property
    def slicing_axis(self) -> int:
        return int(self.plans['transpose_forward'][0])

    @property
    def view(self) -> str:
        names = {axis: name for name, axis in VIEW_AXES.items()}
        return f"{names[self.slicing_axis].lower()} (axis {self.slicing_axis})"

    def npz(self, case: str) -> str:
        return os.path.join(self.folder, case + '.npz')


def _load_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise UserInputError(f"{path} is missing: {what}")
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def read_view_folder(folder: str) -> ViewFolder:
    if not os.path.isdir(folder):
        raise UserInputError(f"input folder {folder} does not exist or is not a folder")
    what = 'fuse-views reads nnUNetv2_predict output folders (it writes plans.json and dataset.json there)'
    plans = _load_json(os.path.join(folder, 'plans.json'), what)
    dataset_json = _load_json(os.path.join(folder, 'dataset.json'), what)
    for source, content, key in (('plans.json', plans, 'transpose_forward'), ('plans.json', plans, 'dataset_name'),
                                 ('dataset.json', dataset_json, 'labels'),
                                 ('dataset.json', dataset_json, 'file_ending')):
        if key not in content:
            raise UserInputError(f"{os.path.join(folder, source)} has no {key!r} entry")
    ending = dataset_json['file_ending']
    cases = case_files(folder, ending)
    if not cases:
        raise UserInputError(f"{folder} holds no segmentations ({ending} files)")
    return ViewFolder(folder, plans, dataset_json, cases)


def check_views(views: Sequence[ViewFolder]) -> None:
    """Refuses folders that are not different views of the same cases of one dataset."""
    if len(views) < 2:
        raise UserInputError(f"-i takes the prediction folders of two or three views, got {len(views)}")
    first = views[0]
    for other in views[1:]:
        for source, key, a, b in (
                ('plans.json', 'dataset_name', first.plans['dataset_name'], other.plans['dataset_name']),
                ('dataset.json', 'labels', first.dataset_json['labels'], other.dataset_json['labels']),
                ('dataset.json', 'regions_class_order', first.dataset_json.get('regions_class_order'),
                 other.dataset_json.get('regions_class_order')),
                ('dataset.json', 'file_ending', first.dataset_json['file_ending'],
                 other.dataset_json['file_ending'])):
            if a != b:
                raise UserInputError(f"{first.folder} and {other.folder} differ in {source} {key}: {a} vs {b}; "
                                     f"fuse predictions of one dataset")
    seen: Dict[int, ViewFolder] = {}
    for view in views:
        if view.slicing_axis in seen:
            raise UserInputError(
                f"{seen[view.slicing_axis].folder} and {view.folder} both slice along array axis {view.slicing_axis} "
                f"(plans.json transpose_forward {view.plans['transpose_forward']}); fuse-views fuses different views "
                f"(plan them with: nnunet-ext plan ID -pl MultiView2DPlanner)")
        seen[view.slicing_axis] = view
    for other in views[1:]:
        missing, extra = set(first.cases) - set(other.cases), set(other.cases) - set(first.cases)
        if missing or extra:
            problems = ([f"missing in {other.folder}: {name_some(missing)}"] if missing else []) + \
                       ([f"missing in {first.folder}: {name_some(extra)}"] if extra else [])
            raise UserInputError("the views do not hold the same cases: " + '; '.join(problems))


def _require_probabilities(views: Sequence[ViewFolder], reason: str) -> None:
    for view in views:
        missing = [case for case in view.cases if not os.path.isfile(view.npz(case))]
        if missing:
            raise UserInputError(f"{reason} needs the probabilities (.npz) of every case; {view.folder} lacks them for "
                                 f"{name_some(missing)} (predict with nnUNetv2_predict --save_probabilities, or "
                                 f"use --method vote --tie_break lowest, which reads the segmentations only)")


def _same_geometry(a, b) -> bool:
    """Equal structure, strings and (within ``GEOMETRY_TOLERANCE``) numbers."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_geometry(a[k], b[k]) for k in a)
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    try:
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    except (TypeError, ValueError):
        return a == b
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=GEOMETRY_TOLERANCE, atol=GEOMETRY_TOLERANCE))


def _readable(value):
    """Numbers rounded to 4 decimals, arrays and tuples as lists (for error messages)."""
    if isinstance(value, dict):
        return {k: _readable(v) for k, v in value.items()}
    if isinstance(value, str):
        return value
    array = np.asarray(value)
    if array.dtype.kind in 'iuf':
        return np.round(array.astype(np.float64), 4).tolist()
    return value


def _geometry(properties: dict) -> dict:
    """The geometry a reader reports: spacing plus its reader-specific entries (``sitk_stuff``:
    spacing/origin/direction; ``nibabel_stuff``: affines), without file names."""
    return {k: v for k, v in properties.items() if k in ('spacing', 'sitk_stuff', 'nibabel_stuff')}


@dataclass(frozen=True)
class FusionRule:
    """How a case is fused. Plain values for the vote, so that worker processes need not import torch;
    nnU-Net's ``LabelManager`` only for ``mean`` (its probabilities -> segmentation conversion)."""
    method: str
    tie_break: str
    output_values: Tuple[int, ...]  # the label values a segmentation can hold
    num_channels: int  # probability channels
    label_manager: object = None  # for method 'mean'


def output_values(label_manager) -> Tuple[int, ...]:
    """The values nnU-Net writes into segmentations: the labels, or 0 and ``regions_class_order``."""
    if label_manager.has_regions:
        return tuple(sorted({0, *[int(v) for v in label_manager.regions_class_order]}))
    return tuple(int(v) for v in label_manager.all_labels)


def fuse_case(case: str, seg_files: Sequence[str], npz_files: Optional[Sequence[str]], reader_writer_class,
              rule: FusionRule, output_file: str) -> dict:
    """Fuses one case's views and writes ``output_file``; returns its statistics."""
    maps, properties = [], None
    for path in seg_files:
        segmentation, props = reader_writer_class().read_seg(path)
        if properties is None:
            properties = props
        elif segmentation.shape[1:] != maps[0].shape:
            raise UserInputError(f"case {case}: {path} has shape {segmentation.shape[1:]}, {seg_files[0]} has "
                                 f"{maps[0].shape}; the views must be predictions of the same images")
        elif not _same_geometry(_geometry(props), _geometry(properties)):
            raise UserInputError(f"case {case}: the geometry of {path} ({_readable(_geometry(props))}) differs from "
                                 f"that of {seg_files[0]} ({_readable(_geometry(properties))}); the views must be "
                                 f"predictions of the same images")
        if segmentation.shape[0] != 1:
            raise UserInputError(f"case {case}: {path} has {segmentation.shape[0]} channels; a segmentation has one")
        if not np.array_equal(segmentation, np.round(segmentation)):
            raise UserInputError(f"case {case}: {path} holds non-integer values; a segmentation holds labels")
        # the reader's (1, *spatial) float array -> spatial labels; probabilities are (C, *spatial)
        maps.append(segmentation[0].astype(np.int32))
    shape = maps[0].shape
    values = list(rule.output_values)
    for path, segmentation in zip(seg_files, maps):
        unexpected = sorted(set(np.unique(segmentation).tolist()) - set(values))
        if unexpected:
            raise UserInputError(f"case {case}: {path} holds label values {unexpected}, not among the dataset's "
                                 f"output labels {values}")
    probabilities = None
    if npz_files is not None:
        probabilities = mean_probabilities(npz_files, shape, rule.num_channels)
    if rule.method == 'mean':
        fused = np.asarray(rule.label_manager.convert_probabilities_to_segmentation(probabilities))
    else:
        fused = majority_vote(maps, values, probabilities if rule.tie_break == 'probability' else None)
    reader_writer_class().write_seg(fused, output_file, properties)
    disagree = int(np.any(np.stack(maps) != maps[0], axis=0).sum())
    return {'case': case, 'voxels_where_views_disagree': disagree,
            'tie_voxels': tie_voxels(maps, values) if rule.method == 'vote' else None}


def _prepare_output(output_folder: str) -> str:
    """A hidden temporary folder beside ``output_folder`` (refused if that exists and is not empty)."""
    output_folder = os.path.abspath(output_folder)
    if os.path.exists(output_folder) and (not os.path.isdir(output_folder) or os.listdir(output_folder)):
        raise UserInputError(f"output {output_folder} exists and is not an empty folder; remove it or choose another")
    parent = os.path.dirname(output_folder)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f'.{os.path.basename(output_folder)}.partial-', dir=parent)


def fuse_view_folders(input_folders: Sequence[str], output_folder: str, method: str = 'vote',
                      tie_break: str = 'probability', num_processes: int = 2, progress: bool = True) -> dict:
    """Fuses the predictions of several views case by case into ``output_folder``; returns the summary
    written to ``fuse_views.json`` (see the module docstring for methods, checks and outputs)."""
    if method not in METHODS:
        raise UserInputError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if tie_break not in TIE_BREAKS:
        raise UserInputError(f"--tie_break must be one of {', '.join(TIE_BREAKS)}, got {tie_break!r}")
    if num_processes < 1:
        raise UserInputError(f"-np must be >= 1, got {num_processes}")
    views = [read_view_folder(folder) for folder in input_folders]
    check_views(views)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # imports torch: after the checks
    first = views[0]
    plans_manager = PlansManager(first.plans)
    label_manager = plans_manager.get_label_manager(first.dataset_json)
    use_probabilities = method == 'mean' or tie_break == 'probability'
    if method == 'vote' and tie_break == 'probability':
        if label_manager.has_regions:
            raise UserInputError("--tie_break probability compares the probabilities of labels, but this dataset is "
                                 "region-based (sigmoid per region); use --tie_break lowest or --method mean")
        if list(label_manager.all_labels) != list(range(label_manager.num_segmentation_heads)):
            raise UserInputError(f"labels {label_manager.all_labels} are not consecutive from 0; nnU-Net's probability "
                                 f"channels then do not map to label values")
    if use_probabilities:
        _require_probabilities(views, '--method mean' if method == 'mean' else '--tie_break probability')
    reader_writer_class = plans_manager.image_reader_writer_class
    rule = FusionRule(method, tie_break, output_values(label_manager), label_manager.num_segmentation_heads,
                      label_manager if method == 'mean' else None)
    ending = first.dataset_json['file_ending']

    temporary = _prepare_output(output_folder)
    try:
        jobs = [(case, [v.cases[case] for v in views], [v.npz(case) for v in views] if use_probabilities else None,
                 reader_writer_class, rule, os.path.join(temporary, case + ending))
                for case in sorted(first.cases)]
        per_case = run_cases(fuse_case, jobs, num_processes, 'fuse views', progress)
        for name in ('dataset.json', 'plans.json'):
            shutil.copy(os.path.join(first.folder, name), os.path.join(temporary, name))
        summary = {
            'nnunet_ext_version': __version__,
            'method': method,
            'tie_break': tie_break if method == 'vote' else None,
            'inputs': [{'folder': os.path.abspath(v.folder), 'view': v.view, 'slicing_axis': v.slicing_axis,
                        'plans_name': v.plans.get('plans_name'), 'transpose_forward': v.plans['transpose_forward']}
                       for v in views],
            'output_folder': os.path.abspath(output_folder),
            'file_ending': ending,
            'cases': per_case,
        }
        with open(os.path.join(temporary, SUMMARY_NAME), 'w', encoding='utf-8') as f:
            json.dump(summary, f, indent=2)
        if os.path.isdir(output_folder):
            os.rmdir(output_folder)  # empty (checked above)
        os.rename(temporary, output_folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return summary
