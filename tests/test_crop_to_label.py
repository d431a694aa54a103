"""Cropping to a label's bounding box (``nnunet_ext.conversion.crop_to_label``): boxes against numpy's
``nonzero``, crops against SimpleITK's own index -> physical point transform of the full image, the crop
-> paste round trip exact, a whole raw dataset cropped (labels renumbered, cases without the label
skipped, dataset.json record, nnU-Net's integrity check) and nothing left behind on errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from cli_helpers import assert_refused, run, verify_raw_dataset
from nnunet_ext.conversion.crop_to_label import (RECORD_KEY, bounding_box, crop_dataset_to_label, crop_image,
                                                 margin_in_voxels, paste, resolve_crop_labels)
from nnunet_ext.demo.phantom import make_phantom_case
from nnunet_ext.errors import UserInputError

LITS_LABELS = {'background': 0, 'liver': 1, 'tumor': 2}
SPACING_XYZ = (0.8, 0.7, 2.5)
ORIGIN = (-120.0, 35.0, 60.0)
# a rotation about z and a flip of z, so index -> physical point is not a plain shift
_C, _S = np.cos(0.3), np.sin(0.3)
DIRECTION = (_C, -_S, 0.0, _S, _C, 0.0, 0.0, 0.0, -1.0)


def _image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    return image


def _naive_box(mask: np.ndarray, margin):
    idx = np.nonzero(mask)
    return tuple(slice(max(0, int(i.min()) - m), min(n, int(i.max()) + 1 + m))
                 for i, m, n in zip(idx, margin, mask.shape))


# ---------------------------------------------------------------- boxes and margins
def test_margin_is_the_smallest_whole_number_of_voxels_covering_the_millimetres():
    assert margin_in_voxels(10.0, (2.5, 0.8, 0.7)) == (4, 13, 15)  # 10/2.5 = 4 exactly: not 5
    assert margin_in_voxels(0.0, (2.5, 0.8)) == (0, 0)
    assert margin_in_voxels(1.0, (3.0,)) == (1,)
    with pytest.raises(UserInputError, match='>= 0'):
        margin_in_voxels(-1.0, (1.0,))


@pytest.mark.parametrize('margin', [(0, 0, 0), (1, 2, 3), (5, 40, 40)])
def test_bounding_box_matches_numpy_nonzero_and_is_clipped(margin):
    rng = np.random.default_rng(0)
    mask = np.zeros((10, 30, 28), bool)
    mask[3:6, 4:20, 10:12] = rng.random((3, 16, 2)) > 0.3
    mask[7, 25, 2] = True
    assert bounding_box(mask, margin) == _naive_box(mask, margin)
    assert bounding_box(np.zeros((4, 4), bool), (1, 1)) is None


# ---------------------------------------------------------------- crop and paste
def test_crop_keeps_every_voxel_at_its_physical_position_and_paste_restores_the_array():
    rng = np.random.default_rng(1)
    array = rng.normal(size=(9, 20, 24)).astype(np.float32)
    image = _image(array)
    box = (slice(2, 7), slice(5, 17), slice(3, 22))
    crop = crop_image(image, box)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(crop), array[box])
    assert crop.GetSpacing() == image.GetSpacing() and crop.GetDirection() == image.GetDirection()
    for k, j, i in [(0, 0, 0), (4, 11, 18), (2, 7, 5)]:  # crop index (x, y, z) -> same point as the full image's
        full_index = (i + box[2].start, j + box[1].start, k + box[0].start)
        np.testing.assert_allclose(crop.TransformIndexToPhysicalPoint((i, j, k)),
                                   image.TransformIndexToPhysicalPoint(full_index), atol=1e-9)
    pasted = paste(sitk.GetArrayFromImage(crop), box, array.shape)
    np.testing.assert_array_equal(pasted[box], array[box])
    outside = np.ones(array.shape, bool)
    outside[box] = False
    assert not pasted[outside].any()
    with pytest.raises(ValueError, match='does not fit'):
        paste(array[:2], box, array.shape)


# ---------------------------------------------------------------- labels
def test_labels_crop_label_becomes_background_and_kept_labels_are_renumbered():
    labels = resolve_crop_labels(LITS_LABELS, 'liver')
    assert labels.kept == ('tumor',) and labels.region_values == (1, 2)
    assert labels.crop_dataset_labels == {'background': 0, 'tumor': 1}
    np.testing.assert_array_equal(labels.remap(np.array([0, 1, 2, 2, 1])), [0, 0, 1, 1, 0])
    assert resolve_crop_labels(LITS_LABELS, '1') == labels  # by number
    many = {'background': 0, 'liver': 1, 'vessel': 2, 'tumor': 3, 'kidney': 4}
    kept = resolve_crop_labels(many, 'liver', ['tumor', 'vessel'])
    assert kept.kept == ('vessel', 'tumor')  # source order
    np.testing.assert_array_equal(kept.remap(np.array([0, 1, 2, 3, 4])), [0, 0, 1, 2, 0])
    assert type(labels).from_record(labels.record(10.0, 'Dataset501_LiTS', [])) == labels
    assert not labels.keeps_crop_label
    old_record = labels.record(10.0, 'Dataset501_LiTS', [])
    del old_record['kept_labels']  # records written before the coarse-to-fine option
    assert type(labels).from_record(old_record) == labels


def test_labels_the_crop_label_can_be_kept_and_is_kept_when_it_is_the_only_one():
    """Coarse-to-fine of one structure (multi-level paper, Section 2.2): the fine stage segments the crop
    label itself."""
    pancreas = resolve_crop_labels({'background': 0, 'pancreas': 1}, 'pancreas')
    assert pancreas.kept == ('pancreas',) and pancreas.keeps_crop_label and pancreas.region_values == (1,)
    assert pancreas.crop_dataset_labels == {'background': 0, 'pancreas': 1}
    both = resolve_crop_labels(LITS_LABELS, 'liver', ['tumor', 'liver'])
    assert both.kept == ('liver', 'tumor') and both.region_labels == ('liver', 'tumor')
    assert both.crop_dataset_labels == {'background': 0, 'liver': 1, 'tumor': 2}
    np.testing.assert_array_equal(both.remap(np.array([0, 1, 2, 2, 1])), [0, 1, 2, 2, 1])
    assert type(both).from_record(both.record(20.0, 'x', [])) == both


@pytest.mark.parametrize('labels, label, keep, message', [
    (LITS_LABELS, 'spleen', None, r"'spleen' is not a label of this dataset; its labels: liver \(1\), tumor \(2\)"),
    (LITS_LABELS, 'liver', ['tumor', 'tumor'], 'names a label twice'),
    ({'background': 0, 'liver_and_tumor': [1, 2], 'tumor': 2}, 'tumor', None, 'regions'),
])
def test_bad_label_choices_are_refused(labels, label, keep, message):
    with pytest.raises(UserInputError, match=message):
        resolve_crop_labels(labels, label, keep)


# ---------------------------------------------------------------- a whole dataset
def _write_raw_dataset(folder: str) -> dict:
    """4 labelled training cases (one without liver), 1 labelled and 1 unlabelled test case; LiTS labels."""
    rng = np.random.default_rng(3)
    arrays = {}
    for sub in ('imagesTr', 'labelsTr', 'imagesTs', 'labelsTs'):
        os.makedirs(os.path.join(folder, sub))
    for split, case in [('Tr', 'c0'), ('Tr', 'c1'), ('Tr', 'c2'), ('Tr', 'empty'), ('Ts', 't0'), ('Ts', 'unlabelled')]:
        phantom = make_phantom_case(rng, (8, 32, 32))
        label = np.zeros_like(phantom.label) if case == 'empty' else phantom.label
        arrays[case] = (phantom.image, label)
        sitk.WriteImage(_image(phantom.image), os.path.join(folder, f'images{split}', f'{case}_0000.nii.gz'))
        if case != 'unlabelled':
            sitk.WriteImage(_image(label), os.path.join(folder, f'labels{split}', f'{case}.nii.gz'))
    with open(os.path.join(folder, 'dataset.json'), 'w') as f:
        json.dump({'channel_names': {'0': 'CT'}, 'labels': LITS_LABELS, 'numTraining': 4, 'file_ending': '.nii.gz',
                   'name': 'Dataset501_LiTS', 'nnunet_ext_intensity': {'window': [-100, 400], 'hist_eq': True}}, f)
    return arrays


def test_a_raw_dataset_cropped_to_the_liver(tmp_path):
    source = str(tmp_path / 'scratch' / 'Dataset501_LiTS')
    arrays = _write_raw_dataset(source)
    raw = str(tmp_path / 'raw')
    messages = []
    target, summary, labels, skipped = crop_dataset_to_label(source, raw, 502, None, False, 'liver', 5.0,
                                                             num_processes=1, log=messages.append)
    assert os.path.basename(target) == 'Dataset502_LiTS_liverCrop' and os.listdir(raw) == [os.path.basename(target)]
    assert skipped == ['empty'] and any('empty' in m for m in messages)
    assert summary.training_cases == 3 and summary.test_cases == 1
    with open(os.path.join(target, 'dataset.json')) as f:
        dataset = json.load(f)
    assert dataset['labels'] == {'background': 0, 'tumor': 1} and dataset['numTraining'] == 3
    assert dataset['nnunet_ext_intensity'] == {'window': [-100, 400], 'hist_eq': True}  # kept for preprocess-images
    record = dataset[RECORD_KEY]
    assert record['label'] == 'liver' and record['region_labels'] == ['liver', 'tumor']
    assert record['margin_mm'] == 5.0 and record['label_map'] == {'2': 1} and record['skipped_cases'] == ['empty']
    assert record['source_labels'] == LITS_LABELS and record['source'] == 'Dataset501_LiTS'
    assert not os.path.exists(os.path.join(target, 'imagesTs', 'unlabelled_0000.nii.gz'))
    margin = (2, 8, 7)  # ceil(5 / (2.5, 0.7, 0.8))
    for split, case in [('Tr', 'c0'), ('Tr', 'c1'), ('Tr', 'c2'), ('Ts', 't0')]:
        image, label = arrays[case]
        box = _naive_box(label > 0, margin)
        crop = sitk.ReadImage(os.path.join(target, f'images{split}', f'{case}_0000.nii.gz'))
        crop_label = sitk.ReadImage(os.path.join(target, f'labels{split}', f'{case}.nii.gz'))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(crop), image[box])
        np.testing.assert_array_equal(sitk.GetArrayFromImage(crop_label), (label[box] == 2).astype(np.uint8))
        first = tuple(b.start for b in reversed(box))
        np.testing.assert_allclose(crop.GetOrigin(), _image(image).TransformIndexToPhysicalPoint(first), atol=1e-6)
        assert crop_label.GetOrigin() == crop.GetOrigin()
        np.testing.assert_allclose(crop.GetDirection(), DIRECTION, atol=1e-6)  # NIfTI stores float32
    verify_raw_dataset(target)  # nnU-Net's own integrity check


def test_errors_leave_nothing_behind(tmp_path):
    source = str(tmp_path / 'Dataset501_LiTS')
    _write_raw_dataset(source)
    raw = str(tmp_path / 'raw')
    os.makedirs(raw)
    with pytest.raises(UserInputError, match='spleen'):
        crop_dataset_to_label(source, raw, 502, None, False, 'spleen', num_processes=1)
    os.remove(os.path.join(source, 'imagesTr', 'c1_0000.nii.gz'))
    with pytest.raises(UserInputError, match='c1: label .* but no image'):
        crop_dataset_to_label(source, raw, 502, None, False, 'liver', num_processes=1)
    assert os.listdir(raw) == []


def test_convert_refuses_an_unknown_crop_label_and_leaves_nothing(tmp_path, env):
    source = tmp_path / 'LiTS'
    source.mkdir()
    phantom = make_phantom_case(np.random.default_rng(0), (6, 24, 24))
    sitk.WriteImage(_image(phantom.image.astype(np.int16)), str(source / 'volume-0.nii.gz'))
    sitk.WriteImage(_image(phantom.label), str(source / 'segmentation-0.nii.gz'))
    os.makedirs(env['nnUNet_raw'], exist_ok=True)
    result = run(['nnunet-ext', 'convert', 'lits', str(source), '--id', '503', '--crop-to-label', 'spleen',
                  '-np', '1'], env, check=False)
    assert_refused(result, r"convert: error: --crop-to-label 'spleen' is not a label of this dataset",
                   env['nnUNet_raw'])
