"""The multi-level saliency guidance module of the multi-level structural network (MLN; Section 3.4
of ``docs/methods/multi-level-structural.md``, Fig. 4): fuses the region, boundary and pixel
features into the final prediction ``P^fusion``.

With ``F_r``, ``F_b``, ``F_p`` the region, boundary and pixel features on one grid (same channels;
``F_p`` zero except at the uncertain points),

    S          = F_b + F_p                                   ("element-wise summarized")
    W_b, W_p   = sigmoid(DW_b(S)), sigmoid(DW_p(S))          (two depth-wise 1x1 convolutions)
    M_b, M_p   = W_b * F_b,  W_p * F_p                       (the two saliency maps)
    P^fusion   = Conv_2(act(Conv_1([F_r * M_b, F_r * M_p])))         (two 1x1 convolutions)

Our reading where the paper is silent: the weight maps go through a sigmoid (they are weights,
as in attention gates; the paper names no activation), each depth-wise convolution has a bias, the
two final 1x1 convolutions are separated by the network's nonlinearity and their hidden width is the
feature width. No normalisation (the paper names none): the module is voxel-wise, so the pixel
features, zero away from the uncertain points, change the prediction at those points only.
"""
from __future__ import annotations

from typing import Optional, Type

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

__all__ = ["SaliencyGuidanceFusion"]


class SaliencyGuidanceFusion(nn.Module):
    """Section 3.4: ``Conv_2(act(Conv_1([F_r W_b F_b, F_r W_p F_p])))`` with
    ``W = sigmoid(depth-wise 1x1 conv(F_b + F_p))``.

    Args:
        channels: channels of each of the three feature maps.
        num_classes: channels of the fused logits.
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d``.
        nonlin, nonlin_kwargs: nonlinearity between the two final 1x1 convolutions (default ``nn.ReLU``).

    ``forward(region, boundary, pixel)``: three (B, channels, *spatial) maps -> (B, num_classes, *spatial).
    """

    def __init__(self, channels: int, num_classes: int, conv_op: Type[_ConvNd] = nn.Conv2d,
                 nonlin: Type[nn.Module] = nn.ReLU, nonlin_kwargs: Optional[dict] = None):
        super().__init__()
        if min(channels, num_classes) < 1:
            raise ValueError(f"SaliencyGuidanceFusion needs positive sizes, got channels={channels}, "
                             f"num_classes={num_classes}")
        self.channels = channels
        self.boundary_weight = conv_op(channels, channels, kernel_size=1, groups=channels, bias=True)  # DW_b
        self.pixel_weight = conv_op(channels, channels, kernel_size=1, groups=channels, bias=True)     # DW_p
        self.hidden = nn.Sequential(conv_op(2 * channels, channels, kernel_size=1, bias=True),            # Conv_1
                                    nonlin(**(nonlin_kwargs or {})))
        self.classifier = conv_op(channels, num_classes, kernel_size=1, bias=True)                     # Conv_2

    def forward(self, region: torch.Tensor, boundary: torch.Tensor, pixel: torch.Tensor) -> torch.Tensor:
        if not region.shape == boundary.shape == pixel.shape or region.shape[1] != self.channels:
            raise ValueError(f"region, boundary and pixel features must all have shape (B, {self.channels}, "
                             f"*spatial); got {tuple(region.shape)}, {tuple(boundary.shape)}, {tuple(pixel.shape)}")
        mutual = boundary + pixel
        boundary_saliency = torch.sigmoid(self.boundary_weight(mutual)) * boundary
        pixel_saliency = torch.sigmoid(self.pixel_weight(mutual)) * pixel
        guided = torch.cat((region * boundary_saliency, region * pixel_saliency), 1)
        return self.classifier(self.hidden(guided))
