"""Two-stage prediction (``nnunet-ext cascade-predict``): the ResUNet paper's liver -> tumour cascade
(Sections II-E/F) and the multi-level paper's coarse-to-fine with test-time refinement (Section 2.2,
Algorithm 1, Eq. 14).

Unit part: the pasting logic on a phantom with known liver and tumour: perfect stage outputs (the
reference liver as stage 1, the reference tumour of the crop as stage 2) must give back the reference
label map exactly; the refinement loop with fake predictors (a perfect fine model drops a coarse false
positive and converges in round 2; a drifting one stops at the maximum; an empty one stops). CLI part
(marked cli): a tiny 3D liver+tumour phantom in the LiTS layout -> ``convert lits`` three times (full,
``--crop-to-label liver``, and ``--crop-to-label liver --crop-keep liver tumor`` for coarse-to-fine) ->
the stock plan_and_preprocess (all at once, with ``--verify_dataset_integrity``: converted datasets pass
nnU-Net's integrity check and preprocessing) and nnUNetv2_train (ResUNet, 3 iterations, in parallel) ->
``cascade-predict`` with the liver model, with reference liver masks, and coarse-to-fine with
``--refine 3``. Models trained for 3 iterations find nothing reliably, so the CLI part checks geometry,
the consistency of the fusion with the stage-1 masks (tumour only inside the liver box, liver exactly
where stage 1 found it unless stage 2 says tumour) and the refinement's bookkeeping."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np
import pytest
import SimpleITK as sitk

from cli_helpers import SHORT_TRAINING, assert_preactivation_resunet_fold, run, run_parallel, user_environment
from nnunet_ext.conversion.crop_to_label import RECORD_KEY, bounding_box, margin_in_voxels, resolve_crop_labels
from nnunet_ext.demo.phantom import make_phantom_case
from nnunet_ext.errors import UserInputError
from nnunet_ext.inference import cascade as cascade_module
from nnunet_ext.inference.cascade import (PredictorSettings, Refinement, StageModel, crop_case, fuse_stages,
                                          list_cases, paste_case, read_coarse_region, relative_dice, run_cascade)

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
        region, spacing = read_coarse_region(f'c{seed}', image, mask, labels.region_values)
        np.testing.assert_array_equal(region, case.label > 0)
        assert spacing == pytest.approx(SPACING_ZYX)
        box = bounding_box(region, margin_in_voxels(MARGIN_MM, spacing))
        crop = str(tmp_path / f'crop{seed}_0000.nii.gz')
        crop_case(f'c{seed}', [image], box, [crop])
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(crop)), case.image[box])
        stage2 = sitk.GetImageFromArray(labels.remap(case.label[box]))  # a perfect tumour model on the crop
        stage2.CopyInformation(sitk.ReadImage(crop))
        stage2_path = str(tmp_path / f'crop{seed}.nii.gz')
        sitk.WriteImage(stage2, stage2_path)
        out = str(tmp_path / f'out{seed}.nii.gz')
        paste_case(f'c{seed}', image, box, stage2_path, tumour_values, out, region, labels.source['liver'])
        fused = sitk.ReadImage(out)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(fused), case.label)
        np.testing.assert_allclose(fused.GetOrigin(), ORIGIN, atol=1e-4)
        np.testing.assert_allclose(fused.GetDirection(), DIRECTION, atol=1e-6)


def test_tumour_comes_from_stage2_inside_the_box_only_and_liver_from_stage1():
    reference = _phantom(5).label
    region = reference > 0
    box = bounding_box(region, (1, 2, 2))
    crop_shape = tuple(b.stop - b.start for b in box)
    everywhere = np.ones(crop_shape, np.uint8)  # stage 2 says tumour on the whole crop
    fused = fuse_stages(SHAPE, box, everywhere, {1: 2}, region, 1)
    in_box = np.zeros(reference.shape, bool)
    in_box[box] = True
    np.testing.assert_array_equal(fused, np.where(in_box, 2, 0))  # region lies inside its own box
    nothing = fuse_stages(SHAPE, box, np.zeros(crop_shape, np.uint8), {1: 2}, region, 1)
    np.testing.assert_array_equal(nothing, region.astype(np.uint8))  # stage-1 tumour becomes liver
    np.testing.assert_array_equal(fuse_stages(SHAPE, coarse_region=np.zeros(SHAPE, bool), coarse_value=1),
                                  np.zeros(SHAPE))  # no liver found
    with pytest.raises(ValueError, match='does not fit the box'):
        fuse_stages(SHAPE, box, everywhere[:-1], {1: 2}, region, 1)
    with pytest.raises(ValueError, match=r'labels \[3\]'):
        fuse_stages(SHAPE, box, everywhere * 3, {1: 2}, region, 1)


def test_a_fine_stage_that_keeps_the_crop_label_replaces_the_coarse_output_inside_the_box():
    """Coarse-to-fine: no coarse region is passed; the output is the fine crop pasted, 0 elsewhere, even
    where the fine stage says background inside the coarse region."""
    rng = np.random.default_rng(0)
    box = (slice(2, 7), slice(5, 20), slice(0, 9))
    fine = (rng.random((5, 15, 9)) > 0.5).astype(np.uint8)
    expected = np.zeros(SHAPE, np.uint8)
    expected[box] = fine * 3  # crop value 1 -> source value 3
    np.testing.assert_array_equal(fuse_stages(SHAPE, box, fine, {1: 3}), expected)


def test_relative_dice_is_equation_14():
    a = np.zeros((4, 5), bool)
    b = np.zeros((4, 5), bool)
    a[0, :4] = True  # 4 voxels
    b[0, 2:] = True  # 3 voxels, 2 shared
    assert relative_dice(a, b) == pytest.approx(2 * 2 / (4 + 3))
    assert relative_dice(a, a) == 1.0 and relative_dice(a, ~a) == 0.0
    assert relative_dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


# ---------------------------------------------------------------- unit: the refinement loop, with fake models
@dataclass(frozen=True)
class _FolderModel:
    """Stands in for StageModel: a model folder we wrote ourselves."""
    path: str
    option: str
    folds: tuple = ('0',)

    def folder(self, checkpoint):
        return self.path


class _FakePredictor:
    """Stands in for StagePredictor: ``rule(reference crop)`` for every crop, the crop located in its case's
    full image by its origin (crops keep their physical position)."""
    references: dict = {}
    rule = None
    calls: list = []

    def __init__(self, folder, folds, settings):
        self.folder = folder

    def predict(self, cases, output_folder):
        os.makedirs(output_folder, exist_ok=True)
        type(self).calls.append(sorted(cases))
        for case, paths in cases.items():
            crop = sitk.ReadImage(paths[0])
            full = _image(np.zeros(SHAPE, np.uint8))
            i, j, k = full.TransformPhysicalPointToIndex(crop.GetOrigin())
            x, y, z = crop.GetSize()
            box = (slice(k, k + z), slice(j, j + y), slice(i, i + x))
            out = sitk.GetImageFromArray(type(self).rule(self.references[case], box).astype(np.uint8))
            out.CopyInformation(crop)
            sitk.WriteImage(out, os.path.join(output_folder, case + '.nii.gz'))


def _fine_model_folder(folder: str, keep_crop: bool) -> str:
    labels = resolve_crop_labels({'background': 0, 'organ': 1}, 'organ') if keep_crop else \
        resolve_crop_labels(LITS_LABELS, 'liver')
    os.makedirs(folder)
    with open(os.path.join(folder, 'dataset.json'), 'w') as f:
        json.dump({'labels': labels.crop_dataset_labels, 'channel_names': {'0': 'CT'}, 'file_ending': '.nii.gz',
                   RECORD_KEY: labels.record(MARGIN_MM, 'test', [])}, f)
    return folder


def _organ(centre, radius=3) -> np.ndarray:
    zz, yy, xx = np.indices(SHAPE)
    return ((zz - centre[0]) ** 2 / 4 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) <= radius ** 2


@pytest.fixture
def refinement_case(tmp_path, monkeypatch):
    """One case: an organ, coarse masks = the organ + a false positive far away, a fine model folder that
    keeps the crop label; the predictor is faked."""
    monkeypatch.setattr(cascade_module, 'StagePredictor', _FakePredictor)
    _FakePredictor.calls = []
    organ = _organ((6, 10, 10))
    images, masks = tmp_path / 'images', tmp_path / 'masks'
    images.mkdir()
    masks.mkdir()
    sitk.WriteImage(_image(organ.astype(np.float32)), str(images / 'a_0000.nii.gz'))
    coarse = organ | _organ((6, 26, 26), 1)
    sitk.WriteImage(_image(coarse.astype(np.uint8)), str(masks / 'a.nii.gz'))
    _FakePredictor.references = {'a': organ}
    fine = _FolderModel(_fine_model_folder(str(tmp_path / 'fine'), keep_crop=True), '--fine')
    return dict(images=str(images), masks=str(masks), fine=fine, organ=organ, out=str(tmp_path / 'out'))


def _cascade(case, refinement):
    result = run_cascade(case['images'], case['out'], case['fine'], coarse_masks=case['masks'],
                         settings=PredictorSettings(device='cpu', progress=False), refinement=refinement,
                         log=lambda line: None)
    return result, sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(case['out'], 'a.nii.gz')))


def test_refinement_drops_a_coarse_false_positive_and_converges(refinement_case):
    """A perfect fine model: round 1 in the coarse box (organ + false positive) gives the organ; round 2
    in the organ's box gives it again: RDSC 1, converged; the output is the organ alone."""
    _FakePredictor.rule = staticmethod(lambda reference, box: reference[box])
    result, output = _cascade(refinement_case, Refinement(max_rounds=5))
    np.testing.assert_array_equal(output, refinement_case['organ'])
    assert result.rounds == {'a': 2} and result.rdsc == {'a': 1.0} and result.stopped == {'a': 'converged'}
    assert result.boxes['a'] == bounding_box(refinement_case['organ'], margin_in_voxels(MARGIN_MM, SPACING_ZYX))
    unrefined, output = _cascade(refinement_case, Refinement(max_rounds=1))
    assert unrefined.rounds == {'a': 1} and unrefined.stopped == {}
    np.testing.assert_array_equal(output, refinement_case['organ'])  # the perfect fine model ignores the FP


