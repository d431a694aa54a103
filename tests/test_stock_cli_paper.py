"""The papers' own networks and a paper's recipe through the stock nnU-Net command line, on the shared 2D
phantom with nnU-Net's default plans (``stock_phantoms``): ``nnUNetv2_train`` of
``nnUNetTrainerANUNetPaper`` (ANU-Net's BatchNorm network, hybrid loss) and
``nnUNetTrainerResUNetPaperRecipe`` (Zhang et al.'s network, Dice alone, the paper's augmentation), side by
side, then ``nnUNetv2_predict`` (the predictor rebuilds the paper networks and loads them strictly; the
recipe trained without 2D mirroring of the first axis, so the predictor mirrors the last axis only)."""
from __future__ import annotations

import os

import pytest
import torch

from cli_helpers import SHORT_TRAINING, assert_label_maps_on_input_grids, run_parallel

pytestmark = pytest.mark.cli

TRAINERS = ('nnUNetTrainerANUNetPaper', 'nnUNetTrainerResUNetPaperRecipe')
CONFIGURATION = '2d'


@pytest.fixture(scope='module')
def runs(stock_phantoms, tmp_path_factory):
    root = str(tmp_path_factory.mktemp('paper'))
    phantom = stock_phantoms[CONFIGURATION]
    env, dataset_id = phantom['env'], str(phantom['dataset_id'])
    logs = run_parallel([['nnUNetv2_train', dataset_id, CONFIGURATION, '0', '-tr', t, '-device', 'cpu']
                         for t in TRAINERS], {**env, **SHORT_TRAINING, 'nnUNet_n_proc_DA': '0'})
    images = os.path.join(env['nnUNet_raw'], phantom['dataset'], 'imagesTs')
    predictions = {t: os.path.join(root, t) for t in TRAINERS}
    run_parallel([['nnUNetv2_predict', '-i', images, '-o', predictions[t], '-d', dataset_id, '-c', CONFIGURATION,
                   '-tr', t, '-f', '0', '-device', 'cpu', '-npp', '0', '-nps', '0'] for t in TRAINERS], env)
    results = {t: os.path.join(env['nnUNet_results'], phantom['dataset'], f'{t}__nnUNetPlans__{CONFIGURATION}',
                               'fold_0') for t in TRAINERS}
    return dict(logs={t: log.stdout for t, log in zip(TRAINERS, logs)}, images=images, predictions=predictions,
                checkpoints={t: torch.load(os.path.join(results[t], 'checkpoint_final.pth'), map_location='cpu',
                                           weights_only=False) for t in TRAINERS})


def test_the_paper_networks_are_trained(runs):
    anunet = runs['checkpoints']['nnUNetTrainerANUNetPaper']['network_weights']
    assert {k.split('.')[2] for k in anunet if k.startswith('decoder.heads.')} == {'0', '1', '2', '3'}  # X_{0,1..4}
    assert anunet['encoder.stages.4.1.convs.0.conv.weight'].shape[0] == 512  # 32..512, whatever the plans say
    assert any(k.endswith('running_mean') for k in anunet)  # BatchNorm
    resunet = runs['checkpoints']['nnUNetTrainerResUNetPaperRecipe']['network_weights']
    assert max(w.shape[0] for k, w in resunet.items() if k.endswith('conv1.weight')) == 512  # the bridge
    assert any(k.endswith('running_mean') for k in resunet)


def test_the_recipe_trains_with_its_loss_and_augmentation(runs):
    log = runs['logs']['nnUNetTrainerResUNetPaperRecipe']
    assert 'paper recipe (ResUNet paper' in log and 'training length from environment' in log
    checkpoint = runs['checkpoints']['nnUNetTrainerResUNetPaperRecipe']
    assert checkpoint['inference_allowed_mirroring_axes'] == (1,)  # left-right flips only
    # soft Dice alone is in [-1, 0]; nnU-Net's Dice + CE starts near +0.4 on this phantom
    assert all(-1 <= loss <= 0 for loss in checkpoint['logging']['train_losses'])


def test_predictions_are_label_maps_on_the_input_grid(runs):
    assert_label_maps_on_input_grids(runs['images'], runs['predictions'])
