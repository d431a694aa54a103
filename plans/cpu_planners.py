"""Planners for trying trainers out on a CPU."""
from typing import List, Tuple, Union

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnunet_ext.plans.network_planners import MemoryTargetRecordMixin


class nnUNetPlannerCPUTrial(MemoryTargetRecordMixin, ExperimentPlanner):
    """nnU-Net's default planner with a 1 GB memory target: small patches and batches for CPU trial runs.

    Writes ``nnUNetPlansCPUTrial.json``; train with ``-p nnUNetPlansCPUTrial``. Patch and batch
    sizes come out smaller than the defaults, which changes results: use it to try things out,
    never for numbers you report. The plans record their 1 GB target, which the trainers' start-up
    memory check compares their network with.
    """

    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 1,
                 preprocessor_name: str = 'DefaultPreprocessor', plans_name: str = 'nnUNetPlansCPUTrial',
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
                 suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
