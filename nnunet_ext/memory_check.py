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

The check runs once at trainer start (:class:`MemoryCheckMixin`, part of every trainer of this package)
on the network already built: arithmetic only, no second network. It names our planners
(:func:`nnunet_ext.discovery.planner_classes`), so it sits above ``nnunet_ext.plans`` in the dependency
order; the references the planners record are :mod:`nnunet_ext.training.memory_reference`, below it.
"""
from __future__ import annotations

import re
import sys
from typing import Optional, Tuple

from nnunet_ext.discovery import planner_classes
from nnunet_ext.nn.unwrap import unwrapped_network
from nnunet_ext.training.composition import TrainerMixin
from nnunet_ext.training.memory_reference import (DEFAULT_THRESHOLD, MEMORY_TARGET_KEY, NNUNET_PLANNER_REFERENCES,
                                                  MemoryReference, memory_ratio)

_DEFAULT = NNUNET_PLANNER_REFERENCES['ExperimentPlanner']


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
    ours = planner_classes().get(planner_name)
    if ours is not None:
        for cls in ours.__mro__:
            if cls.__name__ in NNUNET_PLANNER_REFERENCES:
                reference = NNUNET_PLANNER_REFERENCES[cls.__name__]
                return reference, (f"{planner_name} at {cls.__name__}'s default {reference.target_gb:g} GB "
                                   f"(these plans do not record their target)")
    return _DEFAULT, (f"nnU-Net's default planner at 8 GB ({planner_name} is not a planner known here and the "
                      f"plans do not record their target)")


def planner_for_network(network) -> Optional[type]:
    """Our planner whose estimate is that of ``network``'s class (the most specific class of its MRO that
    a planner of ``nnunet_ext.plans`` declares as ``planned_network``), or None."""
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




class MemoryCheckMixin(TrainerMixin):
    """Once at training start, checks the built network against the memory its plans were sized for
    (:func:`check_memory_target`: a warning in the training log and on stderr, naming the planner to run,
    when it needs more than ``memory_check_threshold`` times that; ``None`` turns the check off)."""

    cooperative_hooks = frozenset({'on_train_start'})
    memory_check_threshold = DEFAULT_THRESHOLD

    def on_train_start(self):
        super().on_train_start()  # nnU-Net's: initialize() (builds the network), data loaders, plans printed
        if self.memory_check_threshold is not None:
            check_memory_target(self, self.memory_check_threshold)


__all__ = ['MemoryCheckMixin', 'check_memory_target', 'memory_message', 'planner_for_network',
           'plans_memory_reference']
