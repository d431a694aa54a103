"""U-Nets with instructive feature enhancement (IFE, ``docs/methods/ife.md``,
Section 2.3, Fig. 4) on chosen encoder skips.

nnU-Net's own networks (``PlainConvUNet``, ``ResidualEncoderUNet``: same encoder, decoder, plans
keywords) whose skip of encoder stage ``st`` (for ``st`` in ``ife_stages``) is replaced by
``cat[skip, top_r(score(skip))]`` and whose decoder stage consuming it takes the wider input
("only the initialization channel number of the corresponding network layer needs to be modified").
The paper applies IFE to the "middle layers" of U-Net and nnU-Net; the authors' U-Net puts it on the
skips of stages 1 and 2 (0 = full resolution), our default. Any plans topology, 2D/3D, nnU-Net's
deep-supervision contract. Extra keywords: ``ife_score`` ('curvature' or 'entropy'),
``ife_stages`` and ``ife_ratios`` (one ratio r per stage).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnunet_ext.architectures.skip_decoder import SkipTransformingUNetDecoder, replace_decoder
from nnunet_ext.nn.feature_enhancement import CurvatureScore, EntropyScore, InstructiveFeatureEnhancement

SCORES = {'curvature': CurvatureScore, 'entropy': EntropyScore}


class IFEUNetDecoder(SkipTransformingUNetDecoder):
    """nnU-Net's ``UNetDecoder`` with IFE on the skips of encoder stages ``ife_stages``."""

    def __init__(self, encoder, num_classes: int, n_conv_per_stage, deep_supervision: bool,
                 nonlin_first: bool = False, ife_score: str = 'entropy', ife_stages: Sequence[int] = (1, 2),
                 ife_ratios: Sequence[float] = (0.5, 0.5)):
        super().__init__(encoder, num_classes, n_conv_per_stage, deep_supervision, nonlin_first=nonlin_first)
        if ife_score not in SCORES:
            raise ValueError(f"ife_score must be one of {sorted(SCORES)}, got {ife_score!r}")
        stages, ratios = [int(s) for s in ife_stages], [float(r) for r in ife_ratios]
        if len(stages) != len(ratios) or len(set(stages)) != len(stages):
            raise ValueError(f"ife_stages {tuple(ife_stages)} and ife_ratios {tuple(ife_ratios)} must be equally long, "
                             f"stages distinct")
        with_skip = range(len(encoder.output_channels) - 1)
        for st in stages:
            if st not in with_skip:
                raise ValueError(f"IFE on encoder stage {st}: these plans' network has skips at stages "
                                 f"{list(with_skip)} (the last of its {len(encoder.output_channels)} stages is the "
                                 f"bottleneck). Choose ife_stages among them (subclass the trainer and set "
                                 f"ife_stages).")
        self.ife_score = ife_score
        self.enhancers = nn.ModuleDict()
        for st, r in zip(stages, ratios):
            ife = InstructiveFeatureEnhancement(SCORES[ife_score](), r, channels=encoder.output_channels[st])
            self.enhancers[str(st)] = ife
            self.widen_stage_input(self.decoder_stage(st), ife.out_channels, nonlin_first)
        # per decoder stage, the key of its skip's enhancer (None: plain skip), fixed here so that
        # forward builds no strings (one graph under torch.compile)
        keys = [str(self.encoder_stage(s)) for s in range(len(self.stages))]
        self._enhancer_keys = tuple(key if key in self.enhancers else None for key in keys)

    def decoder_stage(self, encoder_stage: int) -> int:
        return len(self.encoder.output_channels) - 2 - encoder_stage

    def transform_skip(self, s: int, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        key = self._enhancer_keys[s]
        return skip if key is None else self.enhancers[key](skip)

    def compute_conv_feature_map_size(self, input_size):
        """nnU-Net's estimate plus the selected channels concatenated to each enhanced skip."""
        total = super().compute_conv_feature_map_size(input_size)
        size = list(input_size)
        for st, stride in enumerate(self.encoder.strides):
            size = [i // j for i, j in zip(size, stride)]
            if str(st) in self.enhancers:
                ife = self.enhancers[str(st)]
                total += ife.selected_channels(ife.channels) * math.prod(size)
        return total


class IFEPlainConvUNet(PlainConvUNet):
    """``PlainConvUNet`` (nnU-Net's default network) with IFE on the skips of ``ife_stages``."""

    def __init__(self, *args, ife_score: str = 'entropy', ife_stages: Sequence[int] = (1, 2),
                 ife_ratios: Sequence[float] = (0.5, 0.5), **kwargs):
        super().__init__(*args, **kwargs)
        replace_decoder(self, PlainConvUNet, args, kwargs, IFEUNetDecoder, ife_score=ife_score,
                        ife_stages=ife_stages, ife_ratios=ife_ratios)


class IFEResidualEncoderUNet(ResidualEncoderUNet):
    """``ResidualEncoderUNet`` (nnU-Net's ResEnc network) with IFE on the skips of ``ife_stages``."""

    def __init__(self, *args, ife_score: str = 'entropy', ife_stages: Sequence[int] = (1, 2),
                 ife_ratios: Sequence[float] = (0.5, 0.5), **kwargs):
        super().__init__(*args, **kwargs)
        replace_decoder(self, ResidualEncoderUNet, args, kwargs, IFEUNetDecoder, ife_score=ife_score,
                        ife_stages=ife_stages, ife_ratios=ife_ratios)
