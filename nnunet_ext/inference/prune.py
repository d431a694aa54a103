"""``nnunet-ext prune``: a trained ANU-Net / UNet++ model folder -> the model folder of one pruned level
(ANU-Net paper, Section 3.5, Fig. 7), which the stock predictors run.

The output is an nnU-Net model folder (``plans.json``, ``dataset.json``, ``fold_*/CHECKPOINT``):

* ``plans.json``: the configuration's architecture keywords gain ``max_level: LEVEL``, so the trainer's
  ``build_network_architecture`` builds only the modules of levels ``1..LEVEL`` (the deeper encoder
  stages, nodes, gates and heads do not exist);
* each checkpoint holds only those modules' weights (``ANUNet.level_state_dict``), which nnU-Net's
  predictor loads strictly; the optimizer state is dropped (a pruned model is for prediction), and
  ``nnunet_ext_pruned`` records the level and the source.

Predict with ``nnUNetv2_predict_from_modelfolder -m OUT ...``, or name ``OUT``
``$nnUNet_results/DATASET/TRAINER__PLANS<suffix>__CONFIG`` and use ``nnUNetv2_predict -p PLANS<suffix>``.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from typing import Callable, List, Optional, Sequence

import torch

from nnunet_ext.errors import UserInputError
from nnunet_ext.model_folders import fold_checkpoints, network_for_checkpoint, read_plans_and_dataset


def _nested_network(plans: dict, dataset_json: dict, checkpoint: dict):
    from nnunet_ext.architectures.anunet import ANUNet

    network = network_for_checkpoint(plans, dataset_json, checkpoint)
    if not isinstance(network, ANUNet):
        raise UserInputError(f"{checkpoint['trainer_name']} builds a {type(network).__name__}, not a nested U-Net "
                             f"(ANU-Net / UNet++): nothing to prune")
    return network


def pruned_plans(plans: dict, configuration: str, level: int) -> dict:
    """``plans`` with ``max_level: level`` in ``configuration``'s architecture keywords (the merged
    configuration is written out, so configurations inheriting from it keep theirs)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans = copy.deepcopy(plans)
    merged = PlansManager(plans).get_configuration(configuration).configuration
    architecture = copy.deepcopy(merged['architecture'])
    architecture['arch_kwargs'] = {**architecture['arch_kwargs'], 'max_level': level}
    plans['configurations'][configuration]['architecture'] = architecture
    return plans


def prune_model_folder(model_folder: str, level: int, output_folder: str, folds: Optional[Sequence[str]] = None,
                       checkpoint_name: str = 'checkpoint_final.pth',
                       log: Callable[[str], None] = print) -> List[str]:
    """Writes the pruned model folder; returns the checkpoints written. All or nothing: the folder is
    assembled next to ``output_folder`` and moved into place at the end."""
    from batchgenerators.utilities.file_and_folder_operations import save_json

    model_folder = os.path.abspath(model_folder)
    output_folder = os.path.abspath(output_folder)
    plans, dataset_json = read_plans_and_dataset(model_folder)
    if os.path.exists(output_folder):
        raise UserInputError(f"{output_folder} exists; choose a new output folder")
    if output_folder == model_folder or output_folder.startswith(model_folder + os.sep):
        raise UserInputError("the output folder must lie outside the model folder")
    checkpoints = fold_checkpoints(model_folder, folds, checkpoint_name)

    parent = os.path.dirname(output_folder)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix='.prune_', dir=parent)
    written = []
    try:
        new_plans = None
        for path in checkpoints:
            checkpoint = torch.load(path, map_location='cpu', weights_only=False)
            network = _nested_network(plans, dataset_json, checkpoint)
            if not 1 <= level <= network.max_level:
                raise UserInputError(f"--level {level}: this {type(network).__name__} has levels "
                                     f"1..{network.max_level}")
            network.load_state_dict(checkpoint['network_weights'], strict=True)
            configuration = checkpoint['init_args']['configuration']
            new_plans = pruned_plans(plans, configuration, level)
            pruned = {k: v for k, v in checkpoint.items() if k not in ('optimizer_state', 'grad_scaler_state')}
            pruned['network_weights'] = network.level_state_dict(level)
            pruned['init_args'] = {**checkpoint['init_args'], 'plans': new_plans}
            pruned['nnunet_ext_pruned'] = {'level': level, 'max_level': network.max_level, 'source': path}
            fold = os.path.basename(os.path.dirname(path))
            os.makedirs(os.path.join(staging, fold))
            torch.save(pruned, os.path.join(staging, fold, checkpoint_name))
            kept = sum(v.numel() for v in pruned['network_weights'].values())
            total = sum(v.numel() for v in network.state_dict().values())
            log(f"{fold}: level {level} of {network.max_level}, {kept:,} of {total:,} weights kept")
            written.append(os.path.join(output_folder, fold, checkpoint_name))
        save_json(new_plans, os.path.join(staging, 'plans.json'), sort_keys=False)
        for name in ('dataset.json', 'dataset_fingerprint.json'):
            if os.path.isfile(os.path.join(model_folder, name)):
                shutil.copy2(os.path.join(model_folder, name), os.path.join(staging, name))
        os.rename(staging, output_folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written
