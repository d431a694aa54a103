"""Pre-activation residual U-Net (ResUNet) of Zhang, Liu & Wang, "Road extraction by deep residual U-Net"
(IEEE GRSL 2018, arXiv:1711.10684), the network of the ResUNet liver paper
(``docs/methods/resunet.md``, Section II-C, Fig. 7) and the "Residual U-Net" baseline of
the GODC/LFAM paper (Table I), on nnU-Net's plans topology.

Why not dynamic-network-architectures' ``ResidualEncoderUNet``: its ``BasicBlockD`` is post-activation
(conv-norm-nonlin, conv-norm, add, nonlin; ResNet-D average-pool shortcut) and its decoder is nnU-Net's
plain one (transposed convolution, plain conv blocks). Zhang et al.'s network differs in all three:

* **Residual unit** (Zhang et al. Eq. 1-2, Fig. 2b; He et al. 2016, "Identity mappings in deep residual
  networks", full pre-activation): ``x_{l+1} = h(x_l) + F(x_l)`` with
  ``F(x) = conv(nonlin(norm(conv_s(nonlin(norm(x))))))`` and ``h`` the identity, or a 1x1 convolution with the
  unit's stride where the width or the resolution changes (projection shortcut, no norm: the shortcut
  path stays clean as in He et al.). Down-sampling is the stride ``s`` of the unit's first convolution
  (Zhang et al.: "stride 2 ... instead of pooling").
* **Input stem**: the first unit has no pre-activation, ``F(x) = conv(nonlin(norm(conv(x))))`` (Zhang et
  al. Table 1, level 1: the network input is not normalised/activated before the first convolution).
* **Decoder** (Zhang et al. Section II-B, levels 5-7): per level, parameter-free up-sampling of the deeper
  feature (nearest neighbour, to the skip's size: any anisotropic stride), concatenation with the
  encoder feature of that level, a residual unit (the projection shortcut adapts the concatenated width).
  Segmentation heads are 1x1 convolutions on the unit outputs (Zhang et al.: "1x1 convolution and a
  sigmoid"; here raw logits, nnU-Net applies softmax/sigmoid in the loss).

Plans mapping (``PlainConvUNet`` keywords, so nnU-Net's default ``nnUNetPlans`` train it unchanged):
``n_stages``, ``features_per_stage``, ``kernel_sizes``, ``strides`` (per axis, anisotropic), conv/norm/
dropout/nonlin ops (InstanceNorm + LeakyReLU under nnU-Net plans), ``conv_bias``. A residual unit holds
two convolutions, so ``n_conv_per_stage`` / ``n_conv_per_stage_decoder`` = 2k give k units per stage
(nnU-Net's default 2 = one unit, Zhang et al.'s configuration). The last stage is Zhang et al.'s bridge.
``nonlin_first`` is refused (a pre-activation unit fixes the order norm -> nonlin -> conv). Dropout (if
the plans set it) sits between the two convolutions of a unit (Wide-ResNet placement).

Deep supervision is nnU-Net's contract: one head per decoder stage (the parameter set does not depend
on the flag), with it on a list of logits, highest resolution first, at the scales of nnU-Net's default
``_get_deep_supervision_scales``; off, the highest-resolution logits. Decoder skips pass through
``PreActResUNetDecoder.transform_skip(s, skip, up)`` before the concatenation, the hook the LFAM variant
(:class:`LFAMPreActResUNet`) uses.

:meth:`PreActResUNet.paper_preset` is Zhang et al.'s network: 2D, 3 input channels (RGB), 1 output,
BatchNorm + ReLU, convolutions with bias, 3x3 kernels, features 64/128/256 in three encoder levels and a
512-feature bridge (three stride-2 down-samplings), three decoder levels, one unit per level. As built it
has **8,221,379 parameters**: 8,220,993 in Zhang et al.'s network (7,780,032 weights of the 3x3
convolutions, 430,272 of the seven 1x1 projection shortcuts, 64 of the head, 4,225 biases, 6,400
BatchNorm scales/shifts) + 386 in the two auxiliary deep-supervision heads. Zhang et al. report 7.8 M:
the weights of the 3x3 convolutions alone.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Type, Union

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.helper import maybe_convert_scalar_to_list
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from nnunet_ext.architectures.lfam_unet import _lfam_initialize
from nnunet_ext.nn.lateral_alignment import LateralFeatureAlignment

IntOrSeq = Union[int, Sequence[int]]


def _per_stage(value, n: int, what: str) -> List:
    values = [value] * n if isinstance(value, int) else list(value)
    if len(values) != n:
        raise ValueError(f"{what} needs {n} entries, got {value}")
    return values


def _units(n_conv: Sequence[int], what: str) -> List[int]:
    """Convolutions per stage -> residual units per stage (two convolutions each)."""
    if any(int(n) < 2 or int(n) % 2 for n in n_conv):
        raise ValueError(f"{what} = {list(n_conv)}: a pre-activation residual unit holds two convolutions, so "
                         f"every stage needs an even number >= 2 (2 = one unit, nnU-Net's default)")
    return [int(n) // 2 for n in n_conv]


def _voxels(channels: int, size: Sequence[int]) -> np.int64:
    return np.prod([channels, *size], dtype=np.int64)


def _kept(elements) -> np.int64:
    """Elements kept for backward -> nnU-Net's unit of ``compute_conv_feature_map_size``.

    nnU-Net's proxy (dynamic-network-architectures' ``ConvDropoutNormReLU``) counts one map per
    conv-norm-nonlinearity block, which keeps two for backward (the convolution's output, read by the
    norm, and the in-place activated output, read by the next convolution); its planner's reference
    values are calibrated on that proxy. Our estimates count what a module really keeps and halve it,
    so that they compare with nnU-Net's U-Net's on the planner's scale."""
    return np.int64(elements) // 2


