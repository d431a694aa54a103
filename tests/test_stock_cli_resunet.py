"""The pre-activation residual U-Net through the stock nnU-Net command line, as the README tells users to
run it, on the tiny 3D phantom with nnU-Net's default plans: nnUNetv2_train -> nnUNetv2_predict (the
predictor rebuilds the network from the plans without deep supervision and loads its weights strictly),
with the GODC + LFAM combination (``nnUNetTrainerResUNetGODCLFAM``: the residual net and its deformable
skips). The plain 2D residual U-Net trains through the stock command in ``test_cascade.py`` (three models);
the paper's network with the paper's recipe is checked in ``test_paper_recipes.py``, and a recipe trainer
through the whole CLI is ``test_stock_cli.py``'s IFE recipe."""
from __future__ import annotations

import os

import pytest

from cli_helpers import (SHORT_TRAINING, assert_label_maps_on_input_grids, assert_preactivation_resunet_fold, run,
                         run_parallel)
from deploy_helpers import assert_deploy_agrees, export_and_deploy_commands

pytestmark = pytest.mark.cli

CONFIGURATION = '3d_fullres'  # on the shared planned phantom (stock_phantoms)
TRAINER = 'nnUNetTrainerResUNetGODCLFAM'  # the LFAM variant covers the residual net


@pytest.fixture(scope='module')
def pipeline(stock_phantoms, tmp_path_factory):
    """The training, then the prediction of the phantom's test images."""
    phantom = stock_phantoms[CONFIGURATION]
    env, dataset_id = phantom['env'], str(phantom['dataset_id'])
    log = run(['nnUNetv2_train', dataset_id, CONFIGURATION, '0', '-tr', TRAINER, '-device', 'cpu'],
              {**env, **SHORT_TRAINING, 'nnUNet_n_proc_DA': '0'})
    images = os.path.join(env['nnUNet_raw'], phantom['dataset'], 'imagesTs')
    predictions = os.path.join(str(tmp_path_factory.mktemp('resunet')), 'predictions')
    model = os.path.join(env['nnUNet_results'], phantom['dataset'], f'{TRAINER}__nnUNetPlans__{CONFIGURATION}')
    deployed = os.path.join(os.path.dirname(predictions), 'deploy')
    export, deploy = export_and_deploy_commands(model, images, deployed)
    run_parallel([['nnUNetv2_predict', '-i', images, '-o', predictions, '-d', dataset_id, '-c', CONFIGURATION,
                   '-tr', TRAINER, '-f', '0', '-device', 'cpu', '-npp', '0', '-nps', '0'], export], env)
    run(deploy, env)
    return dict(log=log, images=images, predictions=predictions, fold=os.path.join(model, 'fold_0'), deployed=deployed)


def test_the_stock_trainer_trains_the_preactivation_resunet_with_its_alignments_and_the_short_schedule(pipeline):
    assert 'training length from environment' in pipeline['log'].stdout
    assert_preactivation_resunet_fold(pipeline['fold'], TRAINER, lfam=True)


def test_predictions_are_label_maps_on_the_input_grids(pipeline):
    assert_label_maps_on_input_grids(pipeline['images'], {TRAINER: pipeline['predictions']})


def test_the_exported_model_predicts_what_the_stock_predictor_predicts(pipeline):
    """The deploy predictor (torch-free) on the 3D residual U-Net with LFAM (its deformable convolutions as gathers)."""
    report = assert_deploy_agrees(pipeline['deployed'], pipeline['predictions'], 0.999)
    assert len(report) == 2
