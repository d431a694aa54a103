"""nnU-Net's U-Net decoder with a hook on every skip connection, shared by the networks that change
what the decoder receives from the encoder (LFAM aligns the skip, IFE widens it).

``SkipTransformingUNetDecoder.forward`` is dynamic-network-architectures' ``UNetDecoder.forward``
with ``skip -> transform_skip(s, skip, up)`` before the concatenation; everything else (stages,
transposed convolutions, segmentation heads, the deep-supervision contract: a list of logits,
highest resolution first, with deep supervision on, the highest-resolution logits otherwise) is
nnU-Net's.
"""
from __future__ import annotations

import inspect
from typing import List, Tuple

import torch
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder


class SkipTransformingUNetDecoder(UNetDecoder):
    """``UNetDecoder`` whose skips pass through :meth:`transform_skip` before the concatenation.

    Decoder stage ``s`` (0 = the deepest) takes the skip of encoder stage ``n_stages - 2 - s``
    (:meth:`encoder_stage`).
    """

    def encoder_stage(self, s: int) -> int:
        return len(self.encoder.output_channels) - 2 - s

    def transform_skip(self, s: int, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return skip

    def forward_with_features(self, skips: List[torch.Tensor]) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """``(logits, features)``: the logits as a list (every scale, highest resolution first, with deep
        supervision; the last head's only without) and the last stage's output before its head."""
        lres_input = skips[-1]
        seg_outputs = []
        for s in range(len(self.stages)):
            up = self.transpconvs[s](lres_input)
            x = torch.cat((up, self.transform_skip(s, skips[-(s + 2)], up)), 1)
            x = self.stages[s](x)
            if self.deep_supervision:
                seg_outputs.append(self.seg_layers[s](x))
            elif s == len(self.stages) - 1:
                seg_outputs.append(self.seg_layers[-1](x))
            lres_input = x
        return seg_outputs[::-1], lres_input  # highest resolution first

    def forward(self, skips: List[torch.Tensor]):
        seg_outputs, _ = self.forward_with_features(skips)
        return seg_outputs if self.deep_supervision else seg_outputs[0]

    def widen_stage_input(self, s: int, skip_channels: int, nonlin_first: bool = False) -> None:
        """Rebuilds decoder stage ``s`` for a skip of ``skip_channels`` channels (same convs, norms,
        nonlinearities as nnU-Net's decoder builds from the encoder; only the first conv's input
        width changes)."""
        enc = self.encoder
        old = self.stages[s]
        out_channels = enc.output_channels[self.encoder_stage(s)]
        self.stages[s] = StackedConvBlocks(
            len(old.convs), enc.conv_op, out_channels + skip_channels, out_channels,
            enc.kernel_sizes[self.encoder_stage(s)], 1, enc.conv_bias, enc.norm_op, enc.norm_op_kwargs,
            enc.dropout_op, enc.dropout_op_kwargs, enc.nonlin, enc.nonlin_kwargs, nonlin_first)


def replace_decoder(network, base_class, args, kwargs, decoder_class, **decoder_kwargs) -> None:
    """Gives ``network`` (built by ``base_class.__init__(*args, **kwargs)``, e.g. ``PlainConvUNet``)
    a ``decoder_class`` decoder over the same encoder, with the decoder arguments ``base_class``
    received (classes, convs per stage, deep supervision, ``nonlin_first``) and ``decoder_kwargs``."""
    bound = inspect.signature(base_class.__init__).bind(network, *args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    network.decoder = decoder_class(network.encoder, a['num_classes'], a['n_conv_per_stage_decoder'],
                                    a['deep_supervision'], nonlin_first=a.get('nonlin_first', False),
                                    **decoder_kwargs)
