"""``nnunet-ext evaluate`` end to end: small NIfTI cases (SimpleITK, anisotropic spacing) in a fake
nnUNet_raw, the console script in a subprocess, the summary JSON against the per-case metrics computed
here by brute force (``test_metrics.oracle``); errors leave no output file behind."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from test_metrics import oracle

SCRIPT = os.path.join(os.path.dirname(sys.executable), 'nnunet-ext')
SITK_SPACING = (0.8, 0.7, 2.5)                 # x, y, z as SimpleITK writes it
SPACING = tuple(reversed(SITK_SPACING))        # the array's (z, y, x): what the metrics must use
SHAPE = (6, 16, 14)
IGNORE = 3
LABELS = {"background": 0, "liver": 1, "tumour": 2, "ignore": IGNORE}
REGIONS = {"background": 0, "organ": [1, 2], "tumour": 2}


def _blob(center, radii):
    grid = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing='ij')
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1


def _write(path, array, spacing=SITK_SPACING):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, path)


def _cases():
    """{case: (prediction, reference)}: liver + tumour, an ignored band, an empty tumour prediction."""
    rng = np.random.default_rng(0)
    out = {}
    for i in range(4):
        ref = np.zeros(SHAPE, np.uint8)
        ref[_blob((3, 8, 7), (2.5, 5 + i % 2, 4))] = 1
        ref[_blob((3, 8 + i % 3 - 1, 6), (1.2, 2, 2))] = 2
        pred = np.zeros(SHAPE, np.uint8)
        pred[_blob((3, 7 + i, 7), (2.2, 5, 4 + i % 2))] = 1
        pred[_blob((2 + i % 2, 8, 6 + i % 2), (1.2, 2, 1.5))] = 2
        pred[rng.random(SHAPE) < 0.01] = 1           # stray false positives
        if i == 1:
            pred[pred == 2] = 1                      # tumour missed: distances NaN, precision NaN
        if i == 2:
            ref[:, 13:, :][ref[:, 13:, :] == 0] = IGNORE   # an ignored band (pred voxels there don't count)
            pred[:, 13:15, 2:5] = 1
        out[f"case_{i:03d}"] = (pred, ref)
    return out


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('evaluate')
    raw = root / 'nnUNet_raw'
    for did, name, labels, extra in ((997, 'EvalToy', LABELS, {}),
                                     (998, 'EvalRegions', REGIONS, {"regions_class_order": [1, 2]})):
        folder = raw / f'Dataset{did}_{name}'
        folder.mkdir(parents=True)
        (folder / 'dataset.json').write_text(json.dumps(
            {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 4, "file_ending": ".nii.gz", **extra}))
    pred, gt = root / 'pred', root / 'gt'
    pred.mkdir()
    gt.mkdir()
    cases = _cases()
    for case, (p, r) in cases.items():
        _write(str(pred / f'{case}.nii.gz'), p)
        _write(str(gt / f'{case}.nii.gz'), r)
    (pred / 'dataset.json').write_text('{}')        # nnU-Net's predict writes these beside the cases
    (pred / 'plans.json').write_text('{}')
    env = {**os.environ, 'nnUNet_raw': str(raw), 'nnUNet_preprocessed': str(root / 'pre'),
           'nnUNet_results': str(root / 'res')}
    return {"root": root, "pred": str(pred), "gt": str(gt), "cases": cases, "env": env}


def _evaluate(setup, *args, check=True):
    result = subprocess.run([SCRIPT, 'evaluate', *args, '--no_pbar'], env=setup['env'], capture_output=True,
                            text=True, encoding='utf-8', timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def _equal(json_value, expected):
    if isinstance(expected, float) and math.isnan(expected):
        return json_value is None
    return json_value is not None and math.isclose(json_value, expected, rel_tol=1e-9, abs_tol=1e-9)


def _check_against_oracle(summary, setup, masks, ignore=None, hd95='pooled'):
    """Every per-case number and every per-class mean/median/n_nan against the oracle."""
    assert [c['case'] for c in summary['metric_per_case']] == sorted(setup['cases'])
    for name, to_mask in masks.items():
        expected_rows = []
        for entry in summary['metric_per_case']:
            pred, ref = setup['cases'][entry['case']]
            assert entry['spacing'] == pytest.approx(SPACING, rel=1e-6)  # z, y, x; float32 in the header
            evaluated = None if ignore is None else ref != ignore
            expected = oracle(to_mask(pred), to_mask(ref), entry['spacing'], evaluated, hd95)
            expected_rows.append(expected)
            for key, value in expected.items():
                assert _equal(entry['metrics'][name][key], value), (entry['case'], name, key,
                                                                    entry['metrics'][name][key], value)
        for key in ('Dice', 'HD95', 'ASD', 'RVD', 'precision'):
            values = np.array([row[key] for row in expected_rows], float)
            stats = summary['per_class'][name][key]
            assert stats['n_nan'] == int(np.isnan(values).sum())
            assert _equal(stats['mean'], float(np.nanmean(values)) if (~np.isnan(values)).any() else math.nan)
            assert _equal(stats['median'], float(np.nanmedian(values)) if (~np.isnan(values)).any() else math.nan)


def test_dataset_labels_and_ignore_label(setup):
    result = _evaluate(setup, setup['pred'], setup['gt'], '-d', '997', '-np', '2')
    summary_file = os.path.join(setup['pred'], 'summary_nnunet_ext.json')
    with open(summary_file, encoding='utf-8') as f:
        summary = json.load(f)
    assert [c['name'] for c in summary['classes']] == ['liver', 'tumour']
    assert summary['ignore_label'] == IGNORE and summary['dataset'] == 'Dataset997_EvalToy'
    assert summary['arguments']['d'] == '997' and summary['arguments']['np'] == 2
    assert 'Dice' in summary['conventions'] and 'MedPy' in summary['conventions']['HD95']
    assert summary['hd95'] == 'pooled' and summary['arguments']['hd95'] == 'pooled'  # the documented default
    _check_against_oracle(summary, setup, {'liver': lambda s: s == 1, 'tumour': lambda s: s == 2}, ignore=IGNORE)
    tumour = summary['per_class']['tumour']
    assert tumour['HD95']['n_nan'] == 1 and tumour['counts']['prediction_empty'] == 1
    assert '| liver | 4 |' in result.stdout and '| tumour | 4 |' in result.stdout
    # the ignored band really changed the numbers of case_002 (else the check above proves nothing)
    pred, ref = setup['cases']['case_002']
    case = next(c for c in summary['metric_per_case'] if c['case'] == 'case_002')
    assert case['metrics']['liver']['FP'] != oracle(pred == 1, ref == 1, SPACING)['FP']


def test_hd95_max_is_recorded_and_equals_the_oracle(setup):
    out = os.path.join(str(setup['root']), 'summary_max.json')
    _evaluate(setup, setup['pred'], setup['gt'], '-d', '997', '-np', '1', '--hd95', 'max', '-o', out)
    with open(out, encoding='utf-8') as f:
        summary = json.load(f)
    assert summary['hd95'] == 'max' and 'MONAI' in summary['conventions']['HD95']
    _check_against_oracle(summary, setup, {'liver': lambda s: s == 1, 'tumour': lambda s: s == 2}, ignore=IGNORE,
                          hd95='max')
    pred, ref = setup['cases']['case_000']
    spacing = summary['metric_per_case'][0]['spacing']
    assert not math.isclose(oracle(pred == 1, ref == 1, spacing, ref != IGNORE, 'max')['HD95'],
                            oracle(pred == 1, ref == 1, spacing, ref != IGNORE, 'pooled')['HD95'])  # discriminates


def test_regions(setup):
    out = str(setup['root'] / 'regions.json')
    _evaluate(setup, setup['pred'], setup['gt'], '-d', 'Dataset998_EvalRegions', '-o', out, '-np', '1')
    with open(out, encoding='utf-8') as f:
        summary = json.load(f)
    assert summary['classes'] == [{"name": "organ", "labels": [1, 2], "region": True},
                                  {"name": "tumour", "labels": [2], "region": False}]
    _check_against_oracle(summary, setup, {'organ': lambda s: (s == 1) | (s == 2), 'tumour': lambda s: s == 2})


def test_without_dataset_labels_found_in_references(setup):
    out = str(setup['root'] / 'found.json')
    result = _evaluate(setup, setup['pred'], setup['gt'], '-o', out)
    with open(out, encoding='utf-8') as f:
        summary = json.load(f)
    # no dataset.json: the ignore label is an ordinary label found in the references
    assert [c['name'] for c in summary['classes']] == ['1', '2', '3'] and summary['ignore_label'] is None
    assert 'found in the references' in result.stderr and 'found in the references' in summary['classes_source']
    _check_against_oracle(summary, setup, {'1': lambda s: s == 1, '2': lambda s: s == 2})

    out = str(setup['root'] / 'labels.json')
    _evaluate(setup, setup['pred'], setup['gt'], '-o', out, '--labels', '2', '-np', '1')
    with open(out, encoding='utf-8') as f:
        assert [c['name'] for c in json.load(f)['classes']] == ['2']


def _leftovers(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith('.json') or n.endswith('.tmp'))


def test_missing_cases_are_an_error(setup):
    pred = setup['root'] / 'pred_missing'
    shutil.copytree(setup['pred'], pred, ignore=shutil.ignore_patterns('*.json'))
    os.remove(pred / 'case_001.nii.gz')
    _write(str(pred / 'extra_case.nii.gz'), np.zeros(SHAPE))
    result = _evaluate(setup, str(pred), setup['gt'], check=False)
    assert result.returncode == 2, result.stderr
    assert 'case_001' in result.stderr and 'extra_case' in result.stderr and 'Traceback' not in result.stderr
    assert _leftovers(pred) == []


def test_shape_mismatch_is_an_error_and_leaves_no_file(setup):
    pred = setup['root'] / 'pred_shape'
    shutil.copytree(setup['pred'], pred, ignore=shutil.ignore_patterns('*.json'))
    _write(str(pred / 'case_003.nii.gz'), np.zeros((6, 16, 13)))
    result = _evaluate(setup, str(pred), setup['gt'], '-d', '997', check=False)
    assert result.returncode == 2, result.stderr
    assert 'case_003' in result.stderr and 'shape' in result.stderr and 'Traceback' not in result.stderr
    assert _leftovers(pred) == []


def test_bad_arguments(setup):
    result = _evaluate(setup, setup['pred'], setup['gt'], '-d', '555', check=False)
    assert result.returncode == 2 and '555' in result.stderr and 'Traceback' not in result.stderr
    result = _evaluate(setup, setup['pred'], str(setup['root'] / 'nowhere'), check=False)
    assert result.returncode == 2 and 'nowhere' in result.stderr
    result = _evaluate(setup, setup['pred'], setup['gt'], '-d', '997', '--labels', '5', check=False)
    assert result.returncode == 2 and '5' in result.stderr and 'Traceback' not in result.stderr
