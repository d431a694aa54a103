"""Loss mixins: each overrides nnU-Net's ``_build_loss`` hook and nothing else.

A trainer combines one loss mixin with an architecture (mixin or base trainer) by inheritance::

    class nnUNetTrainerGODC(LengthAndChecksMixin, GODCLossMixin, nnUNetTrainer): ...

Every mixin builds the per-output loss in ``_build_output_loss``; ``DeepSupervisedLossMixin``
wraps it for deep supervision as nnU-Net does, with the length check nnU-Net leaves out, weighting the
heads with ``_deep_supervision_weights()`` (nnU-Net's ``1/2**i``, lowest 0, normalised, unless the
architecture mixin owns other weights: ``DeepSupervisionHeadsMixin``).
"""
from __future__ import annotations

import torch
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from torch import nn

from nnunet_ext.losses import GODCLoss
from nnunet_ext.training.deep_supervision import DeepSupervisionHeadsMixin, StrictDeepSupervisionWrapper


class DeepSupervisedLossMixin(DeepSupervisionHeadsMixin):
    """``_build_loss`` = ``_build_output_loss`` wrapped for deep supervision the way nnU-Net does it, the
    heads weighted by ``_deep_supervision_weights()`` (owned by ``DeepSupervisionHeadsMixin``: nnU-Net's, or
    the architecture's)."""

    def _build_output_loss(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must implement _build_output_loss")

    def _build_loss(self):
        loss = self._build_output_loss()
        if self.enable_deep_supervision:
            loss = StrictDeepSupervisionWrapper(loss, self._deep_supervision_weights())
        return loss


class DiceCELossMixin(DeepSupervisedLossMixin):
    """nnU-Net's own per-output loss (Dice + CE, or Dice + BCE for regions; same arguments as
    ``nnUNetTrainer._build_loss``), as a region term other mixins can build on.

    ``dice_ce_weight_ce`` (1.0): weight of the CE/BCE term; 0 leaves the soft Dice alone, the region term
    of the multi-level structural loss paper and the ResUNet paper's loss (their recipe trainers)."""

    dice_ce_weight_ce: float = 1.0

    def _build_output_loss(self) -> nn.Module:
        dice_kwargs = {'batch_dice': self.configuration_manager.batch_dice, 'smooth': 1e-5, 'ddp': self.is_ddp}
        if self.label_manager.has_regions:
            loss = DC_and_BCE_loss({}, {**dice_kwargs, 'do_bg': True}, weight_ce=self.dice_ce_weight_ce,
                                   use_ignore_label=self.label_manager.ignore_label is not None,
                                   dice_class=MemoryEfficientSoftDiceLoss)
        else:
            loss = DC_and_CE_loss({**dice_kwargs, 'do_bg': False}, {}, weight_ce=self.dice_ce_weight_ce, weight_dice=1,
                                  ignore_label=self.label_manager.ignore_label, dice_class=MemoryEfficientSoftDiceLoss)
        if self._do_i_compile():
            loss.dc = torch.compile(loss.dc)
        return loss


class GODCLossMixin(DeepSupervisedLossMixin):
    """nnU-Net's Dice + CE (or Dice + BCE for regions) with the Dice term replaced by GODC (Eq. 8).

    Class attributes to override in a subclass: ``godc_exponent`` (1 paper, 2 aggressive
    variant), ``godc_weight_ce`` (weight of the CE/BCE term; 0 gives GODC alone),
    ``godc_weight_dice``, ``godc_empty_gradient`` (True: on a sample without the class the union
    weight carries its gradient, a false-positive term of the same scale as GODC's gradient on
    samples with the class; False: the weight is detached everywhere, such samples get no Dice
    gradient). The ignore label is handled by nnU-Net's compound losses (mask passed to GODC as
    ``loss_mask``); GODC is per sample whatever the plans' ``batch_dice``.
    """

    godc_exponent: float = 1.0
    godc_weight_ce: float = 1.0
    godc_weight_dice: float = 1.0
    godc_empty_gradient: bool = True

    def _build_output_loss(self) -> nn.Module:
        godc_kwargs = {'smooth': 1e-5, 'ddp': self.is_ddp, 'exponent': self.godc_exponent,
                       'empty_gradient': self.godc_empty_gradient}
        if self.label_manager.has_regions:
            loss = DC_and_BCE_loss({}, {**godc_kwargs, 'do_bg': True},
                                   weight_ce=self.godc_weight_ce, weight_dice=self.godc_weight_dice,
                                   use_ignore_label=self.label_manager.ignore_label is not None,
                                   dice_class=GODCLoss)
        else:
            loss = DC_and_CE_loss({**godc_kwargs, 'do_bg': False}, {},
                                  weight_ce=self.godc_weight_ce, weight_dice=self.godc_weight_dice,
                                  ignore_label=self.label_manager.ignore_label, dice_class=GODCLoss)
        if self._do_i_compile():
            loss.dc = torch.compile(loss.dc)
        return loss


class GODCOnlyLossMixin(GODCLossMixin):
    """GODC alone, without the cross-entropy term: the paper's training loss (Eq. 8).

    Without CE, background-only patches (a third or more of nnU-Net's patches) get their gradient
    from GODC alone. A class absent from a sample has ``DC = smooth / (sum P + smooth) ~ 0`` with no
    gradient (Eq. 7: the Dice gradient on a false positive scales with the IoU, 0 there); GODC's
    ``empty_gradient`` (on by default, ``godc_empty_gradient``) lets the union weight ``U / mean U =
    sum P / mean U`` carry the gradient on those samples, so their false positives are pushed down at
    the same scale as GODC's gradient on samples with foreground (``nnunet_ext.losses.godc``).
    """

    godc_weight_ce: float = 0.0
