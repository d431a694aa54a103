"""Planner for the U-Net with lateral feature alignment (LFAM) on its skips."""
from nnunet_ext.architectures.lfam_unet import LFAMPlainConvUNet
from nnunet_ext.plans.network_planners import _NetworkPlanner
from nnunet_ext.training.architecture_mixins import LFAMArchitectureMixin


class LFAMPlanner(_NetworkPlanner):
    """Plans for the LFAM trainers (nnUNetPlansLFAM): nnU-Net's default plans, sized for LFAMPlainConvUNet.

    nnU-Net's default planner whose memory estimate is ``LFAMPlainConvUNet``'s (deformable alignment on
    every skip).

    Same plans as nnU-Net's default planner (``PlainConvUNet`` and its keywords, which the LFAM trainers
    build their network from) with patch and batch sized so that the LFAM U-Net fits the GPU memory
    target. Writes ``nnUNetPlansLFAM.json``: ``nnunet-ext plan ID -pl LFAMPlanner``, then
    ``nnUNetv2_train ID CONFIG FOLD -tr nnUNetTrainerLFAM -p nnUNetPlansLFAM`` (or ``nnUNetTrainerGODCLFAM``).
    """

    planned_network = LFAMPlainConvUNet
    estimate_kwargs = LFAMArchitectureMixin.variant_kwargs()
    default_plans_name = 'nnUNetPlansLFAM'
