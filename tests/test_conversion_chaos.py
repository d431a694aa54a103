"""`nnunet-ext convert chaos` on CHAOS-shaped fixtures: DICOM series whose file-name order differs from
their slice positions, PNG ground truth with CHAOS's grey levels, CT / T1DUAL (two phases) / T2SPIR."""
from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from cli_helpers import assert_refused, run, verify_raw_dataset
from dicom_helpers import write_dicom_series

SHAPE = (5, 12, 16)  # z, y, x
GREY = {1: 63, 2: 126, 3: 189, 4: 252}  # liver, right kidney, left kidney, spleen (CHAOS's values)


def _organs(seed):
    label = np.zeros(SHAPE, np.uint8)
    label[:, 2:6, 2:8] = 1
    label[1:4, 7:10, 2:5] = 2
    label[1:4, 7:10, 10:13] = 3
    label[2:5, 2:5, 11:15] = 4
    label[seed % SHAPE[0], 0, 0] = 1  # one voxel that tells the slices apart
    return label


def _mr_case(root, number, sequence, label):
    base = os.path.join(root, 'Train_Sets', 'MR', str(number), sequence)
    rng = np.random.default_rng(number)
    names = [f'IMG-0002-{k + 1:05d}.dcm' for k in range(SHAPE[0])]
    # the files' names are assigned to positions in a shuffled order: name order != position order
    order = list(rng.permutation(SHAPE[0]))
    position_of = {names[i]: int(order.index(i)) for i in range(SHAPE[0])}
    phases = ['InPhase', 'OutPhase'] if sequence == 'T1DUAL' else ['']
    arrays = []
    for p, phase in enumerate(phases):
        array = rng.integers(0, 900, SHAPE).astype(np.int16)
        write_dicom_series(os.path.join(base, 'DICOM_anon', phase), array,
                           names=[names[order[k]] for k in range(SHAPE[0])], series_uid=f'1.2.{number}.{p + 7}',
                           modality='MR')
        arrays.append(array)
    ground = os.path.join(base, 'Ground')
    os.makedirs(ground)
    for name in names:
        grey = np.zeros(SHAPE[1:], np.uint8)
        for value, g in GREY.items():
            grey[label[position_of[name]] == value] = g + (number % 3)  # anywhere inside the ranges
        Image.fromarray(grey).save(os.path.join(ground, name.replace('.dcm', '.png')))
    return arrays


def _ct_case(root, number, label, split='Train_Sets'):
    base = os.path.join(root, split, 'CT', str(number))
    rng = np.random.default_rng(number)
    names = [f'i{k:04d},0000b.dcm' for k in range(SHAPE[0])]
    order = list(rng.permutation(SHAPE[0]))  # position k holds file names[order[k]]
    array = rng.integers(-500, 500, SHAPE).astype(np.int16)
    write_dicom_series(os.path.join(base, 'DICOM_anon'), array, names=[names[order[k]] for k in range(SHAPE[0])],
                       series_uid=f'1.3.{number}')
    if split == 'Train_Sets':
        ground = os.path.join(base, 'Ground')
        os.makedirs(ground)
        for i in range(SHAPE[0]):  # the i-th PNG belongs to the i-th DICOM name, at position order.index(i)
            Image.fromarray(((label[order.index(i)] == 1) * 255).astype(np.uint8)).save(
                os.path.join(ground, f'liver_GT_{i:03d}.png'))
    return array


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def test_ct_slices_follow_dicom_positions_and_test_patients_go_to_imagesTs(tmp_path, env):
    src = str(tmp_path / 'CHAOS')
    labels = {1: _organs(1), 2: _organs(2)}
    cts = {n: _ct_case(src, n, labels[n]) for n in labels}
    test_ct = _ct_case(src, 30, _organs(3), split='Test_Sets')
    out = run(['nnunet-ext', 'convert', 'chaos', src, '--modality', 'CT', '--id', '721'], env).stdout
    target = os.path.join(env['nnUNet_raw'], 'Dataset721_CHAOSCT')
    verify_raw_dataset(target)
    assert 'cases: 2 training, 1 test' in out
    for n in labels:
        np.testing.assert_array_equal(_read(os.path.join(target, 'imagesTr', f'chaos_ct_{n:02d}_0000.nii.gz')), cts[n])
        np.testing.assert_array_equal(_read(os.path.join(target, 'labelsTr', f'chaos_ct_{n:02d}.nii.gz')),
                                      (labels[n] == 1).astype(np.uint8))
    np.testing.assert_array_equal(_read(os.path.join(target, 'imagesTs', 'chaos_ct_30_0000.nii.gz')), test_ct)


