"""Signed distance maps in nnU-Net's data pipeline, for the boundary terms of the multi-level loss (Eq. 6)
and of the MLN (Eq. 12).

A batchgeneratorsv2 transform appended to nnU-Net's training and validation transforms: it runs
per sample in the data-augmentation workers, after spatial augmentation and after the
deep-supervision down-sampling, so each map is that of the exact patch (and resolution) the loss
sees, at no cost to the training step. Every segmentation tensor ``(L, *spatial)`` becomes
``cat([segmentation, Phi])`` in float32 (label values are exact in float32), with one map per
foreground label (label maps) or per region channel (region-based training). The maps are in the
units of the spacing (Eq. 7 as written); the losses normalise them (:mod:`nnunet_ext.losses.boundary`).

Spacing: the configuration's voxel spacing for the full-resolution target, ``spacing * full / size``
per axis for a down-sampled one. Each deep-supervision target's map is the exact signed distance map
of that target's own labels (nnU-Net's nearest-neighbour down-sampling of the patch) on its own grid:
the low-resolution maps are computed, not resampled from the full-resolution one (they would differ:
the coarse grid's interface voxels are not the fine grid's). Spatial augmentation (scaling,
rotation) is not undone: distances are measured in the augmented patch's voxel grid times the
configuration spacing.

Cost (``bench/distance_targets_time.py``, one core): a 3D 128^3 sample with two labels and its five
deep-supervision scales takes about 0.2 s with ITK's exact transform (``backend='auto'``), against
about 1 s for the previous scipy implementation (erosion + feature transform in float64), with the
same values up to float32 rounding.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import SegOnlyTransform

from nnunet_ext.losses.signed_distance import BACKENDS, signed_distance_map

__all__ = ["SignedDistanceTransform"]


class SignedDistanceTransform(SegOnlyTransform):
    """Appends the signed distance maps (Eq. 7) to each segmentation tensor of a sample.

    Args:
        spacing: voxel spacing of the full-resolution patch (the configuration's spacing).
        foreground_labels: label maps: the labels that get a map, in output-channel order
            (nnU-Net's ``label_manager.foreground_labels``). Exclusive with ``num_regions``.
        num_regions: region-based training: the first ``num_regions`` channels are binary regions,
            each gets a map (a trailing ignore channel does not).
        backend: distance transform of :func:`~nnunet_ext.losses.signed_distance.signed_distance_map`
            (``'auto'``: ITK's exact transform for 2D/3D maps of at least 2**17 voxels, scipy's below;
            ``'itk'``; ``'scipy'``: the reference; the same values up to float32 rounding).
    """

    def __init__(self, spacing: Sequence[float], foreground_labels: Optional[Sequence[int]] = None,
                 num_regions: Optional[int] = None, backend: str = 'auto'):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        if (foreground_labels is None) == (num_regions is None):
            raise ValueError("give exactly one of foreground_labels (label maps) and num_regions (regions)")
        self.spacing = tuple(float(s) for s in spacing)
        self.foreground_labels = None if foreground_labels is None else tuple(int(c) for c in foreground_labels)
        self.num_regions = num_regions

    def _masks(self, segmentation: np.ndarray):
        if self.foreground_labels is not None:
            if segmentation.shape[0] != 1:
                raise ValueError(f"label-map segmentation must have 1 channel, got shape {segmentation.shape}")
            return [segmentation[0] == c for c in self.foreground_labels]
        if segmentation.shape[0] < self.num_regions:
            raise ValueError(f"expected at least {self.num_regions} region channels, got shape {segmentation.shape}")
        return [segmentation[r] != 0 for r in range(self.num_regions)]

    def _with_distance(self, segmentation: torch.Tensor, full_shape: Sequence[int]) -> torch.Tensor:
        shape = segmentation.shape[1:]
        if len(shape) != len(self.spacing):
            raise ValueError(f"segmentation of spatial shape {tuple(shape)} and spacing {self.spacing} differ in "
                             f"dimension")
        spacing = [s * f / n for s, f, n in zip(self.spacing, full_shape, shape)]
        masks = self._masks(segmentation.numpy())
        packed = torch.empty((segmentation.shape[0] + len(masks), *shape), dtype=torch.float32)
        packed[:segmentation.shape[0]] = segmentation  # label values are exact in float32
        distance = packed[segmentation.shape[0]:].numpy()  # shares memory with packed
        for k, mask in enumerate(masks):
            signed_distance_map(mask, spacing, out=distance[k], backend=self.backend)
        return packed

    def _apply_to_segmentation(self, segmentation: Union[torch.Tensor, List[torch.Tensor]],
                               **params) -> Union[torch.Tensor, List[torch.Tensor]]:
        if isinstance(segmentation, (list, tuple)):
            full_shape = segmentation[0].shape[1:]
            return [self._with_distance(s, full_shape) for s in segmentation]
        return self._with_distance(segmentation, segmentation.shape[1:])
