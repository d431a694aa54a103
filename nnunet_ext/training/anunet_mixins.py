"""ANU-Net / UNet++ in nnU-Net's training loop (ANU-Net paper, Section 3.4, Eq. 8).

* :class:`NestedUNetArchitectureMixin` builds ``ANUNet`` or ``UNetPlusPlus``
  (``nnunet_ext.architectures.anunet``) from the plans: nnU-Net's default plans (``PlainConvUNet``
  keywords, taken as they are) or plans written by ``ANUNetPlanner`` (which name the nested network and
  size the patch for its decoder).
* The heads ``X_{0,1} .. X_{0,L}`` all predict at full resolution, so ``_get_deep_supervision_scales``
  returns ``L`` scales of 1: nnU-Net's data pipeline then hands every head the full-resolution target.
  Their weights are equal (Eq. 8 sums the heads' losses), normalised to sum 1; ``anunet_head_weights``
  overrides them (highest level first, the order of the network's outputs).
* :class:`HybridLossMixin`: the hybrid loss of Eq. 8 per head (``nnunet_ext.losses.hybrid``).

Training always runs the full network: the pruning level chosen at prediction time through
``NNUNET_EXT_ANUNET_PRUNE_LEVEL`` is refused while training (it would train a sub-network).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from nnunet_ext.architectures.anunet import PRUNE_LEVEL_ENV
from nnunet_ext.losses.hybrid import HybridLoss, NNUNetTargetHybridLoss
from nnunet_ext.training.architecture_mixins import PLAIN_UNET
from nnunet_ext.training.deep_supervision import DeepSupervisionHeadsMixin
from nnunet_ext.training.loss_mixins import DeepSupervisedLossMixin

ANUNET = 'nnunet_ext.architectures.anunet.ANUNet'
UNET_PLUS_PLUS = 'nnunet_ext.architectures.anunet.UNetPlusPlus'
NESTED_NETWORKS = (ANUNET, UNET_PLUS_PLUS)


class NestedUNetArchitectureMixin(DeepSupervisionHeadsMixin):
    """The plans' topology as a nested U-Net (``nested_network``: ANU-Net by default, UNet++ for the
    ablation), full-resolution deep-supervision heads with equal weights. It owns the heads' weights
    (a refinement of ``DeepSupervisionHeadsMixin``), so any loss mixin, in any order of the bases, weighs
    the heads equally.

    Class attributes: ``nested_network`` (dotted class path), ``anunet_head_weights`` (None: equal;
    else one weight per head, highest level first), ``anunet_upsampling_norm`` (False: nnU-Net's bare
    transposed convolution; True: followed by norm and nonlinearity as in the paper).
    """

    cooperative_hooks = frozenset({'on_train_start'})
    nested_network: str = ANUNET
    anunet_head_weights: Optional[Sequence[float]] = None
    anunet_upsampling_norm: bool = False

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        arch = configuration_manager.network_arch_class_name
        if arch not in (PLAIN_UNET, *NESTED_NETWORKS):
            raise ValueError(f"{cls.__name__} builds a nested U-Net from nnU-Net's PlainConvUNet plans or from "
                             f"ANUNetPlanner's plans; these plans name {arch}. Plan with nnU-Net's default planner "
                             f"or with: nnunet-ext plan ID -pl ANUNetPlanner")
        kwargs = dict(configuration_manager.network_arch_init_kwargs)
        if arch == PLAIN_UNET:
            kwargs['upsampling_norm'] = cls.anunet_upsampling_norm
        return get_network_from_plans(cls.nested_network, kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=enable_deep_supervision)

    def _get_deep_supervision_scales(self):
        """One full-resolution scale per head ``X_{0,1} .. X_{0,L}`` (``L = n_stages - 1``, as many as
        nnU-Net's default has decoder outputs)."""
        if not self.enable_deep_supervision:
            return None
        dim = len(self.configuration_manager.patch_size)
        return [[1.0] * dim for _ in range(self._num_heads())]

    def _num_heads(self) -> int:
        """Heads of the trained (full) network: one per level of the plans' topology."""
        return len(self.configuration_manager.pool_op_kernel_sizes) - 1

    def _deep_supervision_weights(self):
        num_heads = len(self._get_deep_supervision_scales())
        if self.anunet_head_weights is None:
            return np.full(num_heads, 1 / num_heads)
        weights = np.asarray(self.anunet_head_weights, dtype=float)
        if weights.shape != (num_heads,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"{type(self).__name__}.anunet_head_weights: need {num_heads} non-negative weights "
                             f"(one per head, highest level first) with a positive sum, got {self.anunet_head_weights}")
        return weights / weights.sum()

    def on_train_start(self):
        if os.environ.get(PRUNE_LEVEL_ENV, '').strip():
            raise RuntimeError(f"{PRUNE_LEVEL_ENV}={os.environ[PRUNE_LEVEL_ENV]} is set: it chooses a pruned level "
                               f"for prediction; training must run the full network. Unset it before "
                               f"nnUNetv2_train.")
        super().on_train_start()


class HybridLossMixin(DeepSupervisedLossMixin):
    """The hybrid loss of Eq. 8 (focal-style BCE + soft Dice) on every head, equal head weights.

    Labels: softmax, foreground classes one-vs-rest; regions: sigmoid per region (the paper's binary
    case). The ignore label (or nnU-Net's ignore channel with regions) masks both terms. The Dice is
    the plans' ``batch_dice``, over the global batch under DDP (``ddp=self.is_ddp``, as nnU-Net's own
    Dice). Class attributes: ``hybrid_alpha`` (0.75: an object voxel weighs 3x a background voxel, the
    paper's "lower the weight of the more frequent class"; RetinaNet's 0.25 does the opposite),
    ``hybrid_gamma`` (2), ``hybrid_modulation`` (``'hardness'``: ``max(p_t - 0.5, margin)^-gamma``,
    Eq. 8's weight on the right side of 0.5 and the largest weight on wrong voxels; ``'literal'``:
    Eq. 8's ``|Y - 0.5|^-gamma``, under which a confidently wrong voxel weighs ~100x less than an
    uncertain one and ANU-Net learned nothing on small objects), ``hybrid_margin`` (0.05),
    ``hybrid_smooth`` (1),
    ``hybrid_bce_normalization`` (``'weights'``: the modulated BCE as a weighted mean, on the Dice term's
    scale; ``'voxels'``: Eq. 8's literal mean over voxels, ~200x the Dice term at initialisation; see
    ``nnunet_ext.losses.hybrid``). Eq. 8 taken literally: ``hybrid_modulation = 'literal'`` and
    ``hybrid_bce_normalization = 'voxels'`` (with RetinaNet's ``hybrid_alpha = 0.25``).
    """

    hybrid_alpha: float = 0.75
    hybrid_gamma: float = 2.0
    hybrid_margin: float = 0.05
    hybrid_smooth: float = 1.0
    hybrid_bce_normalization: str = 'weights'
    hybrid_modulation: str = 'hardness'

    def _build_output_loss(self) -> nn.Module:
        lm = self.label_manager
        hybrid = HybridLoss('sigmoid' if lm.has_regions else 'softmax', alpha=self.hybrid_alpha,
                            gamma=self.hybrid_gamma, margin=self.hybrid_margin, smooth=self.hybrid_smooth,
                            batch_dice=self.configuration_manager.batch_dice,
                            bce_normalization=self.hybrid_bce_normalization, modulation=self.hybrid_modulation,
                            ddp=self.is_ddp)
        return NNUNetTargetHybridLoss(hybrid, ignore_label=None if lm.has_regions else lm.ignore_label,
                                      has_ignore_channel=lm.has_regions and lm.ignore_label is not None)