def test_refinement_stops_at_the_maximum_or_when_the_box_stops_changing(refinement_case):
    """A fine model that grows its prediction by one voxel along x every round never reaches RDSC 0.99 on
    this small organ: it stops after max_rounds; the box of a prediction equal to the coarse one does not
    change: one round."""
    def grow(reference, box):
        grown = reference | np.roll(reference, len(_FakePredictor.calls), axis=2)
        return grown[box]
    _FakePredictor.rule = staticmethod(grow)
    result, _ = _cascade(refinement_case, Refinement(max_rounds=3))
    assert result.rounds == {'a': 3} and result.stopped == {'a': 'maximum rounds'} and len(_FakePredictor.calls) == 3
    assert 0 < result.rdsc['a'] < 0.99
    _FakePredictor.calls = []
    sitk.WriteImage(_image(refinement_case['organ'].astype(np.uint8)),
                    os.path.join(refinement_case['masks'], 'a.nii.gz'))
    _FakePredictor.rule = staticmethod(lambda reference, box: reference[box])
    result, _ = _cascade(refinement_case, Refinement(max_rounds=3))
    assert result.rounds == {'a': 1} and result.stopped == {'a': 'box unchanged'} and len(_FakePredictor.calls) == 1


def test_an_empty_fine_prediction_stops_the_refinement_with_a_background_output(refinement_case):
    _FakePredictor.rule = staticmethod(lambda reference, box: np.zeros_like(reference[box]))
    result, output = _cascade(refinement_case, Refinement(max_rounds=4))
    assert result.stopped == {'a': 'empty fine prediction'} and result.rounds == {'a': 1} and not output.any()


