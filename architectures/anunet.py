"""ANU-Net (attention-based nested U-Net, ``docs/methods/anunet.md``) and
UNet++ (the same nested decoder without attention gates, the paper's main ablation) on nnU-Net's
planned topology.

Topology. The encoder is dynamic-network-architectures' ``PlainConvEncoder`` built from the plans'
keywords (any number of stages, 2D/3D, anisotropic kernels and strides); its stage ``i`` output is
``X_{i,0}``. With ``L = n_stages - 1`` levels, the nested decoder has the nodes ``X_{i,j}``, ``j >= 1``,
``i + j <= L`` of Eq. 4::

    X_{i,j} = H_{i,j}( cat[ Ag_{i,1}(X_{i,0}), ..., Ag_{i,j}(X_{i,j-1}), Up_i(X_{i+1,j-1}) ] )

* ``H_{i,j}``: nnU-Net's ``StackedConvBlocks`` (the plans' decoder convs per stage, kernel of row ``i``,
  conv -> dropout -> norm -> nonlin), ``(j + 1) * f_i`` input channels, ``f_i`` output channels.
* ``Up_i``: one transposed convolution per row, ``f_{i+1} -> f_i`` channels, kernel = stride =
  the stride of encoder stage ``i + 1`` (anisotropic strides work), shared by all nodes of row ``i``
  (Fig. 4 draws one "up-sampling" per row; the parameter counts of Table 6 need the sharing). With
  ``upsampling_norm`` it is followed by ``norm_op`` and ``nonlin`` (the paper's up-convolution block;
  nnU-Net's own decoder uses a bare transposed convolution, our default).
* ``Ag_{i,k+1}`` (ANU-Net only): the attention gate of Eqs. 1-3 applied to ``X_{i,k}`` with the gating
  signal ``g = Up_i(X_{i+1,k})`` ("the upsampling feature in the decoder", Section 3.2), at the same
  resolution as ``X_{i,k}``. Eq. 4 concatenates ``Ag(X_{i,k})`` for every ``k < j``; the gated map of
  ``X_{i,k}`` is computed once, when node ``X_{i,k+1}`` is built, and reused by the later nodes of the
  row (Fig. 5: the gates sit on the skip path between consecutive nodes). So there is one gate per
  node, named after the node that first consumes it. ``F_int`` of row ``i``: ``attention_channels[i]``,
  by default ``f_0`` for row 0 and ``f_i // 2`` below (the paper: 32/32/64/128 for 32/64/128/256).
  W_x and W_g are followed by the plans' ``norm_op``; the one-channel psi branch by the same norm only if
  it is a BatchNorm (the paper's, as in ``paper_preset``) and by none otherwise: a per-image norm
  (nnU-Net's InstanceNorm) of one channel would standardise the attention logits of every image, and
  the gate could not close on an image without the organ (``gate_psi_norm``,
  ``nnunet_ext.nn.attention_gate``).
* Heads (Section 3.4, Fig. 6): a 1x1 convolution with bias on each of ``X_{0,1} .. X_{0,L}``, all at full
  resolution. The forward returns raw logits (nnU-Net applies softmax/sigmoid itself).

Deep supervision (nnU-Net's contract). The trainer toggles ``network.decoder.deep_supervision``. On:
a list of the heads' logits, ``[head(X_{0,l}), head(X_{0,l-1}), ..., head(X_{0,1})]`` with ``l`` the
active level: the main output first (nnU-Net treats element 0 as the prediction and gives it the
largest weight), then the shallower heads. All have the input's resolution, so a trainer must not
down-sample the targets (``_get_deep_supervision_scales`` -> all ones). Off: ``head(X_{0,l})`` only.
The parameter set does not depend on the flag (nnU-Net reloads strictly with deep supervision off).

Pruning (Section 3.5, Fig. 7). Level ``l`` (``1 <= l <= L``, "ANU-Net Ll") computes only what head
``X_{0,l}`` needs: encoder stages ``0..l`` and the nodes ``X_{i,k}``, ``i + k <= l`` (with their gates
and up-samplings); the deeper encoder stages and nodes are not run at all. The active level is
``network.prune_level`` (settable; ``None`` resets to the deepest built level). At construction it is
read from the keyword ``prune_level`` or, if that is ``None``, from the environment variable
``NNUNET_EXT_ANUNET_PRUNE_LEVEL`` (so the stock ``nnUNetv2_predict`` can run a pruned level of a
full checkpoint: ``NNUNET_EXT_ANUNET_PRUNE_LEVEL=3 nnUNetv2_predict ...``). ``max_level`` builds only
the modules of levels ``<= max_level``: such a network loads :meth:`level_state_dict` of the full
network strictly (a pruned export whose checkpoint holds only the kept weights; see
:meth:`pruned_copy`).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, get_matching_convtransp
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd

from nnunet_ext.nn.attention_gate import AttentionGate, psi_norm_op

PRUNE_LEVEL_ENV = 'NNUNET_EXT_ANUNET_PRUNE_LEVEL'
# paper_preset's norms: the paper's BatchNorm, or nnU-Net's InstanceNorm; (2D op, 3D op) and keywords
PAPER_NORMS = {'batch': (nn.BatchNorm2d, nn.BatchNorm3d), 'instance': (nn.InstanceNorm2d, nn.InstanceNorm3d)}
PAPER_NORM_KWARGS = {'batch': {'eps': 1e-5, 'momentum': 0.1, 'affine': True},
                     'instance': {'eps': 1e-5, 'affine': True}}

IntOrSeq = Union[int, List[int], Tuple[int, ...]]


def _node(i: int, j: int) -> str:
    return f"{i}_{j}"


def level_nodes(level: int) -> List[Tuple[int, int]]:
    """Decoder nodes ``(i, j)`` (``j >= 1``) that head ``X_{0,level}`` depends on, in an order where every
    node comes after its inputs: anti-diagonals ``i + j = 1, 2, ..., level``, deepest row first."""
    return [(s - j, j) for s in range(1, level + 1) for j in range(1, s + 1)]


def _validate_level(level, max_level: int, what: str = 'prune level') -> int:
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 1 <= int(level) <= max_level:
        raise ValueError(f"{what} must be an integer in 1..{max_level} (the levels this network has: head X_0,l for "
                         f"l = 1..{max_level}), got {level!r}")
    return int(level)


class NestedDecoder(nn.Module):
    """The nested rows ``X_{i,j}`` (``j >= 1``), their up-samplings, attention gates and the full-resolution
    heads of ANU-Net/UNet++ over a ``PlainConvEncoder`` whose stages are ``X_{i,0}``. See the module
    docstring for the equations; ``deep_supervision`` is the flag nnU-Net's trainer toggles."""

    def __init__(self, encoder: PlainConvEncoder, num_classes: int, n_conv_per_row: Sequence[int],
                 deep_supervision: bool, attention: bool, attention_channels: Sequence[int],
                 upsampling_norm: bool = False, nonlin_first: bool = False, gate_psi_norm: str = 'auto'):
        super().__init__()
        self.deep_supervision = deep_supervision
        self.attention = attention
        self.max_level = len(encoder.output_channels) - 1
        f = list(encoder.output_channels)
        conv_op = encoder.conv_op
        transp_op = get_matching_convtransp(conv_op=conv_op)
        self.ups = nn.ModuleList()
        for i in range(self.max_level):
            stride = encoder.strides[i + 1]
            layers = [transp_op(f[i + 1], f[i], stride, stride, bias=encoder.conv_bias)]
            if upsampling_norm:
                if encoder.norm_op is not None:
                    layers.append(encoder.norm_op(f[i], **(encoder.norm_op_kwargs or {})))
                if encoder.nonlin is not None:
                    layers.append(encoder.nonlin(**(encoder.nonlin_kwargs or {})))
            self.ups.append(nn.Sequential(*layers))
        self.nodes = nn.ModuleDict()
        self.gates = nn.ModuleDict()
        for i, j in level_nodes(self.max_level):
            self.nodes[_node(i, j)] = StackedConvBlocks(
                n_conv_per_row[i], conv_op, (j + 1) * f[i], f[i], encoder.kernel_sizes[i], 1, encoder.conv_bias,
                encoder.norm_op, encoder.norm_op_kwargs, encoder.dropout_op, encoder.dropout_op_kwargs,
                encoder.nonlin, encoder.nonlin_kwargs, nonlin_first)
            if attention:
                self.gates[_node(i, j)] = AttentionGate(f[i], f[i], attention_channels[i], conv_op, encoder.norm_op,
                                                        encoder.norm_op_kwargs, encoder.conv_bias, gate_psi_norm)
        self.heads = nn.ModuleList([conv_op(f[0], num_classes, 1, 1, 0, bias=True) for _ in range(self.max_level)])
        self.num_classes = num_classes
        self.output_channels = f
        self.strides = encoder.strides

    def forward(self, skips: Sequence[torch.Tensor], level: Optional[int] = None):
        """``skips``: ``[X_{0,0}, ..., X_{level,0}]`` (more are ignored). Returns the logits of head
        ``X_{0,level}`` or, with deep supervision, the list ``[head(X_{0,level}), ..., head(X_{0,1})]``."""
        level = self.max_level if level is None else level
        if len(skips) < level + 1:
            raise ValueError(f"level {level} needs encoder outputs X_0,0..X_{level},0, got {len(skips)}")
        X: Dict[Tuple[int, int], torch.Tensor] = {(i, 0): skips[i] for i in range(level + 1)}
        gated: Dict[Tuple[int, int], torch.Tensor] = {}
        for i, j in level_nodes(level):
            up = self.ups[i](X[i + 1, j - 1])
            prev = X[i, j - 1]
            gated[i, j - 1] = self.gates[_node(i, j)](prev, up) if self.attention else prev
            X[i, j] = self.nodes[_node(i, j)](torch.cat([gated[i, k] for k in range(j)] + [up], 1))
        if not self.deep_supervision:
            return self.heads[level - 1](X[0, level])
        return [self.heads[k - 1](X[0, k]) for k in range(level, 0, -1)]

    def compute_conv_feature_map_size(self, input_size, level: Optional[int] = None) -> int:
        """Voxels of the decoder's stored feature maps for a patch of ``input_size`` (nnU-Net's VRAM
        estimate, same conventions as its ``UNetDecoder``: conv outputs, up-sampled maps, heads),
        plus the attention gates' maps."""
        level = self.max_level if level is None else level
        sizes = []
        size = list(input_size)
        for stride in self.strides:
            size = [s // st for s, st in zip(size, stride)]
            sizes.append(size)
        total = np.int64(0)
        for i, j in level_nodes(level):
            voxels = np.prod(sizes[i], dtype=np.int64)
            total += self.nodes[_node(i, j)].compute_conv_feature_map_size(sizes[i])
            total += self.output_channels[i] * voxels  # Up_i(X_{i+1,j-1})
            if self.attention:
                total += self.gates[_node(i, j)].compute_conv_feature_map_size(sizes[i])
        n_heads = level if self.deep_supervision else 1
        total += n_heads * self.num_classes * np.prod(sizes[0], dtype=np.int64)
        return total


class ANUNet(AbstractDynamicNetworkArchitectures):
    """ANU-Net with nnU-Net's plans keywords (those of ``PlainConvUNet``) plus:

    Args:
        pool: the encoder's down-sampling, ``'conv'`` (nnU-Net's strided convolution, default) or
            ``'max'``/``'avg'`` (pooling then convolutions, the paper's encoder).
        attention_channels: ``F_int`` per row (``n_stages - 1`` entries); default ``f_0`` for row 0,
            ``f_i // 2`` below.
        upsampling_norm: follow each up-sampling transposed conv by ``norm_op`` and ``nonlin``.
        gate_psi_norm: norm of the gates' one-channel psi branch: ``'auto'`` (default: ``norm_op`` if it is
            a BatchNorm, as in the paper, else none), ``'norm_op'`` or ``'none'``.
        max_level: build only levels ``1..max_level`` (default ``n_stages - 1``, all); the network of
            a pruned export.
        prune_level: active level at construction (default: ``NNUNET_EXT_ANUNET_PRUNE_LEVEL`` if set,
            else ``max_level``).
    """

    use_attention = True

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: IntOrSeq, conv_op: Type[_ConvNd],
                 kernel_sizes: IntOrSeq, strides: IntOrSeq, n_conv_per_stage: IntOrSeq, num_classes: int,
                 n_conv_per_stage_decoder: IntOrSeq, conv_bias: bool = False,
                 norm_op: Union[None, Type[nn.Module]] = None, norm_op_kwargs: dict = None,
                 dropout_op: Union[None, Type[_DropoutNd]] = None, dropout_op_kwargs: dict = None,
                 nonlin: Union[None, Type[nn.Module]] = None, nonlin_kwargs: dict = None,
                 deep_supervision: bool = False, nonlin_first: bool = False, pool: str = 'conv',
                 attention_channels: Optional[Sequence[int]] = None, upsampling_norm: bool = False,
                 max_level: Optional[int] = None, prune_level: Optional[int] = None, gate_psi_norm: str = 'auto'):
        super().__init__()
        self.init_kwargs = dict(
            input_channels=input_channels, n_stages=n_stages, features_per_stage=features_per_stage, conv_op=conv_op,
            kernel_sizes=kernel_sizes, strides=strides, n_conv_per_stage=n_conv_per_stage, num_classes=num_classes,
            n_conv_per_stage_decoder=n_conv_per_stage_decoder, conv_bias=conv_bias, norm_op=norm_op,
            norm_op_kwargs=norm_op_kwargs, dropout_op=dropout_op, dropout_op_kwargs=dropout_op_kwargs, nonlin=nonlin,
            nonlin_kwargs=nonlin_kwargs, deep_supervision=deep_supervision, nonlin_first=nonlin_first, pool=pool,
            attention_channels=attention_channels, upsampling_norm=upsampling_norm, max_level=max_level,
            prune_level=prune_level, gate_psi_norm=gate_psi_norm)
        name = type(self).__name__
        if n_stages < 2:
            raise ValueError(f"{name} needs at least 2 stages (one level of nested decoder), got n_stages={n_stages}")
        num_levels = n_stages - 1
        max_level = num_levels if max_level is None else _validate_level(max_level, num_levels, 'max_level')

        def per_stage(value, what: str) -> list:
            value = [value] * n_stages if isinstance(value, int) else list(value)
            if len(value) != n_stages:
                raise ValueError(f"{name}: {what} must have one entry per stage (n_stages={n_stages}), got {value}")
            return value

        features = per_stage(features_per_stage, 'features_per_stage')
        kernels = per_stage(kernel_sizes, 'kernel_sizes')
        strides = per_stage(strides, 'strides')
        n_conv = per_stage(n_conv_per_stage, 'n_conv_per_stage')
        if isinstance(n_conv_per_stage_decoder, int):
            n_conv_per_stage_decoder = [n_conv_per_stage_decoder] * num_levels
        if len(n_conv_per_stage_decoder) != num_levels:
            raise ValueError(f"{name}: n_conv_per_stage_decoder must have n_stages - 1 = {num_levels} entries "
                             f"(nnU-Net's order, deepest decoder stage first), got {list(n_conv_per_stage_decoder)}")
        n_conv_per_row = [n_conv_per_stage_decoder[num_levels - 1 - i] for i in range(num_levels)]
        if attention_channels is None:
            attention_channels = [features[0]] + [max(1, c // 2) for c in features[1:num_levels]]
        attention_channels = [int(c) for c in attention_channels]
        if len(attention_channels) != num_levels:
            raise ValueError(f"{name}: attention_channels (F_int) needs one entry per row, n_stages - 1 = "
                             f"{num_levels}, got {attention_channels}")

        psi_norm_op(norm_op, gate_psi_norm)  # refuses an unknown value, also for UNet++ (no gates)

        self.key_to_encoder = "encoder.stages"
        self.key_to_stem = "encoder.stages.0"
        self.keys_to_in_proj = ("encoder.stages.0.0.convs.0.all_modules.0", "encoder.stages.0.0.convs.0.conv")
        m = max_level + 1
        self.encoder = PlainConvEncoder(input_channels, m, features[:m], conv_op, kernels[:m], strides[:m],
                                        n_conv[:m], conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs,
                                        nonlin, nonlin_kwargs, return_skips=True, nonlin_first=nonlin_first,
                                        pool=pool)
        self.decoder = NestedDecoder(self.encoder, num_classes, n_conv_per_row[:max_level], deep_supervision,
                                     self.use_attention, attention_channels[:max_level], upsampling_norm,
                                     nonlin_first, gate_psi_norm)
        self.num_levels = num_levels
        self.max_level = max_level
        self._prune_level = max_level
        if prune_level is None:
            env = os.environ.get(PRUNE_LEVEL_ENV, '').strip()
            if env:
                try:
                    prune_level = int(env)
                except ValueError:
                    raise ValueError(f"{PRUNE_LEVEL_ENV}={env!r} is not an integer; set it to a level in "
                                     f"1..{max_level} or unset it for the full network") from None
                if not 1 <= prune_level <= max_level:
                    raise ValueError(f"{PRUNE_LEVEL_ENV}={env}: this {name} has levels 1..{max_level}; set a level "
                                     f"in that range or unset it for the full network")
        self.prune_level = prune_level

    @property
    def prune_level(self) -> int:
        """The active level ``l``: the forward computes head ``X_{0,l}`` and only what it needs."""
        return self._prune_level

    @prune_level.setter
    def prune_level(self, level: Optional[int]) -> None:
        self._prune_level = self.max_level if level is None else _validate_level(level, self.max_level)

    def forward(self, x: torch.Tensor):
        level = self._prune_level
        skips = []
        for stage in self.encoder.stages[:level + 1]:  # the deeper stages are not run
            x = stage(x)
            skips.append(x)
        return self.decoder(skips, level)

    # ----- pruned export -------------------------------------------------------------------------------
    def level_module_prefixes(self, level: int) -> List[str]:
        """Module names (state-dict key prefixes) whose weights level ``level`` uses (all heads up to it,
        so a pruned network keeps deep supervision working)."""
        level = _validate_level(level, self.max_level)
        prefixes = [f"encoder.stages.{s}." for s in range(level + 1)]
        prefixes += [f"decoder.ups.{i}." for i in range(level)]
        for i, j in level_nodes(level):
            prefixes.append(f"decoder.nodes.{_node(i, j)}.")
            if self.decoder.attention:
                prefixes.append(f"decoder.gates.{_node(i, j)}.")
        prefixes += [f"decoder.heads.{k}." for k in range(level)]
        return prefixes

    def level_state_dict_keys(self, level: int) -> List[str]:
        """The state-dict keys (parameters and buffers) used by level ``level``, in state-dict order."""
        prefixes = tuple(self.level_module_prefixes(level))
        return [k for k in self.state_dict() if k.startswith(prefixes)]

    def level_state_dict(self, level: int) -> "OrderedDict[str, torch.Tensor]":
        """The part of the state dict a network built with ``max_level=level`` loads strictly."""
        keys = set(self.level_state_dict_keys(level))
        return OrderedDict((k, v) for k, v in self.state_dict().items() if k in keys)

    def pruned_copy(self, level: int) -> "ANUNet":
        """A network built with ``max_level=level`` holding this network's weights for that level."""
        level = _validate_level(level, self.max_level)
        reference = next(self.parameters())
        net = type(self)(**{**self.init_kwargs, 'max_level': level, 'prune_level': level})
        net.to(device=reference.device, dtype=reference.dtype)
        net.load_state_dict(self.level_state_dict(level), strict=True)
        net.decoder.deep_supervision = self.decoder.deep_supervision
        return net.train(self.training)

    # ----- nnU-Net hooks -------------------------------------------------------------------------------
    def compute_conv_feature_map_size(self, input_size):
        assert len(input_size) == convert_conv_op_to_dim(self.encoder.conv_op), (
            "give the patch size without batch/channel axes: input_size=(x, y(, z))")
        return (self.encoder.compute_conv_feature_map_size(input_size)
                + self.decoder.compute_conv_feature_map_size(input_size, self.max_level))

    @staticmethod
    def initialize(module):
        InitWeights_He(1e-2)(module)

    # ----- the paper's configuration ---------------------------------------------------------------------
    @classmethod
    def paper_preset(cls, level: int = 4, num_classes: int = 1, input_channels: int = 1,
                     deep_supervision: bool = True, ndim: int = 2, prune_level: Optional[int] = None,
                     norm: str = 'batch') -> "ANUNet":
        """The network of the paper (Section 3, Fig. 4; Table 6 counts its parameters): 5 stages of
        32/64/128/256/512 features, max-pooling by 2, two 3x3 conv -> BatchNorm -> ReLU per node (convs
        with bias), up-sampling by a 2x2 transposed conv -> BatchNorm -> ReLU shared per row, gates with
        ``F_int`` 32/32/64/128, heads 1x1 conv on ``X_{0,1..level}``; built up to ``level`` ("ANU-Net
        L<level>"). ``prune_level``: the active level (as the constructor's: by default
        ``NNUNET_EXT_ANUNET_PRUNE_LEVEL`` if set, else ``level``).

        Parameters (heads included, ``num_classes=1``): 103,812 / 513,387 / 2,191,829 / 8,950,594 for
        L1..L4, Table 6's 0.1038 / 0.5134 / 2.1918 / 8.9506 M. The paper does not spell the blocks out;
        these counts pin them down: convs with bias, one up-sampling per row (a transposed conv per node
        would give 0.5214 M for L2), one gate per node (a gate per concatenated skip: 0.5155 M), and a
        norm of ``f_i`` channels after the row's transposed conv (without it: 0.1037 / 0.5132 / 2.1914 /
        8.9496 M). That last norm adds ``2 f_i`` per row, which for these widths equals ``2 F_int`` per gate:
        an extra BatchNorm inside every gate would give the same counts; we take the up-convolution block
        (conv -> BN -> ReLU, as in the Attention U-Net code the gate sizes follow) and keep the gate as in
        Eqs. 1-3.

        ``norm``: ``'batch'``, the paper's BatchNorm; ``'instance'``, nnU-Net's InstanceNorm (affine) in every
        place the paper has BatchNorm except the gates' one-channel ``psi``, which then has no norm (module
        docstring): 20 parameters fewer at L4 (10 gates), the topology and every other count unchanged."""
        if norm not in PAPER_NORMS:
            raise ValueError(f"ANUNet.paper_preset: norm must be one of {sorted(PAPER_NORMS)}, got {norm!r}")
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        norm_op, norm_kwargs = PAPER_NORMS[norm][ndim - 2], dict(PAPER_NORM_KWARGS[norm])
        return cls(input_channels, 5, (32, 64, 128, 256, 512), conv, 3, (1, 2, 2, 2, 2), 2, num_classes, 2,
                   conv_bias=True, norm_op=norm_op, norm_op_kwargs=norm_kwargs,
                   nonlin=nn.ReLU, nonlin_kwargs={'inplace': True}, deep_supervision=deep_supervision, pool='max',
                   attention_channels=(32, 32, 64, 128), upsampling_norm=True, max_level=level,
                   prune_level=prune_level)


class UNetPlusPlus(ANUNet):
    """UNet++ (Zhou et al.): ANU-Net's nested decoder without attention gates, ``X_{i,j} =
    H(cat[X_{i,0}, ..., X_{i,j-1}, Up_i(X_{i+1,j-1})])``; same keywords, heads, deep supervision and
    pruning (``attention_channels`` is accepted and ignored)."""

    use_attention = False
