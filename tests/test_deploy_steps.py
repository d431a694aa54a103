"""nnunet_ext.deploy (numpy/onnxruntime predictor) against nnU-Net 2.8.1's own functions as the oracle.

Each step is compared with the nnU-Net function it reproduces; the whole pipeline with
nnUNetPredictor.predict_from_files_sequential on the same tiny torch network (exported to ONNX here), and
``python -m nnunet_ext.deploy`` runs in a subprocess where torch, nnunetv2, skimage and nibabel cannot be
imported."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

torch = pytest.importorskip('torch')
pytest.importorskip('nnunetv2')

from nnunet_ext.deploy import preprocessing as dp  # noqa: E402
from nnunet_ext.deploy import resampling as dr  # noqa: E402
from nnunet_ext.deploy import sliding_window as dsw  # noqa: E402
from nnunet_ext.deploy.segmentation import Labels, convert_predicted_logits_to_segmentation_with_correct_shape  # noqa: E402
from deploy_helpers import BLOCKED, BOOTSTRAP, torch_free_deploy  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------- helpers
def tiny_net(dims: int, channels: int, heads: int, seed: int):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
    net = torch.nn.Sequential(conv(channels, 4, 3, padding=1), torch.nn.LeakyReLU(0.1), conv(4, heads, 3, padding=1))
    return net.eval()


def export_onnx(net, dims: int, channels: int, patch, path: str) -> None:
    x = torch.zeros((1, channels, *patch))
    torch.onnx.export(net, (x,), path, dynamo=False, opset_version=18, input_names=['image'], output_names=['logits'],
                      dynamic_axes={'image': {0: 'batch'}, 'logits': {0: 'batch'}})


def state(net) -> dict:
    """A copy of the weights (state_dict() shares the tensors, which nnU-Net's fold loop overwrites)."""
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def onnx_runner(path: str):
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(path, sess_options=options, providers=['CPUExecutionProvider'])
    return lambda x: session.run(['logits'], {'image': np.ascontiguousarray(x, dtype=np.float32)})[0]


def plans_and_config(dims, spacing, patch, schemes, use_mask, transpose_forward=(0, 1, 2), reader='SimpleITKIO',
                     intensity=None, prob_kwargs=None):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    data_kwargs = {'is_seg': False, 'order': 3, 'order_z': 0, 'force_separate_z': None}
    prob_kwargs = prob_kwargs or {'is_seg': False, 'order': 1, 'order_z': 0, 'force_separate_z': None}
    intensity = intensity or {str(c): {'mean': 10.0, 'std': 5.0, 'percentile_00_5': -3.0, 'percentile_99_5': 40.0,
                                       'min': -5.0, 'max': 50.0, 'median': 9.0} for c in range(len(schemes))}
    transpose_backward = [int(i) for i in np.argsort(transpose_forward)]
    conf = {'data_identifier': 'x', 'preprocessor_name': 'DefaultPreprocessor', 'batch_size': 2,
            'patch_size': list(patch), 'median_image_size_in_voxels': list(patch), 'spacing': list(spacing),
            'normalization_schemes': list(schemes), 'use_mask_for_norm': list(use_mask),
            'resampling_fn_data': 'resample_data_or_seg_to_shape', 'resampling_fn_data_kwargs': data_kwargs,
            'resampling_fn_seg': 'resample_data_or_seg_to_shape',
            'resampling_fn_seg_kwargs': {'is_seg': True, 'order': 1, 'order_z': 0, 'force_separate_z': None},
            'resampling_fn_probabilities': 'resample_data_or_seg_to_shape',
            'resampling_fn_probabilities_kwargs': prob_kwargs, 'batch_dice': False,
            'architecture': {'network_class_name': 'x', 'arch_kwargs': {}, '_kw_requires_import': []}}
    plans = {'dataset_name': 'Dataset999_X', 'plans_name': 'nnUNetPlans', 'configurations': {'c': conf},
             'transpose_forward': list(transpose_forward), 'transpose_backward': transpose_backward,
             'image_reader_writer': reader, 'foreground_intensity_properties_per_channel': intensity,
             'label_manager': 'LabelManager', 'original_median_spacing_after_transp': [1, 1, 1],
             'original_median_shape_after_transp': [1, 1, 1], 'experiment_planner_used': 'x'}
    pm = PlansManager(plans)
    return pm, pm.get_configuration('c')


def model_json(pm, cm, dims, labels, regions_class_order, heads, channels, folds, file_ending, mirror_axes):
    return {
        'format': 'nnunet-ext-export', 'format_version': 1, 'nnunet_ext_version': '0.1.0', 'nnunetv2_version': '2.8.1',
        'source': {'model_folder': '/x', 'dataset_name': 'Dataset999_X', 'trainer': 'nnUNetTrainer',
                   'plans': 'nnUNetPlans', 'configuration': 'c', 'checkpoint': 'checkpoint_final.pth'},
        'folds': [{'fold': str(f), 'onnx': f'fold_{f}.onnx', 'checkpoint_sha256': '0'} for f in folds],
        'onnx': {'opset': 18, 'input': 'image', 'output': 'logits', 'input_shape': ['batch', channels, *cm.patch_size],
                 'output_shape': ['batch', heads, *cm.patch_size]},
        'configuration_dims': dims, 'image_reader_writer': pm.plans['image_reader_writer'], 'file_ending': file_ending,
        'channel_names': {str(c): 'x' for c in range(channels)}, 'num_input_channels': channels,
        'transpose_forward': pm.transpose_forward, 'transpose_backward': pm.transpose_backward,
        'spacing': cm.spacing, 'patch_size': cm.patch_size,
        'normalization': [{'scheme': s, 'use_mask_for_norm': m,
                           'intensity_properties': pm.foreground_intensity_properties_per_channel[str(c)]}
                          for c, (s, m) in enumerate(zip(cm.normalization_schemes, cm.use_mask_for_norm))],
        'resampling_data': {'function': 'resample_data_or_seg_to_shape',
                            'kwargs': cm.configuration['resampling_fn_data_kwargs']},
        'resampling_probabilities': {'function': 'resample_data_or_seg_to_shape',
                                     'kwargs': cm.configuration['resampling_fn_probabilities_kwargs']},
        'tile_step_size': 0.5, 'use_gaussian': True, 'mirror_axes': mirror_axes, 'labels': labels,
        'regions_class_order': regions_class_order,
        'has_regions': any(isinstance(v, list) and len(v) > 1 for v in labels.values()),
        'ignore_label': labels.get('ignore'), 'num_segmentation_heads': heads}


# ----------------------------------------------------------------------------------------------- steps
def test_steps_gaussian_padding_match_nnunet():
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
    for image, tile, step in [((110, 64), (64, 64), 0.5), ((64, 64), (64, 64), 0.5), ((200, 97, 33), (64, 48, 32), 0.5),
                              ((131, 70), (40, 24), 0.33), ((50,), (13,), 1.0)]:
        assert dsw.compute_steps_for_sliding_window(image, tile, step) == \
            compute_steps_for_sliding_window(image, tile, step)
    for tile in [(16, 12), (9, 8, 7), (64, 64)]:
        ours = dsw.compute_gaussian(tile, 1. / 8, 10)
        theirs = compute_gaussian(tile, 1. / 8, 10, dtype=torch.float16, device=torch.device('cpu')).numpy()
        assert ours.dtype == np.float16
        np.testing.assert_array_equal(ours, theirs)
    rng = np.random.default_rng(0)
    for shape, new in [((2, 5, 7), (8, 8)), ((1, 3, 9, 4), (6, 5, 4)), ((1, 3, 9, 9), (9, 9))]:
        a = rng.random(shape).astype(np.float32)
        ours, ours_slicer = dsw.pad_nd_image(a, new)
        # nnU-Net pads torch tensors (F.pad with value 0)
        theirs, theirs_slicer = pad_nd_image(torch.from_numpy(a), new, 'constant', {'value': 0}, True, None)
        np.testing.assert_array_equal(ours, theirs.numpy())
        assert ours_slicer == theirs_slicer
        np.testing.assert_array_equal(ours[ours_slicer], a)


@pytest.mark.parametrize('scheme', ['ZScoreNormalization', 'CTNormalization', 'NoNormalization',
                                    'RescaleTo01Normalization', 'RGBTo01Normalization'])
@pytest.mark.parametrize('use_mask', [False, True])
def test_normalization_matches_nnunet(scheme, use_mask):
    from nnunetv2.preprocessing.normalization import default_normalization_schemes as schemes
    rng = np.random.default_rng(1)
    image = (rng.random((6, 9, 11)) * (255 if scheme == 'RGBTo01Normalization' else 80) - (
        0 if scheme == 'RGBTo01Normalization' else 20)).astype(np.float32)
    # a non-contiguous view, as nnU-Net normalises data[c] of a transposed, cropped array
    image = np.ascontiguousarray(image.transpose(2, 0, 1))[:, 1:-1].transpose(1, 2, 0)
    seg = np.where(rng.random(image.shape) > 0.3, np.int8(0), np.int8(-1))
    props = {'mean': 12.5, 'std': 7.25, 'percentile_00_5': -4.0, 'percentile_99_5': 55.0}
    theirs = getattr(schemes, scheme)(use_mask_for_norm=use_mask, intensityproperties=props).run(image.copy(), seg)
    ours = dp.normalize(image.copy(), seg, {'scheme': scheme, 'use_mask_for_norm': use_mask,
                                            'intensity_properties': props})
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)


