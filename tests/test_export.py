"""``nnunet-ext export`` without training: the standard-operator deformable convolution against the custom
operator, every network family's ONNX logits against PyTorch's (ONNX Runtime run here, not the export's own
check), model.json against the plans it came from, and the user errors. The exported models of trained
folders against ``nnUNetv2_predict`` are in the stock-CLI tests (``deploy_helpers``)."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from cli_helpers import refused_in_process
from nnunet_ext.export.onnx_file import write_onnx
from nnunet_ext.export.portable import MINIMUM_OPSET
from nnunet_ext.nn.deformable_conv import deform_conv, deform_conv_output_size
from nnunet_ext.nn.deformable_conv.portable import deform_conv_portable
from trainer_helpers import TRAINERS, cases, make_trainer, tiny, tiny_plans, DATASET_JSON


# ------------------------------------------------------------------ the deformable convolution in standard operators
@pytest.mark.parametrize('n, kernel, offset_groups, groups, stride, padding, dilation', [
    (2, (3, 3), 1, 1, 1, 1, 1),
    (2, (3, 3), 2, 2, 2, 1, 2),
    (2, (1, 3), 1, 1, 1, (0, 1), 1),
    (3, (1, 3, 3), 1, 1, 1, (0, 1, 1), 1),
    (3, (3, 3, 3), 2, 1, (1, 2, 1), 1, 1),
])
@pytest.mark.parametrize('modulation', ['none', 'mask', 'logits'])
def test_portable_deformable_convolution_equals_the_custom_operator(n, kernel, offset_groups, groups, stride, padding,
                                                                   dilation, modulation):
    """The custom operator is the oracle (its own tests compare it with loops over Dai et al. Eq. 2 / Zhu et al.
    Eq. 3); offsets of a few pixels reach beyond the border (zeros outside)."""
    generator = torch.Generator().manual_seed(n * 10 + offset_groups)
    C, O = 4, 6
    x = torch.randn(2, C, *([7] * n), generator=generator)
    out = deform_conv_output_size(x.shape[2:], kernel, stride, padding, dilation)
    K = int(np.prod(kernel))
    offset = 2.5 * torch.randn(2, n * offset_groups * K, *out, generator=generator)
    mask = torch.randn(2, offset_groups * K, *out, generator=generator)
    weight = torch.randn(O, C // groups, *kernel, generator=generator)
    bias = torch.randn(O, generator=generator)
    reference_mask = {'none': None, 'mask': mask, 'logits': torch.sigmoid(mask)}[modulation]
    expected = deform_conv(x, offset, weight, bias, stride, padding, dilation, reference_mask)
    got = deform_conv_portable(x, offset, weight, bias, stride, padding, dilation,
                               None if modulation == 'none' else mask, mask_logits=modulation == 'logits')
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)


# --------------------------------------------------------------------------- every family's network through ONNX
def _network(trainer_name: str, configuration: str):
    trainer = make_trainer(trainer_name, tiny(), configuration=configuration)
    network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                                 trainer.label_manager.num_segmentation_heads, False)
    torch.manual_seed(0)
    with torch.no_grad():  # LFAM's offset predictors start at zero: give them offsets to follow
        for name, p in network.named_parameters():
            if 'offset_predictor' in name:
                p.normal_(0, 0.05)
    return network.eval(), list(trainer.configuration_manager.patch_size)


@pytest.mark.parametrize('trainer_name, configuration', cases(('2d', '3d_fullres'), ('nnUNetTrainer', *TRAINERS)))
def test_onnx_logits_equal_pytorch_logits(trainer_name, configuration, tmp_path, nnunet_folders):
    """Every network family (nnU-Net's own included) in 2D and 3D: ONNX Runtime's logits on a batch of two (the
    batch axis is free) equal the network's within 1e-4 of the largest logit, with standard operators only."""
    network, patch = _network(trainer_name, configuration)
    path = str(tmp_path / 'model.onnx')
    opset = MINIMUM_OPSET
    write_onnx(network, path, [1, *patch], opset)
    model = onnx.load(path)
    assert {node.domain for node in model.graph.node} <= {'', 'ai.onnx'}
    assert model.opset_import[0].version == opset
    x = torch.randn(2, 1, *patch, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = network(x).numpy()
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    got = session.run(None, {'image': x.numpy()})[0]
    assert got.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max()))
    if 'IFEEntropy' in trainer_name:
        # a histogram level flips with rounding, possibly which channels are selected: no worse than PyTorch
        # in float64 differs from itself in float32 (onnx_file.check_onnx), on this random network
        with torch.no_grad():
            in_float64 = network.double()(x.double()).numpy()
        assert np.abs(got - expected).max() <= np.abs(in_float64 - expected).max() + 1e-4 * scale
    else:
        assert np.abs(got - expected).max() <= 1e-4 * scale


