"""U-Nets with a lateral feature alignment module (LFAM, GODC/LFAM paper Fig. 2) on every skip.

They are nnU-Net's own networks (dynamic-network-architectures' ``PlainConvUNet`` and
``ResidualEncoderUNet``: same encoder, same decoder blocks, same plans keywords) whose decoder
aligns each encoder skip to the up-sampled decoder feature before concatenating them. So they
follow any plans topology (2D/3D, any number of stages, anisotropic kernels and strides) and keep
nnU-Net's deep-supervision contract. Extra keywords: ``lfam_offset_groups``, ``lfam_modulated``,
``lfam_shared`` (one deformable kernel bank for all levels, the paper's "Conv. shared" ablation;
see ``SharedKernelSlice``).
"""
from __future__ import annotations

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnunet_ext.architectures.skip_decoder import SkipTransformingUNetDecoder, replace_decoder

from nnunet_ext.nn.deformable_conv import DeformableConv
from nnunet_ext.nn.lateral_alignment import LateralFeatureAlignment, SharedKernelSlice


class LFAMUNetDecoder(SkipTransformingUNetDecoder):
    """nnU-Net's ``UNetDecoder`` with ``LateralFeatureAlignment`` applied to each skip: one independent
    module per resolution level by default (the paper's better setting, Table II); with
    ``lfam_shared`` the levels share one deformable kernel bank (offset predictors stay per level)."""

    def __init__(self, encoder, num_classes: int, n_conv_per_stage, deep_supervision: bool,
                 nonlin_first: bool = False, lfam_offset_groups: int = 1, lfam_modulated: bool = True,
                 lfam_shared: bool = False):
        super().__init__(encoder, num_classes, n_conv_per_stage, deep_supervision, nonlin_first=nonlin_first)
        levels = range(len(encoder.output_channels) - 1)  # skip of stage s, s = 0 .. n_stages - 2
        kernels = {s: tuple(encoder.kernel_sizes[s]) for s in levels}
        shared = {}
        if lfam_shared:
            bank = DeformableConv(max(encoder.output_channels[s] for s in levels),
                                  max(encoder.output_channels[s] for s in levels),
                                  tuple(max(k) for k in zip(*kernels.values())), offset_groups=lfam_offset_groups,
                                  ndim=len(kernels[0]))
            shared = {s: SharedKernelSlice(bank, encoder.output_channels[s], kernels[s]) for s in levels}
        self.alignments = nn.ModuleList([  # decoder order: deepest skip first
            LateralFeatureAlignment(encoder.output_channels[s], encoder.output_channels[s], encoder.conv_op,
                                    kernels[s], lfam_offset_groups, lfam_modulated, shared.get(s))
            for s in reversed(levels)])

    def transform_skip(self, s: int, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``skip -> LFAM(skip, up)`` before the concatenation."""
        return self.alignments[s](skip, up)

    def compute_conv_feature_map_size(self, input_size):
        """nnU-Net's decoder estimate plus, per level, LFAM's own
        (:meth:`LateralFeatureAlignment.compute_conv_feature_map_size`: what it keeps for backward and its
        largest temporary, in elements), halved: nnU-Net's estimate counts one map per conv-norm-nonlin
        block, which keeps two for backward, and its planner's reference values are calibrated on that
        proxy (the convention of ``nnunet_ext.architectures.resunet._kept``)."""
        total = super().compute_conv_feature_map_size(input_size)
        size = list(input_size)
        level_sizes = []
        for stride in self.encoder.strides:
            size = [i // j for i, j in zip(size, stride)]
            level_sizes.append(size)
        for s, alignment in enumerate(self.alignments):
            total += alignment.compute_conv_feature_map_size(level_sizes[-(s + 2)]) // 2
        return total


def _lfam_initialize(module: nn.Module) -> None:
    """After nnU-Net's He initialisation: He-initialise deformable kernels like the other convs and
    re-zero the offset predictors (``Module.apply`` visits children first)."""
    if isinstance(module, DeformableConv):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    if isinstance(module, LateralFeatureAlignment):
        module.reset_offset_predictor()


class LFAMPlainConvUNet(PlainConvUNet):
    """``PlainConvUNet`` (nnU-Net's default network) with LFAM on every skip connection."""

    def __init__(self, *args, lfam_offset_groups: int = 1, lfam_modulated: bool = True, lfam_shared: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        replace_decoder(self, PlainConvUNet, args, kwargs, LFAMUNetDecoder, lfam_offset_groups=lfam_offset_groups,
                        lfam_modulated=lfam_modulated, lfam_shared=lfam_shared)

    @staticmethod
    def initialize(module):
        PlainConvUNet.initialize(module)
        _lfam_initialize(module)


class LFAMResidualEncoderUNet(ResidualEncoderUNet):
    """``ResidualEncoderUNet`` (nnU-Net's ResEnc network; the paper's "Residual U-Net" row) with LFAM
    on every skip connection."""

    def __init__(self, *args, lfam_offset_groups: int = 1, lfam_modulated: bool = True, lfam_shared: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        replace_decoder(self, ResidualEncoderUNet, args, kwargs, LFAMUNetDecoder,
                        lfam_offset_groups=lfam_offset_groups, lfam_modulated=lfam_modulated, lfam_shared=lfam_shared)

    @staticmethod
    def initialize(module):
        ResidualEncoderUNet.initialize(module)
        _lfam_initialize(module)
