"""Planner for the nested U-Nets (ANU-Net, UNet++)."""
from nnunet_ext.architectures.anunet import ANUNet
from nnunet_ext.plans.network_planners import _NetworkPlanner


class ANUNetPlanner(_NetworkPlanner):
    """Plans for the ANU-Net and UNet++ trainers (nnUNetPlansANUNet), sized for ANUNet's nested decoder and gates.

    nnU-Net sizes patch and batch by the network's ``compute_conv_feature_map_size`` against its
    reference value for the GPU memory target; with ``ANUNet`` as the planned class, the nested rows
    (``L(L+1)/2`` decoder nodes instead of ``L``) and the attention gates count, so the planned patch and
    batch fit the target as nnU-Net's own do for its U-Net. The plans name ``ANUNet`` and keep
    ``PlainConvUNet``'s keywords. Writes ``nnUNetPlansANUNet.json``; train with
    ``-p nnUNetPlansANUNet -tr nnUNetTrainerANUNet`` (or any of our nested-U-Net trainers: UNet++ needs
    a little less memory than planned, it has no gates). Run it with ``nnunet-ext plan ID -pl ANUNetPlanner``.
    """

    planned_network = ANUNet
    default_plans_name = 'nnUNetPlansANUNet'
    writes_planned_network = True
