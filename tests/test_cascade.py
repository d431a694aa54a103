"""The liver -> tumour cascade (``nnunet-ext cascade-predict``, ResUNet paper Sections II-E/F).

Unit part: the pasting logic on a phantom with known liver and tumour: perfect stage outputs (the
reference liver as stage 1, the reference tumour of the crop as stage 2) must give back the reference
label map exactly. CLI part (marked cli): a tiny 3D liver+tumour phantom in the LiTS layout -> ``convert
lits`` twice (full, and ``--crop-to-label liver``) -> the stock plan_and_preprocess (both datasets at
once) and nnUNetv2_train (ResUNet, 3 iterations, in parallel) -> ``cascade-predict`` with the liver model
and with reference liver masks. Models trained for 3 iterations find nothing reliably, so the CLI part
checks geometry and the consistency of the fusion with the stage-1 masks (tumour only inside the liver
box, liver exactly where stage 1 found it unless stage 2 says tumour)."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import SimpleITK as sitk

from cli_helpers import SHORT_TRAINING, run, run_parallel, user_environment
from nnunet_ext.conversion.crop_to_label import bounding_box, margin_in_voxels, resolve_crop_labels
from nnunet_ext.demo.phantom import make_phantom_case
from nnunet_ext.errors import UserInputError
from nnunet_ext.inference.cascade import StageModel, crop_case_to_liver, fuse_stages, list_cases, paste_case

LITS_LABELS = {'background': 0, 'liver': 1, 'tumor': 2}
SHAPE = (12, 32, 32)
SPACING_ZYX = (2.5, 0.8, 0.8)  # the phantom's
MARGIN_MM = 4.0
ORIGIN = (-100.0, 20.0, 50.0)
_C, _S = np.cos(0.2), np.sin(0.2)
DIRECTION = (_C, -_S, 0.0, _S, _C, 0.0, 0.0, 0.0, 1.0)


def _image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(reversed(SPACING_ZYX)))
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    return image


def _phantom(seed: int):
    return make_phantom_case(np.random.default_rng(seed), SHAPE)


# ---------------------------------------------------------------- unit: the fusion of the two stages
def test_perfect_stages_give_back_the_reference_label_map(tmp_path):
    """crop (files) -> perfect stage-2 output on the crop (the reference tumour, crop numbering, crop
    geometry) -> paste: the reference label map, on the image's grid."""
    labels = resolve_crop_labels(LITS_LABELS, 'liver')
    tumour_values = {v: k for k, v in labels.value_map.items()}
    for seed in range(3):
        case = _phantom(seed)
        assert (case.label == 2).any()
        image, mask = str(tmp_path / f'c{seed}_0000.nii.gz'), str(tmp_path / f'c{seed}.nii.gz')
        sitk.WriteImage(_image(case.image), image)
        sitk.WriteImage(_image(case.label), mask)  # a perfect liver model
        crop = str(tmp_path / f'crop{seed}_0000.nii.gz')
        box = crop_case_to_liver(f'c{seed}', [image], mask, labels.region_values, MARGIN_MM, [crop])
        region = np.isin(case.label, labels.region_values)
        assert box == bounding_box(region, margin_in_voxels(MARGIN_MM, SPACING_ZYX))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(crop)), case.image[box])
        stage2 = sitk.GetImageFromArray(labels.remap(case.label[box]))  # a perfect tumour model on the crop
        stage2.CopyInformation(sitk.ReadImage(crop))
        stage2_path = str(tmp_path / f'crop{seed}.nii.gz')
        sitk.WriteImage(stage2, stage2_path)
        out = str(tmp_path / f'out{seed}.nii.gz')
        paste_case(f'c{seed}', image, mask, labels.region_values, labels.source['liver'], box, stage2_path,
                   tumour_values, out)
        fused = sitk.ReadImage(out)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(fused), case.label)
        np.testing.assert_allclose(fused.GetOrigin(), ORIGIN, atol=1e-4)
        np.testing.assert_allclose(fused.GetDirection(), DIRECTION, atol=1e-6)
    empty = str(tmp_path / 'empty.nii.gz')
    sitk.WriteImage(_image(np.zeros(SHAPE, np.uint8)), empty)
    assert crop_case_to_liver('e', [image], empty, labels.region_values, MARGIN_MM, [str(tmp_path / 'x.nii.gz')]) \
        is None and not os.path.exists(tmp_path / 'x.nii.gz')