def test_crop_matches_nnunet():
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    rng = np.random.default_rng(2)
    data = np.zeros((2, 9, 12, 10), dtype=np.float32)
    data[0, 2:7, 3:9, 1:8] = rng.random((5, 6, 7)) + 0.5
    data[0, 4, 5, 4] = 0  # a hole: filled
    data[1, 1, 10, 2] = 3  # another channel widens the box
    for d in (data, np.zeros((1, 4, 5, 6), dtype=np.float32), data[:1, :1]):
        ours = dp.crop_to_nonzero(d.copy())
        theirs = crop_to_nonzero(d.copy())
        np.testing.assert_array_equal(ours[0], theirs[0])
        np.testing.assert_array_equal(ours[1], theirs[1])
        assert ours[1].dtype == theirs[1].dtype
        assert [list(map(int, b)) for b in theirs[2]] == ours[2]


@pytest.mark.parametrize('case', ['isotropic', 'anisotropic_data', 'anisotropic_probabilities', 'separate_z_forced',
                                  'new_spacing_anisotropic', 'float16_logits', 'same_shape'])
def test_resampling_matches_nnunet(case):
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
    rng = np.random.default_rng(3)
    kw = {'is_seg': False, 'order': 3, 'order_z': 0, 'force_separate_z': None}
    dtype = np.float32
    if case == 'isotropic':
        shape, new, cur, tgt = (2, 7, 9, 8), (10, 6, 13), (1.0, 1.2, 0.9), (0.7, 1.8, 0.55)
    elif case == 'anisotropic_data':
        shape, new, cur, tgt = (1, 5, 12, 11), (9, 16, 8), (4.0, 0.8, 0.9), (2.2, 0.6, 1.2)
    elif case == 'anisotropic_probabilities':
        shape, new, cur, tgt = (3, 12, 7, 6), (12, 10, 4), (0.7, 0.8, 3.5), (0.7, 0.56, 5.0)
        kw = {'is_seg': False, 'order': 1, 'order_z': 0, 'force_separate_z': None}
    elif case == 'separate_z_forced':
        shape, new, cur, tgt = (1, 6, 8, 9), (9, 7, 11), (1.0, 1.0, 1.0), (0.66, 1.14, 0.8)
        kw = {'is_seg': False, 'order': 3, 'order_z': 1, 'force_separate_z': True}
    elif case == 'new_spacing_anisotropic':
        shape, new, cur, tgt = (1, 9, 8, 8), (3, 10, 7), (1.0, 1.0, 1.0), (3.5, 0.8, 1.14)
    elif case == 'float16_logits':
        shape, new, cur, tgt = (3, 1, 13, 9), (1, 17, 7), (999.0, 1.0, 1.0), (999.0, 0.76, 1.3)
        kw = {'is_seg': False, 'order': 1, 'order_z': 0, 'force_separate_z': None}
        dtype = np.float16
    else:
        shape, new, cur, tgt = (2, 4, 5, 6), (4, 5, 6), (1.0, 2.0, 1.0), (1.0, 2.0, 1.0)
    data = (rng.random(shape) * 10 - 3).astype(dtype)
    ours = dr.resample_data_or_seg_to_shape(data.copy(), new, cur, tgt, **kw)
    theirs = resample_data_or_seg_to_shape(data.copy(), new, cur, tgt, **kw)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)
    if case != 'same_shape':
        assert not np.array_equal(ours, dr.resample_data_or_seg_to_shape(
            data.copy(), new, cur, tgt, **{**kw, 'order': 0}))  # the order matters: the test can fail


