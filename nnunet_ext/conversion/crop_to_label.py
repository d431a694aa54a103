"""Cropping a converted dataset to the bounding box of one label: the training set of the tumour stage of
the ResUNet paper's liver-then-tumour cascade (``docs/methods/resunet.md``, Sections
II-E/F: a second network "segments liver tumors based on the region of interest detected by the
previous network") and the fine stage of the multi-level paper's coarse-to-fine framework (Section 2.2).
``nnunet-ext convert SOURCE ... --crop-to-label liver`` applies it to any converter's
output; ``nnunet-ext cascade-predict`` crops and pastes with the same functions at prediction time.

Our choices (documented for users in the README):

* **Region and box.** The region of a case is the crop label together with the labels kept for the
  second stage (for LiTS, ``--crop-to-label liver``: liver and tumour, i.e. the whole organ; a tumour on
  the liver's border is inside the box). The box is the region's bounding box grown by a margin in
  **millimetres** on every side (``--crop-margin``, default 10 mm), converted per axis to whole voxels
  with ``ceil(margin / spacing)``: a physical margin means the same context on thin- and thick-slice
  scans; clipped at the image border.
* **Labels.** The second network segments the kept labels (default: every foreground label other than
  the crop label; ``--crop-keep`` to choose), renumbered 1, 2, ... in their original order, keeping
  their names: LiTS ``{background 0, liver 1, tumor 2}`` -> ``{background 0, tumor 1}``. The crop label
  becomes background unless it is kept itself: that is the *coarse-to-fine* fine stage of the
  multi-level paper (``docs/methods/multi-level-structural.md``, Section 2.2: the fine model segments the same organ
  inside the coarse model's box), which is also the default when the dataset has no other foreground
  label (NIH pancreas ``--crop-to-label pancreas`` keeps ``pancreas 1``). Labels neither kept nor
  cropped become background. Datasets with regions or an ignore label are refused (none of our
  converters writes them).
* **Cases without the label** are skipped with a warning and listed in the summary and in dataset.json;
  no case left is an error. Test images without reference labels (``imagesTs`` without ``labelsTs``)
  cannot be cropped (the cascade crops them at prediction time) and are not copied.
* **Geometry.** Crops are SimpleITK regions of interest: spacing and direction are kept, the origin is
  the physical position of the box's first voxel, so a crop lies where it was in world space.
* **Record.** dataset.json gets ``nnunet_ext_crop`` (label, region labels, margin, source dataset and
  labels, the label renumbering, skipped cases); nnU-Net copies dataset.json into the trained model's
  folder, where ``cascade-predict`` reads it back (same margin, same label mapping). Other keys of the
  source dataset.json (e.g. ``nnunet_ext_intensity``) are kept.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnunet_ext.conversion.geometry import check_same_grid
from nnunet_ext.parallel import run_cases
from nnunet_ext.conversion.raw_dataset import ConversionSummary, RawDatasetWriter
from nnunet_ext.conversion.readers import checked_label_counts, label_counts, read_image, read_label
from nnunet_ext.errors import UserInputError

RECORD_KEY = 'nnunet_ext_crop'
DEFAULT_MARGIN_MM = 10.0
Box = Tuple[slice, ...]  # array (z, y, x) order


# ---------------------------------------------------------------- boxes, crops, pastes
def margin_in_voxels(margin_mm: float, spacing: Sequence[float]) -> Tuple[int, ...]:
    """``ceil(margin / spacing)`` per axis (a margin of at least ``margin_mm`` millimetres)."""
    if not margin_mm >= 0:
        raise UserInputError(f"the crop margin must be >= 0 mm, got {margin_mm}")
    return tuple(int(math.ceil(margin_mm / s - 1e-9)) for s in spacing)


def bounding_box(mask: np.ndarray, margin: Sequence[int]) -> Optional[Box]:
    """Bounding box of ``mask`` grown by ``margin`` voxels per axis and clipped to the array; None if the
    mask is empty."""
    found = ndimage.find_objects(mask.astype(np.uint8))
    if not found:
        return None
    return tuple(slice(max(0, s.start - m), min(n, s.stop + m)) for s, m, n in zip(found[0], margin, mask.shape))


def sitk_spacing(image: sitk.Image) -> Tuple[float, ...]:
    """Spacing in array (z, y, x) order."""
    return tuple(reversed(image.GetSpacing()))


def crop_image(image: sitk.Image, box: Box) -> sitk.Image:
    """The region ``box`` (array order) of ``image``; spacing and direction kept, origin = physical point
    of the box's first voxel."""
    index = [int(b.start) for b in reversed(box)]
    size = [int(b.stop - b.start) for b in reversed(box)]
    return sitk.RegionOfInterest(image, size, index)


