"""Does the network a trainer built fit the GPU memory its plans were sized for?

nnU-Net's planner sizes patch and batch so that its own U-Net fits a GPU memory target (8 GB by
default): the network's ``compute_conv_feature_map_size(patch)`` (elements of the feature maps of one
sample, nnU-Net's proxy for memory) times ``batch_size / ref_bs`` must not exceed a reference value
calibrated for that target (``ExperimentPlanner``: 560,000,000 for 3D at batch 2, 85,000,000 for 2D at
batch 12, for 8 GB; the reference scales linearly with the target). Our networks keep more for
backward than nnU-Net's U-Net, so on plans sized for the U-Net they may need several times the target.

:func:`check_memory_target` compares the built network's own estimate on the plans' patch and batch
with the reference that the plans' planner used (``memory_ratio``). nnU-Net's plans do not record the
memory target; the planners of ``nnunet_ext.plans`` do (``MEMORY_TARGET_KEY``). For other plans the
planner named in ``experiment_planner_used`` gives the reference at its default target
(``NNUNET_PLANNER_REFERENCES``: nnU-Net 2.8.1's planners; ours by their class attributes), and a planner
we do not know is taken as nnU-Net's default one; the message says which. Above ``threshold`` (1.5x)
the trainer writes a warning to its log and to stderr naming the planner that sizes patch and batch
for that network (``nnunet-ext plan ID -pl NAME``).

The check runs once at trainer start (``TrainingLengthFromEnvMixin.on_train_start``) on the network
already built: arithmetic only, no second network.
"""
from __future__ import annotations

import re
import sys
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


def _ours_by_name(name: str):
    from nnunet_ext.registry import planner_classes
    return planner_classes().get(name)


def plans_memory_reference(plans: dict) -> Tuple[MemoryReference, str]:
    """``(reference, how it is known)`` for a plans dict (module docstring)."""
    planner_name = plans.get('experiment_planner_used', 'an unknown planner')
    record = plans.get(MEMORY_TARGET_KEY)
    if record is not None:
        fields = MemoryReference.__dataclass_fields__
        try:
            reference = MemoryReference(**{k: record[k] for k in fields})
        except (KeyError, TypeError) as e:
            raise ValueError(f"plans {plans.get('plans_name')!r}: {MEMORY_TARGET_KEY} is incomplete ({e}); "
                             f"re-plan with nnunet-ext plan") from None
        return reference, f"{planner_name} at {reference.target_gb:g} GB, as recorded in the plans"
    if planner_name in NNUNET_PLANNER_REFERENCES:
        reference = NNUNET_PLANNER_REFERENCES[planner_name]
        return reference, (f"{planner_name} at its default {reference.target_gb:g} GB (nnU-Net's plans do not "
                           f"record the target; a -gpu_memory_target given when planning is not known here)")
    ours = _ours_by_name(planner_name)
    if ours is not None:
        for cls in ours.__mro__:
            if cls.__name__ in NNUNET_PLANNER_REFERENCES:
                reference = NNUNET_PLANNER_REFERENCES[cls.__name__]
                return reference, (f"{planner_name} at {cls.__name__}'s default {reference.target_gb:g} GB "
                                   f"(these plans do not record their target)")
    return _DEFAULT, (f"nnU-Net's default planner at 8 GB ({planner_name} is not a planner known here and the "
                      f"plans do not record their target)")


def memory_ratio(estimate: float, batch_size: int, ndim: int, reference: MemoryReference) -> float:
    """``estimate * batch_size / ref_bs / reference_value``: 1 is what nnU-Net's planner fills at most
    (its criterion ``estimate / ref_bs * batch_size <= reference``, rounding of the batch aside)."""
    value, ref_bs = reference.reference(ndim)
    return float(estimate) * batch_size / ref_bs / value