def test_tumour_comes_from_stage2_inside_the_box_only_and_liver_from_stage1():
    reference = _phantom(5).label
    region = reference > 0
    box = bounding_box(region, (1, 2, 2))
    crop_shape = tuple(b.stop - b.start for b in box)
    everywhere = np.ones(crop_shape, np.uint8)  # stage 2 says tumour on the whole crop
    fused = fuse_stages(region, 1, box, everywhere, {1: 2})
    in_box = np.zeros(reference.shape, bool)
    in_box[box] = True
    np.testing.assert_array_equal(fused, np.where(in_box, 2, 0))  # region lies inside its own box
    nothing = fuse_stages(region, 1, box, np.zeros(crop_shape, np.uint8), {1: 2})
    np.testing.assert_array_equal(nothing, region.astype(np.uint8))  # stage-1 tumour becomes liver
    np.testing.assert_array_equal(fuse_stages(np.zeros(SHAPE, bool), 1), np.zeros(SHAPE))  # no liver found
    with pytest.raises(ValueError, match='does not fit the box'):
        fuse_stages(region, 1, box, everywhere[:-1], {1: 2})
    with pytest.raises(ValueError, match=r'labels \[3\]'):
        fuse_stages(region, 1, box, everywhere * 3, {1: 2})


def test_inputs_and_model_options_are_checked(tmp_path):
    for name in ('a_0000.nii.gz', 'a_0001.nii.gz', 'b_0000.nii.gz', 'notes.txt'):
        (tmp_path / name).write_bytes(b'')
    with pytest.raises(UserInputError, match=r'b: channels \[0\] .* take 2'):
        list_cases(str(tmp_path), '.nii.gz', 2)
    (tmp_path / 'b_0001.nii.gz').write_bytes(b'')
    assert list_cases(str(tmp_path), '.nii.gz', 2) == {
        c: [str(tmp_path / f'{c}_000{i}.nii.gz') for i in range(2)] for c in 'ab'}
    with pytest.raises(UserInputError, match='no CASE_0000.mha images'):
        list_cases(str(tmp_path), '.mha', 1)
    model = StageModel.parse(['501', '2d', 'nnUNetTrainerResUNet'], 'nnUNetPlans', '--liver')
    assert model.folds == ('0', '1', '2', '3', '4')
    assert StageModel.parse(['501', '2d', 'T', 'all'], 'P', '--liver').folds == ('all',)
    with pytest.raises(UserInputError, match='DATASET CONFIG TRAINER'):
        StageModel.parse(['501', '2d'], 'P', '--tumour')
    with pytest.raises(UserInputError, match='folds are numbers'):
        StageModel.parse(['501', '2d', 'T', 'x'], 'P', '--tumour')


# ---------------------------------------------------------------- CLI: the whole pipeline
LIVER_ID, TUMOUR_ID = 311, 312
TRAINER = 'nnUNetTrainerResUNet'
CONFIGURATION = '2d'  # 2D networks on the 3D volumes (slice-wise, as the paper): the fastest on CPU


def _lits_source(folder: str, labels_folder: str) -> None:
    """5 training volumes + 2 test volumes in LiTS naming; the test volumes' references to labels_folder
    named as the converter names the test cases (lits_test_NNN)."""
    os.makedirs(folder)
    os.makedirs(labels_folder)
    for number in range(7):
        case = _phantom(100 + number)
        test = number >= 5
        image = _image(case.image.astype(np.int16))
        label = _image(case.label)
        if test:
            sitk.WriteImage(image, os.path.join(folder, f'test-volume-{number - 5}.nii.gz'))
            sitk.WriteImage(label, os.path.join(labels_folder, f'lits_test_{number - 5:03d}.nii.gz'))
        else:
            sitk.WriteImage(image, os.path.join(folder, f'volume-{number}.nii.gz'))
            sitk.WriteImage(label, os.path.join(folder, f'segmentation-{number}.nii.gz'))


