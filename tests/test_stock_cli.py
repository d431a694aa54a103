"""Our trainers through the stock nnU-Net command line, as the README tells users to run them, on a tiny
2D phantom dataset: plan_and_preprocess -> train (--npz; --c) -> find_best_configuration -> predict ->
ensemble, for GODC, the paper's combination GODC + LFAM, and IFE with its paper's recipe; the predictor rebuilds
the LFAM and IFE networks from the plans and loads their weights strictly. The planned phantom is shared with the other
stock-CLI tests (``stock_phantoms``)."""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cli_helpers import SHORT_TRAINING, run, run_parallel
from deploy_helpers import assert_deploy_agrees, export_and_deploy_commands

pytestmark = pytest.mark.cli

TRAINERS = ('nnUNetTrainerGODC', 'nnUNetTrainerGODCLFAM')  # find_best_configuration and the ensemble use these
# IFE through the whole CLI, with the IFE paper's recipe (nnUNetTrainerLFAM has nnUNetTrainerGODCLFAM's network
# with nnU-Net's loss, IFECurvature IFEEntropy's decoder with the other score; test_gpu_readiness.py builds them
# all in 2D and 3D)
OTHER_TRAINERS = ('nnUNetTrainerIFEEntropyPaperRecipe',)
LFAM_TRAINERS = ('nnUNetTrainerGODCLFAM',)
IFE_TRAINERS = ('nnUNetTrainerIFEEntropyPaperRecipe',)


# 2d only: the 3d_fullres CLI runs GODC + LFAM in test_stock_cli_resunet.py (nnUNetTrainerResUNetGODCLFAM),
# the nested networks in test_stock_cli_anunet.py and the MLN in test_stock_cli_mln.py
@pytest.fixture(scope='module', params=['2d'])
def pipeline(request, stock_phantoms, tmp_path_factory):
    """Runs the whole stock pipeline once per configuration; tests check its products."""
    configuration = request.param
    env, dataset_id, dataset = (stock_phantoms[configuration][k] for k in ('env', 'dataset_id', 'dataset'))
    root = str(tmp_path_factory.mktemp(f'root_{configuration}'))

    train_env = {**env, **SHORT_TRAINING, 'nnUNet_n_proc_DA': '0'}
    other_trainers = OTHER_TRAINERS
    trainers = TRAINERS + other_trainers
    results = run_parallel([['nnUNetv2_train', str(dataset_id), configuration, '0', '-tr', trainer, '-device', 'cpu',
                             '--npz'] for trainer in trainers], train_env)
    logs = {trainer: result.stdout for trainer, result in zip(trainers, results)}
    images = os.path.join(env['nnUNet_raw'], dataset, 'imagesTs')
    predictions = {trainer: os.path.join(root, f'pred_{trainer}') for trainer in trainers}

    def predict(trainer):
        probabilities = ['--save_probabilities'] if trainer in TRAINERS else []  # the ensemble needs them
        return ['nnUNetv2_predict', '-i', images, '-o', predictions[trainer], '-d', str(dataset_id), '-c',
                configuration, '-tr', trainer, '-f', '0', '-device', 'cpu', '-npp', '0', '-nps', '0', *probabilities]

    # continue the GODC run for one more epoch (--c picks up checkpoint_final) while the trainers whose
    # results it does not touch predict (the training-length variables mean nothing to the predictor)
    continue_godc = ['nnUNetv2_train', str(dataset_id), configuration, '0', '-tr', TRAINERS[0], '-device', 'cpu',
                     '--npz', '--c']
    continued = run_parallel([continue_godc, *map(predict, other_trainers)],
                             {**train_env, 'nnUNet_ext_num_epochs': '2'})[0].stdout
    # -np 1: one evaluation worker (nnU-Net spawns its pool: each worker costs seconds of imports)
    find_best = ['nnUNetv2_find_best_configuration', str(dataset_id), '-c', configuration, '-tr', *TRAINERS, '-f', '0',
                 '-np', '1']
    run_parallel([find_best, *map(predict, TRAINERS)], env)
    ensemble = os.path.join(root, 'ensemble')
    run(['nnUNetv2_ensemble', '-i', *(predictions[t] for t in TRAINERS), '-o', ensemble, '-np', '1'], env)
    return dict(configuration=configuration, env=env, root=root, dataset=dataset, dataset_id=dataset_id,
                logs=logs, continued=continued, predictions=predictions, ensemble=ensemble, images=images)