def test_a_custom_operator_without_onnx_form_is_named(tmp_path):
    class Direct(torch.nn.Module):  # the deformable convolution's custom operator outside LFAM
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(2, 1, 3, 3))

        def forward(self, x):
            offset = torch.zeros(x.shape[0], 18, *x.shape[2:])
            return deform_conv(x, offset, self.weight, None, 1, 1, 1)

    from nnunet_ext.errors import UserInputError
    with pytest.raises(UserInputError, match=r'Direct cannot be exported to ONNX opset 17: operator '
                                             r'nnunet_ext::deform_conv has no ONNX form'):
        write_onnx(Direct(), str(tmp_path / 'x.onnx'), [1, 8, 8], 17)


# ------------------------------------------------------------------------- model folders made by hand, no training
def _model_folder(root, trainer_name: str, configuration: str, plans: dict = None, dataset_json: dict = None,
                  mirror_axes=(0, 1)) -> str:
    """An nnU-Net model folder with one fold: the trainer's network (random weights) in a checkpoint shaped
    like nnU-Net's."""
    plans = plans or tiny_plans()
    dataset_json = dataset_json or dict(DATASET_JSON)
    folder = os.path.join(str(root), f'{trainer_name}__nnUNetPlans__{configuration}')
    os.makedirs(os.path.join(folder, 'fold_0'))
    with open(os.path.join(folder, 'plans.json'), 'w') as f:
        json.dump(plans, f)
    with open(os.path.join(folder, 'dataset.json'), 'w') as f:
        json.dump(dataset_json, f)
    trainer = make_trainer(trainer_name, (plans, dataset_json), configuration=configuration)
    network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                                 trainer.label_manager.num_segmentation_heads, False)
    torch.save({'network_weights': network.state_dict(), 'trainer_name': trainer_name,
                'init_args': {'configuration': configuration}, 'inference_allowed_mirroring_axes': mirror_axes},
               os.path.join(folder, 'fold_0', 'checkpoint_final.pth'))
    return folder


