"""The papers' own networks in nnU-Net's training loop: fixed configurations instead of the plans' topology.

Every other architecture mixin of ours builds its network from the plans (nnU-Net's stages, features,
kernels, strides, InstanceNorm), which is what a practitioner wants. A reviewer reproducing a paper's table
wants the network the paper reports, with its parameter count:

* :class:`PaperANUNetArchitectureMixin`: ``ANUNet.paper_preset`` (ANU-Net paper, Section 3, Fig. 4,
  Table 6): 5 stages of 32/64/128/256/512 features, max-pooling by 2, biased convolutions, up-sampling
  blocks with norm, gates with ``F_int`` 32/32/64/128, four full-resolution heads ``X_{0,1..4}``; nnU-Net's
  InstanceNorm by default, the paper's BatchNorm with ``anunet_paper_norm = 'batch'``.
  ``docs/methods/anunet.md``.
* :class:`PaperResUNetArchitectureMixin`: ``PreActResUNet.paper_preset`` (Zhang et al.'s residual U-Net, the
  ResUNet paper's network): 64/128/256 + a 512 bridge, three stride-2 down-samplings, one pre-activation
  unit per level, BatchNorm, biased convolutions; deep-supervision heads at 1, 1/2 and 1/4 of the input
  resolution. ``docs/methods/resunet.md``.

What the plans still decide: the input channels (the dataset's channels), the outputs (labels or
regions) and the patch and batch size nnU-Net trains and predicts with. Both networks are 2D, as in the
papers (slices): a 3D configuration is refused with a message naming the 2d one. The patch
must be divisible by the network's total down-sampling (16 and 8): nnU-Net's sliding window feeds the
plans' patch unchanged, and an odd feature map would not match its skip. nnU-Net's default 2d plans are
(their patch is a multiple of ``2 ** (n_stages - 1)``, at least 16 for any patch of 64² or more).

Initialisation: nnU-Net's He initialisation (``network.initialize``), as every trainer of ours; the
papers do not state theirs. BatchNorm becomes SyncBatchNorm under nnU-Net's DDP (``nnUNetTrainer``
converts it). Pruned exports (``nnunet-ext prune``) write ``max_level`` into the plans' architecture
keywords; the ANU-Net mixin builds that level.
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
from torch import nn

from nnunet_ext.architectures.anunet import PAPER_NORMS, ANUNet
from nnunet_ext.architectures.resunet import PreActResUNet
from nnunet_ext.training.anunet_mixins import NestedUNetArchitectureMixin
from nnunet_ext.training.composition import TrainerMixin

ANUNET_PAPER_LEVELS = 4
ANUNET_PAPER_DOWNSAMPLING = 2 ** ANUNET_PAPER_LEVELS
RESUNET_PAPER_STRIDES = (1, 2, 2, 2)


def check_2d(patch_size: Sequence[int], trainer: str, network: str) -> None:
    """The papers' networks are 2D (slices); a 3D configuration is refused rather than silently built in 3D."""
    if len(patch_size) != 2:
        raise ValueError(f"{trainer}: {network} is a 2D network (the paper segments slices); these plans' patch "
                         f"{list(patch_size)} is {len(patch_size)}D. Train the 2d configuration "
                         f"(nnUNetv2_train DATASET 2d FOLD -tr {trainer}).")


def check_patch_divisible(patch_size: Sequence[int], factor: int, trainer: str, network: str) -> None:
    """Refuse a patch the network's down-sampling cannot divide (nnU-Net would fail deep in the forward)."""
    if any(int(s) % factor for s in patch_size):
        raise ValueError(f"{trainer}: {network} down-samples by {factor} in every axis, so the patch must be a "
                         f"multiple of {factor}; these plans' patch is {list(patch_size)}. Use plans with such a "
                         f"patch (nnU-Net's default 2d plans of images of 64 pixels or more have one), or edit "
                         f"the configuration's patch_size in nnUNetPlans.json.")


class PaperANUNetArchitectureMixin(NestedUNetArchitectureMixin):
    """The ANU-Net paper's network (``ANUNet.paper_preset``: 32..512 features, 4 max-poolings, the paper's
    gates and up-sampling blocks) with the plans' channels and classes, 2D only; four full-resolution heads
    with equal weights (Eq. 8).

    Class attribute ``anunet_paper_norm``: ``'instance'`` (default), nnU-Net's InstanceNorm where the paper
    has BatchNorm; ``'batch'``, the paper's BatchNorm (Table 6's 8,950,594 parameters). With BatchNorm the
    network learned markedly worse on real images under nnU-Net's training (``docs/methods/anunet.md``):
    its running statistics come from augmented, foreground-oversampled patches, not the images it predicts.
    """

    anunet_paper_norm: str = 'instance'

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        patch = configuration_manager.patch_size
        check_2d(patch, cls.__name__, "ANU-Net's paper network")
        check_patch_divisible(patch, ANUNET_PAPER_DOWNSAMPLING, cls.__name__, "ANU-Net's paper network")
        level = configuration_manager.network_arch_init_kwargs.get('max_level', ANUNET_PAPER_LEVELS)
        if cls.anunet_paper_norm not in PAPER_NORMS:
            raise ValueError(f"{cls.__name__}.anunet_paper_norm must be one of {sorted(PAPER_NORMS)} ('batch': the "
                             f"paper's BatchNorm), got {cls.anunet_paper_norm!r}")
        network = ANUNet.paper_preset(level=level, num_classes=num_output_channels, input_channels=num_input_channels,
                                      deep_supervision=enable_deep_supervision, ndim=2, norm=cls.anunet_paper_norm)
        network.apply(network.initialize)
        return network

    def _num_heads(self) -> int:
        return ANUNET_PAPER_LEVELS


class PaperResUNetArchitectureMixin(TrainerMixin):
    """Zhang et al.'s residual U-Net (``PreActResUNet.paper_preset``: 64/128/256 + 512 bridge, BatchNorm,
    one pre-activation unit per level) with the plans' channels and classes, 2D only;
    deep-supervision heads at 1, 1/2 and 1/4 of the patch, weighted as nnU-Net weights its own."""

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        patch = configuration_manager.patch_size
        check_2d(patch, cls.__name__, "the ResUNet paper's network")
        check_patch_divisible(patch, int(np.prod(RESUNET_PAPER_STRIDES)), cls.__name__,
                              "the ResUNet paper's network")
        network = PreActResUNet.paper_preset(input_channels=num_input_channels, num_classes=num_output_channels,
                                             conv_op=nn.Conv2d, deep_supervision=enable_deep_supervision)
        network.apply(network.initialize)
        return network

    def _get_deep_supervision_scales(self) -> List[List[float]]:
        """nnU-Net's rule (``1 / cumprod(strides)``, the deepest dropped) on the paper network's strides."""
        if not self.enable_deep_supervision:
            return None
        dim = len(self.configuration_manager.patch_size)
        scales = 1 / np.cumprod(RESUNET_PAPER_STRIDES)
        return [[float(s)] * dim for s in scales[:-1]]
