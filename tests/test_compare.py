"""``nnunet_ext.evaluation.compare`` without training: a fabricated ``nnUNet_results`` tree (small NIfTI
label maps, nnU-Net's folder layout, checkpoints holding only a ``'logging'`` entry), the paired test
against scipy, the report against per-case Dice computed here with numpy; a table of bad inputs (the tree
broken by hand) through ``nnunet-ext compare`` in-process: one error line, exit status 2, nothing written
(``test_evaluate_cli.refused``)."""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.stats import wilcoxon

from nnunet_ext.errors import UserInputError
from nnunet_ext.evaluation.compare import REPORT_FILES, compare, default_output_folder, write_report
from nnunet_ext.evaluation.paired_test import paired_wilcoxon
from nnunet_ext.evaluation.report import markdown_table

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
DATASET = 'Dataset321_CompareToy'
SHAPE = (1, 20, 24)
CASES = [f'case_{i}' for i in range(6)]
SPLITS = [{'train': [], 'val': ['case_0', 'case_3']}, {'train': [], 'val': ['case_1', 'case_4']},
          {'train': [], 'val': ['case_2', 'case_5']}]


# --- the paired test ------------------------------------------------------------------------------------------------

def test_paired_wilcoxon_equals_scipy_on_the_common_defined_pairs():
    rng = np.random.default_rng(1)
    reference = {('0', f'c{i}'): float(v) for i, v in enumerate(rng.uniform(0.5, 0.9, 12))}
    other = {k: v + float(rng.normal(0.03, 0.05)) for k, v in reference.items()}
    other[('0', 'c3')] = math.nan               # undefined for one trainer: not a pair
    other[('1', 'only_other')] = 0.7            # evaluated for one trainer only: not a pair
    other[('0', 'c5')] = reference[('0', 'c5')]  # a zero difference: dropped by zero_method='wilcox'
    keys = [k for k in reference if k != ('0', 'c3')]
    result = paired_wilcoxon(reference, other)
    expected = wilcoxon([other[k] for k in keys], [reference[k] for k in keys])
    assert result['n_pairs'] == 11 and result['n_nonzero'] == 10
    assert result['p'] == pytest.approx(float(expected.pvalue), rel=1e-12)
    assert result['statistic'] == pytest.approx(float(expected.statistic))
    d = np.array([other[k] - reference[k] for k in keys])
    assert result['mean_difference'] == pytest.approx(d.mean()) and result['median_difference'] == pytest.approx(
        np.median(d))
    assert result['note'] is None


def test_paired_wilcoxon_without_a_test_says_why():
    same = {('0', 'a'): 0.5, ('0', 'b'): 0.7}
    result = paired_wilcoxon(same, dict(same))
    assert result['p'] is None and result['n_pairs'] == 2 and 'all 2 paired differences are zero' in result['note']
    result = paired_wilcoxon({('0', 'a'): 0.5}, {('1', 'a'): 0.5, ('0', 'a'): math.nan})
    assert result['p'] is None and result['n_pairs'] == 0 and 'no case' in result['note']
    # two non-zero differences: scipy's exact p (0.5), and the note that it cannot be small
    result = paired_wilcoxon({'a': 0.5, 'b': 0.6}, {'a': 0.7, 'b': 0.9})
    assert result['p'] == pytest.approx(0.5) and 'cannot be below 0.5' in result['note']


# --- a fabricated results tree --------------------------------------------------------------------------------------

def _write(path, array):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing((0.7, 0.9, 1.0))
    sitk.WriteImage(image, path)


def _reference(i):
    ref = np.zeros(SHAPE, np.uint8)
    ref[0, 3:15, 4:18 - i] = 1
    ref[0, 6:9 + i % 2, 7:10] = 2
    return ref


def _prediction(i, shift):
    pred = np.zeros(SHAPE, np.uint8)
    pred[0, 3 + shift:15, 5:18 - i + shift] = 1
    if i % 3:
        pred[0, 6:9, 7 + shift:11] = 2
    return pred


def _checkpoint(path, epochs, offset):
    logging = {'train_losses': [1.0 - 0.1 * e - offset for e in range(epochs)],
               'val_losses': [1.1 - 0.1 * e - offset for e in range(epochs)],
               'mean_fg_dice': [0.1 * e + offset for e in range(epochs)],
               'ema_fg_dice': [0.05 * e + offset for e in range(epochs)],
               'dice_per_class_or_region': [[0.1, 0.2]] * epochs, 'lrs': [0.01] * epochs,
               'epoch_start_timestamps': [0.0] * epochs, 'epoch_end_timestamps': [1.0] * epochs}
    torch.save({'logging': logging, 'trainer_name': 'x'}, path)


