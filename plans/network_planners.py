"""What the planners of heavier networks share: nnU-Net's default planning with another network's
memory estimate, and the memory target written into the plans.

nnU-Net's ``ExperimentPlanner`` shrinks the patch until ``UNet_class``'s
``compute_conv_feature_map_size(patch)`` fits its reference for the GPU memory target, then picks the
batch from what is left. A planner here plans exactly as nnU-Net's default one (same spacing, topology,
normalisation, resampling, same ``PlainConvUNet`` keywords) but estimates memory with
``planned_network``, the network its trainers build from those keywords; so the plans keep
``PlainConvUNet``'s class name and keywords (the trainers build their variant from them) unless
``writes_planned_network`` (the plans then name ``planned_network``, as ``ANUNetPlanner``'s do).

The estimate builds the network on PyTorch's meta device: no parameter memory and no initialisation
for each candidate patch. Every plans file written also records the memory reference it was sized
with (``nnunet_ext.training.memory_reference.MEMORY_TARGET_KEY``), which the trainers' start-up memory
check reads; nnU-Net ignores the extra key.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunet_ext.training.architecture_mixins import PLAIN_UNET
from nnunet_ext.training.memory_reference import MEMORY_TARGET_KEY, memory_record


def dotted_name(cls: type) -> str:
    """``module.Class``, as plans files name network classes."""
    return f'{cls.__module__}.{cls.__name__}'


class MemoryTargetRecordMixin:
    """Writes the planner's memory reference (target, reference values and batch sizes, the network
    whose estimate sized patch and batch) into the plans under ``MEMORY_TARGET_KEY``."""

    def save_plans(self, plans):
        network = getattr(self, 'planned_network', None) or self.UNet_class
        plans[MEMORY_TARGET_KEY] = memory_record(self, dotted_name(network))
        super().save_plans(plans)


class _NetworkPlanner(MemoryTargetRecordMixin, ExperimentPlanner):
    """nnU-Net's default planner whose memory estimate is that of ``planned_network`` (module
    docstring). Subclasses set ``planned_network`` (a class taking ``PlainConvUNet``'s keywords),
    ``estimate_kwargs`` (the keywords the trainers add to the plans' ones when they build it, e.g. their
    architecture mixin's ``variant_kwargs()``) and ``default_plans_name``; ``writes_planned_network``
    (False) names ``planned_network`` in the plans."""

    planned_network: Optional[type] = None
    estimate_kwargs: dict = {}
    default_plans_name: Optional[str] = None
    writes_planned_network: bool = False

    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = 'DefaultPreprocessor', plans_name: Optional[str] = None,
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
                 suppress_transpose: bool = False):
        if self.planned_network is None or self.default_plans_name is None:
            raise TypeError(f"{type(self).__name__} must set planned_network and default_plans_name")
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name,
                         plans_name or self.default_plans_name, overwrite_target_spacing, suppress_transpose)
        if self.writes_planned_network:
            self.UNet_class = self.planned_network

    @classmethod
    def estimated_network(cls, arch_class_name: str, arch_kwargs: dict) -> Tuple[str, dict]:
        """The class (and keywords) whose estimate stands for ``arch_class_name``: ``planned_network``
        with ``estimate_kwargs`` for ``PlainConvUNet`` (what the trainers build from those plans),
        ``planned_network`` itself with ``estimate_kwargs`` for it, any other class as named."""
        if arch_class_name in (PLAIN_UNET, dotted_name(cls.planned_network)):
            return dotted_name(cls.planned_network), {**arch_kwargs, **cls.estimate_kwargs}
        return arch_class_name, arch_kwargs

    @classmethod
    def static_estimate_VRAM_usage(cls, patch_size: Tuple[int], input_channels: int, output_channels: int,
                                   arch_class_name: str, arch_kwargs: dict, arch_kwargs_req_import: Tuple[str, ...]):
        """nnU-Net's estimate (``compute_conv_feature_map_size(patch_size)``) of ``estimated_network``,
        built on the meta device from the plans' keywords."""
        name, kwargs = cls.estimated_network(arch_class_name, arch_kwargs)
        with torch.device('meta'):
            network = get_network_from_plans(name, kwargs, arch_kwargs_req_import, input_channels, output_channels,
                                             allow_init=False)
        return network.compute_conv_feature_map_size(patch_size)
