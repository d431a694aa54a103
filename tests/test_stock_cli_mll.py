"""``nnUNetTrainerMLL`` through the stock nnU-Net command line on tiny 2D and 3D phantoms with
multi-class labels and an ignore label, deep supervision on (nnU-Net's default): plan_and_preprocess
-> train for 13 epochs (the paper schedule switches the point term on at epoch 12) -> predict."""
from __future__ import annotations

import glob
import json
import math
import os
import re

import numpy as np
import pytest
import SimpleITK as sitk

from cli_helpers import SHORT_TRAINING, planned_phantom, run, user_environment

pytestmark = pytest.mark.cli

# 2d only: the 3D loss, distance targets and network are covered by unit tests and test_gpu_readiness.py
CASES = {'2d': (211, (48, 48))}
IGNORE = 3


def add_ignore_label(dataset_folder: str) -> None:
    """Marks a band of each training case's background as 'ignore' (label 3, nnU-Net's convention:
    the highest label) and declares it in dataset.json."""
    for path in glob.glob(os.path.join(dataset_folder, 'labelsTr', '*.nii.gz')):
        image = sitk.ReadImage(path)
        labels = sitk.GetArrayFromImage(image)
        band = np.zeros(labels.shape, bool)
        band[..., :4, :] = True
        labels[band & (labels == 0)] = IGNORE
        out = sitk.GetImageFromArray(labels)
        out.CopyInformation(image)
        sitk.WriteImage(out, path)
    with open(os.path.join(dataset_folder, 'dataset.json')) as f:
        dataset = json.load(f)
    dataset['labels']['ignore'] = IGNORE
    with open(os.path.join(dataset_folder, 'dataset.json'), 'w') as f:
        json.dump(dataset, f, indent=2)


@pytest.fixture(scope='module', params=sorted(CASES))
def mll_run(request, tmp_path_factory):
    configuration = request.param
    dataset_id, shape = CASES[configuration]
    root = str(tmp_path_factory.mktemp(f'mll_{configuration}'))
    env = user_environment(root)
    dataset = planned_phantom(env, dataset_id, 'IgnorePhantom', configuration, shape, prepare=add_ignore_label)
    train_env = {**env, **SHORT_TRAINING, 'nnUNet_n_proc_DA': '0', 'nnUNet_ext_num_epochs': '13',
                 'nnUNet_ext_num_iterations_per_epoch': '2', 'nnUNet_ext_num_val_iterations_per_epoch': '1'}
    run(['nnUNetv2_train', str(dataset_id), configuration, '0', '-tr', 'nnUNetTrainerMLL', '-device', 'cpu'], train_env)
    results = os.path.join(env['nnUNet_results'], dataset, f'nnUNetTrainerMLL__nnUNetPlans__{configuration}', 'fold_0')
    log = open(sorted(glob.glob(os.path.join(results, 'training_log_*.txt')))[-1], encoding='utf-8').read()
    images = os.path.join(env['nnUNet_raw'], dataset, 'imagesTs')
    predictions = os.path.join(root, 'predictions')
    run(['nnUNetv2_predict', '-i', images, '-o', predictions, '-d', str(dataset_id), '-c', configuration, '-tr',
         'nnUNetTrainerMLL', '-f', '0', '-device', 'cpu', '-npp', '0', '-nps', '0'], env)
    return dict(log=log, images=images, predictions=predictions, results=results)


def test_schedule_and_terms_are_logged_per_epoch(mll_run):
    log = mll_run['log']
    weights = re.findall(r'multi-level loss weights: region (\S+), boundary \(alpha\) (\S+), point \(beta\) (\S+)', log)
    assert len(weights) == 13
    assert weights[0] == ('1', '0', '0')
    assert weights[2] == ('1', '0.4', '0')
    assert weights[11] == ('1', '1', '0') and weights[12] == ('1', '1', '1')
    for phase in ('train', 'val'):
        terms = re.findall(rf'multi-level loss terms \({phase}, unweighted\): region (\S+), boundary (\S+), point (\S+)',
                           log)
        assert len(terms) == 13, phase
        assert all(math.isfinite(float(v.rstrip(','))) for row in terms for v in row)
    assert os.path.isfile(os.path.join(mll_run['results'], 'checkpoint_final.pth'))
    assert os.path.isfile(os.path.join(mll_run['results'], 'validation', 'summary.json'))


def test_predictions_are_label_maps_without_the_ignore_label(mll_run):
    images = sorted(glob.glob(os.path.join(mll_run['images'], '*_0000.nii.gz')))
    predicted = sorted(glob.glob(os.path.join(mll_run['predictions'], '*.nii.gz')))
    assert [os.path.basename(p) for p in predicted] == [os.path.basename(i).replace('_0000', '') for i in images]
    for image, prediction in zip(images, predicted):
        array = sitk.GetArrayFromImage(sitk.ReadImage(prediction))
        assert array.shape == sitk.GetArrayFromImage(sitk.ReadImage(image)).shape
        assert set(np.unique(array)) <= {0, 1, 2}
