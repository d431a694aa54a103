"""Planner for the multi-level structural network (MLN heads on nnU-Net's U-Net)."""
from nnunet_ext.architectures.mln_unet import MLNPlainConvUNet
from nnunet_ext.plans.network_planners import _NetworkPlanner
from nnunet_ext.training.mln_mixins import MLNArchitectureMixin


class MLNPlanner(_NetworkPlanner):
    """Plans for nnUNetTrainerMLN (nnUNetPlansMLN): nnU-Net's default plans, sized for MLNPlainConvUNet.

    nnU-Net's default planner whose memory estimate is ``MLNPlainConvUNet``'s (boundary, pixel and fusion
    heads at full resolution).

    Same plans as nnU-Net's default planner (``PlainConvUNet`` keywords: the MLN trainer adds its heads
    to that U-Net) with patch and batch sized so that the MLN fits the GPU memory target. Writes
    ``nnUNetPlansMLN.json``: ``nnunet-ext plan ID -pl MLNPlanner``, then
    ``nnUNetv2_train ID CONFIG FOLD -tr nnUNetTrainerMLN -p nnUNetPlansMLN``.
    """

    planned_network = MLNPlainConvUNet
    estimate_kwargs = MLNArchitectureMixin.variant_kwargs()
    default_plans_name = 'nnUNetPlansMLN'