# trainer -> fold -> (shift of the predictions, cases left out of the validation folder, checkpoint or None)
TREE = {'nnUNetTrainer': {0: (0, (), 'checkpoint_final.pth'), 1: (0, (), 'checkpoint_final.pth'),
                          2: (0, (), 'checkpoint_final.pth')},
        'nnUNetTrainerGODC': {0: (1, (), 'checkpoint_final.pth'), 1: (1, ('case_4',), 'checkpoint_latest.pth'),
                              2: (2, (), None)}}


@pytest.fixture
def tree(tmp_path, monkeypatch):
    raw, pre, res = tmp_path / 'raw', tmp_path / 'pre', tmp_path / 'res'
    for variable, folder in (('nnUNet_raw', raw), ('nnUNet_preprocessed', pre), ('nnUNet_results', res)):
        (folder / DATASET).mkdir(parents=True)
        monkeypatch.setenv(variable, str(folder))
    (raw / DATASET / 'dataset.json').write_text(json.dumps(
        {'channel_names': {'0': 'CT'}, 'labels': {'background': 0, 'liver': 1, 'tumour': 2}, 'numTraining': 6,
         'file_ending': '.nii.gz'}))
    (pre / DATASET / 'gt_segmentations').mkdir()
    (pre / DATASET / 'splits_final.json').write_text(json.dumps(SPLITS))
    for i, case in enumerate(CASES):
        _write(str(pre / DATASET / 'gt_segmentations' / f'{case}.nii.gz'), _reference(i))
    for trainer, folds in TREE.items():
        for fold, (shift, left_out, checkpoint) in folds.items():
            folder = res / DATASET / f'{trainer}__nnUNetPlans__2d' / f'fold_{fold}'
            (folder / 'validation').mkdir(parents=True)
            for case in SPLITS[fold]['val']:
                if case not in left_out:
                    _write(str(folder / 'validation' / f'{case}.nii.gz'), _prediction(CASES.index(case), shift))
            (folder / 'validation' / 'summary.json').write_text('{}')
            if checkpoint:
                _checkpoint(str(folder / checkpoint), 3 + fold, 0.1 * shift)
    return tmp_path


def _dice(pred, ref):
    """Independent Dice: NaN when both are empty."""
    total = pred.sum() + ref.sum()
    return float('nan') if total == 0 else 2.0 * np.logical_and(pred, ref).sum() / total


def _expected_dice(trainer, folds, label):
    """{(fold, case): Dice} from the arrays of the fabricated tree."""
    out = {}
    for fold in folds:
        shift, left_out, _ = TREE[trainer][fold]
        for case in SPLITS[fold]['val']:
            if case not in left_out:
                i = CASES.index(case)
                out[(fold, case)] = _dice(_prediction(i, shift) == label, _reference(i) == label)
    return out