def paste(values: np.ndarray, box: Box, shape: Sequence[int], fill=0) -> np.ndarray:
    """An array of ``shape`` filled with ``fill``, ``values`` (the crop) at ``box``."""
    expected = tuple(b.stop - b.start for b in box)
    if values.shape != expected:
        raise ValueError(f"crop of shape {values.shape} does not fit the box {box} (shape {expected})")
    out = np.full(tuple(shape), fill, dtype=values.dtype)
    out[box] = values
    return out


# ---------------------------------------------------------------- labels
@dataclass(frozen=True)
class CropLabels:
    """Which labels of the source dataset define the box and how the kept ones are renumbered. ``kept`` may
    hold the crop label itself (coarse-to-fine of one structure): then the fine stage segments it too."""
    source_labels: Tuple[Tuple[str, int], ...]  # (name, value), as in the source dataset.json
    crop_label: str
    kept: Tuple[str, ...]

    @property
    def source(self) -> Dict[str, int]:
        return dict(self.source_labels)

    @property
    def keeps_crop_label(self) -> bool:
        """True when the second stage segments the crop label itself (its output replaces the first
        stage's inside the box, see ``cascade.py``)."""
        return self.crop_label in self.kept

    @property
    def region_labels(self) -> Tuple[str, ...]:
        return (self.crop_label, *(n for n in self.kept if n != self.crop_label))

    @property
    def region_values(self) -> Tuple[int, ...]:
        return tuple(self.source[n] for n in self.region_labels)

    @property
    def value_map(self) -> Dict[int, int]:
        """Source value -> crop dataset value of the kept labels."""
        return {self.source[n]: i + 1 for i, n in enumerate(self.kept)}

    @property
    def crop_dataset_labels(self) -> Dict[str, int]:
        return {'background': 0, **{n: i + 1 for i, n in enumerate(self.kept)}}

    def remap(self, label: np.ndarray) -> np.ndarray:
        """Source label array -> crop dataset labels (kept labels renumbered, everything else 0)."""
        out = np.zeros(label.shape, np.uint8)
        for source_value, value in self.value_map.items():
            out[label == source_value] = value
        return out

    def record(self, margin_mm: float, source: str, skipped: Sequence[str]) -> dict:
        return {'label': self.crop_label, 'region_labels': list(self.region_labels), 'kept_labels': list(self.kept),
                'margin_mm': float(margin_mm), 'source': source, 'source_labels': self.source,
                'label_map': {str(k): v for k, v in self.value_map.items()}, 'skipped_cases': list(skipped)}

    @classmethod
    def from_record(cls, record: dict) -> 'CropLabels':
        source = {str(k): int(v) for k, v in record['source_labels'].items()}
        region = list(record['region_labels'])
        kept = record.get('kept_labels', region[1:])  # records written before 'kept_labels' never kept the crop label
        return cls(tuple(source.items()), region[0], tuple(kept))


