"""The multi-level structural loss (Eq. 11, ``docs/methods/multi-level-structural.md``) as a
trainer mixin: wraps the region term of the trainer's loss mixin (nnU-Net's Dice+CE, GODC+CE, ...:
``_build_output_loss``, which this mixin does not define, so the order of the two does not matter) into
:class:`~nnunet_ext.losses.StructuralLoss`, adds the signed distance maps to the data pipeline, applies the
weight schedule per epoch and logs the weights and each term::

    class nnUNetTrainerMLL(LengthAndChecksMixin, StructuralLossMixin, DiceCELossMixin, nnUNetTrainer): ...
    class nnUNetTrainerMLLGODC(LengthAndChecksMixin, StructuralLossMixin, GODCLossMixin, nnUNetTrainer): ...

:class:`StructuralTrainingMixin` holds what the MLN's loss mixin shares (``nnunet_ext.training.mln_mixins``).

Works for label maps (softmax; the ignore label excluded from every term) and region-based
training (sigmoid; the ignore channel excluded), 2D and 3D, with or without deep supervision.
"""
from __future__ import annotations

from typing import List

from nnunet_ext.losses.boundary import BoundaryLoss
from nnunet_ext.losses.schedules import PaperSchedule
from nnunet_ext.losses.structural import StructuralLoss
from nnunet_ext.losses.uncertain_points import UncertainPointLoss
from nnunet_ext.training.distance_transform import SignedDistanceTransform
from nnunet_ext.training.loss_mixins import DeepSupervisedLossMixin


class StructuralTrainingMixin(DeepSupervisedLossMixin):
    """The training machinery the multi-level structural loss and the MLN share: signed distance maps
    appended to every target, nnU-Net's validation step on the packed targets, the per-epoch weight schedule
    and the per-epoch log of each term. The loss itself is the subclass's (``_build_loss``):
    :class:`StructuralLossMixin` (Eq. 11) or ``MLNLossMixin`` (Eq. 13), each with the options it reads.

    ``mll_schedule``: epoch -> weights (set at the start of every epoch as ``self.loss.weights``).
    """

    cooperative_hooks = frozenset({'get_training_transforms'})
    mll_schedule = PaperSchedule()

    def _label_channels(self) -> int:
        lm = self.label_manager
        if lm.has_regions:
            return len(lm.foreground_regions) + (1 if lm.ignore_label is not None else 0)
        return 1

    # --- data: signed distance maps appended to every target -------------------------------------------------
    def _distance_transform(self) -> SignedDistanceTransform:
        lm = self.label_manager
        if lm.has_regions:
            return SignedDistanceTransform(self.configuration_manager.spacing,
                                           num_regions=len(lm.foreground_regions))
        return SignedDistanceTransform(self.configuration_manager.spacing, foreground_labels=lm.foreground_labels)

    def get_training_transforms(self, *args, **kwargs):
        transforms = super().get_training_transforms(*args, **kwargs)
        transforms.transforms.append(self._distance_transform())
        return transforms

    def get_validation_transforms(self, *args, **kwargs):
        transforms = super().get_validation_transforms(*args, **kwargs)
        transforms.transforms.append(self._distance_transform())
        return transforms

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step; its loss sees the distance maps, its online Dice only the labels."""
        packed = batch['target']
        n = self._label_channels()
        if isinstance(packed, list):
            labels = [t[:, :n].clone() for t in packed]
            on_device = [t.to(self.device, non_blocking=True) for t in packed]
        else:
            labels = packed[:, :n].clone()
            on_device = packed.to(self.device, non_blocking=True)
        structural = self.loss
        self.loss = lambda output, _labels: structural(output, on_device)
        try:
            return super().validation_step({**batch, 'target': labels})
        finally:
            self.loss = structural

    # --- schedule and log --------------------------------------------------------------------------------------
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        weights = self.mll_schedule(self.current_epoch)
        self.loss.weights = weights
        self.loss.pop_term_means()
        self.print_to_log_file(f"multi-level loss weights: region {weights.region:.4g}, boundary (alpha) "
                               f"{weights.boundary:.4g}, point (beta) {weights.point:.4g}")

    def _log_terms(self, phase: str) -> None:
        means = self.loss.pop_term_means()
        self.print_to_log_file(f"multi-level loss terms ({phase}, unweighted): "
                               + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        self._log_terms('train')

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        super().on_validation_epoch_end(val_outputs)
        self._log_terms('val')


class StructuralLossMixin(StructuralTrainingMixin):
    """Eq. 11: region (from the loss mixin after it: ``_build_output_loss``) + alpha * boundary + beta *
    uncertain-point terms.

    Class attributes (override in a subclass):
        mll_schedule: epoch -> weights (``PaperSchedule()``: alpha 0, +0.2 per epoch, up to 1; beta 0
            before epoch 12, then 1; ``KervadecRebalanceSchedule()`` for Kervadec's rebalancing).
        mll_boundary_term, mll_point_term: include the term (ablations switch one off).
        mll_num_points: N points per sample (``None``: ``mll_point_fraction`` of the patch voxels).
        mll_point_fraction, mll_oversample_ratio (k), mll_importance_ratio (m).
        mll_distance_normalization: scale of Phi in the boundary term (``'mean'``, the default: divided
            per sample and class by its mean magnitude over the patch, so the term is unit-free, in
            [-1, 1] and balanced against the region term; ``'max'``; ``None``: the paper's and
            Kervadec's literal ``mean(P Phi)`` in millimetres). See :mod:`nnunet_ext.losses.boundary`.
    """

    mll_boundary_term: bool = True
    mll_point_term: bool = True
    mll_num_points = None
    mll_point_fraction: float = 1 / 16
    mll_oversample_ratio: float = 3.0
    mll_importance_ratio: float = 0.75
    mll_distance_normalization = 'mean'

    def _build_loss(self):
        lm = self.label_manager
        use_sigmoid = lm.has_regions
        point = UncertainPointLoss(self.mll_num_points, self.mll_point_fraction, self.mll_oversample_ratio,
                                   self.mll_importance_ratio, use_sigmoid) if self.mll_point_term else False
        weights = self._deep_supervision_weights() if self.enable_deep_supervision else None
        return StructuralLoss(self._build_output_loss(), self._label_channels(), use_sigmoid,
                              ignore_label=None if use_sigmoid else lm.ignore_label,
                              has_ignore_channel=use_sigmoid and lm.ignore_label is not None,
                              deep_supervision_weights=weights,
                              boundary_loss=BoundaryLoss(use_sigmoid, self.mll_distance_normalization)
                              if self.mll_boundary_term else False, point_loss=point)
