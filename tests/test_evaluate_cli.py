"""``nnunet-ext evaluate`` end to end: small NIfTI cases (SimpleITK, anisotropic spacing) in a fake
nnUNet_raw, the console script in a subprocess, the summary JSON against the per-case metrics computed
here by brute force (``test_metrics.oracle``); errors leave no output file behind. What is refused (a table
of bad arguments, folders and files, each broken by hand): ``nnunet-ext`` in-process (``cli.main``, as the
console script calls it), one error line, exit status 2, no traceback, nothing new on disk; the messages
of a truncated file, an unlisted label and a float-valued prediction word for word, with sizes and counts
known from how the files were made."""
from __future__ import annotations

import json
import math
import re
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from cli_helpers import snapshot
from test_metrics import oracle

SCRIPT = os.path.join(os.path.dirname(sys.executable), 'nnunet-ext')
SITK_SPACING = (0.8, 0.7, 2.5)                 # x, y, z as SimpleITK writes it
SPACING = tuple(reversed(SITK_SPACING))        # the array's (z, y, x): what the metrics must use
SHAPE = (6, 16, 14)
IGNORE = 3
LABELS = {"background": 0, "liver": 1, "tumour": 2, "ignore": IGNORE}
REGIONS = {"background": 0, "organ": [1, 2], "tumour": 2, "ignore": IGNORE}


def _blob(center, radii):
    grid = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing='ij')
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1


def _write(path, array, spacing=SITK_SPACING, dtype=np.uint8):
    image = sitk.GetImageFromArray(np.asarray(array).astype(dtype))
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
    _check_against_oracle(summary, setup, {'organ': lambda s: (s == 1) | (s == 2), 'tumour': lambda s: s == 2},
                          ignore=IGNORE)


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


# --- what is refused: one line on stderr, exit status 2, nothing written ---------------------------------------------

ERROR = 'nnunet-ext {}: error: '
#: the lines a command prints on stderr before it fails (with --no_pbar): evaluate's and compare's progress notes
NOTE = re.compile(r'^(\d+ cases, file ending |classes: |missing: |note: |Dataset\d{3}_\w+, configuration )')


def refused(capsys, argv, root, pattern=None, exact=None) -> str:
    """``nnunet-ext ARGV`` in-process (as the console script calls it): exit status 2, no traceback, the notes
    of the run and then one error line (its message matching the regex ``pattern``, or equal to ``exact``), and
    nothing new under ``root``. Returns the message."""
    from nnunet_ext.cli import main
    before = snapshot(root)
    status = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    prefix = ERROR.format(argv[0])
    assert status == 2 and 'Traceback' not in err, err
    assert lines and lines[-1].startswith(prefix), err
    assert all(NOTE.match(line) for line in lines[:-1]), err
    message = lines[-1][len(prefix):]
    if exact is not None:
        assert message == exact
    if pattern is not None:
        assert re.search(pattern, message), message
    assert snapshot(root) == before, snapshot(root) - before
    return message


@pytest.fixture
def world(setup, tmp_path, monkeypatch):
    """A private copy of the cases (``pred``, ``gt``) and of dataset 997 in its own nnUNet_raw, for one test to
    break; nnU-Net's three folders set to it."""
    w = {'root': tmp_path, 'pred': tmp_path / 'pred', 'gt': tmp_path / 'gt', 'raw': tmp_path / 'raw',
         'monkeypatch': monkeypatch}
    shutil.copytree(setup['pred'], w['pred'], ignore=shutil.ignore_patterns('*.json'))
    shutil.copytree(setup['gt'], w['gt'])
    shutil.copytree(os.path.join(setup['env']['nnUNet_raw'], 'Dataset997_EvalToy'), w['raw'] / 'Dataset997_EvalToy')
    for name in ('raw', 'pre', 'res'):
        (tmp_path / name).mkdir(exist_ok=True)
        monkeypatch.setenv({'raw': 'nnUNet_raw', 'pre': 'nnUNet_preprocessed', 'res': 'nnUNet_results'}[name],
                           str(tmp_path / name))
    return w


