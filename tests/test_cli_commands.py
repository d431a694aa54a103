"""``nnunet-ext`` commands and bad input through the stock nnU-Net commands."""
from __future__ import annotations

import json
import os
import re

import pytest

from cli_helpers import run, run_parallel, user_environment
from nnunet_ext.demo.phantom import write_phantom_dataset
from nnunet_ext.registry import trainer_classes
from nnunet_ext.training.schedule import training_length_overrides

TRAINERS = set(trainer_classes())  # the one list of our trainers; README and docs are checked against it



@pytest.fixture(scope='module')
def env(tmp_path_factory):
    return user_environment(str(tmp_path_factory.mktemp('cli_root')))


def test_env_prints_exports_and_creates_the_data_folders(tmp_path):
    out = run(['nnunet-ext', 'env', '--root', str(tmp_path / 'data')], dict(os.environ)).stdout
    exports = dict(re.findall(r'^export (\w+)=(.*)$', out, re.M))
    for variable in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        assert exports[variable] == str(tmp_path / 'data' / variable)
        assert os.path.isdir(exports[variable])
    import nnunet_ext.trainers
    assert exports['nnUNet_extTrainer'].split(os.pathsep)[0] == os.path.dirname(nnunet_ext.trainers.__file__)


def test_env_keeps_existing_variables_and_other_trainer_folders(tmp_path):
    environ = {**os.environ, 'nnUNet_raw': str(tmp_path / 'r'), 'nnUNet_preprocessed': str(tmp_path / 'p'),
               'nnUNet_results': str(tmp_path / 'res'), 'nnUNet_extTrainer': '/somewhere/else'}
    out = run(['nnunet-ext', 'env'], environ).stdout
    assert f"export nnUNet_raw={tmp_path / 'r'}" in out
    assert re.search(r"nnUNet_extTrainer=\S+trainers:/somewhere/else", out)


@pytest.mark.parametrize('case', ['unwritable', 'unset'])
def test_env_errors_are_clear(tmp_path, case):
    environ = {k: v for k, v in os.environ.items() if not k.startswith('nnUNet')}
    if case == 'unwritable':
        blocker = tmp_path / 'a_file'
        blocker.write_text('')
        result = run(['nnunet-ext', 'env', '--root', str(blocker / 'root')], environ, check=False)
        assert 'cannot create nnUNet_raw folder' in result.stderr
    else:
        result = run(['nnunet-ext', 'env'], environ, check=False)
        assert 'nnUNet_raw is not set' in result.stderr and '--root' in result.stderr
    assert result.returncode == 2 and 'Traceback' not in result.stderr and result.stdout == ''


def test_trainers_lists_every_trainer_and_nnunet_finds_each_and_the_readme_subclass(env, tmp_path):
    """``nnunet-ext trainers``; nnU-Net's own lookup finds each of ours, and the README's example, a user's own
    trainer folder next to ours in nnUNet_extTrainer (all lookups in one interpreter, beside the listing: each
    interpreter costs seconds of imports)."""
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'README.md'), encoding='utf-8').read()
    snippet = re.search(r'```python\n(# my_trainers\.py.*?)```', readme, re.S).group(1)
    folder = tmp_path / 'my_trainer_folder'
    folder.mkdir()
    (folder / 'my_trainers.py').write_text(snippet)
    user_env = {**env, 'nnUNet_extTrainer': env['nnUNet_extTrainer'] + os.pathsep + str(folder)}
    code = ('from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n'
            f'for n in {sorted(TRAINERS)!r}: print(n, f(n).__mro__[1].__module__)\n'
            'cls = f("nnUNetTrainerMLLSlow")\n'
            'print("MLLSlow", cls.mll_schedule(4).boundary, cls.mll_schedule(5).boundary)')
    listing, lookup = run_parallel([['nnunet-ext', 'trainers'], ['python', '-c', code]], env, envs=[env, user_env])
    out, found = listing.stdout, lookup.stdout
    listed = {line.split()[0] for line in out.strip().splitlines()}
    assert listed == TRAINERS
    assert all(len(line.split(None, 1)) == 2 for line in out.strip().splitlines())  # each has a description
    for name in TRAINERS:  # nnU-Net found our class (its first mixin is ours), not a namesake
        assert f'{name} nnunet_ext.' in found
    assert found.strip().splitlines()[-1] == 'MLLSlow 0.0 0.2'