def _label_name(labels: Dict[str, int], given: str, what: str) -> str:
    """A label of ``labels`` by name or by number."""
    if given in labels and given != 'background':
        return given
    if re.fullmatch(r'\d+', given):
        names = [n for n, v in labels.items() if v == int(given) and n != 'background']
        if names:
            return names[0]
    choices = ', '.join(f'{n} ({v})' for n, v in labels.items() if n != 'background')
    raise UserInputError(f"{what} {given!r} is not a label of this dataset; its labels: {choices}")


def resolve_crop_labels(labels: Dict[str, object], label: str, keep: Optional[Sequence[str]] = None) -> CropLabels:
    """``--crop-to-label LABEL [--crop-keep LABEL ...]`` against a dataset.json ``labels`` dict."""
    if any(not isinstance(v, int) for v in labels.values()):
        raise UserInputError("--crop-to-label: this dataset defines regions (label lists); only plain labels are "
                             "supported")
    if 'ignore' in labels:
        raise UserInputError("--crop-to-label: datasets with an ignore label are not supported")
    if labels.get('background') != 0:
        raise UserInputError(f"--crop-to-label: dataset.json labels need background = 0, got {labels}")
    int_labels = {str(k): int(v) for k, v in labels.items()}
    crop = _label_name(int_labels, str(label), '--crop-to-label')
    if keep is None:
        kept = [n for n, v in sorted(int_labels.items(), key=lambda item: item[1]) if v != 0 and n != crop] or [crop]
    else:
        kept = [_label_name(int_labels, str(k), '--crop-keep') for k in keep]
        if len(set(kept)) != len(kept):
            raise UserInputError(f"--crop-keep names a label twice: {list(keep)}")
        kept.sort(key=lambda n: int_labels[n])
    return CropLabels(tuple(int_labels.items()), crop, tuple(kept))


# ---------------------------------------------------------------- one case, one dataset
def crop_case(case: str, image_paths: Sequence[str], label_path: str, image_outs: Sequence[str], label_out: str,
              labels: CropLabels, margin_mm: float) -> Optional[Tuple[Tuple[float, ...], Dict[int, int]]]:
    """Crops one case (runs in a worker). Returns (spacing, label voxel counts), or None when the case has
    no voxel of the region (nothing written)."""
    label = read_label(case, label_path)
    values = sitk.GetArrayViewFromImage(label)
    checked_label_counts(case, values, sorted(labels.source.values()), label_path)
    box = bounding_box(np.isin(values, labels.region_values), margin_in_voxels(margin_mm, sitk_spacing(label)))
    if box is None:
        return None
    images = [read_image(case, p) for p in image_paths]
    for image, path in zip(images, image_paths):
        check_same_grid(case, image, label, what=f'label ({os.path.basename(path)})')
    for image, out in zip(images, image_outs):
        sitk.WriteImage(crop_image(image, box), out, useCompression=True)
    cropped = sitk.GetImageFromArray(labels.remap(values[box]))
    cropped.CopyInformation(crop_image(label, box))
    sitk.WriteImage(cropped, label_out, useCompression=True)
    return tuple(label.GetSpacing()), label_counts(sitk.GetArrayViewFromImage(cropped))


def _cases(folder: str, images: str, labels_folder: str, file_ending: str, channels: int) -> Dict[str, Tuple]:
    """``{case: ([image per channel], label)}`` for the cases that have a label file in ``labels_folder``."""
    label_dir = os.path.join(folder, labels_folder)
    if not os.path.isdir(label_dir):
        return {}
    cases = {}
    for name in sorted(os.listdir(label_dir)):
        if not name.endswith(file_ending):
            continue
        case = name[:-len(file_ending)]
        paths = [os.path.join(folder, images, f'{case}_{c:04d}{file_ending}') for c in range(channels)]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise UserInputError(f"{case}: label {os.path.join(label_dir, name)} but no image {missing[0]}")
        cases[case] = (paths, os.path.join(label_dir, name))
    return cases


