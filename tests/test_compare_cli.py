"""``nnunet-ext compare`` end to end: the tiny 2D phantom planned by the stock command (shared with the
stock-CLI tests, ``stock_phantoms``, whose other trainers' results the report must leave out: ``-tr``),
nnUNetTrainer and nnUNetTrainerGODCOnly trained on fold 0 (test-sized; two validation cases: the phantom has
ten training cases), then the console script on folds 0 1 (fold 1 was never trained: it must be reported).
The numbers are checked against Dice computed here with numpy from the arrays of the validation folders and
gt_segmentations (and against nnU-Net's own validation summary), the Wilcoxon p against scipy on the same
pairs, the plots as PNG files."""
from __future__ import annotations

import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.stats import wilcoxon

from cli_helpers import SHORT_TRAINING, run, run_parallel

pytestmark = pytest.mark.cli

OTHER = 'nnUNetTrainerGODCOnly'  # trained on the shared phantom by no other test
TRAINERS = ('nnUNetTrainer', OTHER)
FOLDS = (0,)  # trained; compare also asks for fold 1
CLASSES = {'liver': 1, 'tumour': 2}
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'

# nnU-Net's own trainer reads no training-length variable: train it through nnU-Net's Python API (what
# nnUNetv2_train runs: get_trainer_from_args -> run_training -> perform_actual_validation) for the same
# test-sized length as our trainers get from SHORT_TRAINING
TRAIN_NNUNET_TRAINER = """
import sys, torch
from nnunetv2.run.run_training import get_trainer_from_args
if __name__ == '__main__':
    trainer = get_trainer_from_args(sys.argv[1], sys.argv[2], int(sys.argv[3]), 'nnUNetTrainer',
                                    device=torch.device('cpu'))
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, 3, 2
    trainer.run_training()
    trainer.perform_actual_validation(False)
"""


def _train_command(dataset_id: int, trainer: str, fold: int):
    if trainer == 'nnUNetTrainer':
        return [sys.executable, '-c', TRAIN_NNUNET_TRAINER, str(dataset_id), '2d', str(fold)]
    return ['nnUNetv2_train', str(dataset_id), '2d', str(fold), '-tr', trainer, '-device', 'cpu']


@pytest.fixture(scope='module')
def compared(stock_phantoms):
    env, dataset_id, dataset = (stock_phantoms['2d'][k] for k in ('env', 'dataset_id', 'dataset'))
    # one export worker for the final validation (two cases): spawning a second costs ~8 s of imports
    run_parallel([_train_command(dataset_id, t, f) for t in TRAINERS for f in FOLDS],
                 {**env, **SHORT_TRAINING, 'nnUNet_n_proc_DA': '0', 'nnUNet_def_n_proc': '1'})
    with ThreadPoolExecutor(max_workers=2) as pool:  # independent: the report, and a user error
        report = pool.submit(run, ['nnunet-ext', 'compare', str(dataset_id), '-c', '2d', '-tr', *TRAINERS, '-f', '0',
                                   '1', '--no_pbar'], env)
        refused = pool.submit(run, ['nnunet-ext', 'compare', str(dataset_id), '-c', '3d_fullres', '--no_pbar'], env,
                              False)
        result, refused = report.result(), refused.result()
    out = os.path.join(env['nnUNet_results'], dataset, 'compare_2d')
    with open(os.path.join(out, 'compare.json'), encoding='utf-8') as f:
        content = json.load(f)
    return dict(env=env, dataset=dataset, result=result, refused=refused, out=out, content=content)


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def _dice(pred, ref):
    total = pred.sum() + ref.sum()
    return float('nan') if total == 0 else 2.0 * np.logical_and(pred, ref).sum() / total


def _own_dice(compared):
    """{trainer: {class: {(fold, case): Dice}}} from the validation predictions and gt_segmentations."""
    env, dataset = compared['env'], compared['dataset']
    references = os.path.join(env['nnUNet_preprocessed'], dataset, 'gt_segmentations')
    out = {}
    for trainer in TRAINERS:
        out[trainer] = {name: {} for name in CLASSES}
        for fold in FOLDS:
            validation = os.path.join(env['nnUNet_results'], dataset, f'{trainer}__nnUNetPlans__2d', f'fold_{fold}',
                                      'validation')
            files = sorted(f for f in os.listdir(validation) if f.endswith('.nii.gz'))
            assert files, validation
            for file in files:
                pred, ref = _read(os.path.join(validation, file)), _read(os.path.join(references, file))
                for name, label in CLASSES.items():
                    out[trainer][name][(fold, file[:-len('.nii.gz')])] = _dice(pred == label, ref == label)
    return out


def test_missing_fold_is_reported(compared):
    stderr = compared['result'].stderr
    for trainer in TRAINERS:
        assert re.search(rf'{trainer} fold 1: missing \(no folder', stderr), stderr
        assert f'{trainer} fold 1: missing' in '\n'.join(compared['content']['problems'])
    assert len(compared['content']['problems']) == 2, compared['content']['problems']
    markdown = open(os.path.join(compared['out'], 'report.md'), encoding='utf-8').read()
    assert f'{OTHER} fold 1: missing' in markdown
    assert re.search(r'^\| nnUNetTrainer \| liver \| [\d.]+ \| missing \|', markdown, re.M), markdown


