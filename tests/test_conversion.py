"""`nnunet-ext convert lits|msd` and `nnunet-ext preprocess-images` on small fixtures in the sources' real
on-disk layouts (NIfTI written with nibabel, an MSD task folder and its .tar), against the fixtures'
own arrays and geometry; nnU-Net's verify_dataset_integrity on the result; every bad input refused
with a message naming the case, leaving nothing in nnUNet_raw."""
from __future__ import annotations

import json
import os
import re
import tarfile

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from cli_helpers import assert_refused, run, verify_raw_dataset

SPACING = (0.7, 0.8, 2.5)  # x, y, z in mm
SHAPE_XYZ = (20, 18, 6)


def _affine(spacing=SPACING, origin=(-120.0, 30.0, 55.0)):
    # a rotation about z plus a flip, so direction and origin are not trivial
    c, s = np.cos(0.3), np.sin(0.3)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, -1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.array(spacing)
    affine[:3, 3] = origin
    return affine


def _label_array(seed: int, shape=SHAPE_XYZ) -> np.ndarray:
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    label[3:15, 4:14, 1:5] = 1
    x, y = rng.integers(5, 10, 2)
    label[x:x + 3, y:y + 3, 2:4] = 2
    return label


def _ct_array(label: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 100)
    return (rng.normal(-300, 200, label.shape) + 350 * (label == 1) + 250 * (label == 2)).astype(np.int16)


def _save(array, path, affine=None):
    nib.save(nib.Nifti1Image(array, _affine() if affine is None else affine), path)


def _lits_source(root: str, cases=(0, 1, 2)) -> dict:
    arrays = {}
    for i, number in enumerate(cases):
        folder = os.path.join(root, f'Training Batch {1 + i % 2}')
        os.makedirs(folder, exist_ok=True)
        label = _label_array(number)
        image = _ct_array(label, number)
        ending = '.nii' if i % 2 else '.nii.gz'
        _save(image, os.path.join(folder, f'volume-{number}{ending}'))
        _save(label, os.path.join(folder, f'segmentation-{number}{ending}'))
        arrays[number] = (image, label)
    test = _ct_array(_label_array(9), 9)
    os.makedirs(os.path.join(root, 'Test'), exist_ok=True)
    _save(test, os.path.join(root, 'Test', 'test-volume-0.nii.gz'))
    arrays['test'] = test
    return arrays


def _sitk_array_xyz(path):
    """SimpleITK's (z, y, x) array back in nibabel's (x, y, z) order."""
    return sitk.GetArrayFromImage(sitk.ReadImage(path)).transpose(2, 1, 0)


def test_lits_conversion_keeps_values_labels_and_geometry_and_passes_nnunet_integrity(tmp_path, env):
    source = str(tmp_path / 'LiTS')
    arrays = _lits_source(source)
    out = run(['nnunet-ext', 'convert', 'lits', source, '--id', '501', '-np', '2'], env).stdout
    target = os.path.join(env['nnUNet_raw'], 'Dataset501_LiTS')
    assert 'cases: 3 training, 1 test' in out
    assert sorted(os.listdir(env['nnUNet_raw'])) == ['Dataset501_LiTS']  # no temporary folder left
    verify_raw_dataset(target)
    dataset = json.load(open(os.path.join(target, 'dataset.json')))
    assert dataset['labels'] == {'background': 0, 'liver': 1, 'tumor': 2} and dataset['numTraining'] == 3
    total = np.zeros(3, int)
    for number in (0, 1, 2):
        image, label = arrays[number]
        image_path = os.path.join(target, 'imagesTr', f'lits_{number:03d}_0000.nii.gz')
        label_path = os.path.join(target, 'labelsTr', f'lits_{number:03d}.nii.gz')
        np.testing.assert_array_equal(_sitk_array_xyz(image_path), image)
        np.testing.assert_array_equal(_sitk_array_xyz(label_path), label)
        total += np.bincount(label.ravel(), minlength=3)
        for path in (image_path, label_path):  # geometry round-trips: nibabel's affine of the output
            np.testing.assert_allclose(nib.load(path).affine, _affine(), atol=1e-4)
    for value in range(3):
        assert f'label {value} ' in out and f': {total[value]} voxels' in out
    np.testing.assert_array_equal(_sitk_array_xyz(os.path.join(target, 'imagesTs', 'lits_test_000_0000.nii.gz')),
                                  arrays['test'])


