"""Additive attention gate of ANU-Net (``docs/methods/anunet.md``, Section 3.2,
Fig. 3, Eqs. 1-3), for 2D and 3D through ``conv_op``/``norm_op`` as dynamic-network-architectures
builds its blocks.

    F      = sigma_1[ (W_f^T f + b_f) + (W_g^T g + b_g) ]        (Eq. 1, sigma_1 = ReLU)
    alpha  = sigma_2( W_theta^T F + b_theta )                    (Eq. 2, sigma_2 = sigmoid)
    output = f * alpha                                           (Eq. 3)

``f`` (``x`` here) is the feature on the skip connection (the encoder/nested-row feature), ``g`` the
gating signal: "the upsampling feature (g) in the decoder" (Section 3.2, item 1), i.e. in the
nested decoder the up-sampled output of the node one row below, at the same spatial size as ``x``
(our reading of Eq. 4 and Fig. 5: ``Ag(X_{i,k})`` is gated by ``Up(X_{i+1,k})``). The paper's
``b_f``, ``b_g``, ``b_theta`` are BatchNorms (items 2 and 4 of Section 3.2), so each of W_f, W_g,
W_theta is a 1x1 convolution followed by a norm; the convolutions carry a bias when ``conv_bias``
(the paper's networks do; the parameter counts of Table 6 need it). W_theta maps to one channel, so
alpha is one coefficient per voxel, broadcast over the channels of ``x``.

The norm of the one-channel ``psi = W_theta F`` branch (``psi_norm``). W_x and W_g take ``norm_op``,
whatever the network uses (nnU-Net's plans: InstanceNorm). The psi branch must not take a per-image
norm: InstanceNorm (or GroupNorm/LayerNorm) of a single channel standardises the attention logits of
every image to mean ``beta`` and standard deviation ``|gamma|`` (its affine parameters), so every
image has voxels above and below the same level and the gate cannot say "no organ in this image"
(alpha ~ 0 everywhere) while opening on the organ of another image. The paper's BatchNorm does not
standardise per image: in eval mode it is a fixed affine map (running statistics), in training mode
it standardises over the batch. ``psi_norm='auto'`` (default) therefore follows the paper where the
network uses BatchNorm (``norm_op`` a ``_BatchNorm``, as ``ANUNet.paper_preset``; nnU-Net converts it
to ``SyncBatchNorm`` under DDP) and uses no norm otherwise, e.g. on nnU-Net's InstanceNorm plans. We
do not put a BatchNorm there on its own: with nnU-Net's batches of 2 (3D) to ~12 (2D) patches, a
train-mode BatchNorm standardises the gate logits over those few patches, so one patch's gate depends
on the other patches and a batch of background-only patches is still centred on ``beta`` (the same
defect, per batch instead of per image); the train-mode batch statistics and the eval-mode running
statistics then disagree (the small-batch BatchNorm problem nnU-Net avoids by using InstanceNorm);
and under DDP every gate would add a SyncBatchNorm all-reduce to the forward and the backward (one
gate per decoder node: 10 for a 5-stage plan). Without a norm the bias of W_theta sets the level of
the logits directly, training and inference compute the same function, and a network built without
deep supervision has the same parameters (strict reload). ``psi_norm='norm_op'`` forces ``norm_op``
on the psi branch (the former behaviour, e.g. for an ablation), ``'none'`` forces no norm.
"""
from __future__ import annotations

from typing import Optional, Type

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

PSI_NORMS = ('auto', 'norm_op', 'none')


def psi_norm_op(norm_op: Optional[Type[nn.Module]], psi_norm: str = 'auto') -> Optional[Type[nn.Module]]:
    """The norm of the gate's psi branch for a network whose blocks use ``norm_op`` (module docstring)."""
    if psi_norm not in PSI_NORMS:
        raise ValueError(f"psi_norm must be one of {PSI_NORMS} ('auto': the network's norm if it is a BatchNorm, "
                         f"else none; 'norm_op': always the network's norm; 'none'), got {psi_norm!r}")
    if psi_norm == 'none' or norm_op is None:
        return None
    if psi_norm == 'norm_op':
        return norm_op
    return norm_op if isinstance(norm_op, type) and issubclass(norm_op, _BatchNorm) else None