def test_refinement_needs_a_fine_model_that_keeps_the_crop_label(tmp_path, refinement_case):
    tumour = _FolderModel(_fine_model_folder(str(tmp_path / 'tumour'), keep_crop=False), '--fine')
    with pytest.raises(UserInputError, match='--refine re-crops .* segments tumor inside liver'):
        run_cascade(refinement_case['images'], refinement_case['out'], tumour, coarse_masks=refinement_case['masks'],
                    refinement=Refinement(max_rounds=2))
    for bad, message in [((0, 0.99), 'fine rounds in all'), ((2, 1.5), r'in \(0, 1\]')]:
        with pytest.raises(UserInputError, match=message):
            Refinement(*bad)
    assert not os.path.exists(refinement_case['out'])


def test_inputs_and_model_options_are_checked(tmp_path):
    for name in ('a_0000.nii.gz', 'a_0001.nii.gz', 'b_0000.nii.gz', 'notes.txt'):
        (tmp_path / name).write_bytes(b'')
    with pytest.raises(UserInputError, match=r'b: channels \[0\] .* the models expect\(s\) 2'):
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
LIVER_ID, TUMOUR_ID, FINE_ID = 311, 312, 313  # FINE_ID: liver crops keeping liver (coarse-to-fine)
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
    convert = ['nnunet-ext', 'convert', 'lits', source, '-np', '1']
    crop = ['--crop-to-label', 'liver', '--crop-margin', str(MARGIN_MM)]
    run_parallel([[*convert, '--id', str(LIVER_ID)], [*convert, '--id', str(TUMOUR_ID), *crop],
                  [*convert, '--id', str(FINE_ID), *crop, '--crop-keep', 'liver', 'tumor']], env, workers=3)
    run(['nnUNetv2_plan_and_preprocess', '-d', str(LIVER_ID), str(TUMOUR_ID), str(FINE_ID), '-c', CONFIGURATION,
         '--verify_dataset_integrity', '-np', '1', '-npfp', '1'], {**env, 'nnUNet_n_proc_DA': '1'})
    train_env = {**env, **SHORT_TRAINING, 'nnUNet_n_proc_DA': '0'}
    trained = run_parallel([['nnUNetv2_train', str(d), CONFIGURATION, '0', '-tr', TRAINER, '-device', 'cpu']
                            for d in (LIVER_ID, TUMOUR_ID, FINE_ID)], train_env, workers=3)
    images = os.path.join(env['nnUNet_raw'], 'Dataset311_LiTS', 'imagesTs')
    out = {k: os.path.join(root, f'out_{k}') for k in ('model', 'references', 'coarse_to_fine', 'refused', 'refused2')}
    options = ['-device', 'cpu', '-npp', '0', '-nps', '0', '--disable_tta', '--no_pbar']
    common = ['--tumour', str(TUMOUR_ID), CONFIGURATION, TRAINER, '0', *options]
    masks = {k: os.path.join(root, f'coarse_{k}') for k in ('model', 'coarse_to_fine')}
    # the three runs and the two refusals in one round (the refusals, quick, take the workers freed first)
    *results, refused1, refused2 = run_parallel([
        ['nnunet-ext', 'cascade-predict', '-i', images, '-o', out['model'], '--liver', str(LIVER_ID),
         CONFIGURATION, TRAINER, '0', '--save_liver_masks', masks['model'], *common],
        ['nnunet-ext', 'cascade-predict', '-i', images, '-o', out['references'], '--liver_masks', references,
         '--margin', str(MARGIN_MM), *common],
        ['nnunet-ext', 'cascade-predict', '-i', images, '-o', out['coarse_to_fine'], '--coarse', str(LIVER_ID),
         CONFIGURATION, TRAINER, '0', '--fine', str(FINE_ID), CONFIGURATION, TRAINER, '0', '--refine', '3',
         '--save_coarse_masks', masks['coarse_to_fine'], *options],
        ['nnunet-ext', 'cascade-predict', '-i', images, '-o', out['refused'], '--liver_masks', references,
         '--margin', '7', *common],
        ['nnunet-ext', 'cascade-predict', '-i', images, '-o', out['refused2'], '--liver_masks', references,
         '--refine', '2', *common]], env, workers=3, check=False)
    for result in results:
        assert result.returncode == 0, result.stderr[-6000:]
    refused = [refused1, refused2]
    return dict(env=env, images=images, references=references, masks=masks, out=out, refused=refused,
                training_logs=[r.stdout for r in trained],
                logs={'model': results[0], 'references': results[1], 'coarse_to_fine': results[2]})


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
def test_the_stock_trainer_trains_the_preactivation_resunet_with_the_short_schedule(cascade):
    """The plain residual U-Net's stock-CLI training (its 3D GODC + LFAM variant: test_stock_cli_resunet.py)."""
    for dataset_id, log in zip((LIVER_ID, TUMOUR_ID, FINE_ID), cascade['training_logs']):
        assert 'training length from environment' in log
        dataset = next(d for d in os.listdir(cascade['env']['nnUNet_results']) if d.startswith(f'Dataset{dataset_id}_'))
        assert_preactivation_resunet_fold(os.path.join(cascade['env']['nnUNet_results'], dataset,
                                                       f'{TRAINER}__nnUNetPlans__{CONFIGURATION}', 'fold_0'),
                                          TRAINER, lfam=False)