def _results_folder(p, trainer):
    return os.path.join(p['env']['nnUNet_results'], p['dataset'], f"{trainer}__nnUNetPlans__{p['configuration']}")


def test_trainers_are_found_and_use_the_short_schedule(pipeline):
    for trainer, log in pipeline['logs'].items():
        assert 'training length from environment' in log, trainer
        checkpoint = torch.load(os.path.join(_results_folder(pipeline, trainer), 'fold_0', 'checkpoint_final.pth'),
                                map_location='cpu', weights_only=False)
        assert checkpoint['trainer_name'] == trainer
        assert checkpoint['init_args']['configuration'] == pipeline['configuration']


def test_continue_training_resumes_from_the_final_checkpoint(pipeline):
    folder = os.path.join(_results_folder(pipeline, TRAINERS[0]), 'fold_0')
    checkpoint = torch.load(os.path.join(folder, 'checkpoint_final.pth'), map_location='cpu', weights_only=False)
    assert checkpoint['current_epoch'] == 2  # 1 epoch, then 1 more after --c
    assert 'Epoch 1' in pipeline['continued'] and 'Epoch 0' not in pipeline['continued']


def test_validation_with_npz_and_find_best_configuration(pipeline):
    for trainer in TRAINERS:
        validation = os.path.join(_results_folder(pipeline, trainer), 'fold_0', 'validation')
        assert glob.glob(os.path.join(validation, '*.npz')), f'{trainer}: --npz wrote no probabilities'
        assert os.path.isfile(os.path.join(validation, 'summary.json'))
    instructions = os.path.join(pipeline['env']['nnUNet_results'], pipeline['dataset'], 'inference_instructions.txt')
    assert os.path.isfile(instructions)
    assert 'nnUNetTrainerGODC' in open(instructions).read()


def _label_arrays(folder):
    files = sorted(glob.glob(os.path.join(folder, '*.nii.gz')))
    return {os.path.basename(f): sitk.GetArrayFromImage(sitk.ReadImage(f)) for f in files}


def test_predictions_and_ensemble_are_label_maps_of_the_input_geometry(pipeline):
    images = sorted(glob.glob(os.path.join(pipeline['images'], '*_0000.nii.gz')))
    assert len(images) == 2
    for folder in [*pipeline['predictions'].values(), pipeline['ensemble']]:
        labels = _label_arrays(folder)
        assert sorted(labels) == sorted(os.path.basename(i).replace('_0000', '') for i in images), folder
        for name, array in labels.items():
            reference = sitk.ReadImage(os.path.join(pipeline['images'], name.replace('.nii.gz', '_0000.nii.gz')))
            assert array.shape == sitk.GetArrayFromImage(reference).shape
            assert set(np.unique(array)) <= {0, 1, 2}
    for trainer in TRAINERS:
        folder = pipeline['predictions'][trainer]
        assert len(glob.glob(os.path.join(folder, '*.npz'))) == 2  # --save_probabilities, needed by the ensemble


def test_lfam_networks_are_trained_and_rebuilt_for_prediction(pipeline):
    for trainer in LFAM_TRAINERS:
        folder = os.path.join(_results_folder(pipeline, trainer), 'fold_0')
        weights = torch.load(os.path.join(folder, 'checkpoint_final.pth'), map_location='cpu',
                             weights_only=False)['network_weights']
        assert any(k.startswith('decoder.alignments.') and 'offset_predictor' in k for k in weights), trainer
        assert pipeline['predictions'][trainer]  # predicted above: strict state-dict load succeeded


