"""Planners for the pre-activation residual U-Net (ResUNet) and its LFAM variant."""
from nnunet_ext.architectures.resunet import LFAMPreActResUNet, PreActResUNet
from nnunet_ext.plans.network_planners import _NetworkPlanner
from nnunet_ext.training.resunet_mixins import ResUNetArchitectureMixin, ResUNetLFAMArchitectureMixin


class ResUNetPlanner(_NetworkPlanner):
    """Plans for the ResUNet trainers (nnUNetPlansResUNet): nnU-Net's default plans, sized for PreActResUNet.

    nnU-Net's default planner whose memory estimate is ``PreActResUNet``'s.

    Same plans as nnU-Net's default planner (``PlainConvUNet`` keywords: the ResUNet trainers build the
    residual U-Net from them) with patch and batch sized so that the residual U-Net fits the GPU memory
    target. Writes ``nnUNetPlansResUNet.json``: ``nnunet-ext plan ID -pl ResUNetPlanner``, then
    ``nnUNetv2_train ID CONFIG FOLD -tr nnUNetTrainerResUNet -p nnUNetPlansResUNet``.
    """

    planned_network = PreActResUNet
    estimate_kwargs = ResUNetArchitectureMixin.variant_kwargs()
    default_plans_name = 'nnUNetPlansResUNet'


class ResUNetLFAMPlanner(_NetworkPlanner):
    """Plans for nnUNetTrainerResUNetGODCLFAM (nnUNetPlansResUNetLFAM): default plans, sized for LFAMPreActResUNet.

    nnU-Net's default planner whose memory estimate is ``LFAMPreActResUNet``'s (residual U-Net with LFAM).

    Same plans as nnU-Net's default planner (``PlainConvUNet`` keywords) with patch and batch sized so
    that the residual U-Net with deformable alignment on every skip fits the GPU memory target. Writes
    ``nnUNetPlansResUNetLFAM.json``: ``nnunet-ext plan ID -pl ResUNetLFAMPlanner``, then
    ``nnUNetv2_train ID CONFIG FOLD -tr nnUNetTrainerResUNetGODCLFAM -p nnUNetPlansResUNetLFAM``.
    """

    planned_network = LFAMPreActResUNet
    estimate_kwargs = ResUNetLFAMArchitectureMixin.variant_kwargs()
    default_plans_name = 'nnUNetPlansResUNetLFAM'