def test_compute_new_shape_matches_nnunet():
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
    for args in [((5, 10, 15), (1, 1, 1), (2, 2, 2)), ((33, 7, 9), (1.5, 0.7, 3), (1.1, 0.35, 0.9)),
                 ((1, 20, 20), (999, 0.5, 0.5), (999, 0.8, 0.8))]:
        np.testing.assert_array_equal(dr.compute_new_shape(*args), compute_new_shape(*args))


# ----------------------------------------------------------------------------------------------- sliding window
@pytest.mark.parametrize('dims,image_shape,patch,mirror', [
    (2, (2, 3, 11, 9), (16, 12), (0, 1)),       # smaller than the patch: padding, per slice
    (2, (1, 2, 37, 29), (16, 12), (0, 1)),      # several tiles
    (3, (1, 9, 7, 10), (12, 8, 8), (0, 1, 2)),  # padding
    (3, (2, 20, 17, 13), (12, 8, 8), (1, 2)),   # several tiles, mirroring over two axes
])
def test_sliding_window_matches_nnunet_predictor(tmp_path, dims, image_shape, patch, mirror):
    from types import SimpleNamespace
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    channels, heads = image_shape[0], 3
    nets = [tiny_net(dims, channels, heads, seed) for seed in (0, 1)]
    runners = []
    for i, net in enumerate(nets):
        export_onnx(net, dims, channels, patch, str(tmp_path / f'f{i}.onnx'))
        runners.append(onnx_runner(str(tmp_path / f'f{i}.onnx')))
    data = np.random.default_rng(4).standard_normal(image_shape).astype(np.float32)

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, device=torch.device('cpu'),
                                verbose=False, allow_tqdm=False)
    predictor.network = nets[0]
    predictor.configuration_manager = SimpleNamespace(patch_size=list(patch))
    predictor.label_manager = SimpleNamespace(num_segmentation_heads=heads)
    predictor.allowed_mirroring_axes = mirror
    predictor.list_of_parameters = [state(n) for n in nets]
    with torch.no_grad():
        theirs_one = predictor.predict_sliding_window_return_logits(torch.from_numpy(data)).numpy()
        theirs_two = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).numpy()

    ours_one = dsw.predict_sliding_window_return_logits(runners[0], data, patch, heads, 0.5, True, mirror)
    assert ours_one.dtype == theirs_one.dtype == np.float16 and ours_one.shape == theirs_one.shape
    # float16 accumulation as nnU-Net: equal up to one float16 step where onnxruntime's float32 rounding differs
    np.testing.assert_allclose(ours_one.astype(np.float32), theirs_one.astype(np.float32), rtol=2e-3, atol=2e-3)
    assert np.mean(ours_one == theirs_one) > 0.9
    ours_two = ours_one.copy()
    ours_two += dsw.predict_sliding_window_return_logits(runners[1], data, patch, heads, 0.5, True, mirror)
    ours_two /= 2
    np.testing.assert_allclose(ours_two.astype(np.float32), theirs_two.astype(np.float32), rtol=3e-3, atol=3e-3)
    # without mirroring the result differs: the comparison above can fail
    plain = dsw.predict_sliding_window_return_logits(runners[0], data, patch, heads, 0.5, True, None)
    assert np.abs(plain.astype(np.float32) - theirs_one.astype(np.float32)).max() > 1e-2


