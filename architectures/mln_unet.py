"""The multi-level structural network (MLN; Section 3 and Fig. 4 of
``docs/methods/multi-level-structural.md``) on nnU-Net's U-Nets.

The paper's MLN is a ResNet-18/ASPP network with three parallel branches fused by a saliency
guidance module. Here the backbone is nnU-Net's own network (dynamic-network-architectures'
``PlainConvUNet`` or ``ResidualEncoderUNet``: same encoder, decoder and plans keywords, so any plans
topology works: 2D/3D, any number of stages, anisotropic kernels and strides) and the branches are
heads on it, all at the full resolution of the input patch:

- region branch (Section 3.1): the U-Net's decoder and segmentation heads, unchanged: region
  logits ``P^region`` at every deep-supervision scale (nnU-Net's contract); its features ``F_r``
  are the decoder's last stage output (before the segmentation head).
- boundary branch (Section 3.2, "another ASPP module"): one conv-norm-nonlin block on ``F_r``
  (the full-resolution stage's kernel) giving ``F_b``, then a 1x1 convolution regressing one signed
  distance map per foreground class, ``P^boundary`` (positive inside, negative outside: the
  regression target is ``-Phi``, Eq. 12).
- pixel branch (Section 3.3, :class:`~nnunet_ext.nn.point_attention.PointAttentionBranch`): the
  uncertain points are selected on the grid of the full-resolution region logits (no oversampling,
  "regular points rather than encrypted points"; in training ``m N`` most uncertain + ``(1 - m) N``
  random voxels, at inference the ``N`` most uncertain); their features are read from the
  full-resolution encoder stage (the paper's ResBlock1, low-level features), go through
  self-attention and a point-wise MLP (features ``F_p`` at the points) and a shared MLP (point
  logits ``L^pixel``).
- saliency guidance fusion (Section 3.4, :class:`~nnunet_ext.nn.saliency_fusion.SaliencyGuidanceFusion`):
  ``F_p`` is scattered onto a zero map of the grid at the points, and ``F_r``, ``F_b`` and that map
  give the final prediction ``P^fusion``.

The pixel branch contributes at inference too: the paper's final prediction is ``P^fusion``, which
takes the pixel features of the points selected on the region prediction (Sections 3.3-3.4 select
points "based on the region prediction" with no training-only condition).

Outputs. Deep supervision on (training and nnU-Net's online validation): an :class:`MLNOutput`
with everything the loss (Eq. 13, :mod:`nnunet_ext.losses.mln`) needs; ``output[0]`` is the
network's prediction, so nnU-Net's validation step, which reads ``output[0]`` as the full-resolution
prediction, computes its pseudo-Dice on what the predictor returns (and nnU-Net's ``checkpoint_best``
is chosen on the prediction users get). Deep supervision off (nnU-Net's predictor): that prediction
only. The parameter set does not depend on the flag (strict loading at prediction).

The prediction is ``P^fusion`` once the fusion is trained, and the full-resolution region logits
before: the paper omits the pixel branch and the saliency guidance module for the first 12 epochs
(Section 4.1, gamma = 0), when the fusion's output is untrained. The boolean buffer ``fusion_active``
(True by default; saved in checkpoints, so the predictor takes the trained state) selects it with
``torch.where`` (no host sync); ``nnUNetTrainerMLN`` sets it to ``gamma > 0`` each epoch. A run shorter
than the fusion's start (e.g. 12 epochs) therefore predicts with its trained region branch, not with an
untrained fusion.

Label maps only (softmax outputs, at least two channels): region-based (sigmoid) training is refused
by the trainer. The full-resolution encoder stage must have stride 1 (nnU-Net's plans always do).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks

from nnunet_ext.architectures.skip_decoder import SkipTransformingUNetDecoder, replace_decoder
from nnunet_ext.nn.point_attention import (PointAttentionBranch, num_pixel_points, scatter_points,
                                           select_uncertain_voxels, voxel_centres)
from nnunet_ext.nn.saliency_fusion import SaliencyGuidanceFusion

__all__ = ["MLNOutput", "MLNUNetDecoder", "MLNPlainConvUNet", "MLNResidualEncoderUNet"]


@dataclass
class MLNOutput:
    """The MLN's training output (deep supervision on).

    Attributes:
        region: region logits ``P^region``, one (B, C, *spatial_s) tensor per deep-supervision scale,
            highest resolution first (nnU-Net's list).
        distance: ``P^boundary`` (B, C - 1, *spatial): signed distance per foreground class, positive inside.
        point_logits: ``L^pixel`` (B, C, N): the pixel branch's logits at the points.
        point_indices: (B, N) flat indices of the points in the full-resolution grid (distinct per sample).
        fused: ``P^fusion`` (B, C, *spatial), the fusion branch's prediction.
        prediction: the network's prediction (B, C, *spatial): ``fused`` once the fusion is trained, the
            full-resolution region logits before (``None``: ``fused``).
    """

    region: List[torch.Tensor]
    distance: torch.Tensor
    point_logits: torch.Tensor
    point_indices: torch.Tensor
    fused: torch.Tensor
    prediction: Optional[torch.Tensor] = None

    def __getitem__(self, index: int) -> torch.Tensor:
        """``output[0]`` is the network's full-resolution prediction (what the predictor returns), as
        nnU-Net's validation step reads a deep-supervision output."""
        if index != 0:
            raise IndexError(f"MLNOutput[{index}]: only [0] (the prediction) is defined; use the attributes")
        return self.fused if self.prediction is None else self.prediction

    @property
    def points(self) -> torch.Tensor:
        """(B, N, d) coordinates in [0, 1] of the points (voxel centres, ``uncertain_points`` convention)."""
        return voxel_centres(self.point_indices, self.fused.shape[2:])


class MLNUNetDecoder(SkipTransformingUNetDecoder):
    """nnU-Net's ``UNetDecoder`` (skips unchanged) whose ``forward_with_features`` also returns the
    features of its last (full-resolution) stage, read by the boundary head and the fusion."""


class _MLNBranches:
    """The boundary, pixel and fusion heads on a dynamic-network-architectures U-Net (``encoder`` +
    ``decoder``), and the forward of Fig. 4. Mixed into ``PlainConvUNet`` / ``ResidualEncoderUNet``."""

    def _add_mln_branches(self, base_class, args, kwargs, num_points: Optional[int], point_fraction: float,
                          max_points: int, importance_ratio: float, num_heads: int) -> None:
        replace_decoder(self, base_class, args, kwargs, MLNUNetDecoder)
        encoder, num_classes = self.encoder, self.decoder.num_classes
        if num_classes < 2:
            raise ValueError(f"the MLN U-Net predicts softmax label maps: it needs at least 2 output channels "
                             f"(background + foreground), got num_classes={num_classes}")
        if any(s != 1 for s in encoder.strides[0]):
            raise ValueError(f"the MLN pixel branch reads the first encoder stage at full resolution; these plans "
                             f"give it stride {list(encoder.strides[0])}")
        if not 0 <= importance_ratio <= 1:
            raise ValueError(f"mln_importance_ratio (m) must be in [0, 1], got {importance_ratio}")
        num_pixel_points((1,), num_points, point_fraction, max_points)  # checks the point settings
        channels = encoder.output_channels[0]  # width of the full-resolution decoder stage and encoder stage
        self.mln_num_points, self.mln_point_fraction, self.mln_max_points = num_points, point_fraction, max_points
        self.mln_importance_ratio = importance_ratio
        self.boundary_branch = StackedConvBlocks(
            1, encoder.conv_op, channels, channels, encoder.kernel_sizes[0], 1, encoder.conv_bias, encoder.norm_op,
            encoder.norm_op_kwargs, encoder.dropout_op, encoder.dropout_op_kwargs, encoder.nonlin,
            encoder.nonlin_kwargs)
        self.distance_head = encoder.conv_op(channels, num_classes - 1, kernel_size=1, bias=True)
        self.pixel_branch = PointAttentionBranch(channels, channels, num_classes, num_heads)
        self.fusion = SaliencyGuidanceFusion(channels, num_classes, encoder.conv_op, encoder.nonlin,
                                             encoder.nonlin_kwargs)
        # Which output is the prediction: the fusion once it is trained, the region branch before (the
        # paper omits the saliency guidance module until epoch 12, Section 4.1). A buffer, so checkpoints
        # carry it to nnU-Net's predictor; the trainer sets it from gamma each epoch.
        self.register_buffer('fusion_active', torch.ones((), dtype=torch.bool))

    def forward(self, x: torch.Tensor):
        skips = self.encoder(x)
        region, region_features = self.decoder.forward_with_features(skips)
        spatial = region[0].shape[2:]
        boundary_features = self.boundary_branch(region_features)
        num_points = num_pixel_points(spatial, self.mln_num_points, self.mln_point_fraction, self.mln_max_points)
        indices = select_uncertain_voxels(region[0], num_points,
                                          self.mln_importance_ratio if self.training else 1.0)
        point_features, point_logits = self.pixel_branch(skips[0], indices)
        pixel_features = scatter_points(point_features.to(boundary_features.dtype), indices, spatial)
        fused = self.fusion(region_features, boundary_features, pixel_features)
        prediction = torch.where(self.fusion_active, fused, region[0].to(fused.dtype))  # no host sync
        if not self.decoder.deep_supervision:
            return prediction
        return MLNOutput(region, self.distance_head(boundary_features), point_logits, indices, fused, prediction)

    def compute_conv_feature_map_size(self, input_size):
        """nnU-Net's estimate of the U-Net plus what the heads keep for backward, in nnU-Net's unit (its
        proxy counts one map per conv-norm-nonlinearity block, which keeps two: so half the elements).

        Kept at full resolution (``C`` channels, ``V`` voxels): the boundary block (nnU-Net's count of
        it), and in the fusion ``S = F_b + F_p``, the two sigmoid weight maps, the two saliency maps, the
        scattered pixel map ``F_p``, the concatenation (``2C``) and the hidden features: ``9 C V``
        elements. The outputs (distance maps, fused logits) are counted as nnU-Net counts its heads'
        logits. The point branch keeps about ``12 C N`` elements for ``N`` points (its tokens through
        embedding, attention, MLPs; PyTorch's fused attention keeps no ``N x N`` weights). The encoder's
        full-resolution features that the points are read from are kept by the U-Net already."""
        channels, num_classes = self.encoder.output_channels[0], self.decoder.num_classes
        voxels = int(np.prod(input_size, dtype=np.int64))
        points = num_pixel_points(input_size, self.mln_num_points, self.mln_point_fraction, self.mln_max_points)
        kept = 9 * channels * voxels + 12 * channels * points
        return (super().compute_conv_feature_map_size(input_size)
                + self.boundary_branch.compute_conv_feature_map_size(input_size)
                + kept // 2 + voxels * ((num_classes - 1) + num_classes))


class MLNPlainConvUNet(_MLNBranches, PlainConvUNet):
    """``PlainConvUNet`` (nnU-Net's default network) with the MLN's boundary, pixel and fusion heads.

    Extra keywords: ``mln_num_points`` (N per sample; ``None``: ``ceil(mln_point_fraction * voxels)``
    of the patch, at most ``mln_max_points``), ``mln_importance_ratio`` (m, 0.75), ``mln_num_heads``
    (self-attention heads, 4; must divide ``features_per_stage[0]``).
    """

    def __init__(self, *args, mln_num_points: Optional[int] = None, mln_point_fraction: float = 1 / 16,
                 mln_max_points: int = 1024, mln_importance_ratio: float = 0.75, mln_num_heads: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        self._add_mln_branches(PlainConvUNet, args, kwargs, mln_num_points, mln_point_fraction, mln_max_points,
                               mln_importance_ratio, mln_num_heads)


class MLNResidualEncoderUNet(_MLNBranches, ResidualEncoderUNet):
    """``ResidualEncoderUNet`` (nnU-Net's ResEnc network) with the MLN heads; keywords as
    :class:`MLNPlainConvUNet`."""

    def __init__(self, *args, mln_num_points: Optional[int] = None, mln_point_fraction: float = 1 / 16,
                 mln_max_points: int = 1024, mln_importance_ratio: float = 0.75, mln_num_heads: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        self._add_mln_branches(ResidualEncoderUNet, args, kwargs, mln_num_points, mln_point_fraction,
                               mln_max_points, mln_importance_ratio, mln_num_heads)
