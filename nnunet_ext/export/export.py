"""``nnunet-ext export``: a trained model folder -> one ONNX file per fold and ``model.json``
(``docs/commands/export.md``)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable, List, Optional, Sequence

import torch

from nnunet_ext.errors import UserInputError
from nnunet_ext.export.model_json import check_deployable, describe
from nnunet_ext.export.onnx_file import RELATIVE_TOLERANCE, check_onnx, write_onnx
from nnunet_ext.export.portable import MINIMUM_OPSET
from nnunet_ext.model_folders import fold_checkpoints, network_for_checkpoint, read_plans_and_dataset


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _input_shape(plans: dict, dataset_json: dict, configuration: str) -> List[int]:
    """``[C, *patch_size]`` of the network input, as nnU-Net's predictor determines it."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans_manager = PlansManager(plans)
    manager = plans_manager.get_configuration(configuration)
    return [int(determine_num_input_channels(plans_manager, manager, dataset_json)), *map(int, manager.patch_size)]


def _export_folds(model_folder: str, staging: str, folds: Optional[Sequence[str]], checkpoint_name: str,
                  opset: int, log: Callable[[str], None]) -> dict:
    """Writes ``fold_F.onnx`` for each fold into ``staging``; returns the ``model.json`` document."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans, dataset_json = read_plans_and_dataset(model_folder)
    entries: List[dict] = []
    first = None
    for path in fold_checkpoints(model_folder, folds, checkpoint_name):
        checkpoint = torch.load(path, map_location='cpu', weights_only=False)
        trained = (checkpoint['trainer_name'], checkpoint['init_args']['configuration'])
        if first is None:
            check_deployable(plans, trained[1])
            first = checkpoint
        elif trained != (first['trainer_name'], first['init_args']['configuration']):
            raise UserInputError(f"{path} was trained by {trained[0]} on {trained[1]}, the first fold by "
                                 f"{first['trainer_name']} on {first['init_args']['configuration']}")
        network = network_for_checkpoint(plans, dataset_json, checkpoint)
        network.load_state_dict(checkpoint['network_weights'])
        input_shape = _input_shape(plans, dataset_json, trained[1])
        fold = os.path.basename(os.path.dirname(path))[len('fold_'):]
        onnx_name = f'fold_{fold}.onnx'
        write_onnx(network, os.path.join(staging, onnx_name), input_shape, opset)
        measured = check_onnx(network, os.path.join(staging, onnx_name), input_shape)
        reference = measured.get('pytorch_float64_vs_float32')
        log(f"fold {fold}: {onnx_name} (opset {opset}); ONNX Runtime vs PyTorch: largest logit difference "
            f"{measured['max_abs_difference']:.1e}" + ('' if reference is None else
                                                      f" (PyTorch float64 vs float32: {reference:.1e})"))
        entries.append({'fold': fold, 'onnx': onnx_name, 'checkpoint_sha256': _sha256(path), 'check': measured})
    configuration = first['init_args']['configuration']
    num_heads = PlansManager(plans).get_label_manager(dataset_json).num_segmentation_heads
    check = {'input': 'a batch of two N(0, 1) patches, seed 0', 'relative_tolerance': RELATIVE_TOLERANCE,
             'rule': 'max |ONNX - PyTorch| <= tolerance * max(1, max |logit|), or <= max |PyTorch float64 - float32| '
                     '+ that (networks whose output jumps with rounding: IFE entropy)'}
    return describe(model_folder, plans, dataset_json, configuration, first['trainer_name'], checkpoint_name,
                    first.get('inference_allowed_mirroring_axes'), entries, opset, input_shape, num_heads, check)


def export_model_folder(model_folder: str, output_folder: str, folds: Optional[Sequence[str]] = None,
                        checkpoint_name: str = 'checkpoint_final.pth', prune_level: Optional[int] = None,
                        opset: Optional[int] = None, log: Callable[[str], None] = print) -> dict:
    """Exports ``model_folder`` (its folds, or every fold with the checkpoint) to ``output_folder``, which must
    not exist; all or nothing (assembled beside it and moved into place). ``prune_level``: an ANU-Net /
    UNet++ model pruned to that level first (``nnunet-ext prune``). Returns the ``model.json`` document."""
    model_folder = os.path.abspath(model_folder)
    output_folder = os.path.abspath(output_folder)
    if not os.path.isdir(model_folder):
        raise UserInputError(f"{model_folder}: no such model folder")
    if os.path.exists(output_folder):
        raise UserInputError(f"{output_folder} exists; choose a new output folder")
    if opset is None:
        opset = MINIMUM_OPSET
    elif opset < MINIMUM_OPSET:
        raise UserInputError(f"--opset {opset}: the export needs opset {MINIMUM_OPSET} or later")
    if output_folder == model_folder or output_folder.startswith(model_folder + os.sep):
        raise UserInputError("the output folder must lie outside the model folder")
    parent = os.path.dirname(output_folder)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(output_folder)}.partial-', dir=parent)
    try:
        source = model_folder
        if prune_level is not None:
            from nnunet_ext.inference.prune import prune_model_folder
            source = os.path.join(staging, 'pruned')
            prune_model_folder(model_folder, prune_level, source, folds, checkpoint_name, log=log)
        document = _export_folds(source, staging, folds, checkpoint_name, opset, log)
        if prune_level is not None:
            shutil.rmtree(source)
            document['source'].update(model_folder=model_folder, prune_level=prune_level)
        with open(os.path.join(staging, 'model.json'), 'w', encoding='utf-8') as f:
            json.dump(document, f, indent=2)
        os.rename(staging, output_folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return document