@pytest.fixture(scope='module')
def cascade(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('cascade'))
    env = user_environment(root)
    source, references = os.path.join(root, 'LiTS'), os.path.join(root, 'references')
    _lits_source(source, references)
    run_parallel([['nnunet-ext', 'convert', 'lits', source, '--id', str(LIVER_ID), '-np', '1'],
                  ['nnunet-ext', 'convert', 'lits', source, '--id', str(TUMOUR_ID), '-np', '1', '--crop-to-label',
                   'liver', '--crop-margin', str(MARGIN_MM)]], env)
    run(['nnUNetv2_plan_and_preprocess', '-d', str(LIVER_ID), str(TUMOUR_ID), '-c', CONFIGURATION,
         '--verify_dataset_integrity', '-np', '2', '-npfp', '2'], {**env, 'nnUNet_n_proc_DA': '1'})
    train_env = {**env, **SHORT_TRAINING, 'nnUNet_n_proc_DA': '0'}
    run_parallel([['nnUNetv2_train', str(d), CONFIGURATION, '0', '-tr', TRAINER, '-device', 'cpu']
                  for d in (LIVER_ID, TUMOUR_ID)], train_env)
    images = os.path.join(env['nnUNet_raw'], 'Dataset311_LiTS', 'imagesTs')
    out = {k: os.path.join(root, f'out_{k}') for k in ('model', 'references', 'refused')}
    common = ['--tumour', str(TUMOUR_ID), CONFIGURATION, TRAINER, '0', '-device', 'cpu', '-npp', '0', '-nps', '0',
              '--disable_tta', '--no_pbar']
    masks = os.path.join(root, 'stage1')
    results = run_parallel([
        ['nnunet-ext', 'cascade-predict', '-i', images, '-o', out['model'], '--liver', str(LIVER_ID),
         CONFIGURATION, TRAINER, '0', '--save_liver_masks', masks, *common],
        ['nnunet-ext', 'cascade-predict', '-i', images, '-o', out['references'], '--liver_masks', references,
         '--margin', str(MARGIN_MM), *common]], env)
    refused = run(['nnunet-ext', 'cascade-predict', '-i', images, '-o', out['refused'], '--liver_masks', references,
                   '--margin', '7', *common], env, check=False)
    return dict(env=env, images=images, references=references, masks=masks, out=out, refused=refused,
                logs={'model': results[0], 'references': results[1]})


def _check_fusion(output: np.ndarray, stage1: np.ndarray) -> None:
    """Liver exactly where stage 1 found liver/tumour and stage 2 no tumour; tumour only inside the
    stage-1 bounding box + margin."""
    region = np.isin(stage1, (1, 2))
    if not region.any():
        assert not output.any()
        return
    box = bounding_box(region, margin_in_voxels(MARGIN_MM, SPACING_ZYX))
    in_box = np.zeros(region.shape, bool)
    in_box[box] = True
    assert set(np.unique(output)) <= {0, 1, 2}
    np.testing.assert_array_equal(output == 1, region & (output != 2))
    assert not (output[~in_box]).any()


@pytest.mark.cli
def test_outputs_are_label_maps_on_the_input_grids(cascade):
    cases = sorted(f[:-len('_0000.nii.gz')] for f in os.listdir(cascade['images']))
    assert cases == ['lits_test_000', 'lits_test_001']
    for run_name in ('model', 'references'):
        assert sorted(os.listdir(cascade['out'][run_name])) == [c + '.nii.gz' for c in cases]  # no scratch left
        for case in cases:
            image = sitk.ReadImage(os.path.join(cascade['images'], f'{case}_0000.nii.gz'))
            output = sitk.ReadImage(os.path.join(cascade['out'][run_name], f'{case}.nii.gz'))
            assert output.GetSize() == image.GetSize() == tuple(reversed(SHAPE))
            np.testing.assert_allclose(output.GetOrigin(), ORIGIN, atol=1e-4)
            np.testing.assert_allclose(output.GetSpacing(), image.GetSpacing(), atol=1e-6)
            np.testing.assert_allclose(output.GetDirection(), DIRECTION, atol=1e-6)


@pytest.mark.cli
def test_with_reference_liver_masks_liver_and_tumour_are_where_expected(cascade):
    assert 'cases without liver (all background): 0' in cascade['logs']['references'].stdout
    for name in os.listdir(cascade['out']['references']):
        reference = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(cascade['references'], name)))
        output = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(cascade['out']['references'], name)))
        _check_fusion(output, reference)


@pytest.mark.cli
def test_with_the_liver_model_end_to_end(cascade):
    log = cascade['logs']['model']
    assert sorted(os.listdir(cascade['masks'])) == sorted(os.listdir(cascade['out']['model']))
    without = re.search(r'cases without liver \(all background\): (\d+)', log.stdout)
    assert without is not None, log.stdout
    empty = 0
    for name in os.listdir(cascade['out']['model']):
        stage1 = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(cascade['masks'], name)))
        output = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(cascade['out']['model'], name)))
        empty += not np.isin(stage1, (1, 2)).any()
        _check_fusion(output, stage1)
    assert int(without.group(1)) == empty
    assert log.stderr.count('no liver found by stage 1') == empty


@pytest.mark.cli
def test_a_margin_other_than_the_training_crops_is_refused(cascade):
    result = cascade['refused']
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert re.search(r'--margin 7 mm, but the tumour model was trained on crops with a 4 mm margin', result.stderr)
    assert not os.path.exists(cascade['out']['refused'])
