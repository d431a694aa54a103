"""Trained nnU-Net model folders (``TRAINER__PLANS__CONFIG``): their fold checkpoints and the network a
checkpoint was trained with, as nnU-Net's predictor rebuilds it (``prune``, ``export``)."""
from __future__ import annotations

import glob
import os
from typing import List, Optional, Sequence

from nnunet_ext.errors import UserInputError


def trainer_class(name: str):
    """The trainer class ``name``: ours (``nnunet_ext.registry``) or one nnU-Net finds by name."""
    from nnunet_ext.registry import trainer_classes
    ours = trainer_classes()
    if name in ours:
        return ours[name]
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    return recursive_find_trainer_class_by_name(name)


def fold_checkpoints(model_folder: str, folds: Optional[Sequence[str]], checkpoint_name: str) -> List[str]:
    """``fold_F/CHECKPOINT`` of the given folds (``None``: every fold that has it)."""
    if folds is None:
        found = sorted(glob.glob(os.path.join(glob.escape(model_folder), 'fold_*', checkpoint_name)))
        if not found:
            raise UserInputError(f"{model_folder}: no fold_*/{checkpoint_name}; is this a trained nnU-Net model "
                                 f"folder (TRAINER__PLANS__CONFIG)?")
        return found
    paths = [os.path.join(model_folder, f'fold_{f}', checkpoint_name) for f in folds]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserInputError(f"missing checkpoints: {', '.join(missing)}")
    return paths


def read_plans_and_dataset(model_folder: str):
    """``(plans, dataset_json)`` of a model folder, a ``UserInputError`` if it is not one."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    for name in ('plans.json', 'dataset.json'):
        if not os.path.isfile(os.path.join(model_folder, name)):
            raise UserInputError(f"{model_folder} has no {name}: not an nnU-Net model folder (TRAINER__PLANS__CONFIG)")
    return load_json(os.path.join(model_folder, 'plans.json')), load_json(os.path.join(model_folder, 'dataset.json'))


def network_for_checkpoint(plans: dict, dataset_json: dict, checkpoint: dict):
    """The network (without deep supervision, weights not loaded) that ``nnUNetPredictor`` builds for
    ``checkpoint``: its trainer's ``build_network_architecture`` on the plans' configuration."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(checkpoint['init_args']['configuration'])
    trainer = trainer_class(checkpoint['trainer_name'])
    num_input_channels = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    num_heads = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    return trainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_heads,
                                              enable_deep_supervision=False)