@pytest.mark.cli
def test_outputs_are_label_maps_on_the_input_grids(cascade):
    cases = sorted(f[:-len('_0000.nii.gz')] for f in os.listdir(cascade['images']))
    assert cases == ['lits_test_000', 'lits_test_001']
    for run_name in ('model', 'references', 'coarse_to_fine'):
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
    assert sorted(os.listdir(cascade['masks']['model'])) == sorted(os.listdir(cascade['out']['model']))
    without = re.search(r'cases without liver \(all background\): (\d+)', log.stdout)
    assert without is not None, log.stdout
    empty = 0
    for name in os.listdir(cascade['out']['model']):
        stage1 = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(cascade['masks']['model'], name)))
        output = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(cascade['out']['model'], name)))
        empty += not np.isin(stage1, (1, 2)).any()
        _check_fusion(output, stage1)
    assert int(without.group(1)) == empty
    assert log.stderr.count('no liver found by the coarse stage') == empty


@pytest.mark.cli
def test_coarse_to_fine_with_refinement_end_to_end(cascade):
    """The fine model (313) segments liver and tumour inside the liver box: its output replaces the coarse
    one. Models of 3 iterations predict noise, so this checks the bookkeeping: each case's rounds, stop
    reason and RDSC as Algorithm 1 allows, and a case refined no further lies inside its coarse box."""
    log = cascade['logs']['coarse_to_fine']
    assert 'refinement (at most 3 fine rounds, RDSC tolerance 0.99):' in log.stdout
    summary = dict(re.findall(r'^  (lits_test_\d{3}): (.*)$', log.stdout, re.M))
    without = int(re.search(r'cases without liver \(all background\): (\d+)', log.stdout).group(1))
    assert len(summary) + without == 2, log.stdout
    for case, line in summary.items():
        found = re.fullmatch(r'(\d) round\(s\)(?:, RDSC ([\d.]+))?, stopped: (.+)', line)
        assert found is not None, line
        rounds, rdsc, stopped = int(found.group(1)), found.group(2), found.group(3)
        assert 1 <= rounds <= 3 and (rdsc is not None) == (rounds > 1)
        assert stopped in {'converged', 'box unchanged', 'empty fine prediction', 'maximum rounds'}
        assert (stopped == 'converged') == (rdsc is not None and float(rdsc) >= 0.99)
        assert stopped != 'maximum rounds' or rounds == 3
        output = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(cascade['out']['coarse_to_fine'],
                                                                    case + '.nii.gz')))
        assert set(np.unique(output)) <= {0, 1, 2}
        if rounds == 1:
            coarse = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(cascade['masks']['coarse_to_fine'],
                                                                        case + '.nii.gz')))
            box = bounding_box(np.isin(coarse, (1, 2)), margin_in_voxels(MARGIN_MM, SPACING_ZYX))
            outside = np.ones(output.shape, bool)
            outside[box] = False
            assert not output[outside].any()


@pytest.mark.cli
def test_a_margin_other_than_the_training_crops_and_refining_a_tumour_model_are_refused(cascade):
    margin, refine = cascade['refused']
    for result in (margin, refine):
        assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr
    assert re.search(r'--margin 7 mm, but the fine model was trained on crops with a 4 mm margin', margin.stderr)
    assert re.search(r'--refine re-crops .* segments tumor inside liver', refine.stderr)
    assert not os.path.exists(cascade['out']['refused']) and not os.path.exists(cascade['out']['refused2'])
