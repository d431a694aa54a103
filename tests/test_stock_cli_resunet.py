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
import torch

from cli_helpers import SHORT_TRAINING, assert_label_maps_on_input_grids, run_parallel

pytestmark = pytest.mark.cli

TRAINERS = {  # configuration -> trainers, on the shared planned phantoms (stock_phantoms)
    '3d_fullres': ('nnUNetTrainerResUNetGODCLFAM',),  # the LFAM variant covers the residual net
}


@pytest.fixture(scope='module')
def pipelines(stock_phantoms, tmp_path_factory):
    """The trainings two at a time, then the predictions."""
    root = str(tmp_path_factory.mktemp('resunet'))
    env = stock_phantoms['3d_fullres']['env']
    jobs = [(c, t) for c in sorted(TRAINERS) for t in TRAINERS[c]]
    ids = {c: str(stock_phantoms[c]['dataset_id']) for c in TRAINERS}
    logs = dict(zip(jobs, run_parallel([['nnUNetv2_train', ids[c], c, '0', '-tr', t, '-device', 'cpu'] for c, t in jobs],
                                       {**env, **SHORT_TRAINING, 'nnUNet_n_proc_DA': '0'})))
    images = {c: os.path.join(env['nnUNet_raw'], stock_phantoms[c]['dataset'], 'imagesTs') for c in TRAINERS}
    predictions = {(c, t): os.path.join(root, f'pred_{c}_{t}') for c, t in jobs}
    run_parallel([['nnUNetv2_predict', '-i', images[c], '-o', predictions[c, t], '-d', ids[c], '-c', c, '-tr', t,
                   '-f', '0', '-device', 'cpu', '-npp', '0', '-nps', '0'] for c, t in jobs], env)
    return {c: dict(configuration=c, trainers=TRAINERS[c], logs={t: logs[c, t] for t in TRAINERS[c]}, images=images[c],
                    predictions={t: predictions[c, t] for t in TRAINERS[c]},
                    results={t: os.path.join(env['nnUNet_results'], stock_phantoms[c]['dataset'],
                                             f'{t}__nnUNetPlans__{c}', 'fold_0') for t in TRAINERS[c]})
            for c in TRAINERS}


@pytest.fixture(params=sorted(TRAINERS))
def pipeline(request, pipelines):
    return pipelines[request.param]


def test_trainers_train_the_preactivation_resunet_with_the_short_schedule(pipeline):
    for trainer in pipeline['trainers']:
        log = pipeline['logs'][trainer].stdout
        assert 'training length from environment' in log, trainer
        checkpoint = torch.load(os.path.join(pipeline['results'][trainer], 'checkpoint_final.pth'),
                                map_location='cpu', weights_only=False)
        assert checkpoint['trainer_name'] == trainer
        weights = checkpoint['network_weights']
        assert any(k.endswith('.norm1.weight') for k in weights)  # pre-activation units
        assert any(k.startswith('decoder.alignments.') for k in weights) == ('LFAM' in trainer)
        assert not any(k.startswith('decoder.encoder.') for k in weights)  # ours, not nnU-Net's UNetDecoder
        assert os.path.isfile(os.path.join(pipeline['results'][trainer], 'validation', 'summary.json'))


def test_predictions_are_label_maps_on_the_input_grids(pipeline):
    assert_label_maps_on_input_grids(pipeline['images'], pipeline['predictions'])