def _numpy_equalize(a: np.ndarray, bins: int = 256) -> np.ndarray:
    """Histogram equalisation from its definition: the normalised cumulative histogram (256 bins over the
    image's range) evaluated at the bin centres, linearly interpolated at each value."""
    counts, edges = np.histogram(a, bins=bins, range=(a.min(), a.max()))
    centres = (edges[:-1] + edges[1:]) / 2
    cdf = np.cumsum(counts) / a.size
    return np.interp(a, centres, cdf)


def test_window_and_histogram_equalisation_match_numpy_and_preprocess_images_repeats_them(tmp_path, env):
    source = str(tmp_path / 'LiTS')
    arrays = _lits_source(source, cases=(4,))
    run(['nnunet-ext', 'convert', 'lits', source, '--id', '502', '--window', '-100', '400', '--hist-eq', '-np', '1'],
        env)
    target = os.path.join(env['nnUNet_raw'], 'Dataset502_LiTS')
    converted = _sitk_array_xyz(os.path.join(target, 'imagesTr', 'lits_004_0000.nii.gz'))
    expected = _numpy_equalize(np.clip(arrays[4][0].astype(np.float64), -100, 400))
    np.testing.assert_allclose(converted, expected, atol=1e-5)
    assert converted.min() >= 0 and converted.max() <= 1
    # window only
    run(['nnunet-ext', 'convert', 'lits', source, '--id', '503', '--window', '-100', '400', '-np', '1'], env)
    windowed = _sitk_array_xyz(os.path.join(env['nnUNet_raw'], 'Dataset503_LiTS', 'imagesTr', 'lits_004_0000.nii.gz'))
    np.testing.assert_array_equal(windowed, np.clip(arrays[4][0], -100, 400))
    # new images before prediction: the dataset's recorded options, identical output
    new = tmp_path / 'new'
    new.mkdir()
    _save(arrays[4][0], str(new / 'case_0000.nii.gz'))
    run(['nnunet-ext', 'preprocess-images', str(new), str(tmp_path / 'pre'), '-d', '502'], env)
    np.testing.assert_allclose(_sitk_array_xyz(str(tmp_path / 'pre' / 'case_0000.nii.gz')), converted, atol=1e-6)
    assert os.listdir(tmp_path / 'pre') == ['case_0000.nii.gz']


def _break_missing_segmentation(root):
    os.remove(os.path.join(root, 'Training Batch 2', 'segmentation-1.nii'))


def _break_missing_volume(root):
    os.remove(os.path.join(root, 'Training Batch 2', 'volume-1.nii'))


def _break_shape(root):
    _save(np.zeros((20, 18, 5), np.uint8), os.path.join(root, 'Training Batch 1', 'segmentation-2.nii.gz'))


def _break_geometry(root):
    _save(_label_array(2), os.path.join(root, 'Training Batch 1', 'segmentation-2.nii.gz'),
          affine=_affine(spacing=(0.7, 0.8, 3.0)))


def _break_labels(root):
    label = _label_array(0)
    label[0, 0, 0] = 7
    _save(label, os.path.join(root, 'Training Batch 1', 'segmentation-0.nii.gz'))


def _break_duplicate(root):
    label = _label_array(1)
    _save(_ct_array(label, 1), os.path.join(root, 'Training Batch 1', 'volume-1.nii.gz'))


def _break_unreadable(root):
    with open(os.path.join(root, 'Training Batch 1', 'volume-2.nii.gz'), 'wb') as f:
        f.write(b'not a nifti file at all')


@pytest.mark.parametrize('breakage, message', [
    (_break_missing_segmentation, r'no segmentation for volume\(s\) \[1\]'),
    (_break_missing_volume, r'no volume for segmentation\(s\) \[1\]'),
    (_break_shape, r'lits_002: image size \(20, 18, 6\) and segmentation size \(20, 18, 5\) differ'),
    (_break_geometry, r'lits_002: image and segmentation spacing differ'),
    (_break_labels, r'lits_000: unexpected label values \[7\]'),
    (_break_duplicate, r'duplicate LiTS volume 1: .*Batch \d/volume-1\.nii(\.gz)? and .*Batch \d/volume-1\.nii'),
    (_break_unreadable, r'lits_002: cannot read .*volume-2\.nii\.gz'),
])
def test_lits_bad_input_is_refused_naming_the_case_and_leaves_nothing(tmp_path, env, breakage, message):
    source = str(tmp_path / 'LiTS')
    _lits_source(source)
    breakage(source)
    result = run(['nnunet-ext', 'convert', 'lits', source, '--id', '504', '-np', '2'], env, check=False)
    assert_refused(result, message, env['nnUNet_raw'])


