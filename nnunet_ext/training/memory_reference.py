"""The memory reference a planner sizes patch and batch with, as our planners record it in the plans.

nnU-Net's planner sizes patch and batch so that its own U-Net fits a GPU memory target (8 GB by
default): the network's ``compute_conv_feature_map_size(patch)`` (elements of the feature maps of one
sample, nnU-Net's proxy for memory) times ``batch_size / ref_bs`` must not exceed a reference value
calibrated for that target (``ExperimentPlanner``: 560,000,000 for 3D at batch 2, 85,000,000 for 2D at
batch 12, for 8 GB; the reference scales linearly with the target). nnU-Net's plans do not record the
target; the planners of ``nnunet_ext.plans`` do (``MEMORY_TARGET_KEY``, :func:`memory_record`).

The check of a built network against it is :mod:`nnunet_ext.memory_check` (it names our planners, so it
sits above ``nnunet_ext.plans`` in the dependency order; this module sits below it).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Tuple

MEMORY_TARGET_KEY = 'nnunet_ext_memory_target'
DEFAULT_THRESHOLD = 1.5


@dataclass(frozen=True)
class MemoryReference:
    """A planner's memory reference: ``reference_val_{2d,3d}`` of ``compute_conv_feature_map_size`` at
    batch ``reference_bs_{2d,3d}`` correspond to ``reference_gb``; patch and batch were sized for
    ``target_gb`` (the reference scales by ``target_gb / reference_gb``)."""

    target_gb: float
    reference_gb: float
    reference_val_2d: float
    reference_val_3d: float
    reference_bs_2d: int
    reference_bs_3d: int

    def reference(self, ndim: int) -> Tuple[float, int]:
        """``(reference value at the target, its batch size)`` for 2 or 3 spatial dimensions."""
        if ndim not in (2, 3):
            raise ValueError(f"nnU-Net plans 2D or 3D patches, got {ndim} dimensions")
        value = self.reference_val_2d if ndim == 2 else self.reference_val_3d
        bs = self.reference_bs_2d if ndim == 2 else self.reference_bs_3d
        return value * self.target_gb / self.reference_gb, bs

    @classmethod
    def of_planner(cls, planner) -> 'MemoryReference':
        """The reference of an ``ExperimentPlanner`` instance (its attributes, as its planning uses them)."""
        return cls(float(planner.UNet_vram_target_GB), float(planner.UNet_reference_val_corresp_GB),
                   float(planner.UNet_reference_val_2d), float(planner.UNet_reference_val_3d),
                   int(planner.UNet_reference_val_corresp_bs_2d), int(planner.UNet_reference_val_corresp_bs_3d))


_DEFAULT = MemoryReference(8, 8, 85000000, 560000000, 12, 2)
_RESENC = MemoryReference(8, 8, 135000000, 680000000, 12, 2)
# nnU-Net 2.8.1's planners at their default targets (their __init__ sets these; tests/test_planners.py
# compares them with real instances)
NNUNET_PLANNER_REFERENCES = {
    'ExperimentPlanner': _DEFAULT,
    'ResEncUNetPlanner': _RESENC,
    'nnUNetPlannerResEncM': _RESENC,
    'nnUNetPlannerResEncL': MemoryReference(24, 24, 380000000, 2100000000, 12, 2),
    'nnUNetPlannerResEncXL': MemoryReference(40, 40, 560000000, 3600000000, 12, 2),
}


def memory_record(planner, planned_network: Optional[str] = None) -> dict:
    """What our planners write under ``MEMORY_TARGET_KEY``: the reference they sized patch and batch
    with (target included) and the network class whose estimate they used."""
    record = asdict(MemoryReference.of_planner(planner))
    record['planner'] = type(planner).__name__
    record['planned_network'] = planned_network
    return record


def memory_ratio(estimate: float, batch_size: int, ndim: int, reference: MemoryReference) -> float:
    """``estimate * batch_size / ref_bs / reference_value``: 1 is what nnU-Net's planner fills at most
    (its criterion ``estimate / ref_bs * batch_size <= reference``, rounding of the batch aside)."""
    value, ref_bs = reference.reference(ndim)
    return float(estimate) * batch_size / ref_bs / value


__all__ = ['DEFAULT_THRESHOLD', 'MEMORY_TARGET_KEY', 'MemoryReference', 'NNUNET_PLANNER_REFERENCES', 'memory_ratio',
           'memory_record']
