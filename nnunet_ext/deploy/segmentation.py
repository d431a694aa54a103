"""Logits -> label map (and probabilities) in the input image's shape.

Reproduces nnU-Net 2.8.1's ``LabelManager`` (labels / regions, ``apply_inference_nonlin``,
``convert_probabilities_to_segmentation``, ``convert_logits_to_segmentation``,
``revert_cropping_on_probabilities``) and ``inference/export_prediction.py``'s
``convert_predicted_logits_to_segmentation_with_correct_shape``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from nnunet_ext.deploy.resampling import resample_data_or_seg_to_shape


class Labels:
    """dataset.json's ``labels`` (values may be lists: regions) and ``regions_class_order``, as nnU-Net's
    ``LabelManager`` reads them. Raises ValueError for labels nnU-Net would refuse."""

    def __init__(self, label_dict: Dict[str, Union[int, Sequence[int]]], regions_class_order: Optional[List[int]]):
        if not isinstance(label_dict, dict) or 'background' not in label_dict:
            raise ValueError("labels must be an object with a 'background' label (0)")
        background = label_dict['background']
        if isinstance(background, (list, tuple)) or not _is_int(background) or int(background) != 0:
            raise ValueError(f"the background label must be 0, got {background!r}")
        for k, v in label_dict.items():
            if not (_is_int(v) or (isinstance(v, (list, tuple)) and v and all(_is_int(i) for i in v))):
                raise ValueError(f"label {k!r} must be an integer or a list of integers, got {v!r}")
        self.label_dict = label_dict
        self.regions_class_order = None if regions_class_order is None else [int(i) for i in regions_class_order]
        self.has_regions = any(isinstance(v, (list, tuple)) and len(v) > 1 for v in label_dict.values())
        ignore = label_dict.get('ignore')
        if ignore is not None and not (_is_int(ignore) and not isinstance(ignore, (list, tuple))):
            raise ValueError('the ignore label must be an integer')
        self.ignore_label = None if ignore is None else int(ignore)
        labels = []
        for k, v in label_dict.items():
            if k == 'ignore':
                continue
            labels.extend(int(i) for i in v) if isinstance(v, (list, tuple)) else labels.append(int(v))
        self.all_labels = sorted(set(labels))
        if self.ignore_label is not None and self.ignore_label != max(self.all_labels) + 1:
            raise ValueError('the ignore label must be the highest label value')
        self.regions = None
        if self.has_regions:
            if self.regions_class_order is None:
                raise ValueError('region-based labels need regions_class_order')
            self.regions = []
            for k, v in label_dict.items():
                if k == 'ignore':
                    continue
                if (not isinstance(v, (list, tuple)) and int(v) == 0) or \
                        (isinstance(v, (list, tuple)) and set(int(i) for i in v) == {0}):
                    continue
                self.regions.append(tuple(int(i) for i in v) if isinstance(v, (list, tuple)) else int(v))
            if len(self.regions_class_order) != len(self.regions):
                raise ValueError(f"regions_class_order has {len(self.regions_class_order)} entries, the labels have "
                                 f"{len(self.regions)} regions")

    @property
    def foreground_labels(self) -> List[int]:
        return [i for i in self.all_labels if i != 0]

    @property
    def num_segmentation_heads(self) -> int:
        return len(self.regions) if self.has_regions else len(self.all_labels)

    @property
    def segmentation_dtype(self):
        """What nnU-Net's export puts the label map into (before the writer's own uint8/uint16 choice)."""
        return np.uint8 if len(self.foreground_labels) < 255 else np.uint16

    def apply_inference_nonlin(self, logits: np.ndarray) -> np.ndarray:
        """LabelManager.apply_inference_nonlin: float32 sigmoid (regions) or softmax over axis 0 (labels)."""
        logits = np.asarray(logits).astype(np.float32)
        if self.has_regions:
            return (1 / (1 + np.exp(-logits))).astype(np.float32, copy=False)
        shifted = logits - logits.max(0, keepdims=True)
        np.exp(shifted, out=shifted)
        shifted /= shifted.sum(0, keepdims=True)
        return shifted

    def convert_probabilities_to_segmentation(self, probabilities: np.ndarray) -> np.ndarray:
        """LabelManager.convert_probabilities_to_segmentation: regions in regions_class_order (> 0.5, later
        ones win), else argmax over axis 0 (first maximum)."""
        if probabilities.shape[0] != self.num_segmentation_heads:
            raise RuntimeError(f"expected {self.num_segmentation_heads} channels, got {probabilities.shape[0]}")
        if self.has_regions:
            segmentation = np.zeros(probabilities.shape[1:], dtype=np.uint16)
            for i, c in enumerate(self.regions_class_order):
                segmentation[probabilities[i] > 0.5] = c
            return segmentation
        return probabilities.argmax(0)

    def convert_logits_to_segmentation(self, logits: np.ndarray) -> np.ndarray:
        """LabelManager.convert_logits_to_segmentation: the argmax of the logits themselves (no softmax) for
        labels, sigmoid then thresholds for regions."""
        return self.convert_probabilities_to_segmentation(
            self.apply_inference_nonlin(logits) if self.has_regions else logits)

    def revert_cropping_on_probabilities(self, probabilities: np.ndarray, bbox, shape_before_cropping) -> np.ndarray:
        """LabelManager.revert_cropping_on_probabilities: outside the crop, background 1 (labels) or 0 (regions)."""
        full = np.zeros((probabilities.shape[0], *shape_before_cropping), dtype=probabilities.dtype)
        if not self.has_regions:
            full[0] = 1
        full[(slice(None), *bbox_to_slices(bbox))] = probabilities
        return full


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def bbox_to_slices(bbox) -> Tuple[slice, ...]:
    """acvl_utils' bounding_box_to_slice: half-open [start, end) per axis."""
    return tuple(slice(int(a), int(b)) for a, b in bbox)


