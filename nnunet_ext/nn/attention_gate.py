"""Additive attention gate of ANU-Net (``shared/papers/anunet_attention_nested_unet.md``, Section 3.2,
Fig. 3, Eqs. 1-3), for 2D and 3D through ``conv_op``/``norm_op`` as dynamic-network-architectures
builds its blocks.

    F      = sigma_1[ (W_f^T f + b_f) + (W_g^T g + b_g) ]        (Eq. 1, sigma_1 = ReLU)
    alpha  = sigma_2( W_theta^T F + b_theta )                    (Eq. 2, sigma_2 = sigmoid)
    output = f * alpha                                           (Eq. 3)

``f`` (``x`` here) is the feature on the skip connection (the encoder/nested-row feature), ``g`` the
gating signal: "the upsampling feature (g) in the decoder" (Section 3.2, item 1), i.e. in the
nested decoder the up-sampled output of the node one row below, at the same spatial size as ``x``
(our reading of Eq. 4 and Fig. 5: ``Ag(X_{i,k})`` is gated by ``Up(X_{i+1,k})``). The paper's
``b_f``, ``b_g``, ``b_theta`` are BatchNorms (item 2 and 4 of Section 3.2), so each of W_f, W_g,
W_theta is a 1x1 convolution followed by ``norm_op``; the convolutions carry a bias when
``conv_bias`` (the paper's networks do; the parameter counts of Table 6 need it). W_theta maps
to one channel, so alpha is one coefficient per voxel, broadcast over the channels of ``x``.
"""
from __future__ import annotations

from typing import Optional, Type

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd


class AttentionGate(nn.Module):
    """``x * sigmoid(norm(psi(ReLU(norm(W_x x) + norm(W_g g)))))`` (Eqs. 1-3).

    Args:
        x_channels: channels of the gated feature ``x`` (the paper's ``f``, ``F_l``).
        g_channels: channels of the gating signal ``g`` (``F_g``).
        inter_channels: channels of the intermediate map ``F`` of Eq. 1 (``F_int``).
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d``; ``x`` and ``g`` must have the same spatial size.
        norm_op, norm_op_kwargs: normalisation after each 1x1 convolution (the paper: BatchNorm);
            ``None`` for none.
        conv_bias: bias of the three 1x1 convolutions.
    """

    def __init__(self, x_channels: int, g_channels: int, inter_channels: int, conv_op: Type[_ConvNd] = nn.Conv2d,
                 norm_op: Optional[Type[nn.Module]] = None, norm_op_kwargs: Optional[dict] = None,
                 conv_bias: bool = True):
        super().__init__()
        if min(x_channels, g_channels, inter_channels) < 1:
            raise ValueError(f"AttentionGate needs positive channel counts, got x_channels={x_channels}, "
                             f"g_channels={g_channels}, inter_channels={inter_channels}")
        norm_op_kwargs = {} if norm_op_kwargs is None else norm_op_kwargs

        def conv_norm(cin: int, cout: int) -> nn.Sequential:
            layers = [conv_op(cin, cout, kernel_size=1, stride=1, padding=0, bias=conv_bias)]
            if norm_op is not None:
                layers.append(norm_op(cout, **norm_op_kwargs))
            return nn.Sequential(*layers)

        self.x_channels, self.g_channels, self.inter_channels = x_channels, g_channels, inter_channels
        self.conv_op = conv_op
        self.W_x = conv_norm(x_channels, inter_channels)   # W_f, b_f of Eq. 1
        self.W_g = conv_norm(g_channels, inter_channels)   # W_g, b_g of Eq. 1
        self.psi = conv_norm(inter_channels, 1)            # W_theta, b_theta of Eq. 2
        self.relu = nn.ReLU(inplace=True)                  # sigma_1

    def attention(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The coefficients ``alpha`` of Eq. 2, shape (B, 1, *spatial), in (0, 1)."""
        if x.shape[0] != g.shape[0] or x.shape[2:] != g.shape[2:]:
            raise ValueError(f"AttentionGate: x {tuple(x.shape)} and gating signal g {tuple(g.shape)} must share batch "
                             f"and spatial size (up-sample g to x's resolution first)")
        if x.shape[1] != self.x_channels or g.shape[1] != self.g_channels:
            raise ValueError(f"AttentionGate built for x with {self.x_channels} and g with {self.g_channels} channels, "
                             f"got {x.shape[1]} and {g.shape[1]}")
        return torch.sigmoid(self.psi(self.relu(self.W_x(x) + self.W_g(g))))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``x * alpha`` (Eq. 3), the shape of ``x``."""
        return x * self.attention(x, g)

    def compute_conv_feature_map_size(self, input_size) -> int:
        """Voxels of the feature maps the gate stores for the backward pass (nnU-Net's VRAM estimate):
        the two projections, their sum, the one-channel logits/alpha and the gated output."""
        voxels = 1
        for s in input_size:
            voxels *= int(s)
        return voxels * (3 * self.inter_channels + 2 + self.x_channels)