@pytest.mark.parametrize('merge', [False, True])
def test_t2spir_grey_levels_map_to_organs_and_kidneys_can_be_merged(tmp_path, env, merge):
    src = str(tmp_path / 'CHAOS')
    label = _organs(1)
    (image,) = _mr_case(src, 1, 'T2SPIR', label)
    run(['nnunet-ext', 'convert', 'chaos', src, '--modality', 'T2SPIR', '--id', '722']
        + (['--merge-kidneys'] if merge else []), env)
    target = os.path.join(env['nnUNet_raw'], 'Dataset722_CHAOST2SPIR')
    verify_raw_dataset(target)
    expected = np.select([label == 1, label == 2, label == 3, label == 4], [1, 2, 2, 3] if merge else [1, 2, 3, 4], 0)
    np.testing.assert_array_equal(_read(os.path.join(target, 'labelsTr', 'chaos_t2spir_01.nii.gz')), expected)
    np.testing.assert_array_equal(_read(os.path.join(target, 'imagesTr', 'chaos_t2spir_01_0000.nii.gz')), image)


def test_t1dual_phases_become_two_channels(tmp_path, env):
    src = str(tmp_path / 'CHAOS')
    label = _organs(2)
    in_phase, out_phase = _mr_case(src, 2, 'T1DUAL', label)
    run(['nnunet-ext', 'convert', 'chaos', src, '--modality', 'T1DUAL', '--id', '723'], env)
    target = os.path.join(env['nnUNet_raw'], 'Dataset723_CHAOST1DUAL')
    verify_raw_dataset(target)
    np.testing.assert_array_equal(_read(os.path.join(target, 'imagesTr', 'chaos_t1dual_02_0000.nii.gz')), in_phase)
    np.testing.assert_array_equal(_read(os.path.join(target, 'imagesTr', 'chaos_t1dual_02_0001.nii.gz')), out_phase)
    np.testing.assert_array_equal(_read(os.path.join(target, 'labelsTr', 'chaos_t1dual_02.nii.gz')), label)


def test_a_grey_level_outside_the_organ_ranges_and_a_missing_slice_are_refused(tmp_path, env):
    src = str(tmp_path / 'CHAOS')
    _mr_case(src, 3, 'T2SPIR', _organs(3))
    ground = os.path.join(src, 'Train_Sets', 'MR', '3', 'T2SPIR', 'Ground')
    png = os.path.join(ground, 'IMG-0002-00002.png')
    grey = np.asarray(Image.open(png)).copy()
    grey[0, 1] = 90
    Image.fromarray(grey).save(png)
    result = run(['nnunet-ext', 'convert', 'chaos', src, '--modality', 'T2SPIR', '--id', '724'], env, check=False)
    assert_refused(result, r'chaos_t2spir_03: ground truth .*IMG-0002-00002\.png has grey values \[90\] outside',
                   env['nnUNet_raw'])
    os.remove(png)
    result = run(['nnunet-ext', 'convert', 'chaos', src, '--modality', 'T2SPIR', '--id', '724'], env, check=False)
    assert_refused(result, 'chaos_t2spir_03: 4 ground-truth PNGs for 5 DICOM slices', env['nnUNet_raw'])
