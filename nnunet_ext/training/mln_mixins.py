"""The multi-level structural network (MLN, Section 3 of ``docs/methods/multi-level-structural.md``)
as trainer mixins: the architecture (:mod:`nnunet_ext.architectures.mln_unet`) and the loss of Eq. 13
(:mod:`nnunet_ext.losses.mln`)::

    class nnUNetTrainerMLN(LengthAndChecksMixin, MLNLossMixin, DiceCELossMixin, MLNArchitectureMixin,
                           nnUNetTrainer): ...

``MLNLossMixin`` shares the multi-level loss mixin's training machinery
(:class:`~nnunet_ext.training.structural_mixins.StructuralTrainingMixin`) and brings its own loss, schedule
and options; the options of the multi-level loss (``mll_point_term``, ``mll_num_points``, ...) are not
its own, so MLN trainers do not have them. Shared: the data pipeline (the signed distance maps appended
to every target by ``SignedDistanceTransform``), the validation step (nnU-Net's, whose loss sees the distance
maps and whose online pseudo-Dice sees the labels and ``output[0]``, the fused prediction) and its
per-epoch log of the weights and of each unweighted term. The region term ``E_R`` is the next loss
mixin's (nnU-Net's Dice + CE with ``DiceCELossMixin``).

Label maps only (softmax; the ignore label is supported); region-based training is refused at trainer
start, and so is training with deep supervision off (the network then returns only the fused
prediction, its inference contract).
"""
from __future__ import annotations

from nnunet_ext.losses.mln import MLNLoss, MLNSchedule, SignedDistanceRegressionLoss
from nnunet_ext.nn.unwrap import unwrapped_network
from nnunet_ext.training.architecture_mixins import PLAIN_UNET, RESENC_UNET, PlansUNetVariantMixin
from nnunet_ext.training.structural_mixins import StructuralTrainingMixin

__all__ = ["MLNArchitectureMixin", "MLNLossMixin"]


class MLNArchitectureMixin(PlansUNetVariantMixin):
    """The plans' U-Net (``PlainConvUNet`` or ``ResidualEncoderUNet``) with the MLN's boundary, pixel and
    fusion heads.

    Class attributes: ``mln_num_points`` (N per patch; ``None``: ``ceil(mln_point_fraction * voxels)``,
    at most ``mln_max_points``, self-attention being quadratic in N), ``mln_point_fraction`` (1/16, as
    the multi-level loss's point term), ``mln_max_points`` (1024), ``mln_importance_ratio`` (m = 0.75),
    ``mln_num_heads`` (4), ``use_residual_encoder`` (False).
    """

    variant_networks = {PLAIN_UNET: 'nnunet_ext.architectures.mln_unet.MLNPlainConvUNet',
                        RESENC_UNET: 'nnunet_ext.architectures.mln_unet.MLNResidualEncoderUNet'}
    variant_name = 'the MLN heads'
    mln_num_points = None
    mln_point_fraction: float = 1 / 16
    mln_max_points: int = 1024
    mln_importance_ratio: float = 0.75
    mln_num_heads: int = 4

    @classmethod
    def variant_kwargs(cls) -> dict:
        return dict(mln_num_points=cls.mln_num_points, mln_point_fraction=cls.mln_point_fraction,
                    mln_max_points=cls.mln_max_points, mln_importance_ratio=cls.mln_importance_ratio,
                    mln_num_heads=cls.mln_num_heads)


class MLNLossMixin(StructuralTrainingMixin):
    """Eq. 13: ``E_R(P^region) + alpha E_B^S(P^boundary) + beta E_P(L^pixel) + gamma E_R(P^fusion)``.

    Class attributes: ``mll_schedule`` (an :class:`~nnunet_ext.losses.mln.MLNSchedule`: alpha from 0 by 0.2
    per epoch to 1, beta = gamma = 0 before epoch 12, then 1; ``MLNSchedule(epochs_per_step=k)`` stretches
    it to nnU-Net's shorter epochs), ``mln_distance_normalization`` (``'mean'``, the default: Phi divided per sample and
    class by its mean magnitude over the patch, unit-free and balanced against the region term;
    ``'max'``; ``None``: the literal Eq. 12 in millimetres, see :mod:`nnunet_ext.losses.mln`),
    ``mln_distance_scale`` (literal form only: millimetres per unit of the boundary head; 1 = Eq. 12 as
    written).
    """

    mll_schedule = MLNSchedule()
    mln_distance_normalization = 'mean'
    mln_distance_scale: float = 1.0

    def _build_loss(self):
        lm = self.label_manager
        if lm.has_regions:
            raise ValueError(f"{type(self).__name__} trains on label maps (softmax); this dataset uses regions "
                             f"(region-based training), which the MLN network does not support. Use a dataset.json "
                             f"without regions, or nnUNetTrainerMLL for the multi-level loss with regions.")
        if not self.enable_deep_supervision:
            raise ValueError(f"{type(self).__name__} needs deep supervision on: without it the MLN network returns "
                             f"only its fused prediction (its inference contract), not the branches the loss needs")
        return MLNLoss(self._build_output_loss(), ignore_label=lm.ignore_label,
                       deep_supervision_weights=self._deep_supervision_weights(),
                       distance_loss=SignedDistanceRegressionLoss(self.mln_distance_normalization,
                                                                   self.mln_distance_scale),
                       keep_zero_weight_terms=self.is_ddp)  # DDP: every parameter needs a gradient

    def on_train_epoch_start(self):
        super().on_train_epoch_start()  # sets the weights and logs region, alpha, beta
        fusion_active = self.loss.weights.fusion > 0
        unwrapped_network(self.network).fusion_active.fill_(fusion_active)
        self.print_to_log_file(f"MLN fusion weight (gamma) {self.loss.weights.fusion:.4g}; the network predicts with "
                               f"{'the fusion' if fusion_active else 'the region branch (fusion not trained yet)'}")
