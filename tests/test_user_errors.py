"""No traceback for a user's mistake, anywhere in ``nnunet-ext``: every subcommand x every kind of bad
argument, path, id, option value and environment gives one ``error:`` line on stderr, a non-zero exit
status, and leaves nothing in ``nnUNet_raw`` or the output folder. In-process (``nnunet_ext.cli.main``, as
the console script calls it; an exception escaping ``main`` is the traceback a user would see), one table.
The oracle is the observable behaviour; the subprocess-level checks of the same promise are in the
per-command tests (``assert_refused``)."""
from __future__ import annotations


import nibabel as nib
import numpy as np
import pytest

from cli_helpers import refused_in_process

MISSING, FILE, EMPTY, EMPTY2, OUT = '{missing}', '{file}', '{empty}', '{empty2}', '{out}'
CONVERT = ['lits', 'ircadb', 'nih-pancreas', 'chaos', 'msd', 'folder2d']
SOURCE_OPTIONS = {'chaos': ['--modality', 'CT']}


def _convert(source, where, *extra):
    return ['convert', source, where, '--id', '520', *SOURCE_OPTIONS.get(source, []), *extra]


CASES = {
    # plan: ids and planners
    'plan unknown dataset': ['plan', '987', '-pl', 'ExperimentPlanner'],
    'plan non-numeric id': ['plan', 'abc', '-pl', 'ExperimentPlanner'],
    'plan unknown planner': ['plan', '987', '-pl', 'NoSuchPlanner'],
    # evaluate: folders, files, options, dataset ids
    'evaluate missing folders': ['evaluate', MISSING, EMPTY],
    'evaluate file for a folder': ['evaluate', FILE, EMPTY],
    'evaluate empty folders': ['evaluate', EMPTY, EMPTY2],
    'evaluate -np 0': ['evaluate', EMPTY, EMPTY2, '-np', '0'],
    'evaluate unknown dataset': ['evaluate', EMPTY, EMPTY2, '-d', '987'],
    'evaluate bad labels': ['evaluate', EMPTY, EMPTY2, '--labels', 'x'],
    # compare
    'compare unknown dataset': ['compare', '987', '-c', '2d'],
    'compare non-numeric dataset': ['compare', 'Dataset987_Nothing', '-c', '2d'],
    # cascade-predict
    'cascade missing input': ['cascade-predict', '-i', MISSING, '-o', OUT, '--coarse_masks', EMPTY,
                              '--fine', '987', '3d_fullres', 'nnUNetTrainer'],
    'cascade unknown fine model': ['cascade-predict', '-i', EMPTY, '-o', OUT, '--coarse_masks', EMPTY2,
                                   '--fine', '987', '3d_fullres', 'nnUNetTrainer'],
    'cascade bad margin': ['cascade-predict', '-i', EMPTY, '-o', OUT, '--coarse_masks', EMPTY2,
                           '--fine', '987', '3d_fullres', 'nnUNetTrainer', '--margin', '-5'],
    # fuse-views
    'fuse missing folder': ['fuse-views', '-i', MISSING, EMPTY, '-o', OUT],
    'fuse empty folders': ['fuse-views', '-i', EMPTY, EMPTY2, '-o', OUT],
    'fuse one view': ['fuse-views', '-i', EMPTY, '-o', OUT],
    # prune
    'prune missing model': ['prune', MISSING, '--level', '1', '-o', OUT],
    'prune empty model folder': ['prune', EMPTY, '--level', '1', '-o', OUT],
    'prune file as model': ['prune', FILE, '--level', '0', '-o', OUT],
    # stack-slices and preprocess-images
    'stack missing source': ['stack-slices', MISSING, '--id', '521'],
    'stack empty source': ['stack-slices', EMPTY, '--id', '521'],
    'stack even slices': ['stack-slices', EMPTY, '--id', '521', '--slices', '2'],
    'stack bad id': ['stack-slices', EMPTY, '--id', '1000'],
    'preprocess missing input': ['preprocess-images', MISSING, OUT],
    'preprocess unknown dataset': ['preprocess-images', EMPTY, OUT, '-d', '987'],
    'preprocess bad window': ['preprocess-images', EMPTY, OUT, '--window', '5', '1'],
    # (evaluate's and compare's -np is checked by their own table tests, test_evaluate_cli.py / test_compare.py)
    # convert: every source with a missing, a file and an empty input; the common options' bad values
    **{f'convert {s} missing input': _convert(s, MISSING) for s in CONVERT},
    **{f'convert {s} file as input': _convert(s, FILE) for s in CONVERT},
    **{f'convert {s} empty input': _convert(s, EMPTY) for s in CONVERT},
    'convert id 0': ['convert', 'lits', EMPTY, '--id', '0'],
    'convert id 1000': ['convert', 'lits', EMPTY, '--id', '1000'],
    'convert bad name': ['convert', 'lits', EMPTY, '--id', '520', '--name', 'bad name'],
    'convert -np 0': ['convert', 'lits', '{lits}', '--id', '520', '-np', '0'],
    'convert -np x': ['convert', 'lits', '{lits}', '--id', '520', '-np', 'x'],
    'stack -np 0': ['stack-slices', EMPTY, '--id', '521', '-np', '0'],
    'fuse -np 0': ['fuse-views', '-i', EMPTY, EMPTY2, '-o', OUT, '-np', '0'],
    'plan negative memory target': ['plan', '987', '-pl', 'ExperimentPlanner', '-gpu_memory_target', '-1'],
    'plan -np 0': ['plan', '987', '-pl', 'ExperimentPlanner', '-np', '0'],
    'convert reversed window': ['convert', 'lits', EMPTY, '--id', '520', '--window', '100', '-100'],
    'convert crop to an unknown label': ['convert', 'lits', EMPTY, '--id', '520', '--crop-to-label', 'nosuch'],
    'convert folder2d unknown preset': ['convert', 'folder2d', EMPTY, '--id', '520', '--preset', 'nosuch'],
    # study: the spec file and what it names
    'study plan missing spec': ['study', 'plan', MISSING],
    'study run a file that is not TOML': ['study', 'run', FILE],
    'study plan unknown dataset': ['study', 'plan', '{spec}'],
    'study status unknown dataset': ['study', 'status', '{spec}'],
    'study init over an existing file': ['study', 'init', FILE, '-d', '987', '-tr', 'nnUNetTrainerGODC'],
    'study init into a missing folder': ['study', 'init', MISSING + '/s.toml', '-d', '987', '-tr', 'X'],
    'study init bad fold': ['study', 'init', OUT + '.toml', '-d', '987', '-tr', 'X', '-f', 'one'],
    # export and deploy-predict
    'export missing model': ['export', MISSING, '-o', OUT],
    'export empty model folder': ['export', EMPTY, '-o', OUT],
    'export file as model': ['export', FILE, '-o', OUT],
    'export unknown dataset': ['export', '-d', '987', '-c', '2d', '-o', OUT],
    'export bad opset': ['export', EMPTY, '-o', OUT, '--opset', '0'],
    'export bad prune level': ['export', EMPTY, '-o', OUT, '--prune-level', 'x'],
    'deploy missing export': ['deploy-predict', MISSING, '-i', EMPTY, '-o', OUT],
    'deploy empty export folder': ['deploy-predict', EMPTY, '-i', EMPTY2, '-o', OUT],
    'deploy model.json not JSON': ['deploy-predict', '{badjson}', '-i', EMPTY, '-o', OUT],
    'deploy bad step size': ['deploy-predict', EMPTY, '-i', EMPTY2, '-o', OUT, '--step-size', '2'],
    'deploy -threads 0': ['deploy-predict', EMPTY, '-i', EMPTY2, '-o', OUT, '--threads', '0'],
    # argparse's own refusals: usage and one error line, status 2
    'unknown subcommand': ['nosuchcommand'],
    'missing required option': ['convert', 'lits', EMPTY],
}