def _dataset(w, name, content):
    """A raw dataset ``name`` whose dataset.json holds ``content`` (text as it is, else JSON)."""
    folder = w['raw'] / name
    folder.mkdir()
    if content is not None:
        (folder / 'dataset.json').write_text(content if isinstance(content, str) else json.dumps(content))


def _garbage(path):
    with open(path, 'wb') as f:
        f.write(b'not an image ' * 20)


def _broken_crc(path):
    data = bytearray(open(path, 'rb').read())
    data[-8] ^= 0xFF  # gzip's trailer: CRC32 (4 bytes), then the length
    with open(path, 'wb') as f:
        f.write(bytes(data))


def _block(value):
    """A label map of zeros with a 2 x 3 x 4 block (24 voxels) of ``value``."""
    segmentation = np.zeros(SHAPE, float)
    segmentation[1:3, 2:5, 3:7] = value
    return segmentation


DS = 'Dataset997_EvalToy'
BASE_JSON = {"channel_names": {"0": "CT"}, "numTraining": 4, "file_ending": ".nii.gz"}

#: name -> (break the world and return evaluate's arguments, regex the message must match)
BAD_EVALUATE = {
    'prediction folder missing': (lambda w: [w['root'] / 'nowhere', w['gt']],
                                  r'^prediction folder \S+/nowhere does not exist or is not a folder$'),
    'reference folder missing': (lambda w: [w['pred'], w['root'] / 'nowhere'],
                                 r'^reference folder \S+/nowhere does not exist or is not a folder$'),
    'a file for the prediction folder': (lambda w: [w['pred'] / 'case_000.nii.gz', w['gt']],
                                         r'^prediction folder \S+/case_000.nii.gz does not exist or is not a folder'),
    'empty prediction folder': (lambda w: (shutil.rmtree(w['pred']), w['pred'].mkdir(), [w['pred'], w['gt']])[-1],
                                r'^no .nii.gz files in the prediction folder \S+/pred$'),
    'empty reference folder': (lambda w: (shutil.rmtree(w['gt']), w['gt'].mkdir(), [w['pred'], w['gt']])[-1],
                               r'^\S+/gt holds no image files nnU-Net can read'),
    'references of two endings': (lambda w: (_write(str(w['gt'] / 'case_009.nrrd'), np.zeros(SHAPE)),
                                             [w['pred'], w['gt']])[-1],
                                  r'files of several endings \(.nii.gz, .nrrd\); give -d'),
    'a prediction without reference': (lambda w: (_write(str(w['pred'] / 'extra.nii.gz'), np.zeros(SHAPE)),
                                                  [w['pred'], w['gt']])[-1],
                                       r'^cases do not match .*predictions without a reference in \S+/gt: extra$'),
    'a reference without prediction': (lambda w: (os.remove(w['pred'] / 'case_001.nii.gz'), [w['pred'], w['gt']])[-1],
                                       r'^cases do not match .*references without a prediction in \S+/pred: case_001$'),
    'a folder named like a case': (lambda w: (os.remove(w['pred'] / 'case_002.nii.gz'),
                                              (w['pred'] / 'case_002.nii.gz').mkdir(), [w['pred'], w['gt']])[-1],
                                   r'references without a prediction in \S+/pred: case_002$'),
    'different shapes': (lambda w: (_write(str(w['pred'] / 'case_003.nii.gz'), np.zeros((6, 16, 13))),
                                    [w['pred'], w['gt'], '-d', '997'])[-1],
                         r'^case case_003: prediction \S+ has shape \(6, 16, 13\), reference \S+ has shape '
                         r'\(6, 16, 14\)$'),
    'different spacings': (lambda w: (_write(str(w['pred'] / 'case_003.nii.gz'), np.zeros(SHAPE), (1.0, 0.7, 2.5)),
                                      [w['pred'], w['gt']])[-1],
                           r'^case case_003: prediction spacing \(2.5, 0.7, 1\) != reference spacing \(2.5, 0.7, '
                           r'0.8\) \(relative tolerance 0.001\): \S+/pred/case_003.nii.gz is not on the grid of '
                           r'\S+/gt/case_003.nii.gz$'),
    'an unreadable prediction': (lambda w: (_garbage(w['pred'] / 'case_001.nii.gz'), [w['pred'], w['gt']])[-1],
                                 r"^case case_001: prediction \S+/case_001.nii.gz: nnU-Net's SimpleITKIO cannot "
                                 r"read it \(.+\); is it an image of this file type\?$"),
    'an unreadable reference (the reader is chosen on it)': (
        lambda w: (_garbage(w['gt'] / 'case_000.nii.gz'), [w['pred'], w['gt'], '-d', '997'])[-1],
        r'^case case_000: reference \S+/case_000.nii.gz: no nnU-Net reader for .nii.gz opens it \(the last one: .+\)'),
    'an empty prediction file': (lambda w: (open(w['pred'] / 'case_002.nii.gz', 'wb').close(),
                                            [w['pred'], w['gt']])[-1],
                                 r'^case case_002: prediction \S+/case_002.nii.gz is empty \(0 bytes\); copy or '
                                 r'write it again$'),
    'a prediction with a wrong gzip checksum': (lambda w: (_broken_crc(w['pred'] / 'case_002.nii.gz'),
                                                           [w['pred'], w['gt']])[-1],
                                                r'^case case_002: prediction \S+ is corrupt: its gzip stream does not '
                                                r'decompress \(CRC check failed .*\); copy or write it again$'),
    'a two-channel prediction': (lambda w: (_write(str(w['pred'] / 'case_000.nii.gz'), np.zeros((2, *SHAPE)),
                                                   (*SITK_SPACING, 1.0)), [w['pred'], w['gt']])[-1],
                                 r'^case case_000: prediction \S+: a segmentation must have one channel, got shape '
                                 r'\(2, 6, 16, 14\)$'),
    'a float-valued reference, no -d': (lambda w: (_write(str(w['gt'] / 'case_002.nii.gz'),
                                                          _block(1.5), dtype=np.float32),
                                                   [w['pred'], w['gt']])[-1],
                                        r'^case case_002: reference \S+ holds 24 voxels with non-integer values '
                                        r'\(e.g. 1.5\)'),
    'a reference label dataset.json does not list': (
        lambda w: (_write(str(w['gt'] / 'case_001.nii.gz'), _block(4)),
                   [w['pred'], w['gt'], '-d', '997'])[-1],
        r'^case case_001: reference \S+/gt/case_001.nii.gz holds label values 4 \(24 voxels\) that the dataset.json '
        r'of Dataset997_EvalToy does not list \(it lists 0, 1, 2, 3\)'),
    'references without any label': (lambda w: ([_write(str(p), np.zeros(SHAPE)) for p in w['gt'].iterdir()],
                                                 [w['pred'], w['gt']])[-1],
                                     r'^the references in \S+ hold no label > 0; give --labels'),
    '-d an unknown id': (lambda w: [w['pred'], w['gt'], '-d', '555'],
                         r'^-d 555: no dataset 555 in \$nnUNet_raw, \$nnUNet_preprocessed or \$nnUNet_results '
                         r'\(datasets there: Dataset997_EvalToy\); give a dataset id'),
    '-d neither id nor name': (lambda w: [w['pred'], w['gt'], '-d', 'liver'], r'^-d liver: no dataset liver in'),
    '-d without nnUNet_raw': (lambda w: (w['monkeypatch'].delenv('nnUNet_raw'), [w['pred'], w['gt'], '-d', '997'])[-1],
                              r'^nnUNet_raw is not set \(needed for -d\)'),
    'dataset without dataset.json': (lambda w: (_dataset(w, 'Dataset991_NoJson', None),
                                                [w['pred'], w['gt'], '-d', '991'])[-1],
                                     r'^-d 991: \S+/Dataset991_NoJson/dataset.json does not exist'),
    'dataset.json a folder': (lambda w: (_dataset(w, 'Dataset989_Folder', None),
                                         (w['raw'] / 'Dataset989_Folder' / 'dataset.json').mkdir(),
                                         [w['pred'], w['gt'], '-d', '989'])[-1],
                              r'^-d 989: \S+/dataset.json is not a file'),
    'dataset.json not JSON': (lambda w: (_dataset(w, 'Dataset995_Cut', '{"labels": '),
                                         [w['pred'], w['gt'], '-d', '995'])[-1],
                              r'^\S+/Dataset995_Cut/dataset.json is not readable JSON \(Expecting value'),
    'dataset.json without labels': (lambda w: (_dataset(w, 'Dataset996_NoLabels', BASE_JSON),
                                               [w['pred'], w['gt'], '-d', '996'])[-1],
                                    r"^\S+/dataset.json has no 'labels' entry"),
    'dataset.json labels a list': (lambda w: (_dataset(w, 'Dataset994_List', {**BASE_JSON, 'labels': [0, 1]}),
                                              [w['pred'], w['gt'], '-d', '994'])[-1],
                                   r"^\S+/dataset.json: 'labels' must map names to label values, .*; it is \[0, 1\]$"),
    'dataset.json labels not numbers': (lambda w: (_dataset(w, 'Dataset993_Str', {**BASE_JSON, 'labels': {
        'background': 0, 'liver': 'abc'}}), [w['pred'], w['gt'], '-d', '993'])[-1],
                                        r"^\S+/dataset.json: nnU-Net rejects its labels: .*'abc'"),
    'dataset.json with background only': (lambda w: (_dataset(w, 'Dataset992_Bg', {**BASE_JSON, 'labels': {
        'background': 0}}), [w['pred'], w['gt'], '-d', '992'])[-1],
                                          r'^\S+/dataset.json lists no label besides background: nothing to '
                                          r'evaluate'),
    'dataset.json without file_ending': (lambda w: (_dataset(w, 'Dataset990_NoEnding', {'labels': {
        'background': 0, 'liver': 1}}), [w['pred'], w['gt'], '-d', '990'])[-1],
                                         r"^\S+/dataset.json has no 'file_ending' entry"),
    '--labels 0': (lambda w: [w['pred'], w['gt'], '--labels', '0'], r'^--labels 0: labels must be > 0'),
    '--labels negative': (lambda w: [w['pred'], w['gt'], '--labels', '-1'], r'^--labels -1: labels must be > 0'),
    '--labels twice': (lambda w: [w['pred'], w['gt'], '--labels', '1', '1'], r'^--labels 1 1: a label is given twice'),
    '--labels not in the dataset': (lambda w: [w['pred'], w['gt'], '-d', '997', '--labels', '9'],
                                    r'^--labels: \[9\] not among the labels of Dataset997_EvalToy \(\[1, 2\]\)$'),
    '-np 0': (lambda w: [w['pred'], w['gt'], '-np', '0'], r'^-np must be >= 1, got 0$'),
    '-o a folder': (lambda w: [w['pred'], w['gt'], '-o', w['root']], r'^output \S+ is a folder; give a file name'),
    '-o in a missing folder': (lambda w: [w['pred'], w['gt'], '-o', w['root'] / 'nowhere' / 's.json'],
                               r'^the folder of the output \S+/nowhere/s.json does not exist$'),
    '-o one of the predictions': (lambda w: [w['pred'], w['gt'], '-o', w['pred'] / 'case_000.nii.gz'],
                                  r'^-o \S+/case_000.nii.gz is one of the segmentations to evaluate'),
}


