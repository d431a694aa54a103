"""The checks every converter runs on every case (``nnunet_ext/conversion/readers.py``): complete files
(a truncated ``.nii.gz`` or ``.nii``, which SimpleITK reads half-zero without a word), finite intensities,
integer label values listed by the dataset, the label on the image's grid; for ``convert msd`` (which ran
none of them) and ``convert lits``, through ``nnunet-ext`` in-process (one line on stderr, exit 2, nothing
left in nnUNet_raw). Oracles: hand-made tiny NIfTI files, broken by hand."""
from __future__ import annotations

import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest

from cli_helpers import refused_in_process
from nnunet_ext.cli import main

AFFINE = np.diag([0.7, 0.8, 2.5, 1.0])
SHAPE = (12, 10, 4)


def _label(seed: int) -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[2:8, 3:7, 1:3] = 1
    label[seed % 3 + 3, 4, 2] = 2
    return label


def _image(label: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 50, SHAPE) + 200 * (label > 0)).astype(np.int16)


def _save(array, path, affine=AFFINE):
    nib.save(nib.Nifti1Image(array, affine), path)


def _truncate(path: str, keep: float = 0.5) -> None:
    data = open(path, 'rb').read()
    with open(path, 'wb') as f:
        f.write(data[:int(len(data) * keep)])


def refused(capsys, argv, pattern, raw):
    """One ``error:`` line matching ``pattern``, exit 2, nothing new in nnUNet_raw (hidden folders included)."""
    refused_in_process(capsys, argv, raw, pattern)


# --- LiTS: the checks in read_image / read_label ---------------------------------------------------------------

def lits(root: str, ending: str = '.nii.gz') -> str:
    folder = os.path.join(root, 'LiTS')
    os.makedirs(folder)
    for number in (0, 1):
        label = _label(number)
        _save(_image(label, number), os.path.join(folder, f'volume-{number}{ending}'))
        _save(label, os.path.join(folder, f'segmentation-{number}{ending}'))
    return folder


def test_a_truncated_nii_gz_volume_is_refused_not_read_half_zero(tmp_path, raw, capsys):
    source = lits(str(tmp_path))
    path = os.path.join(source, 'volume-1.nii.gz')
    _truncate(path)
    with pytest.raises(EOFError):  # the oracle: Python's gzip finds the stream incomplete
        gzip.open(path).read()
    refused(capsys, ['convert', 'lits', source, '--id', '510', '-np', '1'],
            r'^convert: error: lits_001: .*volume-1\.nii\.gz is truncated', raw)


def test_a_truncated_uncompressed_nii_is_refused_with_its_sizes(tmp_path, raw, capsys):
    source = lits(str(tmp_path), ending='.nii')
    path = os.path.join(source, 'segmentation-0.nii')
    expected = os.path.getsize(path)  # 352-byte header + 12 * 10 * 4 uint8 voxels
    assert expected == 352 + 12 * 10 * 4
    _truncate(path, keep=0.9)
    refused(capsys, ['convert', 'lits', source, '--id', '510', '-np', '1'],
            rf'lits_000: .*segmentation-0\.nii is truncated: {int(expected * 0.9)} bytes, its NIfTI header '
            rf'announces {expected}', raw)


def test_nan_intensities_are_refused_with_their_count(tmp_path, raw, capsys):
    source = lits(str(tmp_path))
    image = _image(_label(0), 0).astype(np.float32)
    image[0, 0, :3] = np.nan
    image[1, 1, 1] = np.inf
    _save(image, os.path.join(source, 'volume-0.nii.gz'))
    refused(capsys, ['convert', 'lits', source, '--id', '510', '-np', '1'],
            r'lits_000: .*volume-0\.nii\.gz has 4 voxels that are NaN or infinite', raw)