def test_compare_report_numbers_plots_and_missing_items(tree):
    lines = []
    result = compare('321', '2d', folds=[0, 1, 2, 3], num_processes=1, progress=False, log=lines.append)
    content = result.content
    assert content['trainers'] == ['nnUNetTrainer', 'nnUNetTrainerGODC'] and content['dataset'] == DATASET
    problems = '\n'.join(content['problems'])
    # everything missing is named: fold 3 of both, the left-out case, the unfinished and the checkpoint-less fold
    assert 'nnUNetTrainer fold 3: missing' in problems and 'nnUNetTrainerGODC fold 3: missing' in problems
    assert 'nnUNetTrainerGODC fold 1: validation predictions missing for 1 of 2' in problems and 'case_4' in problems
    assert 'nnUNetTrainerGODC fold 1: training unfinished' in problems
    assert 'nnUNetTrainerGODC fold 2: no checkpoint' in problems
    assert all(any(p in line for line in lines) for p in content['problems'])

    for trainer in TREE:
        for name, label in (('liver', 1), ('tumour', 2)):
            expected = _expected_dice(trainer, [0, 1, 2], label)
            got = {(c['fold'], c['case']): c['metrics'][name]['Dice'] for c in content['per_case']
                   if c['trainer'] == trainer}
            assert got.keys() == expected.keys()
            for key, value in expected.items():
                assert got[key] == pytest.approx(value, rel=1e-12), (trainer, name, key)
            values = np.array(list(expected.values()))
            stats = content['per_trainer'][trainer]['per_class'][name]['Dice']
            assert stats['mean'] == pytest.approx(values.mean()) and stats['std'] == pytest.approx(values.std())
            fold_means = [np.mean([v for (f, _), v in expected.items() if f == fold]) for fold in (0, 1, 2)]
            fold_dice = content['per_trainer'][trainer]['fold_dice'][name]
            assert [fold_dice['per_fold'][str(f)] for f in (0, 1, 2)] == pytest.approx(fold_means)
            assert fold_dice['mean_over_folds'] == pytest.approx(np.mean(fold_means))
    # the tumour is missed on some cases (Dice 0), so the tumour differences include zeros
    for name, label in (('liver', 1), ('tumour', 2)):
        reference = _expected_dice('nnUNetTrainer', [0, 1, 2], label)
        other = _expected_dice('nnUNetTrainerGODC', [0, 1, 2], label)
        keys = sorted(reference.keys() & other.keys())
        x, y = [other[k] for k in keys], [reference[k] for k in keys]
        test = content['wilcoxon']['tests']['nnUNetTrainerGODC'][name]
        assert test['n_pairs'] == len(keys) == 5
        if np.any(np.subtract(x, y) != 0):
            assert test['p'] == pytest.approx(float(wilcoxon(x, y).pvalue), rel=1e-12)
        else:
            assert test['p'] is None and 'zero' in test['note']
    curves = content['curves']
    assert sorted(curves['nnUNetTrainer']) == ['0', '1', '2'] and sorted(curves['nnUNetTrainerGODC']) == ['0', '1']
    assert curves['nnUNetTrainerGODC']['1']['train_losses'] == pytest.approx([0.9, 0.8, 0.7, 0.6])

    out = default_output_folder(DATASET, '2d', 'nnUNetPlans')
    assert out == os.path.join(os.environ['nnUNet_results'], DATASET, 'compare_2d')
    files = write_report(result, out)
    assert sorted(os.listdir(out)) == sorted(REPORT_FILES.values())
    for kind in ('boxplot', 'curves'):
        with open(files[kind], 'rb') as f:
            assert f.read(8) == PNG_SIGNATURE
        from PIL import Image
        with Image.open(files[kind]) as image:
            image.verify()
    markdown = open(files['markdown'], encoding='utf-8').read()
    for trainer in TREE:
        values = np.array(list(_expected_dice(trainer, [0, 1, 2], 1).values()))
        row = re.search(rf'^\| {trainer} \| liver \| 0 1 2 \| (\d+) \| ([\d.]+) ± ([\d.]+) \|', markdown, re.M)
        assert row, markdown
        assert int(row.group(1)) == len(values)
        assert (float(row.group(2)), float(row.group(3))) == (round(values.mean(), 4), round(values.std(), 4))
    assert '| fold 3 |' in markdown and 'missing' in markdown and '![Per-case Dice](dice_boxplot.png)' in markdown
    html = open(files['html'], encoding='utf-8').read()
    assert html.count('data:image/png;base64,') == 2 and 'nnUNetTrainerGODC fold 3: missing' in html
    with open(files['json'], encoding='utf-8') as f:
        assert json.load(f)['per_case'] == json.loads(json.dumps(content['per_case']))

    # a second run replaces the report; a folder with other content is refused and left alone
    write_report(result, out)
    assert sorted(os.listdir(out)) == sorted(REPORT_FILES.values())
    foreign = tree / 'foreign'
    foreign.mkdir()
    (foreign / 'notes.txt').write_text('mine')
    with pytest.raises(UserInputError, match='not a previous compare report'):
        write_report(result, str(foreign))
    assert os.listdir(foreign) == ['notes.txt']
    assert not [n for n in os.listdir(tree) if n.startswith('.')]