@pytest.mark.parametrize('name', list(BAD_EVALUATE))
def test_a_bad_input_is_one_line_and_writes_nothing(name, world, capsys):
    arrange, pattern = BAD_EVALUATE[name]
    arguments = [str(a) for a in arrange(world)]
    np_given = [] if '-np' in arguments else ['-np', '1']
    refused(capsys, ['evaluate', *arguments, *np_given, '--no_pbar'], world['root'], pattern)


def test_a_truncated_prediction_is_refused_by_the_console_script(setup):
    """A .nii.gz cut in half (an interrupted copy): SimpleITK reads it half-zero without an error, so the
    gzip stream is checked to its end; in a worker process (-np 2), through the real console script."""
    pred = setup['root'] / 'pred_truncated'
    shutil.copytree(setup['pred'], pred, ignore=shutil.ignore_patterns('*.json'))
    path = pred / 'case_002.nii.gz'
    rng = np.random.default_rng(3)  # noise: a file long enough to be cut in the middle of its deflate stream
    _write(str(path), rng.integers(0, 3, SHAPE))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    result = _evaluate(setup, str(pred), setup['gt'], '-d', '997', '-np', '2', check=False)
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"nnunet-ext evaluate: error: case case_002: prediction {path} is truncated: its gzip stream stops before "
        f"its end marker ({len(data) // 2} bytes; an interrupted copy?); copy or write it again")
    assert _leftovers(pred) == []