def test_a_label_with_fractional_values_is_refused_and_whole_floats_are_accepted(tmp_path, raw, capsys):
    source = lits(str(tmp_path))
    label = _label(1).astype(np.float32)
    _save(label, os.path.join(source, 'segmentation-1.nii.gz'))  # whole numbers in a float file: fine
    assert main(['convert', 'lits', source, '--id', '510', '-np', '1']) == 0
    capsys.readouterr()
    label[3, 3, 1] = 0.5
    _save(label, os.path.join(source, 'segmentation-1.nii.gz'))
    refused(capsys, ['convert', 'lits', source, '--id', '511', '-np', '1'],
            r'lits_001: label .*segmentation-1\.nii\.gz has non-integer values \(e\.g\. \[0\.5\]\)', raw)


# --- MSD: none of the checks ran before ----------------------------------------------------------------------------

def msd(root: str) -> str:
    task = os.path.join(root, 'Task09_Spleen')
    for sub in ('imagesTr', 'labelsTr'):
        os.makedirs(os.path.join(task, sub))
    for number in (0, 1):
        label = _label(number)
        _save(_image(label, number), os.path.join(task, 'imagesTr', f'spleen_{number}.nii.gz'))
        _save(label, os.path.join(task, 'labelsTr', f'spleen_{number}.nii.gz'))
    meta = {'name': 'Spleen', 'modality': {'0': 'CT'}, 'labels': {'0': 'background', '1': 'spleen', '2': 'hilum'},
            'numTraining': 2, 'licence': 'CC-BY-SA 4.0'}
    with open(os.path.join(task, 'dataset.json'), 'w') as f:
        json.dump(meta, f)
    return task


def _label_path(task, number=1):
    return os.path.join(task, 'labelsTr', f'spleen_{number}.nii.gz')


def _other_shape(task):
    _save(np.zeros((12, 10, 3), np.uint8), _label_path(task))


def _other_spacing(task):
    _save(_label(1), _label_path(task), affine=np.diag([0.7, 0.8, 3.0, 1.0]))


def _other_origin(task):
    affine = AFFINE.copy()
    affine[:3, 3] = (5.0, 0.0, 0.0)
    _save(_label(1), _label_path(task), affine=affine)


def _unlisted_value(task):
    label = _label(1)
    label[0, 0, 0] = 5
    _save(label, _label_path(task))


def _truncated_label(task):
    _truncate(_label_path(task), keep=0.6)


@pytest.mark.parametrize('breakage, message', [
    (_other_shape, r'spleen_1: image size \(12, 10, 4\) and label size \(12, 10, 3\) differ'),
    (_other_spacing, r'spleen_1: image and label spacing differ: \(0\.7, 0\.8, 2\.5\) vs \(0\.7, 0\.8, 3\.0\)'),
    (_other_origin, r'spleen_1: image and label origin differ'),
    (_unlisted_value, r'spleen_1: unexpected label values \[5\] \(allowed \[0, 1, 2\]\)'),
    (_truncated_label, r'spleen_1: .*labelsTr/spleen_1\.nii\.gz is truncated'),
])
def test_msd_checks_every_case(tmp_path, raw, capsys, breakage, message):
    task = msd(str(tmp_path))
    breakage(task)
    refused(capsys, ['convert', 'msd', task, '--id', '512', '-np', '1'], message, raw)


def test_msd_reports_the_label_voxels_it_converted(tmp_path, raw, capsys):
    task = msd(str(tmp_path))
    assert main(['convert', 'msd', task, '--id', '512', '-np', '1']) == 0
    out = capsys.readouterr().out
    expected = sum(int((_label(n) == 1).sum()) for n in (0, 1))  # 2 * (6 * 4 * 2 - 1)
    assert f'label 1 (spleen): {expected} voxels' in out and 'label 2 (hilum): 2 voxels' in out


def test_preprocess_images_refuses_a_truncated_image_and_writes_nothing(tmp_path, raw, capsys):
    images = tmp_path / 'new_images'
    images.mkdir()
    for number in (0, 1):
        _save(_image(_label(number), number), str(images / f'case_{number}_0000.nii.gz'))
    _truncate(str(images / 'case_1_0000.nii.gz'))
    out = tmp_path / 'out'
    refused(capsys, ['preprocess-images', str(images), str(out), '--window', '-100', '200'],
            r'case_1_0000\.nii\.gz: .*case_1_0000\.nii\.gz is truncated', raw)
    assert not out.exists() or not os.listdir(out)