ENVIRONMENT_CASES = {  # the environment a user forgot to set
    'convert without nnUNet_raw': (['convert', 'lits', EMPTY, '--id', '520'], 'nnUNet_raw'),
    'stack-slices without nnUNet_raw': (['stack-slices', EMPTY, '--id', '521'], 'nnUNet_raw'),
    'compare without nnUNet_results': (['compare', '987', '-c', '2d'], 'nnUNet_results'),
    'plan without nnUNet_preprocessed': (['plan', '987', '-pl', 'ExperimentPlanner'], 'nnUNet_preprocessed'),
    'study without nnUNet_raw': (['study', 'plan', '{spec}'], 'nnUNet_raw'),
    'export without nnUNet_results': (['export', '-d', '987', '-c', '2d', '-o', OUT], 'nnUNet_results'),
}


@pytest.fixture
def places(tmp_path, monkeypatch):
    for name in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    (tmp_path / 'a_file.txt').write_text('not what was expected')
    for name in ('empty', 'empty2'):
        (tmp_path / name).mkdir()
    lits = tmp_path / 'lits'  # a valid LiTS source: only the option is wrong
    lits.mkdir()
    for number in (0, 1):
        label = np.zeros((8, 8, 4), np.uint8)
        label[2:5, 2:5, 1:3] = 1
        nib.save(nib.Nifti1Image(label.astype(np.int16) * 100, np.eye(4)), str(lits / f'volume-{number}.nii.gz'))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(lits / f'segmentation-{number}.nii.gz'))
    (tmp_path / 'badjson').mkdir()
    (tmp_path / 'badjson' / 'model.json').write_text('{not json')
    (tmp_path / 's.toml').write_text('[data]\ndatasets = [987]\n[trainers]\ncompare = ["nnUNetTrainerGODC"]\n')
    return {'spec': str(tmp_path / 's.toml'), 'badjson': str(tmp_path / 'badjson'),
            'lits': str(lits), 'missing': str(tmp_path / 'does_not_exist'), 'file': str(tmp_path / 'a_file.txt'),
            'empty': str(tmp_path / 'empty'), 'empty2': str(tmp_path / 'empty2'), 'out': str(tmp_path / 'out')}


@pytest.mark.parametrize('name', sorted(CASES))
def test_a_users_mistake_is_one_line_never_a_traceback(name, places, capsys, tmp_path):
    argv = [a.format(**places) for a in CASES[name]]
    refused_in_process(capsys, argv, str(tmp_path), may_appear=['out'])


@pytest.mark.parametrize('name', sorted(ENVIRONMENT_CASES))
def test_a_missing_environment_variable_is_named(name, places, capsys, tmp_path, monkeypatch):
    argv, variable = ENVIRONMENT_CASES[name]
    monkeypatch.delenv(variable)
    line = refused_in_process(capsys, [a.format(**places) for a in argv], str(tmp_path), may_appear=['out'])
    assert variable in line