def test_a_truncated_uncompressed_nii_is_refused_with_its_sizes(world, capsys):
    root = world['root']
    for folder in ('p', 'g'):
        (root / folder).mkdir()
        for case in ('a', 'b'):
            _write(str(root / folder / f'{case}.nii'), np.ones(SHAPE))
    path = root / 'p' / 'b.nii'
    expected = 352 + int(np.prod(SHAPE))  # NIfTI-1: 348 header bytes + 4 extension bytes, then uint8 voxels
    assert path.stat().st_size == expected
    path.write_bytes(path.read_bytes()[:expected - 100])
    refused(capsys, ['evaluate', str(root / 'p'), str(root / 'g'), '-np', '1', '--no_pbar'], root,
            exact=f"case b: prediction {path} is truncated: {expected - 100} bytes, its NIfTI header announces "
                  f"{expected} (352 + {int(np.prod(SHAPE))} voxels x 1 byte); copy or write it again")


def test_a_prediction_label_dataset_json_does_not_list_is_refused(world, capsys):
    path = world['pred'] / 'case_001.nii.gz'
    _write(str(path), _block(5))
    refused(capsys, ['evaluate', str(world['pred']), str(world['gt']), '-d', '997', '-np', '1', '--no_pbar'],
            world['root'],
            exact=f"case case_001: prediction {path} holds label values 5 (24 voxels) that the dataset.json of "
                  f"{DS} does not list (it lists 0, 1, 2, 3); segmentations of another dataset, or the wrong -d?")