# ----------------------------------------------------------------------------------------------- segmentation
@pytest.mark.parametrize('regions', [False, True])
@pytest.mark.parametrize('probabilities', [False, True])
def test_logits_to_segmentation_matches_nnunet(regions, probabilities):
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape as cv
    if regions:
        labels = {'background': 0, 'whole': [1, 2, 3], 'core': [2, 3], 'enhancing': 3}
        order = [1, 2, 3]
    else:
        labels = {'background': 0, 'a': 1, 'b': 2, 'c': 3}
        order = None
    heads = 3 if regions else 4
    pm, cm = plans_and_config(3, [1.0, 0.6, 0.6], [8, 8, 8], ['ZScoreNormalization'], [False],
                              transpose_forward=(2, 0, 1))
    dataset_json = {'labels': labels, 'regions_class_order': order, 'file_ending': '.nii.gz'}
    lm = pm.get_label_manager(dataset_json)
    assert lm.num_segmentation_heads == heads
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((heads, 7, 10, 9)) * 3).astype(np.float16)
    properties = {'spacing': [0.8, 1.3, 0.75], 'shape_before_cropping': (9, 14, 12),
                  'bbox_used_for_cropping': [[1, 7], [2, 10], [0, 12]],
                  'shape_after_cropping_and_before_resampling': (6, 8, 12)}
    theirs = cv(torch.from_numpy(logits.copy()), pm, cm, lm, dict(properties), return_probabilities=probabilities)
    ours = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits.copy(), Labels(labels, order), dict(properties), cm.spacing, pm.transpose_forward,
        pm.transpose_backward, cm.configuration['resampling_fn_probabilities_kwargs'], probabilities)
    if probabilities:
        np.testing.assert_array_equal(ours[0], theirs[0])
        assert ours[1].dtype == theirs[1].dtype == np.float32
        np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-6, atol=1e-7)
        assert len(np.unique(ours[0])) > 2
    else:
        np.testing.assert_array_equal(ours, theirs)
        assert ours.dtype == theirs.dtype and len(np.unique(ours)) > 2


