"""ANU-Net through the command line, as README tells users to run it, on tiny 2D and 3D phantoms:
``nnunet-ext plan -pl ANUNetPlanner`` -> stock ``nnUNetv2_train`` (ANU-Net; UNet++ in 2d) -> stock
prediction of the full model, of a pruned level chosen by NNUNET_EXT_ANUNET_PRUNE_LEVEL, and of the
model folder ``nnunet-ext prune`` exported for that level (which must predict exactly the same)."""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch

from cli_helpers import SHORT_TRAINING, planned_phantom, run, run_parallel, user_environment

pytestmark = pytest.mark.cli

PLANS = 'nnUNetPlansANUNet'
CASES = {  # configuration -> (dataset id, phantom shape, other trainers)
    '2d': (211, (48, 48), ('nnUNetTrainerUNetPlusPlus',)),
    '3d_fullres': (212, (12, 32, 32), ()),  # the nested network's losses: test_anunet_godc_gpu_readiness.py
}


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


@pytest.fixture(scope='module', params=sorted(CASES))
def pipeline(request, tmp_path_factory):
    configuration = request.param
    dataset_id, shape, other = CASES[configuration]
    root = str(tmp_path_factory.mktemp(f'anunet_{configuration}'))
    env = user_environment(root)
    dataset = planned_phantom(env, dataset_id, 'NestedPhantom', configuration, shape, planner='ANUNetPlanner')
    trainers = ('nnUNetTrainerANUNet', *other)
    run_parallel([['nnUNetv2_train', str(dataset_id), configuration, '0', '-tr', t, '-p', PLANS, '-device', 'cpu']
                  for t in trainers], {**env, **SHORT_TRAINING, 'nnUNet_n_proc_DA': '0'})

    model = os.path.join(env['nnUNet_results'], dataset, f'nnUNetTrainerANUNet__{PLANS}__{configuration}')
    plans = _load(os.path.join(model, 'fold_0', 'checkpoint_final.pth'))['init_args']['plans']
    levels = len(plans['configurations'][configuration]['architecture']['arch_kwargs']['strides']) - 1
    level = levels - 1
    # the export, named so that the stock nnUNetv2_predict finds it with -p nnUNetPlansANUNetL<level>
    export = os.path.join(env['nnUNet_results'], dataset, f'nnUNetTrainerANUNet__{PLANS}L{level}__{configuration}')
    pruned_log = run(['nnunet-ext', 'prune', model, '--level', str(level), '-o', export], env).stdout

    images = os.path.join(env['nnUNet_raw'], dataset, 'imagesTs')
    out = {name: os.path.join(root, name) for name in ('full', 'env_pruned', 'exported')}
    predict = ['nnUNetv2_predict', '-i', images, '-d', str(dataset_id), '-c', configuration, '-tr',
               'nnUNetTrainerANUNet', '-f', '0', '-device', 'cpu', '-npp', '0', '-nps', '0', '--save_probabilities']
    run_parallel([[*predict, '-o', out['full'], '-p', PLANS],
                  [*predict, '-o', out['env_pruned'], '-p', PLANS],
                  [*predict, '-o', out['exported'], '-p', f'{PLANS}L{level}']], env,
                 envs=[env, {**env, 'NNUNET_EXT_ANUNET_PRUNE_LEVEL': str(level)}, env])
    return dict(configuration=configuration, env=env, root=root, dataset=dataset, dataset_id=dataset_id,
                trainers=trainers, model=model, export=export, level=level, levels=levels, out=out,
                pruned_log=pruned_log, plans=plans)


def _probabilities(folder):
    files = sorted(glob.glob(os.path.join(folder, '*.npz')))
    assert len(files) == 2, folder
    return {os.path.basename(f): np.load(f)['probabilities'] for f in files}


def test_planner_plans_the_nested_network_and_both_trainers_train_it(pipeline):
    arch = pipeline['plans']['configurations'][pipeline['configuration']]['architecture']
    assert arch['network_class_name'] == 'nnunet_ext.architectures.anunet.ANUNet'
    assert pipeline['levels'] >= 2
    for trainer in pipeline['trainers']:
        folder = os.path.join(pipeline['env']['nnUNet_results'], pipeline['dataset'],
                              f"{trainer}__{PLANS}__{pipeline['configuration']}")
        weights = _load(os.path.join(folder, 'fold_0', 'checkpoint_final.pth'))['network_weights']
        heads = {k.split('.')[2] for k in weights if k.startswith('decoder.heads.')}
        assert len(heads) == pipeline['levels']  # one full-resolution head per level
        has_gates = any(k.startswith('decoder.gates.') for k in weights)
        assert has_gates == (trainer != 'nnUNetTrainerUNetPlusPlus'), trainer


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


def test_exported_model_predicts_exactly_what_the_pruned_full_model_predicts(pipeline):
    out = pipeline['out']
    env_pruned, exported, full = (_probabilities(out[k]) for k in ('env_pruned', 'exported', 'full'))
    assert sorted(exported) == sorted(env_pruned) == sorted(full)
    for case in exported:
        np.testing.assert_allclose(exported[case], env_pruned[case], rtol=0, atol=1e-6)
        assert exported[case].shape == full[case].shape
        # a different head (and fewer encoder stages): not the full model's output
        assert not np.allclose(exported[case], full[case], atol=1e-4)


def test_bad_levels_are_refused_and_nothing_is_written(pipeline):
    if pipeline['configuration'] != '2d':
        pytest.skip('checked once')
    target = os.path.join(pipeline['root'], 'bad_export')
    for level in (0, pipeline['levels'] + 1):
        result = run(['nnunet-ext', 'prune', pipeline['model'], '--level', str(level), '-o', target],
                     pipeline['env'], check=False)
        assert result.returncode == 2, result.stderr
        assert f"has levels 1..{pipeline['levels']}" in result.stderr and 'Traceback' not in result.stderr
        assert not os.path.exists(target)
        assert not glob.glob(os.path.join(pipeline['root'], '.prune_*'))
    result = run(['nnunet-ext', 'prune', pipeline['model'], '--level', '1', '-o', pipeline['export']],
                 pipeline['env'], check=False)
    assert result.returncode == 2 and 'exists' in result.stderr