def unwrapped_network(network):
    """The module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(network, '_orig_mod'):
            network = network._orig_mod
        elif type(network).__name__ == 'DistributedDataParallel':
            network = network.module
        else:
            return network


def planner_for_network(network) -> Optional[type]:
    """Our planner whose estimate is that of ``network``'s class (the most specific class of its MRO that
    a planner of ``nnunet_ext.plans`` declares as ``planned_network``), or None."""
    from nnunet_ext.registry import planner_classes
    by_network = {}
    for planner in planner_classes().values():
        planned = getattr(planner, 'planned_network', None)
        if planned is not None:
            by_network.setdefault(planned, planner)
    for cls in type(network).__mro__:
        if cls in by_network:
            return by_network[cls]
    return None


def _dataset_id(plans: dict) -> str:
    match = re.match(r'Dataset(\d+)_', str(plans.get('dataset_name', '')))
    return str(int(match.group(1))) if match else 'DATASET'


def memory_message(network, plans: dict, configuration: str, patch_size, batch_size: int,
                   threshold: float = DEFAULT_THRESHOLD, recipe_batch_size: Optional[int] = None
                   ) -> Tuple[float, Optional[str]]:
    """``(ratio, warning or None)`` for ``network`` (built, unwrapped) trained on ``configuration`` of
    ``plans`` with ``patch_size`` x ``batch_size`` (per GPU). ``recipe_batch_size``: the (global) batch the
    trainer sets itself instead of the plans' (a paper recipe's); then the advice does not point at the
    plans' batch."""
    patch_size = [int(i) for i in patch_size]
    ndim = len(patch_size)
    estimate = network.compute_conv_feature_map_size(patch_size)
    reference, known_as = plans_memory_reference(plans)
    ratio = memory_ratio(estimate, batch_size, ndim, reference)
    if ratio <= threshold:
        return ratio, None
    value, ref_bs = reference.reference(ndim)
    name = type(network).__name__
    planner = planner_for_network(network)
    dataset = _dataset_id(plans)
    target = '' if reference.target_gb == 8 else f' -gpu_memory_target {reference.target_gb:g}'
    if recipe_batch_size is not None:
        advice = (f"this trainer sets batch {recipe_batch_size} itself (a paper's recipe), "
                  f"so the plans' batch_size does not change it: train on smaller patches (plans with a lower "
                  f"-gpu_memory_target) or on a GPU with about {ratio:.1f}x the memory")
    elif planner is not None and plans.get('experiment_planner_used') == planner.__name__:
        advice = (f"these plans are {planner.__name__}'s already (sized for {reference.target_gb:g} GB; the batch "
                  f"size may have been raised by hand): lower the configuration's batch_size in the plans, or plan "
                  f"for the memory of your GPU with -gpu_memory_target")
    elif planner is not None:
        advice = (f"plan patch and batch for {name} with: nnunet-ext plan {dataset} -pl {planner.__name__}{target} "
                  f"(then train with -p {planner.default_plans_name})")
    else:
        advice = (f"no planner of nnunet-ext estimates {name}; plan with a memory target about {ratio:.1f}x "
                  f"lower: nnunet-ext plan {dataset} -pl {plans.get('experiment_planner_used', 'ExperimentPlanner')} "
                  f"-gpu_memory_target {reference.target_gb / ratio:.1f} -overwrite_plans_name PLANS_NAME "
                  f"(then train with -p PLANS_NAME)")
    message = (f"nnunet-ext memory check: {name} on plans {plans.get('plans_name')!r}, configuration "
               f"{configuration!r}, needs about {ratio:.1f}x the GPU memory these plans were sized for. Compared: "
               f"the network's estimate (compute_conv_feature_map_size) for patch {patch_size}, {int(estimate):,}, "
               f"times batch {batch_size} / reference batch {ref_bs}, against the reference {value:,.0f} of "
               f"{known_as}. Training may run out of GPU memory; {advice}.")
    return ratio, message


def check_memory_target(trainer, threshold: float = DEFAULT_THRESHOLD) -> Tuple[Optional[float], Optional[str]]:
    """Warn (nnU-Net's training log and stderr, rank 0) when ``trainer.network`` needs more than
    ``threshold`` times the memory its plans were sized for. Returns ``(ratio, warning or None)``; ratio is
    None (and a log line says why) for a network without ``compute_conv_feature_map_size``."""
    network = unwrapped_network(trainer.network)
    if not hasattr(network, 'compute_conv_feature_map_size'):
        trainer.print_to_log_file(f"nnunet-ext memory check: {type(network).__name__} has no "
                                  f"compute_conv_feature_map_size; not checked against the plans' memory target")
        return None, None
    own_batch = trainer.configuration_manager.batch_size  # a recipe's copy of the configuration, or the plans'
    plans_batch = trainer.plans_manager.get_configuration(trainer.configuration_name).batch_size
    ratio, message = memory_message(network, trainer.plans_manager.plans, trainer.configuration_name,
                                    trainer.configuration_manager.patch_size, trainer.batch_size, threshold,
                                    own_batch if own_batch != plans_batch else None)
    if message is None:
        trainer.print_to_log_file(f"nnunet-ext memory check: {type(network).__name__} needs about {ratio:.3g}x "
                                  f"the memory these plans were sized for", also_print_to_console=False)
        return ratio, None
    trainer.print_to_log_file(message)
    if getattr(trainer, 'local_rank', 0) == 0:
        print(message, file=sys.stderr, flush=True)
    return ratio, message


__all__ = ['MEMORY_TARGET_KEY', 'MemoryReference', 'NNUNET_PLANNER_REFERENCES', 'check_memory_target',
           'memory_message', 'memory_ratio', 'memory_record', 'planner_for_network', 'plans_memory_reference',
           'unwrapped_network']
