"""ANU-Net through the command line, as README tells users to run it, on the tiny 2D and 3D phantoms shared
by the stock-CLI tests: ``nnunet-ext plan -pl ANUNetPlanner`` -> stock ``nnUNetv2_train`` (ANU-Net) ->
stock prediction of the model folder ``nnunet-ext prune`` exported for a level; in 2d also of the full
model and of the level chosen by NNUNET_EXT_ANUNET_PRUNE_LEVEL (the export must predict exactly the same),
``prune``'s user errors, and the paper's own network, ``nnUNetTrainerANUNetPaper`` (32..512, max-pooling,
whatever the plans say), trained and predicted (the predictor rebuilds it and loads it strictly). UNet++
(ANU-Net without gates) is covered by the unit tests and ``test_gpu_readiness.py``, the nested network's GODC
losses by ``test_anunet_godc_gpu_readiness.py``."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch

from cli_helpers import STOCK_PHANTOM_EXTRA_PLANS, SHORT_TRAINING, assert_label_maps_on_input_grids, run_parallel
from deploy_helpers import assert_deploy_agrees, export_and_deploy_commands

pytestmark = pytest.mark.cli

PLANS = 'nnUNetPlansANUNet'
PAPER = 'nnUNetTrainerANUNetPaper'
TRAINER = 'nnUNetTrainerANUNet'
CONFIGURATIONS = ('2d', '3d_fullres')  # on the shared planned phantoms (stock_phantoms)


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


@pytest.fixture(scope='module')
def pipelines(stock_phantoms, tmp_path_factory):
    """Both configurations side by side (trainings, exports and predictions two at a time), on the shared
    phantoms' ANU-Net plans (``nnunet-ext plan -pl ANUNetPlanner``, made with nnU-Net's plans:
    ``cli_helpers.STOCK_PHANTOM_EXTRA_PLANS``)."""
    root = str(tmp_path_factory.mktemp('anunet'))
    env = stock_phantoms['2d']['env']  # one user environment holds both phantoms
    ids = {c: stock_phantoms[c]['dataset_id'] for c in CONFIGURATIONS}
    datasets = {c: stock_phantoms[c]['dataset'] for c in CONFIGURATIONS}
    assert STOCK_PHANTOM_EXTRA_PLANS['ANUNetPlanner'] == PLANS
    jobs = [(c, TRAINER) for c in CONFIGURATIONS]
    jobs.append(('2d', PAPER))  # the paper's own network on the same 2d phantom
    run_parallel([['nnUNetv2_train', str(ids[c]), c, '0', '-tr', t, '-p', PLANS, '-device', 'cpu']
                  for c, t in jobs], {**env, **SHORT_TRAINING, 'nnUNet_n_proc_DA': '0'})

    runs = {}
    for c in CONFIGURATIONS:
        dataset, dataset_id = datasets[c], ids[c]
        model = os.path.join(env['nnUNet_results'], dataset, f'{TRAINER}__{PLANS}__{c}')
        plans = _load(os.path.join(model, 'fold_0', 'checkpoint_final.pth'))['init_args']['plans']
        levels = len(plans['configurations'][c]['architecture']['arch_kwargs']['strides']) - 1
        level = levels - 1
        # the export, named so that the stock nnUNetv2_predict finds it with -p nnUNetPlansANUNetL<level>
        export = os.path.join(env['nnUNet_results'], dataset, f'{TRAINER}__{PLANS}L{level}__{c}')
        runs[c] = dict(configuration=c, env=env, root=os.path.join(root, c), dataset=dataset, dataset_id=dataset_id,
                       model=model, export=export, level=level, levels=levels, plans=plans,
                       out={name: os.path.join(root, c, name) for name in ('full', 'env_pruned', 'exported')})
    logs = run_parallel([['nnunet-ext', 'prune', r['model'], '--level', str(r['level']), '-o', r['export']]
                         for r in runs.values()], env)
    commands, envs = [], []
    for r, log in zip(runs.values(), logs):
        r['pruned_log'] = log.stdout
        images = os.path.join(env['nnUNet_raw'], r['dataset'], 'imagesTs')
        predict = ['nnUNetv2_predict', '-i', images, '-d', str(r['dataset_id']), '-c', r['configuration'], '-tr',
                   TRAINER, '-f', '0', '-device', 'cpu', '-npp', '0', '-nps', '0', '--save_probabilities']
        commands.append([*predict, '-o', r['out']['exported'], '-p', f"{PLANS}L{r['level']}"])
        envs.append(env)
        if r['configuration'] == '2d':  # the export against the full model pruned on the fly (the same code in 3d)
            commands += [[*predict, '-o', r['out']['full'], '-p', PLANS],
                         [*predict, '-o', r['out']['env_pruned'], '-p', PLANS]]
            envs += [env, {**env, 'NNUNET_EXT_ANUNET_PRUNE_LEVEL': str(r['level'])}]
    paper = runs['2d']
    paper['paper_out'] = os.path.join(root, '2d', 'paper')
    commands.append(['nnUNetv2_predict', '-i', os.path.join(env['nnUNet_raw'], paper['dataset'], 'imagesTs'),
                     '-o', paper['paper_out'], '-d', str(paper['dataset_id']), '-c', '2d', '-tr', PAPER, '-p', PLANS,
                     '-f', '0', '-device', 'cpu', '-npp', '0', '-nps', '0'])
    envs.append(env)
    # the user errors of `nnunet-ext prune` (2d model) in the same round: levels out of range, an existing output
    bad = os.path.join(root, '2d', 'bad_export')
    refusals = [['nnunet-ext', 'prune', paper['model'], '--level', str(level), '-o', bad]
                for level in (0, paper['levels'] + 1)]
    refusals.append(['nnunet-ext', 'prune', paper['model'], '--level', '1', '-o', paper['export']])
    # the deploy predictor (docs/commands/export.md): the 2d model exported in full, the 3d one pruned to its level
    deploys = []
    for r in runs.values():
        r['deployed'] = os.path.join(r['root'], 'deploy')
        pruned = [] if r['configuration'] == '2d' else ['--prune-level', str(r['level'])]
        images = os.path.join(env['nnUNet_raw'], r['dataset'], 'imagesTs')
        export, deploy = export_and_deploy_commands(r['model'], images, r['deployed'], *pruned)
        commands.append(export)
        envs.append(env)
        deploys.append(deploy)
    results = run_parallel([*refusals, *commands], env, envs=[env] * len(refusals) + envs, check=False)
    for command, result in zip(commands, results[len(refusals):]):
        assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr[-6000:]}"
    run_parallel(deploys, env)
    paper['bad_export'], paper['refused'] = bad, results[:len(refusals)]
    return runs


@pytest.fixture(params=CONFIGURATIONS)
def pipeline(request, pipelines):
    return pipelines[request.param]


def _probabilities(folder):
    files = sorted(glob.glob(os.path.join(folder, '*.npz')))
    assert len(files) == 2, folder
    return {os.path.basename(f): np.load(f)['probabilities'] for f in files}


def test_planner_plans_the_nested_network_and_the_stock_trainer_trains_it(pipeline):
    arch = pipeline['plans']['configurations'][pipeline['configuration']]['architecture']
    assert arch['network_class_name'] == 'nnunet_ext.architectures.anunet.ANUNet'
    assert pipeline['levels'] >= 2
    weights = _load(os.path.join(pipeline['model'], 'fold_0', 'checkpoint_final.pth'))['network_weights']
    heads = {k.split('.')[2] for k in weights if k.startswith('decoder.heads.')}
    assert len(heads) == pipeline['levels']  # one full-resolution head per level
    assert any(k.startswith('decoder.gates.') for k in weights)  # the attention gates


def test_export_holds_only_the_kept_levels_weights(pipeline):
    level = pipeline['level']
    full = _load(os.path.join(pipeline['model'], 'fold_0', 'checkpoint_final.pth'))
    pruned = _load(os.path.join(pipeline['export'], 'fold_0', 'checkpoint_final.pth'))
    kept = pruned['network_weights']
    assert set(kept) < set(full['network_weights'])
    assert not any(k.startswith(f'encoder.stages.{level + 1}.') or k.startswith(f'decoder.heads.{level}.')
                   for k in kept)
    assert any(k.startswith(f'decoder.heads.{level - 1}.') for k in kept)
    for k, v in kept.items():
        assert torch.equal(v, full['network_weights'][k]), k
    assert 'optimizer_state' not in pruned and pruned['nnunet_ext_pruned']['level'] == level
    from batchgenerators.utilities.file_and_folder_operations import load_json
    plans = load_json(os.path.join(pipeline['export'], 'plans.json'))
    assert plans['configurations'][pipeline['configuration']]['architecture']['arch_kwargs']['max_level'] == level
    assert f'level {level} of {pipeline["levels"]}' in pipeline['pruned_log']


def test_exported_model_predicts_exactly_what_the_pruned_full_model_predicts(pipelines):
    out = pipelines['2d']['out']
    env_pruned, exported, full = (_probabilities(out[k]) for k in ('env_pruned', 'exported', 'full'))
    assert sorted(exported) == sorted(env_pruned) == sorted(full)
    for case in exported:
        np.testing.assert_allclose(exported[case], env_pruned[case], rtol=0, atol=1e-6)
        assert exported[case].shape == full[case].shape
        # a different head (and fewer encoder stages): not the full model's output
        assert not np.allclose(exported[case], full[case], atol=1e-4)


def test_exported_model_predicts_label_maps_on_the_input_grids(pipeline):
    images = os.path.join(pipeline['env']['nnUNet_raw'], pipeline['dataset'], 'imagesTs')
    assert_label_maps_on_input_grids(images, {'exported': pipeline['out']['exported']})
    for probabilities in _probabilities(pipeline['out']['exported']).values():
        assert np.isfinite(probabilities).all()
        np.testing.assert_allclose(probabilities.sum(0), 1, atol=1e-4)


def test_bad_levels_are_refused_and_nothing_is_written(pipelines):
    run2d = pipelines['2d']
    *out_of_range, existing = run2d['refused']
    for result in out_of_range:
        assert result.returncode == 2, result.stderr
        assert f"has levels 1..{run2d['levels']}" in result.stderr and 'Traceback' not in result.stderr
    assert not os.path.exists(run2d['bad_export'])
    assert not glob.glob(os.path.join(os.path.dirname(run2d['bad_export']), '.prune_*'))
    assert not glob.glob(os.path.join(os.path.dirname(run2d['export']), '.prune_*'))
    assert existing.returncode == 2 and 'exists' in existing.stderr and 'Traceback' not in existing.stderr


def test_the_papers_network_is_trained_and_predicts(pipelines):
    run = pipelines['2d']
    folder = os.path.join(run['env']['nnUNet_results'], run['dataset'], f'{PAPER}__{PLANS}__2d')
    weights = _load(os.path.join(folder, 'fold_0', 'checkpoint_final.pth'))['network_weights']
    assert {k.split('.')[2] for k in weights if k.startswith('decoder.heads.')} == {'0', '1', '2', '3'}  # X_{0,1..4}
    assert weights['encoder.stages.4.1.convs.0.conv.weight'].shape[0] == 512  # 32..512, whatever the plans say
    assert not any(k.endswith('running_mean') for k in weights)  # InstanceNorm by default, not the paper's BatchNorm
    assert_label_maps_on_input_grids(os.path.join(run['env']['nnUNet_raw'], run['dataset'], 'imagesTs'),
                                     {PAPER: run['paper_out']})


def test_exported_model_predicts_what_the_stock_predictor_predicts(pipeline):
    """The torch-free deploy predictor: in 2d the full model against nnUNetv2_predict of the model folder, in 3d
    the model exported pruned (``export --prune-level``) against nnUNetv2_predict of ``prune``'s model folder."""
    reference = pipeline['out']['full' if pipeline['configuration'] == '2d' else 'exported']
    assert_deploy_agrees(pipeline['deployed'], reference, 0.999)
    with open(os.path.join(pipeline['deployed'], 'export', 'model.json'), encoding='utf-8') as f:
        source = json.load(f)['source']
    assert source.get('prune_level') == (None if pipeline['configuration'] == '2d' else pipeline['level'])
