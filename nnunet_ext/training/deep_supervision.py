"""Deep supervision: the heads' weights (one owner, :class:`DeepSupervisionHeadsMixin`) and the loss
wrapping as nnU-Net does it, with the length check it leaves out."""
from __future__ import annotations

import numpy as np
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from nnunet_ext.training.composition import TrainerMixin


class StrictDeepSupervisionWrapper(DeepSupervisionWrapper):
    """nnU-Net's ``DeepSupervisionWrapper`` that refuses outputs and targets of different lengths.

    The stock wrapper ``zip``s them, so a network returning fewer heads than there are target
    scales (or the other way round) would silently drop terms.
    """

    def forward(self, *args):
        lengths = {len(a) for a in args if isinstance(a, (tuple, list))}
        if len(lengths) > 1:
            raise ValueError(f"deep supervision: outputs and targets differ in length ({[len(a) for a in args]}); "
                             f"the network's heads must match the trainer's _get_deep_supervision_scales()")
        if self.weight_factors is not None and lengths and len(self.weight_factors) != lengths.pop():
            raise ValueError(f"deep supervision: {len(self.weight_factors)} weights for "
                             f"{len(args[0])} outputs")
        return super().forward(*args)


def nnunet_deep_supervision_weights(num_outputs: int, keep_lowest: bool = False) -> np.ndarray:
    """nnU-Net's weights: ``1/2**i`` for output ``i`` (highest resolution first), the lowest set
    to 0 (to 1e-6 under DDP without compile, see ``keep_lowest``), normalised to sum 1."""
    if num_outputs < 1:
        raise ValueError(f"need at least one output, got {num_outputs}")
    if num_outputs == 1:
        return np.ones(1)
    weights = np.array([1 / (2 ** i) for i in range(num_outputs)])
    weights[-1] = 1e-6 if keep_lowest else 0
    return weights / weights.sum()


class DeepSupervisionHeadsMixin(TrainerMixin):
    """Owner of ``_deep_supervision_weights()``, the weight of each deep-supervision head: nnU-Net's
    (:func:`nnunet_deep_supervision_weights` over ``_get_deep_supervision_scales()``; the lowest kept at 1e-6
    under DDP without compile, nnU-Net's unused-parameter workaround).

    Loss mixins read the weights; an architecture whose heads are not nnU-Net's pyramid (ANU-Net's
    full-resolution heads, Eq. 8's equal weights) subclasses this mixin and overrides the method, so its
    weights win whatever the order of the trainer's bases (``nnunet_ext.training.composition``)."""

    def _deep_supervision_weights(self) -> np.ndarray:
        scales = self._get_deep_supervision_scales()
        keep_lowest = self.is_ddp and not self._do_i_compile()  # nnU-Net's DDP unused-parameter workaround
        return nnunet_deep_supervision_weights(len(scales), keep_lowest=keep_lowest)
