"""Resampling, as nnU-Net 2.8.1's ``preprocessing/resampling/default_resampling.py`` does it.

``resize`` reproduces ``skimage.transform.resize(image, shape, order, mode='edge', anti_aliasing=False)``
(clip=True, preserve_range=False on float64 input) with the same ``scipy.ndimage.zoom`` call skimage makes
(``mode='nearest'``, ``grid_mode=True``) and the same clipping to the input's range. The out-of-plane step of
the separate-z path is nnU-Net's own ``map_coordinates`` code.
"""
from __future__ import annotations

from copy import deepcopy
from typing import Optional, Sequence, Tuple, Union

import numpy as np
from scipy.ndimage import map_coordinates, zoom

ANISO_THRESHOLD = 3  # nnunetv2.configuration.ANISO_THRESHOLD


def compute_new_shape(old_shape: Sequence[int], old_spacing: Sequence[float],
                      new_spacing: Sequence[float]) -> np.ndarray:
    """default_resampling.compute_new_shape (Python's round: half to even)."""
    assert len(old_spacing) == len(old_shape) == len(new_spacing)
    return np.array([int(round(i / j * k)) for i, j, k in zip(old_spacing, new_spacing, old_shape)])


def get_do_separate_z(spacing, anisotropy_threshold=ANISO_THRESHOLD) -> bool:
    return (np.max(spacing) / np.min(spacing)) > anisotropy_threshold


def get_lowres_axis(new_spacing) -> np.ndarray:
    return np.where(max(new_spacing) / np.array(new_spacing) == 1)[0]


def determine_do_sep_z_and_axis(force_separate_z: Optional[bool], current_spacing, new_spacing,
                                separate_z_anisotropy_threshold: float = ANISO_THRESHOLD) -> Tuple[bool, Optional[int]]:
    """default_resampling.determine_do_sep_z_and_axis."""
    if force_separate_z is not None:
        do_separate_z = force_separate_z
        axis = get_lowres_axis(current_spacing) if force_separate_z else None
    elif get_do_separate_z(current_spacing, separate_z_anisotropy_threshold):
        do_separate_z, axis = True, get_lowres_axis(current_spacing)
    elif get_do_separate_z(new_spacing, separate_z_anisotropy_threshold):
        do_separate_z, axis = True, get_lowres_axis(new_spacing)
    else:
        do_separate_z, axis = False, None
    if axis is not None:
        if len(axis) in (2, 3):
            do_separate_z, axis = False, None
        else:
            axis = axis[0]
    return do_separate_z, axis


def resize(image: np.ndarray, output_shape: Sequence[int], order: int) -> np.ndarray:
    """skimage.transform.resize(image, output_shape, order, mode='edge', anti_aliasing=False) for a float64
    ``image`` with as many axes as ``output_shape``."""
    image = np.asarray(image)
    output_shape = tuple(int(i) for i in output_shape)
    assert image.ndim == len(output_shape)
    factors = np.divide(image.shape, output_shape)
    out = zoom(image, [1 / f for f in factors], order=order, mode='nearest', cval=0, grid_mode=True)
    min_val = np.min(image)
    if np.isnan(min_val):
        min_val, max_val = np.nanmin(image), np.nanmax(image)
    else:
        max_val = np.max(image)
    np.clip(out, np.asarray(min_val), np.asarray(max_val), out=out)
    return out


def resample_data_or_seg(data: np.ndarray, new_shape, is_seg: bool = False, axis: Optional[int] = None,
                         order: int = 3, do_separate_z: bool = False, order_z: int = 0, dtype_out=None) -> np.ndarray:
    """default_resampling.resample_data_or_seg for data / probabilities (``is_seg`` False; label maps are
    not resampled by the predictor)."""
    if is_seg:
        raise NotImplementedError('resampling label maps (is_seg=True) is not needed for prediction')
    assert data.ndim == 4, 'data must be (c, x, y, z)'
    assert len(new_shape) == data.ndim - 1
    shape = np.array(data[0].shape)
    new_shape = np.array(new_shape)
    if dtype_out is None:
        dtype_out = data.dtype
    reshaped_final = np.zeros((data.shape[0], *new_shape), dtype=dtype_out)
    if not np.any(shape != new_shape):
        return data
    data = data.astype(float, copy=False)
    if do_separate_z:
        assert axis is not None, 'If do_separate_z, we need to know what axis is anisotropic'
        if axis == 0:
            new_shape_2d = new_shape[1:]
        elif axis == 1:
            new_shape_2d = new_shape[[0, 2]]
        else:
            new_shape_2d = new_shape[:-1]
        for c in range(data.shape[0]):
            tmp = deepcopy(new_shape)
            tmp[axis] = shape[axis]
            reshaped_here = np.zeros(tmp)
            for slice_id in range(shape[axis]):
                if axis == 0:
                    reshaped_here[slice_id] = resize(data[c, slice_id], new_shape_2d, order)
                elif axis == 1:
                    reshaped_here[:, slice_id] = resize(data[c, :, slice_id], new_shape_2d, order)
                else:
                    reshaped_here[:, :, slice_id] = resize(data[c, :, :, slice_id], new_shape_2d, order)
            if shape[axis] != new_shape[axis]:
                rows, cols, dim = new_shape[0], new_shape[1], new_shape[2]
                orig_rows, orig_cols, orig_dim = reshaped_here.shape
                row_scale = float(orig_rows) / rows
                col_scale = float(orig_cols) / cols
                dim_scale = float(orig_dim) / dim
                map_rows, map_cols, map_dims = np.mgrid[:rows, :cols, :dim]
                map_rows = row_scale * (map_rows + 0.5) - 0.5
                map_cols = col_scale * (map_cols + 0.5) - 0.5
                map_dims = dim_scale * (map_dims + 0.5) - 0.5
                coord_map = np.array([map_rows, map_cols, map_dims])
                reshaped_final[c] = map_coordinates(reshaped_here, coord_map, order=order_z, mode='nearest')[None]
            else:
                reshaped_final[c] = reshaped_here
    else:
        for c in range(data.shape[0]):
            reshaped_final[c] = resize(data[c], new_shape, order)
    return reshaped_final


def resample_data_or_seg_to_shape(data: np.ndarray, new_shape: Union[Sequence[int], np.ndarray],
                                  current_spacing: Sequence[float], new_spacing: Sequence[float],
                                  is_seg: bool = False, order: int = 3, order_z: int = 0,
                                  force_separate_z: Optional[bool] = False,
                                  separate_z_anisotropy_threshold: float = ANISO_THRESHOLD) -> np.ndarray:
    """default_resampling.resample_data_or_seg_to_shape (same defaults)."""
    do_separate_z, axis = determine_do_sep_z_and_axis(force_separate_z, current_spacing, new_spacing,
                                                      separate_z_anisotropy_threshold)
    assert data.ndim == 4, 'data must be c x y z'
    return resample_data_or_seg(data, new_shape, is_seg, axis, order, do_separate_z, order_z=order_z)