class AttentionGate(nn.Module):
    """``x * sigmoid(norm_psi(psi(ReLU(norm(W_x x) + norm(W_g g)))))`` (Eqs. 1-3).

    Args:
        x_channels: channels of the gated feature ``x`` (the paper's ``f``, ``F_l``).
        g_channels: channels of the gating signal ``g`` (``F_g``).
        inter_channels: channels of the intermediate map ``F`` of Eq. 1 (``F_int``).
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d``; ``x`` and ``g`` must have the same spatial size.
        norm_op, norm_op_kwargs: normalisation after the W_x and W_g convolutions (the paper: BatchNorm;
            nnU-Net's plans: InstanceNorm); ``None`` for none.
        conv_bias: bias of the three 1x1 convolutions.
        psi_norm: norm after the one-channel W_theta convolution: ``'auto'`` (``norm_op`` if it is a
            BatchNorm, else none), ``'norm_op'`` or ``'none'`` (module docstring).
    """

    def __init__(self, x_channels: int, g_channels: int, inter_channels: int, conv_op: Type[_ConvNd] = nn.Conv2d,
                 norm_op: Optional[Type[nn.Module]] = None, norm_op_kwargs: Optional[dict] = None,
                 conv_bias: bool = True, psi_norm: str = 'auto'):
        super().__init__()
        if min(x_channels, g_channels, inter_channels) < 1:
            raise ValueError(f"AttentionGate needs positive channel counts, got x_channels={x_channels}, "
                             f"g_channels={g_channels}, inter_channels={inter_channels}")
        norm_op_kwargs = {} if norm_op_kwargs is None else norm_op_kwargs

        def conv_norm(cin: int, cout: int, norm: Optional[Type[nn.Module]]) -> nn.Sequential:
            layers = [conv_op(cin, cout, kernel_size=1, stride=1, padding=0, bias=conv_bias)]
            if norm is not None:
                layers.append(norm(cout, **norm_op_kwargs))
            return nn.Sequential(*layers)

        self.x_channels, self.g_channels, self.inter_channels = x_channels, g_channels, inter_channels
        self.conv_op = conv_op
        self.psi_norm = psi_norm
        self.W_x = conv_norm(x_channels, inter_channels, norm_op)                  # W_f, b_f of Eq. 1
        self.W_g = conv_norm(g_channels, inter_channels, norm_op)                  # W_g, b_g of Eq. 1
        self.psi = conv_norm(inter_channels, 1, psi_norm_op(norm_op, psi_norm))    # W_theta, b_theta of Eq. 2
        self.relu = nn.ReLU(inplace=True)                                          # sigma_1

    def logits(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The attention logits ``psi`` (the argument of sigma_2 in Eq. 2), shape (B, 1, *spatial)."""
        if x.shape[0] != g.shape[0] or x.shape[2:] != g.shape[2:]:
            raise ValueError(f"AttentionGate: x {tuple(x.shape)} and gating signal g {tuple(g.shape)} must share batch "
                             f"and spatial size (up-sample g to x's resolution first)")
        if x.shape[1] != self.x_channels or g.shape[1] != self.g_channels:
            raise ValueError(f"AttentionGate built for x with {self.x_channels} and g with {self.g_channels} channels, "
                             f"got {x.shape[1]} and {g.shape[1]}")
        return self.psi(self.relu(self.W_x(x) + self.W_g(g)))

    def attention(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The coefficients ``alpha`` of Eq. 2, shape (B, 1, *spatial), in (0, 1)."""
        return torch.sigmoid(self.logits(x, g))

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