@pytest.mark.parametrize('hd95', ['pooled', 'max'])
def test_hd95_definition_is_applied_and_recorded(tree, hd95):
    from test_metrics import oracle  # brute force: surfaces and distances by loops over voxels
    content = compare(DATASET, '2d', trainers=['nnUNetTrainerGODC'], folds=[0], num_processes=1, progress=False,
                      log=lambda line: None, hd95=hd95).content
    assert content['hd95'] == hd95 and ('MONAI' if hd95 == 'max' else 'MedPy') in content['conventions']['HD95']
    shift = TREE['nnUNetTrainerGODC'][0][0]
    for c in content['per_case']:
        i = CASES.index(c['case'])
        expected = oracle(_prediction(i, shift) == 1, _reference(i) == 1, c['spacing'], hd95=hd95)['HD95']
        assert c['metrics']['liver']['HD95'] == pytest.approx(expected, rel=1e-9)
    with pytest.raises(UserInputError, match='--hd95'):
        compare(DATASET, '2d', folds=[0], num_processes=1, progress=False, log=lambda line: None, hd95='mean')


def test_reference_absent_and_trainer_without_folds(tree):
    result = compare(DATASET, '2d', trainers=['nnUNetTrainerGODC'], folds=[0], num_processes=1, progress=False,
                     log=lambda line: None)
    assert 'nnUNetTrainer is not among the compared trainers' in result.content['wilcoxon']['skipped']
    from nnunet_ext.evaluation.report import render_report
    assert 'no paired tests' in render_report(result.content, REPORT_FILES)['markdown']
    with pytest.raises(UserInputError, match=r'nnUNetTrainerDoesNotExist.*nnUNetTrainer, nnUNetTrainerGODC'):
        compare(DATASET, '2d', trainers=['nnUNetTrainer', 'nnUNetTrainerDoesNotExist'], folds=[0], num_processes=1,
                progress=False, log=lambda line: None)
    with pytest.raises(UserInputError, match='no trainer folder'):
        compare(DATASET, '3d_fullres', num_processes=1, progress=False, log=lambda line: None)
    with pytest.raises(UserInputError, match='no validation predictions to evaluate for nnUNetTrainer'):
        compare(DATASET, '2d', folds=[4], num_processes=1, progress=False, log=lambda line: None)


def test_markdown_table_escapes_pipes():
    assert markdown_table((['a', 'b'], [['x|y', '1']])) == '| a | b |\n|---|---|\n| x\\|y | 1 |'


# --- what is refused: through the command, one line on stderr, exit status 2, nothing written -----------------------

def _fold(tree, trainer='nnUNetTrainer', fold=0):
    return tree / 'res' / DATASET / f'{trainer}__nnUNetPlans__2d' / f'fold_{fold}'


def _gt(tree, case='case_0'):
    return tree / 'pre' / DATASET / 'gt_segmentations' / f'{case}.nii.gz'


def _replace(path, content):
    """``path`` (a file or folder) replaced by a file holding ``content``, or by an empty folder (None)."""
    if os.path.isdir(path):
        import shutil
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)
    if content is None:
        os.makedirs(path)
    else:
        with open(path, 'wb') as f:
            f.write(content if isinstance(content, bytes) else content.encode())