def test_unknown_trainer_and_missing_dataset_give_nnunets_messages_not_ours(env):
    unknown, missing = run_parallel([
        ['nnUNetv2_train', '1', '2d', '0', '-tr', 'nnUNetTrainerDoesNotExist', '-device', 'cpu'],
        ['nnUNetv2_train', '987', '2d', '0', '-tr', 'nnUNetTrainerGODC', '-device', 'cpu']], env, check=False)
    assert unknown.returncode != 0
    assert 'Could not find requested nnunet trainer nnUNetTrainerDoesNotExist' in unknown.stderr
    assert 'nnunet_ext' not in unknown.stderr.split('Traceback', 1)[-1].split('RuntimeError')[0]
    assert missing.returncode != 0
    assert 'Could not find a dataset with the ID 987' in missing.stderr
    traceback = missing.stderr.split('Traceback', 1)[-1]
    assert '/nnunet_ext/' not in traceback and '/trainers/' not in traceback


def test_plan_with_missing_dataset_or_unknown_planner(env):
    result = run(['nnunet-ext', 'plan', '987', '-pl', 'nnUNetPlannerCPUTrial'], env, check=False)
    assert result.returncode == 2 and 'Could not find a dataset with the ID 987' in result.stderr
    assert 'Traceback' not in result.stderr
    write_phantom_dataset(env['nnUNet_raw'], 988, 'PlanPhantom', num_train=4, num_test=0, shape=(32, 32),
                          progress=False)
    result = run(['nnunet-ext', 'plan', '988', '-pl', 'NoSuchPlanner'], env, check=False)
    assert result.returncode == 2 and "unknown planner 'NoSuchPlanner'" in result.stderr
    assert 'Traceback' not in result.stderr


def test_plan_with_our_planner_writes_and_preprocesses_its_plans(env):
    write_phantom_dataset(env['nnUNet_raw'], 989, 'CPUPlanPhantom', num_train=6, num_test=0, shape=(64, 64),
                          progress=False)
    out = run(['nnunet-ext', 'plan', '989', '-pl', 'nnUNetPlannerCPUTrial', '-c', '2d', '-np', '1', '-npfp', '1',
               '--no_pbar'], {**env, 'nnUNet_n_proc_DA': '1'}).stdout
    assert 'plans written: nnUNetPlansCPUTrial' in out
    folder = os.path.join(env['nnUNet_preprocessed'], 'Dataset989_CPUPlanPhantom')
    plans = json.load(open(os.path.join(folder, 'nnUNetPlansCPUTrial.json')))
    assert plans['plans_name'] == 'nnUNetPlansCPUTrial'
    assert os.path.isdir(os.path.join(folder, plans['configurations']['2d']['data_identifier']))
    # trainable with -p like any plans: training on plans our planners write is test_stock_cli_anunet's
    assert plans['configurations']['2d']['batch_size'] >= 2 and plans['experiment_planner_used']


def test_training_length_variables_are_validated():
    assert training_length_overrides({'nnUNet_ext_num_epochs': '3', 'nnUNet_ext_num_iterations_per_epoch': ''}) \
        == {'num_epochs': 3}
    with pytest.raises(ValueError, match="nnUNet_ext_num_epochs='abc' is not an integer"):
        training_length_overrides({'nnUNet_ext_num_epochs': 'abc'})
    with pytest.raises(ValueError, match='must be >= 1'):
        training_length_overrides({'nnUNet_ext_num_val_iterations_per_epoch': '0'})
