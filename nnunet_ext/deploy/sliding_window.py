"""Sliding-window prediction, as nnU-Net 2.8.1's ``nnUNetPredictor`` does it with default options.

Reproduces ``sliding_window_prediction.compute_gaussian`` / ``compute_steps_for_sliding_window``,
acvl_utils' ``pad_nd_image`` (constant 0, content centred), ``nnUNetPredictor._internal_get_sliding_window_slicers``,
``_internal_maybe_mirror_and_predict`` and ``predict_sliding_window_return_logits``.

Precision: nnU-Net accumulates the weighted logits and the weights in float16 on its results device
(``torch.half`` arrays, the gaussian cast to float16) and returns float16 logits. ``half_precision=True``
(the default) does the same in numpy, operation for operation (float32 network output x float16 gaussian in
float32, added into the float16 sum; the division in float16), so the results match nnU-Net's bit for bit up to
the network's own float differences. ``half_precision=False`` accumulates in float32 instead.
"""
from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from scipy.ndimage import gaussian_filter


@lru_cache(maxsize=2)
def _gaussian_float64(tile_size: Tuple[int, ...], sigma_scale: float, value_scaling_factor: float) -> np.ndarray:
    tmp = np.zeros(tile_size)
    center_coords = [i // 2 for i in tile_size]
    sigmas = [i * sigma_scale for i in tile_size]
    tmp[tuple(center_coords)] = 1
    gaussian_importance_map = gaussian_filter(tmp, sigmas, 0, mode='constant', cval=0)
    gaussian_importance_map /= (np.max(gaussian_importance_map) / value_scaling_factor)
    gaussian_importance_map.setflags(write=False)
    return gaussian_importance_map


def compute_gaussian(tile_size: Sequence[int], sigma_scale: float = 1. / 8, value_scaling_factor: float = 1,
                     dtype=np.float16) -> np.ndarray:
    """sliding_window_prediction.compute_gaussian (nnU-Net calls it with value_scaling_factor=10 and float16);
    zeros (after the cast) become the smallest nonzero value."""
    gaussian = _gaussian_float64(tuple(int(i) for i in tile_size), sigma_scale, value_scaling_factor).astype(dtype)
    mask = gaussian == 0
    if mask.any():
        gaussian[mask] = np.min(gaussian[~mask])
    return gaussian


def compute_steps_for_sliding_window(image_size: Sequence[int], tile_size: Sequence[int],
                                     tile_step_size: float) -> List[List[int]]:
    """sliding_window_prediction.compute_steps_for_sliding_window."""
    assert 0 < tile_step_size <= 1, 'step_size must be larger than 0 and smaller or equal to 1'
    target_step_sizes_in_voxels = [i * tile_step_size for i in tile_size]
    num_steps = [int(np.ceil((i - k) / j)) + 1 for i, j, k in zip(image_size, target_step_sizes_in_voxels, tile_size)]
    steps = []
    for dim in range(len(tile_size)):
        max_step_value = image_size[dim] - tile_size[dim]
        actual_step_size = max_step_value / (num_steps[dim] - 1) if num_steps[dim] > 1 else 99999999999
        steps.append([int(np.round(actual_step_size * i)) for i in range(num_steps[dim])])
    return steps


def pad_nd_image(image: np.ndarray, new_shape: Sequence[int]) -> Tuple[np.ndarray, Tuple[slice, ...]]:
    """acvl_utils.pad_nd_image(image, new_shape, 'constant', {'value': 0}, return_slicer=True): pads the last
    len(new_shape) axes up to new_shape (never crops), the odd voxel after the content; returns (padded,
    slicer back to the content)."""
    old_shape = np.array(image.shape)
    new_shape = list(image.shape[:len(image.shape) - len(new_shape)]) + list(new_shape)
    new_shape = np.array([max(new_shape[i], old_shape[i]) for i in range(len(new_shape))])
    difference = new_shape - old_shape
    pad_below = difference // 2
    pad_above = difference // 2 + difference % 2
    pad_list = [list(i) for i in zip(pad_below, pad_above)]
    if any(pad_below) or any(pad_above):
        res = np.pad(image, pad_list, 'constant', constant_values=0)
    else:
        res = image
    pad_list = np.array(pad_list)
    pad_list[:, 1] = np.array(res.shape) - pad_list[:, 1]
    return res, tuple(slice(*i) for i in pad_list)


def get_sliding_window_slicers(image_size: Sequence[int], patch_size: Sequence[int],
                               tile_step_size: float) -> List[tuple]:
    """nnUNetPredictor._internal_get_sliding_window_slicers: for a 2d network on (z, y, x) data every slice
    is tiled in turn; slicers index (C, *image_size)."""
    slicers = []
    if len(patch_size) < len(image_size):
        assert len(patch_size) == len(image_size) - 1
        steps = compute_steps_for_sliding_window(image_size[1:], patch_size, tile_step_size)
        for d in range(image_size[0]):
            for sx in steps[0]:
                for sy in steps[1]:
                    slicers.append(tuple([slice(None), d, *[slice(si, si + ti) for si, ti in
                                                            zip((sx, sy), patch_size)]]))
    else:
        steps = compute_steps_for_sliding_window(image_size, patch_size, tile_step_size)
        for sx in steps[0]:
            for sy in steps[1]:
                for sz in steps[2]:
                    slicers.append(tuple([slice(None), *[slice(si, si + ti) for si, ti in
                                                         zip((sx, sy, sz), patch_size)]]))
    return slicers


def maybe_mirror_and_predict(network: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
                             mirror_axes: Optional[Sequence[int]]) -> np.ndarray:
    """nnUNetPredictor._internal_maybe_mirror_and_predict: the mean of the network's output on x and on x
    flipped over every non-empty combination of ``mirror_axes`` (spatial axes, 0-based), flipped back; summed
    in float32 in nnU-Net's order."""
    prediction = np.asarray(network(x), dtype=np.float32)
    if mirror_axes is not None:
        assert max(mirror_axes) <= x.ndim - 3, 'mirror_axes does not match the dimension of the input!'
        axes = [m + 2 for m in mirror_axes]
        combinations = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
        for combination in combinations:
            flipped = np.ascontiguousarray(np.flip(x, combination))
            prediction += np.flip(np.asarray(network(flipped), dtype=np.float32), combination)
        prediction /= (len(combinations) + 1)
    return prediction


def predict_sliding_window_return_logits(network: Callable[[np.ndarray], np.ndarray], data: np.ndarray,
                                         patch_size: Sequence[int], num_segmentation_heads: int,
                                         tile_step_size: float = 0.5, use_gaussian: bool = True,
                                         mirror_axes: Optional[Sequence[int]] = None, half_precision: bool = True,
                                         progress: bool = False) -> np.ndarray:
    """nnUNetPredictor.predict_sliding_window_return_logits for one network: ``data`` (C, *spatial) float32
    in network axes (for a 2d network: (C, z, y, x)), returns the logits (heads, *spatial), float16 (like
    nnU-Net) or float32 without ``half_precision``. ``network`` maps a float32 batch (1, C, *patch) to
    (1, heads, *patch)."""
    assert data.ndim == 4, 'input_image must be a 4D np.ndarray (c, x, y, z)'
    data, slicer_revert_padding = pad_nd_image(data, patch_size)
    slicers = get_sliding_window_slicers(data.shape[1:], patch_size, tile_step_size)
    dtype = np.float16 if half_precision else np.float32
    predicted_logits = np.zeros((num_segmentation_heads, *data.shape[1:]), dtype=dtype)
    n_predictions = np.zeros(data.shape[1:], dtype=dtype)
    if use_gaussian:
        gaussian = compute_gaussian(tuple(patch_size), sigma_scale=1. / 8, value_scaling_factor=10, dtype=dtype)
    else:
        gaussian = dtype(1)
    bar = _progress(len(slicers)) if progress else None
    try:
        for sl in slicers:
            workon = np.ascontiguousarray(data[sl][None], dtype=np.float32)
            prediction = maybe_mirror_and_predict(network, workon, mirror_axes)[0]
            if use_gaussian:
                prediction *= gaussian
            predicted_logits[sl] += prediction
            n_predictions[sl[1:]] += gaussian
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    np.divide(predicted_logits, n_predictions, out=predicted_logits)
    if np.any(np.isinf(predicted_logits)):
        raise RuntimeError('Encountered inf in predicted array (float16 overflow, as in nnU-Net); '
                           'predict with half_precision=False')
    return predicted_logits[(slice(None), *slicer_revert_padding[1:])]


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, leave=False, desc='tiles')