def convert_predicted_logits_to_segmentation_with_correct_shape(
        predicted_logits: np.ndarray, labels: Labels, properties: dict, configuration_spacing: Sequence[float],
        transpose_forward: Sequence[int], transpose_backward: Sequence[int], resampling_kwargs: dict,
        return_probabilities: bool = False):
    """nnU-Net's function of that name: resample the logits (network axes, preprocessed shape) to the cropped
    shape with ``resampling_probabilities``, label map (and probabilities), un-crop, transpose back.

    ``properties`` needs 'spacing' (the reader's, image axes), 'shape_before_cropping', 'bbox_used_for_cropping',
    'shape_after_cropping_and_before_resampling'. Returns the label map (image axes), or (label map,
    probabilities (C, image axes)) with ``return_probabilities``."""
    spacing_transposed = [properties['spacing'][i] for i in transpose_forward]
    shape = properties['shape_after_cropping_and_before_resampling']
    current_spacing = list(configuration_spacing) if len(configuration_spacing) == len(shape) else \
        [spacing_transposed[0], *configuration_spacing]
    predicted_logits = resample_data_or_seg_to_shape(predicted_logits, shape, current_spacing, spacing_transposed,
                                                     **resampling_kwargs)
    if not return_probabilities:
        segmentation = labels.convert_logits_to_segmentation(predicted_logits)
    else:
        probabilities = labels.apply_inference_nonlin(predicted_logits)
        segmentation = labels.convert_probabilities_to_segmentation(probabilities)
    del predicted_logits
    full = np.zeros(properties['shape_before_cropping'], dtype=labels.segmentation_dtype)
    full[bbox_to_slices(properties['bbox_used_for_cropping'])] = segmentation
    full = full.transpose(transpose_backward)
    if not return_probabilities:
        return full
    probabilities = labels.revert_cropping_on_probabilities(probabilities, properties['bbox_used_for_cropping'],
                                                            properties['shape_before_cropping'])
    probabilities = probabilities.transpose([0] + [i + 1 for i in transpose_backward])
    return full, probabilities