class PreActResidualUnit(nn.Module):
    """``x -> h(x) + F(x)``, full pre-activation (see the module docstring for ``F`` and ``h``).

    ``stem=True``: the network's first unit, without the pre-activation of its input.
    """

    def __init__(self, conv_op: Type[nn.Module], input_channels: int, output_channels: int, kernel_size: IntOrSeq,
                 stride: IntOrSeq = 1, conv_bias: bool = True, norm_op: Optional[Type[nn.Module]] = None,
                 norm_op_kwargs: Optional[dict] = None, dropout_op: Optional[Type[nn.Module]] = None,
                 dropout_op_kwargs: Optional[dict] = None, nonlin: Optional[Type[nn.Module]] = None,
                 nonlin_kwargs: Optional[dict] = None, stem: bool = False):
        super().__init__()
        kernel = maybe_convert_scalar_to_list(conv_op, kernel_size)
        stride = maybe_convert_scalar_to_list(conv_op, stride)
        self.input_channels, self.output_channels = input_channels, output_channels
        self.stride, self.stem = list(stride), stem
        padding = [(k - 1) // 2 for k in kernel]

        def norm(channels):
            return norm_op(channels, **(norm_op_kwargs or {})) if norm_op is not None else nn.Identity()

        def act():
            return nonlin(**(nonlin_kwargs or {})) if nonlin is not None else nn.Identity()

        self.norm1 = nn.Identity() if stem else norm(input_channels)
        self.nonlin1 = nn.Identity() if stem else act()
        self.conv1 = conv_op(input_channels, output_channels, kernel, stride, padding, bias=conv_bias)
        self.norm2, self.nonlin2 = norm(output_channels), act()
        self.dropout = dropout_op(**(dropout_op_kwargs or {})) if dropout_op is not None else nn.Identity()
        self.conv2 = conv_op(output_channels, output_channels, kernel, 1, padding, bias=conv_bias)
        self.projects = input_channels != output_channels or any(s != 1 for s in self.stride)
        self.shortcut = conv_op(input_channels, output_channels, 1, stride, 0, bias=conv_bias) if self.projects \
            else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.nonlin1(self.norm1(x)))
        out = self.conv2(self.dropout(self.nonlin2(self.norm2(out))))
        return out + self.shortcut(x)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """What the unit keeps for backward (batch 1), in nnU-Net's unit (:func:`_kept`): its input ``x``
        (kept by ``norm1`` and the shortcut), ``nonlin1(norm1(x))`` (in place; kept by ``conv1``), the
        output of ``conv1`` (kept by ``norm2``) and ``nonlin2(norm2(.))`` (kept by ``conv2``). The stem
        keeps only ``x`` (kept by ``conv1``) besides the last two. The output of ``conv2``, the shortcut and
        the sum are not kept by the unit (the sum is the next unit's input, counted there)."""
        out_size = [i // s for i, s in zip(input_size, self.stride)]
        inputs = 1 if self.stem else 2
        return _kept(inputs * _voxels(self.input_channels, input_size) + 2 * _voxels(self.output_channels, out_size))


class PreActResUNetEncoder(nn.Module):
    """Stages of residual units; stage ``s`` down-samples by ``strides[s]`` in its first unit. Returns the
    output of every stage (the skips; the last one is the bridge). Keeps nnU-Net's encoder attributes
    (``output_channels``, ``strides``, ``kernel_sizes``, ``conv_op``, ...) that decoders read."""

    def __init__(self, input_channels: int, features_per_stage: Sequence[int], conv_op: Type[nn.Module],
                 kernel_sizes: Sequence, strides: Sequence, units_per_stage: Sequence[int], conv_bias: bool,
                 norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs):
        super().__init__()
        self.output_channels = list(features_per_stage)
        self.kernel_sizes = [list(maybe_convert_scalar_to_list(conv_op, k)) for k in kernel_sizes]
        self.strides = [list(maybe_convert_scalar_to_list(conv_op, s)) for s in strides]
        self.conv_op, self.conv_bias = conv_op, conv_bias
        self.norm_op, self.norm_op_kwargs = norm_op, norm_op_kwargs
        self.dropout_op, self.dropout_op_kwargs = dropout_op, dropout_op_kwargs
        self.nonlin, self.nonlin_kwargs = nonlin, nonlin_kwargs
        ops = (conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs)
        stages, channels = [], input_channels
        for s, (features, kernel, stride, units) in enumerate(zip(features_per_stage, self.kernel_sizes,
                                                                     self.strides, units_per_stage)):
            blocks = [PreActResidualUnit(conv_op, channels, features, kernel, stride, *ops, stem=s == 0)]
            blocks += [PreActResidualUnit(conv_op, features, features, kernel, 1, *ops) for _ in range(units - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = features
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        total, size = np.int64(0), list(input_size)
        for stage in self.stages:
            for unit in stage:
                total += unit.compute_conv_feature_map_size(size)
                size = [i // s for i, s in zip(size, unit.stride)]
        return total


class NearestUpsampling(nn.Module):
    """Parameter-free up-sampling to a given size (Zhang et al.'s "up-sampling"; nearest neighbour, so an
    anisotropic stride of 1 along an axis copies that axis unchanged)."""

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return F.interpolate(x, size=tuple(size), mode='nearest')


class PreActResUNetDecoder(nn.Module):
    """Decoder stage ``s`` (0 = the deepest) up-samples, concatenates ``[up, transform_skip(s, skip, up)]``
    (skip = encoder stage ``n_stages - 2 - s``) and applies residual units; one 1x1 head per stage.

    The encoder is not registered as a submodule (nnU-Net's ``UNetDecoder`` registers it twice in the
    state dict); the decoder keeps what it needs: ``skip_channels``, ``skip_kernel_sizes``, ``conv_op``.
    """

    def __init__(self, encoder: PreActResUNetEncoder, num_classes: int, units_per_stage: Sequence[int],
                 deep_supervision: bool):
        super().__init__()
        self.deep_supervision = deep_supervision
        self.num_classes = num_classes
        self.conv_op = encoder.conv_op
        self.encoder_strides = [list(s) for s in encoder.strides]
        n = len(encoder.output_channels)
        self.skip_channels = [encoder.output_channels[n - 2 - s] for s in range(n - 1)]
        self.skip_kernel_sizes = [encoder.kernel_sizes[n - 2 - s] for s in range(n - 1)]
        self.up_channels = [encoder.output_channels[n - 1 - s] for s in range(n - 1)]
        ops = (encoder.conv_bias, encoder.norm_op, encoder.norm_op_kwargs, encoder.dropout_op,
               encoder.dropout_op_kwargs, encoder.nonlin, encoder.nonlin_kwargs)
        self.upsampling = NearestUpsampling()
        stages = []
        for s, units in enumerate(units_per_stage):
            c, kernel = self.skip_channels[s], self.skip_kernel_sizes[s]
            blocks = [PreActResidualUnit(self.conv_op, self.up_channels[s] + c, c, kernel, 1, *ops)]
            blocks += [PreActResidualUnit(self.conv_op, c, c, kernel, 1, *ops) for _ in range(units - 1)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList([self.conv_op(c, num_classes, 1, 1, 0, bias=True) for c in self.skip_channels])

    def transform_skip(self, s: int, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """What decoder stage ``s`` concatenates from the encoder (the skip itself here)."""
        return skip

    def forward(self, skips: List[torch.Tensor]):
        x = skips[-1]
        outputs = []
        for s, stage in enumerate(self.stages):
            skip = skips[-(s + 2)]
            up = self.upsampling(x, skip.shape[2:])
            x = stage(torch.cat((up, self.transform_skip(s, skip, up)), 1))
            if self.deep_supervision:
                outputs.append(self.seg_layers[s](x))
            elif s == len(self.stages) - 1:
                outputs.append(self.seg_layers[-1](x))
        outputs = outputs[::-1]  # highest resolution first
        return outputs if self.deep_supervision else outputs[0]

    def skip_sizes(self, input_size: Sequence[int]) -> List[List[int]]:
        """Spatial size of the skip of decoder stage ``s`` (deepest first) for an input of ``input_size``."""
        sizes, size = [], list(input_size)
        for stride in self.encoder_strides:
            size = [i // j for i, j in zip(size, stride)]
            sizes.append(size)
        return sizes[-2::-1]

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Per stage, in nnU-Net's unit (:func:`_kept`): the units (the first one's input is the
        concatenation; the up-sampled feature is copied into it and not kept) and, for each head in use,
        its input (the stage's output, kept by the 1x1 convolution) and its logits (counted as nnU-Net's
        decoder counts its heads' logits)."""
        total = np.int64(0)
        for s, size in enumerate(self.skip_sizes(input_size)):
            for unit in self.stages[s]:
                total += unit.compute_conv_feature_map_size(size)
            if self.deep_supervision or s == len(self.stages) - 1:
                total += _kept(_voxels(self.skip_channels[s], size)) + _voxels(self.num_classes, size)
        return total


class PreActResUNet(nn.Module):
    """Zhang et al.'s pre-activation residual U-Net on ``PlainConvUNet`` plans keywords (module docstring)."""

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: IntOrSeq, conv_op: Type[nn.Module],
                 kernel_sizes, strides, n_conv_per_stage: IntOrSeq, num_classes: int,
                 n_conv_per_stage_decoder: IntOrSeq, conv_bias: bool = False, norm_op=None, norm_op_kwargs=None,
                 dropout_op=None, dropout_op_kwargs=None, nonlin=None, nonlin_kwargs=None,
                 deep_supervision: bool = False, nonlin_first: bool = False):
        super().__init__()
        if nonlin_first:
            raise ValueError("PreActResUNet: nonlin_first=True is not a pre-activation unit (norm -> nonlin -> conv)")
        if n_stages < 2:
            raise ValueError(f"PreActResUNet needs at least 2 stages (an encoder level and the bridge), got {n_stages}")
        features = _per_stage(features_per_stage, n_stages, 'features_per_stage')
        kernels = _per_stage(kernel_sizes, n_stages, 'kernel_sizes')
        strides = _per_stage(strides, n_stages, 'strides')
        units = _units(_per_stage(n_conv_per_stage, n_stages, 'n_conv_per_stage'), 'n_conv_per_stage')
        units_decoder = _units(_per_stage(n_conv_per_stage_decoder, n_stages - 1, 'n_conv_per_stage_decoder'),
                               'n_conv_per_stage_decoder')
        self.encoder = PreActResUNetEncoder(input_channels, features, conv_op, kernels, strides, units, conv_bias,
                                            norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin,
                                            nonlin_kwargs)
        self.decoder = self._build_decoder(num_classes, units_decoder, deep_supervision)

    def _build_decoder(self, num_classes: int, units_per_stage: Sequence[int], deep_supervision: bool) -> nn.Module:
        return PreActResUNetDecoder(self.encoder, num_classes, units_per_stage, deep_supervision)

    def forward(self, x: torch.Tensor):
        return self.decoder(self.encoder(x))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """nnU-Net's VRAM proxy (planners call it): the feature maps kept for backward for one sample, in
        nnU-Net's unit (half the elements, see :func:`_kept`): comparable with ``PlainConvUNet``'s estimate
        and the planner's reference values."""
        if len(input_size) != len(self.encoder.strides[0]):
            raise ValueError(f"give the spatial size only ({len(self.encoder.strides[0])} axes), got {input_size}")
        return self.encoder.compute_conv_feature_map_size(input_size) + \
            self.decoder.compute_conv_feature_map_size(input_size)

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """nnU-Net's He initialisation (``InitWeights_He(1e-2)``, zero biases); norms keep PyTorch's (1, 0)."""
        InitWeights_He(1e-2)(module)

    @classmethod
    def paper_preset(cls, input_channels: int = 3, num_classes: int = 1, conv_op: Type[nn.Module] = nn.Conv2d,
                     deep_supervision: bool = False) -> 'PreActResUNet':
        """Zhang et al.'s configuration (Table 1): features 64/128/256 + bridge 512, three stride-2
        down-samplings, one unit per level, BatchNorm + ReLU, biased convolutions, 3x3 kernels. With the
        defaults (RGB in, one output) 8,221,379 parameters, the deep-supervision heads included (module
        docstring)."""
        ndim = 2 if conv_op is nn.Conv2d else 3
        norm = nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d
        return cls(input_channels=input_channels, n_stages=4, features_per_stage=(64, 128, 256, 512),
                   conv_op=conv_op, kernel_sizes=[[3] * ndim] * 4, strides=[[1] * ndim] + [[2] * ndim] * 3,
                   n_conv_per_stage=2, num_classes=num_classes, n_conv_per_stage_decoder=2, conv_bias=True,
                   norm_op=norm, norm_op_kwargs={'eps': 1e-5, 'affine': True}, nonlin=nn.ReLU,
                   nonlin_kwargs={'inplace': True}, deep_supervision=deep_supervision)


class LFAMPreActResUNetDecoder(PreActResUNetDecoder):
    """The ResUNet decoder with a lateral feature alignment module (LFAM, GODC/LFAM paper Fig. 2) on every
    skip: ``skip -> LFAM(skip, up)`` before the concatenation, one independent module per level (the
    paper's better setting), kernel of the skip's stage. The guide is the up-sampled deeper feature
    (its own width here: no transposed convolution narrows it)."""

    def __init__(self, encoder: PreActResUNetEncoder, num_classes: int, units_per_stage: Sequence[int],
                 deep_supervision: bool, lfam_offset_groups: int = 1, lfam_modulated: bool = True):
        super().__init__(encoder, num_classes, units_per_stage, deep_supervision)
        self.alignments = nn.ModuleList([
            LateralFeatureAlignment(self.skip_channels[s], self.up_channels[s], self.conv_op,
                                    tuple(self.skip_kernel_sizes[s]), lfam_offset_groups, lfam_modulated)
            for s in range(len(self.skip_channels))])

    def transform_skip(self, s: int, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.alignments[s](skip, up)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """The ResUNet decoder's estimate plus, per level, LFAM's own
        (:meth:`LateralFeatureAlignment.compute_conv_feature_map_size`: what it keeps for backward and its
        largest temporary, in elements) converted to nnU-Net's unit with :func:`_kept`."""
        total = super().compute_conv_feature_map_size(input_size)
        for size, alignment in zip(self.skip_sizes(input_size), self.alignments):
            total += _kept(alignment.compute_conv_feature_map_size(size))
        return total


class LFAMPreActResUNet(PreActResUNet):
    """:class:`PreActResUNet` with LFAM on every skip (the GODC paper's "Residual U-Net" + LFAM).
    Extra keywords: ``lfam_offset_groups`` (1), ``lfam_modulated`` (True: DCNv2)."""

    def __init__(self, *args, lfam_offset_groups: int = 1, lfam_modulated: bool = True, **kwargs):
        self._lfam_kwargs = dict(lfam_offset_groups=lfam_offset_groups, lfam_modulated=lfam_modulated)
        super().__init__(*args, **kwargs)

    def _build_decoder(self, num_classes: int, units_per_stage: Sequence[int], deep_supervision: bool) -> nn.Module:
        return LFAMPreActResUNetDecoder(self.encoder, num_classes, units_per_stage, deep_supervision,
                                        **self._lfam_kwargs)

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """He initialisation (deformable kernels included), then zero offset predictors (the regular grid),
        as the LFAM U-Nets of ``lfam_unet``."""
        PreActResUNet.initialize(module)
        _lfam_initialize(module)