# ----------------------------------------------------------------------------------------------- readers
def test_natural_image_reader_matches_nnunet(tmp_path):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
    from nnunet_ext.deploy.images import read_images
    rng = np.random.default_rng(6)
    gray = rng.integers(0, 256, (13, 17), dtype=np.uint8)
    rgb = rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    gray16 = rng.integers(0, 65536, (13, 17), dtype=np.uint16)
    for name, array in (('g_0000.png', gray), ('c_0000.png', rgb), ('b_0000.bmp', gray), ('t_0000.tif', rgb),
                        ('w_0000.png', gray16), ('r_0000.bmp', rgb), ('u_0000.tif', gray)):
        path = str(tmp_path / name)
        sitk.WriteImage(sitk.GetImageFromArray(array, isVector=array.ndim == 3), path)
        theirs, theirs_props = NaturalImage2DIO().read_images([path])
        ours, ours_props = read_images([path], 'NaturalImage2DIO')
        np.testing.assert_array_equal(ours, theirs)
        assert ours.dtype == theirs.dtype and tuple(ours_props['spacing']) == tuple(theirs_props['spacing'])
    try:  # Pillow writes palette and 1-bit files, which SimpleITK's readers expand differently
        from PIL import Image
    except ImportError:
        return
    palette_grey = Image.fromarray(gray, mode='L').convert('P', palette=Image.Palette.ADAPTIVE)
    for name, image in (('p_0000.bmp', Image.fromarray(gray, mode='L')), ('q_0000.png', Image.fromarray(gray > 99)),
                        ('v_0000.png', palette_grey)):
        path = str(tmp_path / name)
        image.save(path)
        theirs, _ = NaturalImage2DIO().read_images([path])
        ours, _ = read_images([path], 'NaturalImage2DIO')
        np.testing.assert_array_equal(ours, theirs, err_msg=name)


