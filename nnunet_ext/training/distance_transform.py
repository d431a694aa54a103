"""Signed distance maps in nnU-Net's data pipeline, for the boundary term of the multi-level loss.

A batchgeneratorsv2 transform appended to nnU-Net's training and validation transforms: it runs
per sample in the data-augmentation workers, after spatial augmentation and after the
deep-supervision down-sampling, so each map is that of the exact patch (and resolution) the loss
sees, at no cost to the training step. Every segmentation tensor ``(L, *spatial)`` becomes
``cat([segmentation, Phi])`` in float32 (label values are exact in float32), with one map per
foreground label (label maps) or per region channel (region-based training).

Spacing: the configuration's voxel spacing for the full-resolution target, ``spacing * full / size``
per axis for a down-sampled one. Spatial augmentation (scaling, rotation) is not undone: distances
are measured in the augmented patch's voxel grid times the configuration spacing.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import SegOnlyTransform

from nnunet_ext.losses.signed_distance import signed_distance_map

__all__ = ["SignedDistanceTransform"]


class SignedDistanceTransform(SegOnlyTransform):
    """Appends the signed distance maps (Eq. 7) to each segmentation tensor of a sample.

    Args:
        spacing: voxel spacing of the full-resolution patch (the configuration's spacing).
        foreground_labels: label maps: the labels that get a map, in output-channel order
            (nnU-Net's ``label_manager.foreground_labels``). Exclusive with ``num_regions``.
        num_regions: region-based training: the first ``num_regions`` channels are binary regions,
            each gets a map (a trailing ignore channel does not).
    """

    def __init__(self, spacing: Sequence[float], foreground_labels: Optional[Sequence[int]] = None,
                 num_regions: Optional[int] = None):
        super().__init__()
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
        seg = segmentation.numpy()
        maps = [signed_distance_map(m, spacing) for m in self._masks(seg)]
        distance = torch.from_numpy(np.stack(maps)) if maps else torch.zeros((0, *shape))
        return torch.cat((segmentation.float(), distance), 0)

    def _apply_to_segmentation(self, segmentation: Union[torch.Tensor, List[torch.Tensor]],
                               **params) -> Union[torch.Tensor, List[torch.Tensor]]:
        if isinstance(segmentation, (list, tuple)):
            full_shape = segmentation[0].shape[1:]
            return [self._with_distance(s, full_shape) for s in segmentation]
        return self._with_distance(segmentation, segmentation.shape[1:])
