"""Preprocessing of one case, as nnU-Net 2.8.1's ``DefaultPreprocessor.run_case_npy`` does it without a
segmentation: float32 -> transpose_forward -> crop to the nonzero region (``preprocessing/cropping``) ->
per-channel normalisation (``default_normalization_schemes``) -> resampling to the target spacing.

The operations run in nnU-Net's order on arrays of the same memory layout, so that numpy's float32
reductions (means, standard deviations) sum in the same order and give the same bits.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
from scipy.ndimage import binary_fill_holes

from nnunet_ext.deploy.resampling import compute_new_shape, resample_data_or_seg_to_shape


def create_nonzero_mask(data: np.ndarray) -> np.ndarray:
    """cropping.create_nonzero_mask: any channel nonzero, holes filled."""
    assert data.ndim in (3, 4), 'data must have shape (C, X, Y, Z) or shape (C, X, Y)'
    nonzero_mask = data[0] != 0
    for c in range(1, data.shape[0]):
        nonzero_mask |= data[c] != 0
    return binary_fill_holes(nonzero_mask)


def get_bbox_from_mask(mask: np.ndarray) -> List[List[int]]:
    """acvl_utils' get_bbox_from_mask: half-open bounding box of a 3d mask; the whole array when empty."""
    bbox = []
    for axis in range(mask.ndim):
        other = tuple(i for i in range(mask.ndim) if i != axis)
        present = np.flatnonzero(np.any(mask, axis=other))
        bbox.append([int(present[0]), int(present[-1]) + 1] if present.size else [0, int(mask.shape[axis])])
    return bbox


def crop_to_nonzero(data: np.ndarray, nonzero_label: int = -1):
    """cropping.crop_to_nonzero without a segmentation: (cropped data view, seg (1, ...) int8 with 0 inside the
    nonzero mask and ``nonzero_label`` outside, bbox)."""
    nonzero_mask = create_nonzero_mask(data)
    bbox = get_bbox_from_mask(nonzero_mask)
    slicer = tuple(slice(*i) for i in bbox)
    nonzero_mask = nonzero_mask[slicer][None]
    data = data[(slice(None),) + slicer]
    seg = np.where(nonzero_mask, np.int8(0), np.int8(nonzero_label))
    return data, seg, bbox


def normalize(image: np.ndarray, seg: np.ndarray, entry: dict) -> np.ndarray:
    """One channel through the scheme of a model.json ``normalization`` entry (nnU-Net's classes in
    default_normalization_schemes, target dtype float32)."""
    scheme = entry['scheme']
    props = entry.get('intensity_properties') or {}
    eps = 1e-8
    image = image.astype(np.float32, copy=False)
    if scheme == 'ZScoreNormalization':
        if entry.get('use_mask_for_norm', False):
            mask = seg >= 0
            mean = image[mask].mean()
            std = image[mask].std()
            image[mask] = (image[mask] - mean) / (max(std, eps))
        else:
            mean = image.mean()
            std = image.std()
            image -= mean
            image /= (max(std, eps))
        return image
    if scheme == 'CTNormalization':
        np.clip(image, props['percentile_00_5'], props['percentile_99_5'], out=image)
        image -= props['mean']
        image /= max(props['std'], eps)
        return image
    if scheme == 'NoNormalization':
        return image
    if scheme == 'RescaleTo01Normalization':
        image -= image.min()
        image /= np.clip(image.max(), a_min=eps, a_max=None)
        return image
    if scheme == 'RGBTo01Normalization':
        if image.min() < 0 or image.max() > 255:
            raise ValueError('RGBTo01Normalization needs values in 0..255; the image is not an 8-bit RGB image')
        image /= 255.
        return image
    raise ValueError(f'unknown normalization scheme {scheme!r}')


def preprocess(data: np.ndarray, properties: dict, transpose_forward: Sequence[int],
               configuration_spacing: Sequence[float], normalization: Sequence[dict],
               resampling_kwargs: dict) -> Tuple[np.ndarray, dict]:
    """DefaultPreprocessor.run_case_npy(data, None, properties, ...): returns the float32 network input
    (C, network axes) and ``properties`` with 'shape_before_cropping', 'bbox_used_for_cropping' and
    'shape_after_cropping_and_before_resampling' added (as nnU-Net adds them)."""
    data = data.astype(np.float32)  # a copy
    data = data.transpose([0, *[i + 1 for i in transpose_forward]])
    original_spacing = [properties['spacing'][i] for i in transpose_forward]
    properties['shape_before_cropping'] = data.shape[1:]
    data, seg, bbox = crop_to_nonzero(data)
    properties['bbox_used_for_cropping'] = bbox
    properties['shape_after_cropping_and_before_resampling'] = data.shape[1:]
    target_spacing = list(configuration_spacing)
    if len(target_spacing) < len(data.shape[1:]):
        target_spacing = [original_spacing[0]] + target_spacing
    new_shape = compute_new_shape(data.shape[1:], original_spacing, target_spacing)
    for c in range(data.shape[0]):
        data[c] = normalize(data[c], seg[0], normalization[c])
    data = resample_data_or_seg_to_shape(data, new_shape, original_spacing, target_spacing, **resampling_kwargs)
    return data, properties
