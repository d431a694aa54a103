"""The README's commands: CI runs exactly its test command; the demo runs as documented."""
from __future__ import annotations

import json
import os
import re

import pytest

from cli_helpers import run
from deploy_helpers import assert_deploy_agrees, export_and_deploy_commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fenced_commands(text):
    return [line.strip() for block in re.findall(r'```bash\n(.*?)```', text, re.S) for line in block.splitlines()
            if line.strip() and not line.strip().startswith('#')]


def test_readme_fresh_machine_commands_and_ci_agree():
    readme = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
    commands = _fenced_commands(readme)
    demo = next(c for c in commands if c.endswith('nnunet-ext demo'))
    tests = next(c for c in commands if 'pytest' in c)
    assert "pip install -e . " in demo
    test_command = tests.split('&&')[-1].strip()
    ci = open(os.path.join(ROOT, '.ci', 'run'), encoding='utf-8').read()
    assert "pip install --quiet -e '.[test]'" in ci and "pip install -e '.[test]'" in tests
    assert re.search(rf'^{re.escape(test_command)}$', ci, re.M), f'.ci/run must run {test_command!r}'


def test_readme_trainer_table_matches_the_package():
    """The registry (``nnunet_ext.registry.trainer_classes``) is the one list of our trainers."""
    from nnunet_ext.registry import trainer_classes
    readme = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
    listed = set(re.findall(r'^\| `(nnUNetTrainer\w+)` \|', readme, re.M))
    assert listed == set(trainer_classes())


def test_docs_index_lists_every_trainer_of_the_package_on_its_method_page():
    from nnunet_ext.registry import trainer_classes
    index = open(os.path.join(ROOT, 'docs', 'README.md'), encoding='utf-8').read()
    methods = index.split('## Methods', 1)[1].split('\n## ', 1)[0]
    rows = [row for row in methods.splitlines() if row.startswith('| [')]
    listed = [name for row in rows for name in re.findall(r'`(nnUNetTrainer\w+)`', row.split(' | ', 1)[1])]
    assert sorted(listed) == sorted(trainer_classes())  # each once, none missing, none stale


@pytest.mark.cli
def test_demo_runs_and_prints_the_dice_table(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith('nnUNet')}
    result = run(['nnunet-ext', 'demo', '--root', str(tmp_path / 'demo'), '--budget', '4',
                  '--iterations-per-epoch', '2', '--device', 'cpu'], env, cwd=str(tmp_path))
    assert re.search(r'^\| trainer +\| epochs \| iterations \| train s \| Dice liver \| Dice tumour \| mean',
                     result.stdout,
                     re.M), result.stdout
    rows = re.findall(r'^\| (nnUNetTrainer\w*) +\| 2 +\| 4 ', result.stdout, re.M)
    assert rows == ['nnUNetTrainer', 'nnUNetTrainerGODC']
    saved = json.load(open(tmp_path / 'demo' / 'demo' / 'results.json'))
    for entry in saved['results']:
        assert set(entry['dice']) == {'liver', 'tumour'}
        assert all(0.0 <= d <= 1.0 for d in entry['dice'].values())
    # nnU-Net's own nnUNetTrainer exported, predicted without torch, against the demo's nnU-Net predictions
    demo_env = {**env, **{k: str(tmp_path / 'demo' / k) for k in ('nnUNet_raw', 'nnUNet_preprocessed',
                                                                   'nnUNet_results')}}
    dataset = 'Dataset990_DemoPhantom'
    for command in export_and_deploy_commands(
            os.path.join(demo_env['nnUNet_results'], dataset, 'nnUNetTrainer__nnUNetPlans__2d'),
            os.path.join(demo_env['nnUNet_raw'], dataset, 'imagesTs'), str(tmp_path / 'deploy'), fold='all'):
        run(command, demo_env)
    assert_deploy_agrees(str(tmp_path / 'deploy'), str(tmp_path / 'demo' / 'demo' / 'predictions' / 'nnUNetTrainer'),
                         0.999)


def test_a_new_demo_run_replaces_the_previous_demo_dataset(tmp_path, monkeypatch):
    from nnunet_ext.demo.pipeline import _remove_previous_demo
    for variable in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        os.makedirs(tmp_path / variable / 'Dataset990_DemoPhantom' / 'x')
        os.makedirs(tmp_path / variable / 'Dataset991_Other')
        monkeypatch.setenv(variable, str(tmp_path / variable))
    _remove_previous_demo(990)
    for variable in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        assert os.listdir(tmp_path / variable) == ['Dataset991_Other']


def test_demo_refuses_a_dataset_id_taken_by_another_dataset(tmp_path):
    root = tmp_path / 'demo'
    os.makedirs(root / 'nnUNet_raw' / 'Dataset990_SomethingElse')
    env = {k: v for k, v in os.environ.items() if not k.startswith('nnUNet')}
    result = run(['nnunet-ext', 'demo', '--root', str(root), '--device', 'cpu'], env, check=False)
    assert result.returncode == 2
    assert 'dataset id 990 is taken by' in result.stderr and '--id' in result.stderr
    assert os.listdir(root / 'nnUNet_raw') == ['Dataset990_SomethingElse']


def test_demo_on_a_missing_gpu_says_so(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip('a CUDA GPU is present')
    result = run(['nnunet-ext', 'demo', '--root', str(tmp_path / 'demo'), '--device', 'cuda'], dict(os.environ),
                 check=False)
    assert result.returncode == 2 and 'PyTorch sees no CUDA GPU' in result.stderr
    assert not os.path.exists(tmp_path / 'demo')
