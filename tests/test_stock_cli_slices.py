"""2.5D input and ``nnUNetTrainerMLL`` through the stock nnU-Net command line, as README tells users: a 3D
phantom whose largest spacing is on array axis 2 (so nnU-Net's 2d configuration slices along x, not the
first axis), multi-class labels and an ignore label -> ``nnunet-ext stack-slices`` (3 slices per channel)
-> ``nnUNetv2_plan_and_preprocess -c 2d`` -> ``nnUNetv2_train ... 2d 0 -tr nnUNetTrainerMLL`` for 13 epochs
(the paper schedule switches the point term on at epoch 12; deep supervision on, nnU-Net's default) ->
``nnunet-ext preprocess-images -d`` on new images -> ``nnUNetv2_predict``.

Checked: the plans slice along the stacked axis; nnU-Net's *preprocessed* training data (its ``noNorm``
channels keep the values) has the neighbouring slices as channels, edge slices replicated; new images
stacked by ``preprocess-images`` equal the dataset's own stacked images; ``nnUNetv2_predict`` on the
validation case, stacked from its source image, gives exactly the trainer's final validation
prediction (training, validation and prediction agree). Our trainers' refusal of configurations that do
not slice along the stacked axis is tested in-process (``test_slice_stack.py``)."""
from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from cli_helpers import SHORT_TRAINING, assert_label_maps_on_input_grids, run, user_environment

pytestmark = pytest.mark.cli

SOURCE_ID, STACKED_ID = 321, 322
TRAINER = 'nnUNetTrainerMLL'  # the multi-level paper's, whose networks take 3 slices
SPACING_XYZ = (3.0, 0.8, 0.8)  # array (z, y, x) spacing (0.8, 0.8, 3.0): nnU-Net slices along array axis 2
IGNORE = 3
# the MLL schedule over 13 epochs (point term from epoch 12), short epochs
MLL_TRAINING = {**SHORT_TRAINING, 'nnUNet_ext_num_epochs': '13', 'nnUNet_ext_num_iterations_per_epoch': '2',
                'nnUNet_ext_num_val_iterations_per_epoch': '1'}


def _source_dataset(raw: str) -> str:
    """A 3D phantom dataset with its thick slices on array axis 2 (the phantom's (8, 24, 24) arrays moved
    to (24, 24, 8)), a ``noNorm`` channel and an ignore label (a band of each training case's background)."""
    from nnunet_ext.demo.phantom import write_phantom_dataset
    folder = write_phantom_dataset(raw, SOURCE_ID, 'SlicePhantom', num_train=5, num_test=1, shape=(8, 24, 24),
                                   seed=SOURCE_ID, progress=False)
    for sub in ('imagesTr', 'labelsTr', 'imagesTs', 'labelsTs'):
        for name in os.listdir(os.path.join(folder, sub)):
            path = os.path.join(folder, sub, name)
            array = np.moveaxis(_array(path), 0, 2).copy()
            if sub == 'labelsTr':  # nnU-Net's ignore convention: the highest label
                band = np.zeros(array.shape, bool)
                band[:4] = True
                array[band & (array == 0)] = IGNORE
            image = sitk.GetImageFromArray(array)
            image.SetSpacing(SPACING_XYZ)
            sitk.WriteImage(image, path)
    with open(os.path.join(folder, 'dataset.json'), encoding='utf-8') as f:
        dataset_json = json.load(f)
    dataset_json['channel_names'] = {'0': 'noNorm'}  # preprocessed values = raw values, for the channel check
    dataset_json['labels']['ignore'] = IGNORE
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
         '-np', '1', '-npfp', '1'], {**env, 'nnUNet_n_proc_DA': '1'})
    run(['nnUNetv2_train', str(STACKED_ID), '2d', '0', '-tr', TRAINER, '-device', 'cpu'],
        {**env, **MLL_TRAINING, 'nnUNet_n_proc_DA': '0'})
    with open(os.path.join(env['nnUNet_preprocessed'], dataset, 'splits_final.json'), encoding='utf-8') as f:
        (validation_case,) = json.load(f)[0]['val']
    new_images, stacked_images = os.path.join(root, 'new'), os.path.join(root, 'new_stacked')
    shutil.copytree(os.path.join(source, 'imagesTs'), new_images)
    shutil.copy(os.path.join(source, 'imagesTr', f'{validation_case}_0000.nii.gz'), new_images)
    run(['nnunet-ext', 'preprocess-images', new_images, stacked_images, '-d', str(STACKED_ID)], env)
    predictions = os.path.join(root, 'predictions')
    run(['nnUNetv2_predict', '-i', stacked_images, '-o', predictions, '-d', str(STACKED_ID), '-c', '2d', '-tr', TRAINER,
         '-f', '0', '-device', 'cpu', '-npp', '0', '-nps', '0'], env)
    results = os.path.join(env['nnUNet_results'], dataset, f'{TRAINER}__nnUNetPlans__2d', 'fold_0')
    return dict(env=env, source=source, dataset=dataset, log=log.stdout, new_images=new_images,
                stacked_images=stacked_images, predictions=predictions, validation_case=validation_case,
                raw=os.path.join(env['nnUNet_raw'], dataset), training_log=_training_log(results), results=results)


def _training_log(results: str) -> str:
    with open(sorted(glob.glob(os.path.join(results, 'training_log_*.txt')))[-1], encoding='utf-8') as f:
        return f.read()


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


def test_mll_schedule_and_terms_are_logged_per_epoch(stacked):
    log = stacked['training_log']
    weights = re.findall(r'multi-level loss weights: region (\S+), boundary \(alpha\) (\S+), point \(beta\) (\S+)', log)
    assert len(weights) == 13
    assert weights[0] == ('1', '0', '0')
    assert weights[2] == ('1', '0.4', '0')
    assert weights[11] == ('1', '1', '0') and weights[12] == ('1', '1', '1')
    for phase in ('train', 'val'):
        terms = re.findall(rf'multi-level loss terms \({phase}, unweighted\): '
                           rf'region (\S+), boundary (\S+), point (\S+)',
                           log)
        assert len(terms) == 13, phase
        assert all(math.isfinite(float(v.rstrip(','))) for row in terms for v in row)
    assert os.path.isfile(os.path.join(stacked['results'], 'checkpoint_final.pth'))
    assert os.path.isfile(os.path.join(stacked['results'], 'validation', 'summary.json'))


def test_the_ignore_label_is_trained_around_and_never_predicted(stacked):
    with open(os.path.join(stacked['raw'], 'dataset.json'), encoding='utf-8') as f:
        assert json.load(f)['labels']['ignore'] == IGNORE  # stack-slices keeps it
    case = stacked['validation_case'] + '.nii.gz'
    assert IGNORE in np.unique(_array(os.path.join(stacked['raw'], 'labelsTr', case)))
    for folder in (stacked['predictions'], os.path.join(stacked['results'], 'validation')):
        for path in glob.glob(os.path.join(folder, '*.nii.gz')):
            assert set(np.unique(_array(path))) <= {0, 1, 2}, path