def test_model_json_holds_what_the_plans_say(tmp_path, nnunet_folders, capsys):
    from nnunet_ext.cli import main
    plans = tiny_plans()
    plans['transpose_forward'], plans['transpose_backward'] = [2, 0, 1], [1, 2, 0]
    dataset_json = {**DATASET_JSON, 'labels': {'background': 0, 'liver_and_tumour': [1, 2], 'tumour': 2},
                    'regions_class_order': [1, 2]}
    folder = _model_folder(tmp_path, 'nnUNetTrainerGODCLFAM', '3d_fullres', plans, dataset_json, (0, 2))
    assert main(['export', folder, '-o', str(tmp_path / 'out')]) == 0
    assert sorted(os.listdir(tmp_path / 'out')) == ['fold_0.onnx', 'model.json']
    assert not [n for n in os.listdir(tmp_path) if n.startswith('.out.partial')]
    document = json.loads((tmp_path / 'out' / 'model.json').read_text())
    configuration = plans['configurations']['3d_fullres']
    # by hand from the plans written above
    assert document['spacing'] == configuration['spacing'] and document['patch_size'] == configuration['patch_size']
    assert document['transpose_forward'] == [2, 0, 1] and document['transpose_backward'] == [1, 2, 0]
    properties = plans['foreground_intensity_properties_per_channel']['0']
    assert document['normalization'] == [{'scheme': 'CTNormalization', 'use_mask_for_norm': False,
                                          'intensity_properties': properties}]
    assert document['resampling_data'] == {'function': 'resample_data_or_seg_to_shape',
                                           'kwargs': configuration['resampling_fn_data_kwargs']}
    assert document['resampling_probabilities']['kwargs'] == configuration['resampling_fn_probabilities_kwargs']
    assert document['mirror_axes'] == [0, 2] and document['configuration_dims'] == 3
    assert document['labels'] == dataset_json['labels'] and document['regions_class_order'] == [1, 2]
    assert document['has_regions'] is True and document['num_segmentation_heads'] == 2
    assert document['onnx']['opset'] == 17
    assert document['onnx']['input_shape'] == ['batch', 1, *configuration['patch_size']]
    assert document['file_ending'] == '.nii.gz' and document['image_reader_writer'] == 'SimpleITKIO'
    assert document['source']['trainer'] == 'nnUNetTrainerGODCLFAM' and document['folds'][0]['fold'] == '0'
    import hashlib
    digest = hashlib.sha256(open(os.path.join(folder, 'fold_0', 'checkpoint_final.pth'), 'rb').read()).hexdigest()
    assert document['folds'][0]['checkpoint_sha256'] == digest
    assert document['folds'][0]['check']['max_abs_difference'] < 1e-3
    # the deploy predictor accepts it (its own reading of model.json)
    from nnunet_ext.deploy.model import validate_config
    validate_config(document)


def test_user_errors_are_one_line(tmp_path, nnunet_folders, capsys):
    folder = _model_folder(tmp_path, 'nnUNetTrainerGODCLFAM', '3d_fullres')
    watched = str(tmp_path)
    out = str(tmp_path / 'out')
    refused_in_process(capsys, ['export', str(tmp_path / 'missing'), '-o', out], watched, r'no such model folder')
    refused_in_process(capsys, ['export', folder, '-o', out, '--opset', '16'], watched,
                       r'--opset 16: the export needs opset 17 or later')
    refused_in_process(capsys, ['export', folder, '-o', out, '-f', '3'], watched, r'missing checkpoints')
    refused_in_process(capsys, ['export', '-o', out], watched, r'either as MODEL_DIR or with -d')
    refused_in_process(capsys, ['export', folder, '-d', '1', '-o', out], watched, r'either as MODEL_DIR or with -d')
    refused_in_process(capsys, ['export', '-d', '1', '-o', out], watched, r'-d needs -c')
    refused_in_process(capsys, ['export', folder, '-o', os.path.join(folder, 'inside')], watched,
                       r'must lie outside the model folder')
    os.makedirs(out)
    refused_in_process(capsys, ['export', folder, '-o', out], watched, r'exists; choose a new output folder',
                       may_appear=())
    os.rmdir(out)
    plans = tiny_plans()
    plans['image_reader_writer'] = 'NibabelIO'
    nibabel = _model_folder(tmp_path / 'nib', 'nnUNetTrainer', '2d', plans)
    refused_in_process(capsys, ['export', nibabel, '-o', out], watched, r'reads NIfTI|NibabelIO')
    cascade = copy.deepcopy(tiny_plans())
    cascade['configurations']['3d_fullres']['previous_stage'] = '3d_lowres'
    cascade['configurations']['3d_lowres'] = copy.deepcopy(cascade['configurations']['3d_fullres'])
    del cascade['configurations']['3d_lowres']['previous_stage']
    staged = _model_folder(tmp_path / 'cascade', 'nnUNetTrainer', '3d_fullres', cascade)
    refused_in_process(capsys, ['export', staged, '-o', out], watched, r'cascade stage')