def _truncated(path):
    """``path`` rewritten as noise (long enough to cut inside its deflate stream), then cut in half;
    returns the length left."""
    _write(str(path), np.random.default_rng(5).integers(0, 3, SHAPE))
    data = open(path, 'rb').read()
    _replace(path, data[:len(data) // 2])
    return len(data) // 2


def _env(monkeypatch, variable):
    monkeypatch.delenv(variable)
    return []


#: name -> (break the tree and return the arguments after `compare 321 -c 2d` or None, regex the message must match)
BAD_COMPARE = {
    'unknown dataset': (lambda t, m: ['--dataset', '555'],
                        r'^dataset 555: no dataset 555 in \$nnUNet_raw, \$nnUNet_preprocessed or \$nnUNet_results '
                        rf'\(datasets there: {DATASET}\)'),
    'nnUNet_raw not set': (lambda t, m: _env(m, 'nnUNet_raw'), r'^nnUNet_raw is not set; run: eval'),
    'nnUNet_results not set': (lambda t, m: _env(m, 'nnUNet_results'), r'^nnUNet_results is not set; run: eval'),
    'no raw dataset.json': (lambda t, m: os.remove(t / 'raw' / DATASET / 'dataset.json'),
                            rf'^dataset {DATASET}: \S+/raw/{DATASET}/dataset.json does not exist'),
    'raw dataset.json without labels': (lambda t, m: _replace(t / 'raw' / DATASET / 'dataset.json',
                                                              '{"file_ending": ".nii.gz"}'),
                                        r"^\S+/dataset.json has no 'labels' entry"),
    'no trainer folder for the configuration': (lambda t, m: ['-c', '3d_fullres'],
                                                r'^no trainer folder \*__nnUNetPlans__3d_fullres in \S+; train first'),
    'no trainer folder for the plans': (lambda t, m: ['-p', 'nnUNetPlansX'],
                                        r'^no trainer folder \*__nnUNetPlansX__2d in'),
    'a trainer folder without folds': (
        lambda t, m: (os.makedirs(t / 'res' / DATASET / 'nnUNetTrainerX__nnUNetPlans__2d'),
                      ['-tr', 'nnUNetTrainer', 'nnUNetTrainerX'])[-1],
        r'^no validation predictions to evaluate for nnUNetTrainerX in folds 0 1 2 3 4 \(nnUNetTrainerX fold 0: '
        r'missing \(no folder'),
    'only folds that do not exist': (lambda t, m: ['-f', '4'],
                                     r'^no validation predictions to evaluate for nnUNetTrainer, nnUNetTrainerGODC in '
                                     r'folds 4 '),
    'folds without validation predictions': (
        lambda t, m: ([_replace(_fold(t, 'nnUNetTrainerGODC', f) / 'validation', b'') for f in (0, 1, 2)],
                      ['-f', '0', '1', '2'])[-1],
        r'^no validation predictions to evaluate for nnUNetTrainerGODC in folds 0 1 2 \(nnUNetTrainerGODC fold 0: no '
        r'validation predictions \(no folder'),
    'no gt_segmentations': (lambda t, m: _replace(t / 'pre' / DATASET / 'gt_segmentations', b''),
                            r'^\S+/gt_segmentations does not exist \(nnUNetv2_plan_and_preprocess writes it'),
    'empty gt_segmentations': (lambda t, m: [os.remove(_gt(t, c)) for c in CASES] and None,
                               r'^\S+/gt_segmentations holds no .nii.gz file \(nnUNetv2_plan_and_preprocess writes'),
    'no reference for the predictions of a fold': (
        lambda t, m: ([os.remove(_gt(t, c)) for c in ('case_0', 'case_3')], ['-tr', 'nnUNetTrainer', '-f', '0'])[-1],
        r'^no validation predictions to evaluate for nnUNetTrainer in folds 0 \(nnUNetTrainer fold 0: not evaluated, '
        r'no reference in gt_segmentations: case_0, case_3\)'),
    'splits_final.json not JSON': (lambda t, m: _replace(t / 'pre' / DATASET / 'splits_final.json', '[{"val": '),
                                   r'^\S+/splits_final.json is not readable JSON \(Expecting value'),
    'splits_final.json a folder': (lambda t, m: _replace(t / 'pre' / DATASET / 'splits_final.json', None),
                                   r'^\S+/splits_final.json is not a file'),
    'splits_final.json without case lists': (lambda t, m: _replace(t / 'pre' / DATASET / 'splits_final.json',
                                                                   '[{"train": [], "val": "case_0"}]'),
                                             r"^\S+/splits_final.json is not nnU-Net's splits file"),
    'an unreadable prediction': (lambda t, m: _replace(_fold(t, 'nnUNetTrainerGODC', 1) / 'validation' /
                                                       'case_1.nii.gz', b'not an image' * 20),
                                 r"^case case_1: prediction \S+/nnUNetTrainerGODC__nnUNetPlans__2d/fold_1/validation/"
                                 r"case_1.nii.gz: nnU-Net's SimpleITKIO cannot read it"),
    'an unreadable reference (the reader is chosen on it)': (
        lambda t, m: _replace(_gt(t), b'not an image' * 20),
        r'^case case_0: reference \S+/gt_segmentations/case_0.nii.gz: no nnU-Net reader for .nii.gz opens it'),
    'an empty reference': (lambda t, m: _replace(_gt(t, 'case_4'), b''),
                           r'^case case_4: reference \S+/case_4.nii.gz is empty \(0 bytes\)'),
    'a truncated reference': (lambda t, m: _truncated(_gt(t, 'case_5')) and None,
                              r'^case case_5: reference \S+/case_5.nii.gz is truncated: its gzip stream stops'),
    'a float-valued reference': (
        lambda t, m: _write_float(_gt(t, 'case_3'), 0.5),
        r'^case case_3: reference \S+/case_3.nii.gz holds 480 voxels with non-integer values \(e.g. 0.5\)'),
    'a prediction of another shape': (
        lambda t, m: _write(str(_fold(t) / 'validation' / 'case_3.nii.gz'), np.zeros((1, 20, 23))),
        r'^case case_3: prediction \S+/case_3.nii.gz has shape \(1, 20, 23\), reference \S+ has shape \(1, 20, 24\)$'),
    'a truncated checkpoint': (lambda t, m: _replace(_fold(t, fold=2) / 'checkpoint_final.pth', b'PK\x03\x04'),
                               r'^cannot read the checkpoint \S+/fold_2/checkpoint_final.pth: \w+: .*; remove it'),
    'a checkpoint without curves': (lambda t, m: torch.save({'logging': {k: [None] for k in (
        'train_losses', 'val_losses', 'mean_fg_dice', 'ema_fg_dice')}}, _fold(t) / 'checkpoint_final.pth'),
                                    r"checkpoint_final.pth: its 'logging' entry 'train_losses' is not a list of "
                                    r"numbers"),
    '-o an existing file': (lambda t, m: ['-o', str(t / 'raw' / DATASET / 'dataset.json')],
                            r'^\S+/dataset.json exists and is not a previous compare report; choose another -o'),
    '-o a folder of other files': (lambda t, m: ['-o', str(t / 'raw')],
                                   r'^\S+/raw exists and is not a previous compare report'),
    '-o a report folder with a broken compare.json': (
        lambda t, m: (os.makedirs(t / 'old'), _replace(t / 'old' / 'compare.json', '{"tool": '),
                      ['-o', str(t / 'old')])[-1],
        r'^\S+/old exists and is not a previous compare report'),
    '-o in a missing folder': (lambda t, m: ['-o', str(t / 'nowhere' / 'report')],
                               r'^the parent folder of the output \S+/nowhere/report does not exist$'),
    '-f negative': (lambda t, m: ['-f', '-1'], r'^-f takes fold numbers >= 0, got \[-1\]$'),
    '-np 0': (lambda t, m: ['-np', '0'], r'^-np must be >= 1, got 0$'),
}


def _write_float(path, value):
    image = sitk.GetImageFromArray(np.full(SHAPE, value, np.float32))
    image.SetSpacing((0.7, 0.9, 1.0))
    sitk.WriteImage(image, str(path))


def _compare_argv(extra):
    """``compare 321 -c 2d -np 1 EXTRA --no_pbar``; EXTRA may start with ``--dataset ID`` and give -c or -np."""
    dataset = '321'
    if extra[:1] == ['--dataset']:
        dataset, extra = extra[1], extra[2:]
    defaults = [x for key, value in (('-c', '2d'), ('-np', '1')) if key not in extra for x in (key, value)]
    return ['compare', dataset, *defaults, *extra, '--no_pbar']


@pytest.mark.parametrize('name', list(BAD_COMPARE))
def test_a_bad_input_is_one_line_and_writes_nothing(name, tree, monkeypatch, capsys):
    from test_evaluate_cli import refused
    arrange, pattern = BAD_COMPARE[name]
    extra = arrange(tree, monkeypatch)  # the arguments after `compare 321 -c 2d`, or None
    refused(capsys, _compare_argv(extra or []), tree, pattern)


def test_a_truncated_validation_prediction_is_refused(tree, capsys):
    from test_evaluate_cli import refused
    path = _fold(tree, 'nnUNetTrainerGODC', 2) / 'validation' / 'case_5.nii.gz'
    left = _truncated(path)
    refused(capsys, _compare_argv(['-tr', 'nnUNetTrainerGODC', '-f', '2']), tree,
            exact=f"case case_5: prediction {path} is truncated: its gzip stream stops before its end marker "
                  f"({left} bytes; an interrupted copy?); copy or write it again")


def test_a_prediction_label_dataset_json_does_not_list_is_refused(tree, capsys):
    from test_evaluate_cli import refused
    path = _fold(tree, 'nnUNetTrainer', 1) / 'validation' / 'case_4.nii.gz'
    prediction = _prediction(4, 0)
    prediction[0, 0:2, 0:3] = 3  # 6 voxels of a label the dataset does not have
    _write(str(path), prediction)
    refused(capsys, _compare_argv(['-f', '1']), tree,
            exact=f"case case_4: prediction {path} holds label values 3 (6 voxels) that the dataset.json of {DATASET} "
                  f"does not list (it lists 0, 1, 2); files of another dataset, or its dataset.json edited after "
                  f"training?")
