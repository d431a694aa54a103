"""``model.json``: what prediction needs from a model folder's plans, dataset.json and checkpoints, in one
file that the deploy predictor (``nnunet_ext.deploy``) reads without nnU-Net. The keys are listed in
``docs/commands/export.md``; list-valued geometry (spacing, patch size, mirror axes) is in the network's
axis order, after ``transpose_forward``, as nnU-Net's plans store it."""
from __future__ import annotations

from typing import List, Sequence

from nnunet_ext import __version__
from nnunet_ext.deploy.model import FORMAT, FORMAT_VERSION
from nnunet_ext.deploy.model import READERS as DEPLOYABLE_READERS  # the readers the deploy predictor reproduces
from nnunet_ext.errors import UserInputError


def check_deployable(plans: dict, configuration: str) -> None:
    """Refuses, in one line, a configuration the deploy predictor cannot reproduce."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    manager = PlansManager(plans).get_configuration(configuration)
    if manager.previous_stage_name is not None:
        raise UserInputError(f"configuration {configuration} is a cascade stage (it reads the segmentation of "
                             f"{manager.previous_stage_name}); export the stages' own configurations instead")
    reader = plans.get('image_reader_writer')
    if reader not in DEPLOYABLE_READERS:
        raise UserInputError(f"the plans read images with {reader}; the deploy predictor reads "
                             f"{' and '.join(DEPLOYABLE_READERS)} formats only")


def describe(model_folder: str, plans: dict, dataset_json: dict, configuration: str, trainer: str,
             checkpoint_name: str, mirror_axes, folds: List[dict], opset: int, input_shape: Sequence[int],
             num_heads: int, check: dict) -> dict:
    """The ``model.json`` document."""
    import nnunetv2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    manager = plans_manager.get_configuration(configuration)
    labels = plans_manager.get_label_manager(dataset_json)
    properties = plans['foreground_intensity_properties_per_channel']
    normalization = [{'scheme': scheme, 'use_mask_for_norm': bool(mask),
                      'intensity_properties': properties.get(str(c), {})}
                     for c, (scheme, mask) in enumerate(zip(manager.normalization_schemes, manager.use_mask_for_norm))]
    config = manager.configuration
    return {
        'format': FORMAT, 'format_version': FORMAT_VERSION,
        'nnunet_ext_version': __version__, 'nnunetv2_version': getattr(nnunetv2, '__version__', '2.8.1'),
        'source': {'model_folder': model_folder, 'dataset_name': plans['dataset_name'], 'trainer': trainer,
                   'plans': plans['plans_name'], 'configuration': configuration, 'checkpoint': checkpoint_name},
        'folds': folds,
        'onnx': {'opset': opset, 'input': 'image', 'output': 'logits',
                 'input_shape': ['batch', *input_shape], 'output_shape': ['batch', num_heads, *input_shape[1:]],
                 'check': check},
        'configuration_dims': len(manager.patch_size),
        'image_reader_writer': plans['image_reader_writer'],
        'file_ending': dataset_json['file_ending'],
        'channel_names': dataset_json.get('channel_names', dataset_json.get('modality')),
        'num_input_channels': input_shape[0],
        'transpose_forward': list(plans['transpose_forward']),
        'transpose_backward': list(plans['transpose_backward']),
        'spacing': list(manager.spacing),
        'patch_size': list(manager.patch_size),
        'normalization': normalization,
        'resampling_data': {'function': config['resampling_fn_data'], 'kwargs': config['resampling_fn_data_kwargs']},
        'resampling_probabilities': {'function': config['resampling_fn_probabilities'],
                                     'kwargs': config['resampling_fn_probabilities_kwargs']},
        'tile_step_size': 0.5,
        'use_gaussian': True,
        'mirror_axes': None if mirror_axes is None else [int(a) for a in mirror_axes],
        'labels': dataset_json['labels'],
        'regions_class_order': dataset_json.get('regions_class_order'),
        'has_regions': bool(labels.has_regions),
        'ignore_label': labels.ignore_label,
        'num_segmentation_heads': num_heads,
    }