@pytest.mark.parametrize('dataset', [['-d', '997'], []])
def test_a_float_valued_prediction_is_refused_with_or_without_a_dataset(world, capsys, dataset):
    path = world['pred'] / 'case_003.nii.gz'
    pred = _block(0.25)
    pred[0, 0, 0] = 0.75
    _write(str(path), pred, dtype=np.float32)
    refused(capsys, ['evaluate', str(world['pred']), str(world['gt']), *dataset, '-np', '1', '--no_pbar'],
            world['root'],
            exact=f"case case_003: prediction {path} holds 25 voxels with non-integer values (e.g. 0.25, 0.75): not "
                  f"a label map (probabilities? resampled with linear interpolation?); give it integer labels")


def test_whole_numbers_in_a_float_file_are_accepted_as_labels(setup, world):
    """A prediction stored as float32 whose values are all whole numbers (1.0, 2.0) scores as its labels."""
    for case, (pred, _) in setup['cases'].items():
        _write(str(world['pred'] / f'{case}.nii.gz'), pred, dtype=np.float32)
    assert sitk.ReadImage(str(world['pred'] / 'case_000.nii.gz')).GetPixelID() == sitk.sitkFloat32
    out = str(world['root'] / 'float.json')
    _evaluate({**setup, 'env': {**setup['env'], 'nnUNet_raw': str(world['raw'])}}, str(world['pred']),
              str(world['gt']), '-d', '997', '-np', '1', '-o', out)
    with open(out, encoding='utf-8') as f:
        summary = json.load(f)
    assert summary['label_values'] == [0, 1, 2, 3]
    _check_against_oracle(summary, setup, {'liver': lambda s: s == 1, 'tumour': lambda s: s == 2}, ignore=IGNORE)