def test_user_error_exit_code_and_nothing_written(compared):
    refused = compared['refused']
    assert refused.returncode == 2 and 'Traceback' not in refused.stderr, refused.stderr
    assert 'nnunet-ext compare: error: no trainer folder *__nnUNetPlans__3d_fullres' in refused.stderr
    results = os.path.join(compared['env']['nnUNet_results'], compared['dataset'])
    assert sorted(n for n in os.listdir(results) if n.startswith(('compare', '.'))) == ['compare_2d']


def test_report_numbers_equal_own_per_case_dice(compared):
    own, content = _own_dice(compared), compared['content']
    markdown = open(os.path.join(compared['out'], 'report.md'), encoding='utf-8').read()
    assert compared['result'].stdout.strip().startswith('| trainer | class |')
    for trainer in TRAINERS:
        summary = os.path.join(compared['env']['nnUNet_results'], compared['dataset'], f'{trainer}__nnUNetPlans__2d')
        for name, label in CLASSES.items():
            expected = own[trainer][name]
            got = {(c['fold'], c['case']): c['metrics'][name]['Dice'] for c in content['per_case']
                   if c['trainer'] == trainer}
            assert got.keys() == expected.keys() and len(got) == 2
            for key, value in expected.items():
                assert (got[key] is None) if np.isnan(value) else got[key] == pytest.approx(value, rel=1e-9)
                # nnU-Net's own validation summary of that fold says the same
                with open(os.path.join(summary, f'fold_{key[0]}', 'validation', 'summary.json')) as f:
                    nnunet = next(c for c in json.load(f)['metric_per_case']
                                  if c['reference_file'].endswith(f'{key[1]}.nii.gz'))
                assert np.isclose(nnunet['metrics'][str(label)]['Dice'], value, equal_nan=True)
            values = np.array([v for v in expected.values() if not np.isnan(v)])
            stats = content['per_trainer'][trainer]['per_class'][name]['Dice']
            assert stats['mean'] == pytest.approx(values.mean()) and stats['std'] == pytest.approx(values.std())
            cell = re.search(rf'^\| {trainer} \| {name} \| 0 \| 2 \| ([\d.]+) ± ([\d.]+)', markdown, re.M)
            assert cell, markdown
            assert (float(cell.group(1)), float(cell.group(2))) == (round(values.mean(), 4), round(values.std(), 4))
            assert f'| {trainer} | {name} | 0 | 2 | {cell.group(1)} ± {cell.group(2)}' in compared['result'].stdout


def test_wilcoxon_equals_scipy_on_own_pairs(compared):
    own, tests = _own_dice(compared), compared['content']['wilcoxon']['tests'][OTHER]
    tested = 0
    for name in CLASSES:
        keys = sorted(k for k in own['nnUNetTrainer'][name] if not np.isnan(own['nnUNetTrainer'][name][k])
                      and not np.isnan(own[OTHER][name].get(k, np.nan)))
        x = [own[OTHER][name][k] for k in keys]
        y = [own['nnUNetTrainer'][name][k] for k in keys]
        assert tests[name]['n_pairs'] == len(keys)
        if np.any(np.subtract(x, y) != 0):
            assert tests[name]['p'] == pytest.approx(float(wilcoxon(x, y).pvalue), rel=1e-12)
            tested += 1
        else:
            assert tests[name]['p'] is None and tests[name]['note']
    markdown = open(os.path.join(compared['out'], 'report.md'), encoding='utf-8').read()
    assert '## Wilcoxon signed-rank test of per-case Dice against nnUNetTrainer' in markdown
    assert tested or all(t['note'] for t in tests.values())


def test_report_files_and_plots(compared):
    out = compared['out']
    assert sorted(os.listdir(out)) == ['compare.json', 'dice_boxplot.png', 'report.html', 'report.md',
                                       'training_curves.png']
    from PIL import Image
    for name in ('dice_boxplot.png', 'training_curves.png'):
        with open(os.path.join(out, name), 'rb') as f:
            assert f.read(8) == PNG_SIGNATURE
        with Image.open(os.path.join(out, name)) as image:
            image.load()
            assert image.width > 200 and image.height > 200
    html = open(os.path.join(out, 'report.html'), encoding='utf-8').read()
    assert html.startswith('<!DOCTYPE html>') and html.count('data:image/png;base64,') == 2
    curves = compared['content']['curves']
    for trainer in TRAINERS:  # one epoch each: one value per curve, from checkpoint_final.pth
        assert sorted(curves[trainer]) == ['0']
        assert all(len(curves[trainer]['0'][k]) == 1 for k in ('train_losses', 'val_losses', 'ema_fg_dice'))
        assert curves[trainer]['0']['checkpoint'].endswith('checkpoint_final.pth')