def test_a_taken_dataset_id_is_refused_unless_overwrite(tmp_path, env):
    source = str(tmp_path / 'LiTS')
    _lits_source(source, cases=(0, 1))
    run(['nnunet-ext', 'convert', 'lits', source, '--id', '505', '--name', 'First', '-np', '1'], env)
    result = run(['nnunet-ext', 'convert', 'lits', source, '--id', '505', '-np', '1'], env, check=False)
    assert result.returncode == 2 and 'dataset id 505 is already taken in nnUNet_raw: Dataset505_First' in result.stderr
    assert sorted(os.listdir(env['nnUNet_raw'])) == ['Dataset505_First']
    # a failing --overwrite keeps the old dataset
    _break_labels(source)
    result = run(['nnunet-ext', 'convert', 'lits', source, '--id', '505', '--overwrite', '-np', '1'], env, check=False)
    assert result.returncode == 2 and sorted(os.listdir(env['nnUNet_raw'])) == ['Dataset505_First']
    os.remove(os.path.join(source, 'Training Batch 1', 'segmentation-0.nii.gz'))
    _save(_label_array(0), os.path.join(source, 'Training Batch 1', 'segmentation-0.nii.gz'))
    run(['nnunet-ext', 'convert', 'lits', source, '--id', '505', '--overwrite', '-np', '1'], env)
    assert sorted(os.listdir(env['nnUNet_raw'])) == ['Dataset505_LiTS']


def _msd_task(root: str) -> str:
    """An MSD task in the download's layout: 4D two-modality images (like Task05_Prostate)."""
    task = os.path.join(root, 'Task05_Prostate')
    for sub in ('imagesTr', 'labelsTr', 'imagesTs'):
        os.makedirs(os.path.join(task, sub))
    cases = {}
    for name in ('prostate_00', 'prostate_01', 'prostate_02'):
        label = (_label_array(len(cases)) > 0).astype(np.uint8)
        image = np.stack([_ct_array(label, len(cases)), _ct_array(label, 7 + len(cases))], -1).astype(np.float32)
        _save(image, os.path.join(task, 'imagesTr', f'{name}.nii.gz'))
        _save(label, os.path.join(task, 'labelsTr', f'{name}.nii.gz'))
        cases[name] = (image, label)
    _save(cases['prostate_00'][0], os.path.join(task, 'imagesTs', 'prostate_03.nii.gz'))
    meta = {'name': 'PROSTATE', 'modality': {'0': 'T2', '1': 'ADC'}, 'labels': {'0': 'background', '1': 'prostate'},
            'numTraining': 3, 'numTest': 1, 'training': [], 'test': [], 'licence': 'CC-BY-SA 4.0'}
    with open(os.path.join(task, 'dataset.json'), 'w') as f:
        json.dump(meta, f)
    return task, cases


@pytest.mark.parametrize('archived', [False, True])
def test_msd_task_folder_and_tar_are_converted_with_channels_split(tmp_path, env, archived):
    task, cases = _msd_task(str(tmp_path / 'msd'))
    source = task
    if archived:
        source = str(tmp_path / 'Task05_Prostate.tar')
        with tarfile.open(source, 'w') as archive:
            archive.add(task, arcname='Task05_Prostate')
    run(['nnunet-ext', 'convert', 'msd', source, '--id', '505', '-np', '2'], env)
    target = os.path.join(env['nnUNet_raw'], 'Dataset505_Prostate')
    verify_raw_dataset(target)
    dataset = json.load(open(os.path.join(target, 'dataset.json')))
    assert dataset['channel_names'] == {'0': 'T2', '1': 'ADC'} and dataset['labels'] == {'background': 0, 'prostate': 1}
    for name, (image, label) in cases.items():
        for channel in (0, 1):
            np.testing.assert_array_equal(
                _sitk_array_xyz(os.path.join(target, 'imagesTr', f'{name}_{channel:04d}.nii.gz')), image[..., channel])
        np.testing.assert_array_equal(_sitk_array_xyz(os.path.join(target, 'labelsTr', f'{name}.nii.gz')), label)
    assert sorted(os.listdir(os.path.join(target, 'imagesTs'))) == ['prostate_03_0000.nii.gz',
                                                                    'prostate_03_0001.nii.gz']
    assert sorted(os.listdir(env['nnUNet_raw'])) == ['Dataset505_Prostate']


def test_msd_image_without_label_is_refused_and_leaves_nothing(tmp_path, env):
    task, _ = _msd_task(str(tmp_path / 'msd'))
    os.remove(os.path.join(task, 'labelsTr', 'prostate_01.nii.gz'))
    result = run(['nnunet-ext', 'convert', 'msd', task, '--id', '506'], env, check=False)
    assert_refused(result, re.escape("images without label ['prostate_01']"), env['nnUNet_raw'])