def test_ife_networks_are_trained_with_widened_decoder_stages_and_rebuilt_for_prediction(pipeline):
    for trainer in IFE_TRAINERS:
        folder = os.path.join(_results_folder(pipeline, trainer), 'fold_0')
        weights = torch.load(os.path.join(folder, 'checkpoint_final.pth'), map_location='cpu',
                             weights_only=False)['network_weights']
        reference = torch.load(os.path.join(_results_folder(pipeline, 'nnUNetTrainerGODC'), 'fold_0',
                                            'checkpoint_final.pth'), map_location='cpu',
                               weights_only=False)['network_weights']
        assert set(weights) == set(reference)  # IFE adds input width, no parameters
        widened = [k for k in weights if weights[k].shape != reference[k].shape]
        # the first conv of the two decoder stages fed by the skips of encoder stages 1 and 2: with n encoder
        # stages, decoder stage d takes the skip of encoder stage n - 2 - d
        n_encoder_stages = 1 + len({k.split('.')[2] for k in weights if k.startswith('decoder.stages.')})
        expected = {f'decoder.stages.{n_encoder_stages - 2 - s}' for s in (1, 2)}
        assert {k.split('.convs.0.')[0] for k in widened} == expected, widened
        labels = _label_arrays(pipeline['predictions'][trainer])  # strict state-dict load succeeded
        assert len(labels) == 2 and all(set(np.unique(a)) <= {0, 1, 2} for a in labels.values())


def test_the_ife_recipe_trains_with_adam_and_the_papers_batch(pipeline):
    trainer = IFE_TRAINERS[0]
    log = pipeline['logs'][trainer]
    assert 'paper recipe (IFE paper, Implementation Details): adam, initial lr 0.0001' in log and 'batch 32' in log
    checkpoint = torch.load(os.path.join(_results_folder(pipeline, trainer), 'fold_0', 'checkpoint_final.pth'),
                            map_location='cpu', weights_only=False)
    assert all('exp_avg_sq' in state for state in checkpoint['optimizer_state']['state'].values())  # Adam's
    assert checkpoint['inference_allowed_mirroring_axes'] is None  # trained without mirroring
    assert checkpoint['logging']['lrs'] == [1e-4]


# The deploy predictor (docs/commands/export.md) on the LFAM and IFE families: voxels with nnUNetv2_predict's label.
# IFE's entropy selects channels by counts in a 256-level histogram of the features: a feature that moves by one
# float32 step across a level changes a count, so ONNX Runtime's rounding (like PyTorch's own in float64) can select
# other channels in a tile, which changes the whole tile on a model trained for 3 iterations (measured 0.94-1.0 over
# three runs); its label maps are checked for their grid and labels, its agreement reported, not bounded.
DEPLOY_MIN_AGREEMENT = {'nnUNetTrainerGODCLFAM': 0.999, 'nnUNetTrainerIFEEntropyPaperRecipe': 0.0}


@pytest.fixture(scope='module')
def deployed(pipeline):
    outs = {t: os.path.join(pipeline['root'], f'deploy_{t}') for t in DEPLOY_MIN_AGREEMENT}
    steps = [export_and_deploy_commands(_results_folder(pipeline, t), pipeline['images'], out)
             for t, out in outs.items()]
    for same_step in zip(*steps):  # both exports, then both torch-free predictions
        run_parallel(list(same_step), pipeline['env'])
    return outs


def test_exported_models_predict_what_the_stock_predictor_predicts(pipeline, deployed):
    for trainer, out in deployed.items():
        assert_deploy_agrees(out, pipeline['predictions'][trainer], DEPLOY_MIN_AGREEMENT[trainer])