def test_simpleitk_reader_matches_nnunet(tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunet_ext.deploy.images import read_images
    rng = np.random.default_rng(7)
    for name, array, spacing in (('a_0000.nii.gz', rng.random((4, 5, 6)), (0.7, 0.8, 2.5)),
                                 ('b_0000.nii.gz', rng.integers(0, 9, (5, 6)).astype(np.int16), (0.5, 1.5)),
                                 ('c_0000.mha', rng.random((3, 4, 5)).astype(np.float32), (1.0, 2.0, 3.0))):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing)
        sitk.WriteImage(image, str(tmp_path / name))
        theirs, theirs_props = SimpleITKIO().read_images([str(tmp_path / name)])
        ours, ours_props = read_images([str(tmp_path / name)], 'SimpleITKIO')
        np.testing.assert_array_equal(ours, theirs)
        assert ours.shape == theirs.shape and ours_props['spacing'] == theirs_props['spacing']
        assert ours_props['sitk_stuff'] == theirs_props['sitk_stuff']


# ----------------------------------------------------------------------------------------------- whole pipeline
@pytest.fixture(scope='module')
def pipeline(tmp_path_factory):
    """A 3d two-channel, two-fold model (transposed axes, anisotropic spacing, mask normalisation, CT) exported to
    ONNX with its model.json; a folder of two cases; nnU-Net's own prediction of them
    (nnUNetPredictor.predict_from_files_sequential, save_probabilities) as the oracle."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    root = tmp_path_factory.mktemp('deploy_pipeline')
    dims, channels, heads, patch = 3, 2, 3, [16, 12, 12]
    pm, cm = plans_and_config(dims, [2.0, 0.9, 1.1], patch, ['ZScoreNormalization', 'CTNormalization'],
                              [True, False], transpose_forward=(0, 2, 1))
    labels = {'background': 0, 'liver': 1, 'tumour': 2}
    dataset_json = {'labels': labels, 'file_ending': '.nii.gz', 'channel_names': {'0': 'MR', '1': 'CT'},
                    'numTraining': 1}
    nets = [tiny_net(dims, channels, heads, seed) for seed in (10, 11)]
    export = root / 'export'
    export.mkdir()
    for fold, net in zip((0, 1), nets):
        export_onnx(net, dims, channels, patch, str(export / f'fold_{fold}.onnx'))
    with open(export / 'model.json', 'w') as f:
        json.dump(model_json(pm, cm, dims, labels, None, heads, channels, [0, 1], '.nii.gz', [0, 1, 2]), f)
    images = root / 'images'
    images.mkdir()
    rng = np.random.default_rng(8)
    for case, shape, spacing in (('caseA', (7, 20, 18), (0.8, 0.75, 3.1)), ('caseB', (9, 11, 13), (1.0, 1.0, 1.4))):
        for c in range(channels):
            array = np.zeros(shape, dtype=np.float32)
            array[1:-1, 2:, 1:-2] = rng.standard_normal((shape[0] - 2, shape[1] - 2, shape[2] - 3)) * 8 + 10 * c
            image = sitk.GetImageFromArray(array.astype(np.int16 if c else np.float32))
            image.SetSpacing(spacing)
            image.SetOrigin((3.0, -2.0, 7.5))
            image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
            sitk.WriteImage(image, str(images / f'{case}_{c:04d}.nii.gz'))
    (images / 'notes.txt').write_text('not an image')
    oracle = root / 'oracle'
    oracle.mkdir()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                device=torch.device('cpu'), verbose=False, allow_tqdm=False)
    predictor.manual_initialization(nets[0], pm, cm, [state(n) for n in nets], dataset_json, 'nnUNetTrainer',
                                    (0, 1, 2))
    with torch.no_grad():
        predictor.predict_from_files_sequential(str(images), str(oracle), save_probabilities=True)
    return {'export': str(export), 'images': str(images), 'oracle': str(oracle), 'root': root}


def compare_with_oracle(pipeline, out):
    for case in ('caseA', 'caseB'):
        theirs = sitk.ReadImage(os.path.join(pipeline['oracle'], case + '.nii.gz'))
        ours = sitk.ReadImage(os.path.join(out, case + '.nii.gz'))
        for attribute in ('GetSpacing', 'GetOrigin', 'GetDirection', 'GetSize'):
            assert getattr(ours, attribute)() == getattr(theirs, attribute)()
        assert ours.GetPixelID() == theirs.GetPixelID()
        a, b = sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(theirs)
        p_ours = np.load(os.path.join(out, case + '.npz'))['probabilities']
        p_theirs = np.load(os.path.join(pipeline['oracle'], case + '.npz'))['probabilities']
        assert np.mean(a == b) > 0.995, np.mean(a == b)
        assert len(np.unique(b)) > 1
        p_ours = np.load(os.path.join(out, case + '.npz'))['probabilities']
        p_theirs = np.load(os.path.join(pipeline['oracle'], case + '.npz'))['probabilities']
        assert p_ours.shape == p_theirs.shape and p_ours.dtype == p_theirs.dtype
        np.testing.assert_allclose(p_ours, p_theirs, atol=3e-3)


def test_predict_folder_matches_nnunet(pipeline, tmp_path):
    from nnunet_ext.deploy import load_model, predict_folder
    model = load_model(pipeline['export'], threads=1, providers=['CPUExecutionProvider'])
    written = predict_folder(model, pipeline['images'], str(tmp_path / 'out'), save_probabilities=True,
                             progress=False, verbose=False)
    assert [os.path.basename(p) for p in written] == ['caseA.nii.gz', 'caseB.nii.gz']
    compare_with_oracle(pipeline, str(tmp_path / 'out'))
    assert not [n for n in os.listdir(tmp_path / 'out') if n.startswith('.tmp')]


def run_blocked(*args):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_WAIT_POLICY='PASSIVE')
    return subprocess.run(torch_free_deploy(*args), capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_module_runs_without_torch_and_nnunet(pipeline, tmp_path):
    out = tmp_path / 'out'
    result = run_blocked(pipeline['export'], '-i', pipeline['images'], '-o', str(out), '--save-probabilities',
                         '--threads', '1', '--providers', 'CPUExecutionProvider', '--no-progress')
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ['caseA.nii.gz', 'caseA.npz', 'caseA.pkl', 'caseB.nii.gz', 'caseB.npz',
                                       'caseB.pkl']
    compare_with_oracle(pipeline, str(out))
    # the blocker works: a module that imports torch fails under it
    blocker = BOOTSTRAP.format(blocked=BLOCKED).split('import runpy')[0]
    check = subprocess.run([sys.executable, '-c', blocker + 'import onnxruntime, scipy, SimpleITK\nimport torch'],
                           capture_output=True, text=True)
    assert check.returncode != 0 and 'blocked in this test' in check.stderr


def test_natural_image_2d_pipeline_matches_nnunet(tmp_path):
    """A 2d configuration on RGB PNGs (NaturalImage2DIO, RGBTo01Normalization, spacing (999, 1, 1)) against
    nnUNetPredictor.predict_from_files_sequential."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunet_ext.deploy import predict_folder
    dims, channels, heads, patch = 2, 3, 2, [16, 16]
    pm, cm = plans_and_config(dims, [1.0, 1.0], patch, ['RGBTo01Normalization'] * 3, [False] * 3,
                              reader='NaturalImage2DIO')
    labels = {'background': 0, 'road': 1}
    net = tiny_net(dims, channels, heads, 3)
    export = tmp_path / 'export'
    export.mkdir()
    export_onnx(net, dims, channels, patch, str(export / 'fold_0.onnx'))
    with open(export / 'model.json', 'w') as f:
        json.dump(model_json(pm, cm, dims, labels, None, heads, channels, [0], '.png', [0, 1]), f)
    images = tmp_path / 'images'
    images.mkdir()
    rng = np.random.default_rng(9)
    for case, shape in (('img1', (23, 30)), ('img2', (9, 12))):
        sitk.WriteImage(sitk.GetImageFromArray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8), isVector=True),
                        str(images / f'{case}_0000.png'))
    oracle = tmp_path / 'oracle'
    oracle.mkdir()
    predictor = nnUNetPredictor(device=torch.device('cpu'), verbose=False, allow_tqdm=False)
    predictor.manual_initialization(net, pm, cm, [state(net)], {'labels': labels, 'file_ending': '.png'},
                                    'nnUNetTrainer', (0, 1))
    with torch.no_grad():
        predictor.predict_from_files_sequential(str(images), str(oracle))
    predict_folder(str(export), str(images), str(tmp_path / 'out'), providers=['CPUExecutionProvider'], threads=1,
                   progress=False, verbose=False)
    for case in ('img1', 'img2'):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / 'out' / f'{case}.png')))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(oracle / f'{case}.png')))
        assert a.shape == b.shape and a.dtype == b.dtype
        assert np.mean(a == b) > 0.99 and len(np.unique(b)) == 2