def crop_dataset_to_label(source_folder: str, raw_root: str, dataset_id: int, name: Optional[str], overwrite: bool,
                          label: str, margin_mm: float = DEFAULT_MARGIN_MM, keep: Optional[Sequence[str]] = None,
                          num_processes: int = 2, log=print, source: Optional[str] = None
                          ) -> Tuple[str, ConversionSummary, Dict[str, int], List[str]]:
    """Writes ``nnUNet_raw/DatasetNNN_NAME``: every case of the raw dataset ``source_folder`` that has a label
    cropped to the box of ``label`` (module docstring), all-or-nothing. ``name`` None: the source's name +
    ``_<LABEL>Crop``. ``source`` describes the source in the record (default: the source folder's name).
    Returns (target folder, summary, labels of the new dataset, skipped cases)."""
    with open(os.path.join(source_folder, 'dataset.json'), encoding='utf-8') as f:
        source_json = json.load(f)
    labels = resolve_crop_labels(source_json['labels'], label, keep)
    if name is None:
        source_name = os.path.basename(os.path.normpath(source_folder)).split('_', 1)[-1]
        name = f"{source_name}_{re.sub(r'[^A-Za-z0-9]', '', labels.crop_label)}Crop"
    margin_in_voxels(margin_mm, (1.0,))  # validates the margin before any work
    file_ending = source_json['file_ending']
    channels = len(source_json['channel_names'])
    splits = {'Tr': _cases(source_folder, 'imagesTr', 'labelsTr', file_ending, channels),
              'Ts': _cases(source_folder, 'imagesTs', 'labelsTs', file_ending, channels)}
    unlabelled_tests = 0
    if os.path.isdir(os.path.join(source_folder, 'imagesTs')):
        test_images = {f[:-(len(file_ending) + 5)] for f in os.listdir(os.path.join(source_folder, 'imagesTs'))
                       if f.endswith(file_ending)}
        unlabelled_tests = len(test_images - set(splits['Ts']))
    summary = ConversionSummary()
    skipped: List[str] = []
    with RawDatasetWriter(raw_root, dataset_id, name, overwrite, file_ending=file_ending) as writer:
        jobs, job_splits = [], []
        for split, cases in splits.items():
            for case, (images, label_path) in cases.items():
                writer.claim_case(case, label_path)
                jobs.append((case, images, label_path, [writer.image_path(case, c, split) for c in range(channels)],
                             writer.label_path(case, split), labels, margin_mm))
                job_splits.append(split)
        if not jobs:
            raise UserInputError(f"{source_folder}: no labelled case to crop")
        results = run_cases(crop_case, jobs, num_processes, f'cropping to {labels.crop_label}')
        for job, split, result in zip(jobs, job_splits, results):
            if result is None:
                skipped.append(job[0])
                log(f"warning: {job[0]} has no {'/'.join(labels.region_labels)} voxel; skipped")
            else:
                summary.add(split, *result)
        if summary.training_cases == 0:
            raise UserInputError(f"no training case has a {labels.crop_label} voxel; nothing to crop")
        extra = {k: v for k, v in source_json.items()
                 if k not in ('channel_names', 'labels', 'numTraining', 'file_ending', 'name', 'regions_class_order')}
        extra['description'] = (f"{source_json.get('description', os.path.basename(source_folder))}; cropped to the "
                                f"{labels.crop_label} bounding box + {margin_mm:g} mm by nnunet-ext")
        extra[RECORD_KEY] = labels.record(margin_mm, source or os.path.basename(os.path.normpath(source_folder)),
                                          skipped)
        target = writer.finish(source_json['channel_names'], labels.crop_dataset_labels, **extra)
    if unlabelled_tests:
        log(f"note: {unlabelled_tests} test image(s) without labelsTs not cropped (cascade-predict crops images "
            f"at prediction time)")
    return target, summary, labels.crop_dataset_labels, skipped
