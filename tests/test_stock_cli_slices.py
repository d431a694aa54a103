"""2.5D input through the stock nnU-Net command line, as README tells users: a 3D phantom whose largest
spacing is on array axis 2 (so nnU-Net's 2d configuration slices along x, not the first axis) ->
``nnunet-ext stack-slices`` (3 slices per channel) -> ``nnUNetv2_plan_and_preprocess -c 2d`` ->
``nnUNetv2_train ... 2d 0 -tr nnUNetTrainerMLL`` -> ``nnunet-ext preprocess-images -d`` on new images ->
``nnUNetv2_predict``.

Checked: the plans slice along the stacked axis; nnU-Net's *preprocessed* training data (its ``noNorm``
channels keep the values) has the neighbouring slices as channels, edge slices replicated; new images
stacked by ``preprocess-images`` equal the dataset's own stacked images; ``nnUNetv2_predict`` on the
validation case, stacked from its source image, gives exactly the trainer's final validation
prediction (training, validation and prediction agree). Our trainers' refusal of configurations that do
not slice along the stacked axis is tested in-process (``test_slice_stack.py``)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from cli_helpers import SHORT_TRAINING, assert_label_maps_on_input_grids, run, user_environment

pytestmark = pytest.mark.cli

SOURCE_ID, STACKED_ID = 321, 322
TRAINER = 'nnUNetTrainerMLL'  # the multi-level paper's, whose networks take 3 slices
SPACING_XYZ = (3.0, 0.8, 0.8)  # array (z, y, x) spacing (0.8, 0.8, 3.0): nnU-Net slices along array axis 2


def _source_dataset(raw: str) -> str:
    """A 3D phantom dataset with its thick slices on array axis 2 (the phantom's (8, 24, 24) arrays moved
    to (24, 24, 8)) and a ``noNorm`` channel."""
    from nnunet_ext.demo.phantom import write_phantom_dataset
    folder = write_phantom_dataset(raw, SOURCE_ID, 'SlicePhantom', num_train=5, num_test=1, shape=(8, 24, 24),
                                   seed=SOURCE_ID, progress=False)
    for sub in ('imagesTr', 'labelsTr', 'imagesTs', 'labelsTs'):
        for name in os.listdir(os.path.join(folder, sub)):
            path = os.path.join(folder, sub, name)
            image = sitk.GetImageFromArray(np.moveaxis(_array(path), 0, 2).copy())
            image.SetSpacing(SPACING_XYZ)
            sitk.WriteImage(image, path)
    with open(os.path.join(folder, 'dataset.json'), encoding='utf-8') as f:
        dataset_json = json.load(f)
    dataset_json['channel_names'] = {'0': 'noNorm'}  # preprocessed values = raw values, for the channel check
    with open(os.path.join(folder, 'dataset.json'), 'w', encoding='utf-8') as f:
        json.dump(dataset_json, f, indent=4)
    return folder


@pytest.fixture(scope='module')
def stacked(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('slices'))
    env = user_environment(root)
    source = _source_dataset(env['nnUNet_raw'])
    log = run(['nnunet-ext', 'stack-slices', str(SOURCE_ID), '--id', str(STACKED_ID), '-np', '1'], env)
    dataset = 'Dataset322_SlicePhantom_3slices'
    run(['nnUNetv2_plan_and_preprocess', '-d', str(STACKED_ID), '-c', '2d', '--verify_dataset_integrity',
         '-np', '2', '-npfp', '2'], {**env, 'nnUNet_n_proc_DA': '1'})
    run(['nnUNetv2_train', str(STACKED_ID), '2d', '0', '-tr', TRAINER, '-device', 'cpu'],
        {**env, **SHORT_TRAINING, 'nnUNet_n_proc_DA': '0'})
    with open(os.path.join(env['nnUNet_preprocessed'], dataset, 'splits_final.json'), encoding='utf-8') as f:
        (validation_case,) = json.load(f)[0]['val']
    new_images, stacked_images = os.path.join(root, 'new'), os.path.join(root, 'new_stacked')
    shutil.copytree(os.path.join(source, 'imagesTs'), new_images)
    shutil.copy(os.path.join(source, 'imagesTr', f'{validation_case}_0000.nii.gz'), new_images)
    run(['nnunet-ext', 'preprocess-images', new_images, stacked_images, '-d', str(STACKED_ID)], env)
    predictions = os.path.join(root, 'predictions')
    run(['nnUNetv2_predict', '-i', stacked_images, '-o', predictions, '-d', str(STACKED_ID), '-c', '2d', '-tr', TRAINER,
         '-f', '0', '-device', 'cpu', '-npp', '0', '-nps', '0'], env)
    return dict(env=env, source=source, dataset=dataset, log=log.stdout, new_images=new_images,
                stacked_images=stacked_images, predictions=predictions, validation_case=validation_case,
                raw=os.path.join(env['nnUNet_raw'], dataset),
                results=os.path.join(env['nnUNet_results'], dataset, f'{TRAINER}__nnUNetPlans__2d', 'fold_0'))


def _array(path: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def test_the_plans_slice_along_the_stacked_axis(stacked):
    assert 'along array axis 2' in stacked['log']
    with open(os.path.join(stacked['raw'], 'dataset.json'), encoding='utf-8') as f:
        dataset_json = json.load(f)
    assert dataset_json['channel_names'] == {'0': 'noNorm', '1': 'noNorm', '2': 'noNorm'}
    assert dataset_json['nnunet_ext_slices']['axis'] == 2
    with open(os.path.join(stacked['env']['nnUNet_preprocessed'], stacked['dataset'], 'nnUNetPlans.json')) as f:
        assert json.load(f)['transpose_forward'] == [2, 0, 1]


def test_nnunets_preprocessed_channels_are_the_neighbouring_slices(stacked):
    """In nnU-Net's preprocessed data (transposed: the slicing axis first) channel 0 at slice s is channel
    1 at slice s - 1 and channel 2 at slice s is channel 1 at slice s + 1; the first and last slices
    repeat themselves. Checked on every training case."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    folder = os.path.join(stacked['env']['nnUNet_preprocessed'], stacked['dataset'], 'nnUNetPlans_2d')
    dataset = infer_dataset_class(folder)(folder)
    assert len(dataset.identifiers) == 5
    for identifier in dataset.identifiers:
        data = np.asarray(dataset.load_case(identifier)[0])
        assert data.shape[0] == 3 and data.shape[1] == 8  # 3 channels; 8 slices along x
        np.testing.assert_array_equal(data[0, 1:], data[1, :-1])
        np.testing.assert_array_equal(data[2, :-1], data[1, 1:])
        np.testing.assert_array_equal(data[0, 0], data[1, 0])
        np.testing.assert_array_equal(data[2, -1], data[1, -1])
        assert not np.array_equal(data[0], data[1])  # the neighbours differ from the slice


def test_new_images_are_stacked_as_the_dataset_was(stacked):
    case = stacked['validation_case']
    for channel in range(3):
        name = f'{case}_{channel:04d}.nii.gz'
        np.testing.assert_array_equal(_array(os.path.join(stacked['stacked_images'], name)),
                                      _array(os.path.join(stacked['raw'], 'imagesTr', name)))
    assert len(os.listdir(stacked['stacked_images'])) == 3 * len(os.listdir(stacked['new_images']))


def test_prediction_agrees_with_the_trainers_validation(stacked):
    case = stacked['validation_case'] + '.nii.gz'
    np.testing.assert_array_equal(_array(os.path.join(stacked['predictions'], case)),
                                  _array(os.path.join(stacked['results'], 'validation', case)))
    assert_label_maps_on_input_grids(stacked['new_images'], {'2.5D': stacked['predictions']})