# ----------------------------------------------------------------------------------------------- user errors
def test_user_errors_are_one_line(pipeline, tmp_path, capsys):
    import shutil
    from nnunet_ext.deploy.__main__ import main
    export, images = pipeline['export'], pipeline['images']

    def error(*args):
        capsys.readouterr()
        assert main(list(args) + ['--no-progress']) == 2  # and leaves SIGTERM's handler as it was (conftest)
        err = capsys.readouterr().err.strip()
        assert err.startswith('error: ') and '\n' not in err and 'Traceback' not in err, err
        return err

    out = str(tmp_path / 'out')
    assert 'does not exist' in error(str(tmp_path / 'nope'), '-i', images, '-o', out)
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'model.json').write_text('{not json')
    assert 'not valid JSON' in error(str(bad), '-i', images, '-o', out)
    (bad / 'model.json').write_text(json.dumps({'format': 'nnunet-ext-export', 'format_version': 1}))
    assert 'missing key' in error(str(bad), '-i', images, '-o', out)
    config = json.load(open(os.path.join(export, 'model.json')))
    (bad / 'model.json').write_text(json.dumps({**config, 'image_reader_writer': 'NibabelIO'}))
    assert 'NibabelIO' in error(str(bad), '-i', images, '-o', out)
    (bad / 'model.json').write_text(json.dumps(config))
    assert 'fold_0.onnx' in error(str(bad), '-i', images, '-o', out)
    shutil.copy(os.path.join(export, 'fold_0.onnx'), bad / 'fold_0.onnx')
    (bad / 'fold_1.onnx').write_text('garbage')
    assert 'onnxruntime cannot load' in error(str(bad), '-i', images, '-o', out)
    assert 'not in' in error(export, '-i', images, '-o', out, '-f', '7')
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert 'holds no case' in error(export, '-i', str(empty), '-o', out)
    assert 'does not exist' in error(export, '-i', str(tmp_path / 'missing'), '-o', out)
    one_channel = tmp_path / 'one'
    one_channel.mkdir()
    shutil.copy(os.path.join(images, 'caseA_0000.nii.gz'), one_channel / 'caseA_0000.nii.gz')
    assert 'needs 2' in error(export, '-i', str(one_channel), '-o', out)
    broken = tmp_path / 'broken'
    broken.mkdir()
    for c in range(2):
        (broken / f'x_{c:04d}.nii.gz').write_bytes(b'not a nifti')
    assert 'cannot read image' in error(export, '-i', str(broken), '-o', out)
    (tmp_path / 'file').write_text('x')
    assert 'is a file' in error(export, '-i', images, '-o', str(tmp_path / 'file'))
    assert not os.path.exists(out)


def test_subcommand_parser():
    import argparse
    from nnunet_ext.deploy.commands import add_parser, run
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest='command'))
    args = parser.parse_args(['deploy-predict', 'E', '-i', 'I', '-o', 'O', '-f', '0', 'all', '--disable-tta',
                              '--step-size', '0.25', '--save-probabilities', '--threads', '3',
                              '--providers', 'CPUExecutionProvider'])
    assert args.func is run and args.f == ['0', 'all'] and args.disable_tta and args.step_size == 0.25
    assert args.threads == 3 and args.providers == ['CPUExecutionProvider'] and args.save_probabilities
    with pytest.raises(SystemExit):
        parser.parse_args(['deploy-predict', 'E', '-i', 'I', '-o', 'O', '--step-size', '1.5'])
