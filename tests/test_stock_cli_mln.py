"""``nnUNetTrainerMLN`` through the stock nnU-Net command line on tiny 2D and 3D phantoms (deep
supervision on, nnU-Net's default): plan_and_preprocess -> train (SHORT_TRAINING) -> predict. The two
configurations run side by side (``run_parallel``) on the shared planned phantoms (``stock_phantoms``):
one training and one prediction each."""
from __future__ import annotations

import glob
import math
import os
import re

import numpy as np
import pytest
import SimpleITK as sitk

from cli_helpers import SHORT_TRAINING, STOCK_PHANTOMS, run, run_parallel
from deploy_helpers import assert_deploy_agrees, export_and_deploy_commands

pytestmark = pytest.mark.cli

CASES = dict(STOCK_PHANTOMS)  # configuration -> (dataset id, shape, training cases) of the shared phantoms
TRAINER = 'nnUNetTrainerMLN'


@pytest.fixture(scope='module')
def mln_runs(stock_phantoms, tmp_path_factory):
    root = str(tmp_path_factory.mktemp('mln'))
    env = stock_phantoms['2d']['env']  # one user environment holds both phantoms
    datasets = {c: stock_phantoms[c]['dataset'] for c in CASES}
    train_env = {**env, **SHORT_TRAINING, 'nnUNet_n_proc_DA': '0'}
    run_parallel([['nnUNetv2_train', str(i), c, '0', '-tr', TRAINER, '-device', 'cpu']
                  for c, (i, _, _) in CASES.items()], train_env)
    runs = {}
    for c, (i, _, _) in CASES.items():
        results = os.path.join(env['nnUNet_results'], datasets[c], f'{TRAINER}__nnUNetPlans__{c}', 'fold_0')
        with open(sorted(glob.glob(os.path.join(results, 'training_log_*.txt')))[-1], encoding='utf-8') as f:
            log = f.read()
        runs[c] = dict(log=log, results=results, images=os.path.join(env['nnUNet_raw'], datasets[c], 'imagesTs'),
                       predictions=os.path.join(root, f'predictions_{c}'))
    # the deploy predictor (docs/commands/export.md) on the 2d model: its export beside the stock predictions
    deployed = runs['2d']['deployed'] = os.path.join(root, 'deploy_2d')
    export, deploy = export_and_deploy_commands(os.path.dirname(runs['2d']['results']), runs['2d']['images'], deployed)
    run_parallel([*(['nnUNetv2_predict', '-i', runs[c]['images'], '-o', runs[c]['predictions'], '-d', str(i), '-c', c,
                     '-tr', TRAINER, '-f', '0', '-device', 'cpu', '-npp', '0', '-nps', '0']
                    for c, (i, _, _) in CASES.items()), export], env)
    run(deploy, env)
    return runs


@pytest.mark.parametrize('configuration', sorted(CASES))
def test_training_logs_the_schedule_and_every_term_and_validates(mln_runs, configuration):
    run = mln_runs[configuration]
    log = run['log']
    weights = re.findall(r'multi-level loss weights: region (\S+), boundary \(alpha\) (\S+), point \(beta\) (\S+)',
                         log)
    assert weights == [('1', '0', '0')]  # epoch 0 of the MLN schedule: alpha ramps from 0
    gamma = re.findall(r'MLN fusion weight \(gamma\) ([^;\s]+); the network predicts with the region branch', log)
    assert gamma == ['0']  # one epoch: the fusion is not trained, the prediction is the region branch's
    for phase in ('train', 'val'):
        terms = re.findall(rf'multi-level loss terms \({phase}, unweighted\): region (\S+), boundary (\S+), '
                           rf'distance_l2 (\S+), point (\S+), fusion (\S+)', log)
        assert len(terms) == 1, phase
        assert all(math.isfinite(float(v.rstrip(','))) for v in terms[0])
    assert os.path.isfile(os.path.join(run['results'], 'checkpoint_final.pth'))
    # nnU-Net's final validation predicted the held-out case with the network's inference contract
    assert os.path.isfile(os.path.join(run['results'], 'validation', 'summary.json'))


@pytest.mark.parametrize('configuration', sorted(CASES))
def test_stock_predictor_writes_label_maps(mln_runs, configuration):
    run = mln_runs[configuration]
    images = sorted(glob.glob(os.path.join(run['images'], '*_0000.nii.gz')))
    predicted = sorted(glob.glob(os.path.join(run['predictions'], '*.nii.gz')))
    assert len(images) == 2
    assert [os.path.basename(p) for p in predicted] == [os.path.basename(i).replace('_0000', '') for i in images]
    for image, prediction in zip(images, predicted):
        array = sitk.GetArrayFromImage(sitk.ReadImage(prediction))
        assert array.shape == sitk.GetArrayFromImage(sitk.ReadImage(image)).shape
        assert set(np.unique(array)) <= {0, 1, 2}


def test_exported_prediction_head_predicts_what_the_stock_predictor_predicts(mln_runs):
    """The MLN exports the head nnU-Net's predictor uses; the torch-free deploy predictor matches it."""
    assert_deploy_agrees(mln_runs['2d']['deployed'], mln_runs['2d']['predictions'], 0.999)
