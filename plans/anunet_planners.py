"""Planner for the nested U-Nets (ANU-Net, UNet++)."""
from typing import List, Tuple, Union

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnunet_ext.architectures.anunet import ANUNet


class ANUNetPlanner(ExperimentPlanner):
    """nnU-Net's default planner whose memory estimate counts ANU-Net's nested decoder and gates.

    nnU-Net sizes patch and batch by the network's ``compute_conv_feature_map_size`` against its
    reference value for the GPU memory target; with ``ANUNet`` as the planned class, the nested rows
    (``L(L+1)/2`` decoder nodes instead of ``L``) and the attention gates count, so the planned patch and
    batch fit the target as nnU-Net's own do for its U-Net. The plans name ``ANUNet`` and keep
    ``PlainConvUNet``'s keywords. Writes ``nnUNetPlansANUNet.json``; train with
    ``-p nnUNetPlansANUNet -tr nnUNetTrainerANUNet`` (or any of our nested-U-Net trainers: UNet++ needs
    a little less memory than planned, it has no gates). Run it with ``nnunet-ext plan ID -pl ANUNetPlanner``.
    """

    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = 'DefaultPreprocessor', plans_name: str = 'nnUNetPlansANUNet',
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
                 suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self.UNet_class = ANUNet
