"""Multi-view 2D: the views' transposes, majority vote (ties included) and probability averaging
against naive references, nnU-Net's export orientation, and ``fuse-views``' checks on small fake
``nnUNetv2_predict`` output folders."""
from __future__ import annotations

import json
import os
import pickle
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_ext.errors import UserInputError
from nnunet_ext.inference.fuse_views import fuse_view_folders, majority_vote, mean_probabilities
from nnunet_ext.plans.multiview_planners import MultiView2DPlanner, view_transpose

SHAPE = (4, 5, 6)
LABELS = {'background': 0, 'liver': 1, 'tumour': 2}
SPACING_XYZ = (0.8, 0.7, 2.5)
ORIGIN = (3.0, -4.0, 10.0)
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def naive_vote(maps, probabilities=None):
    """Voxel by voxel: the most frequent label; among equally frequent ones the highest
    ``probabilities`` (if given), then the lowest label."""
    out = np.zeros(maps[0].shape, dtype=np.int64)
    for index in np.ndindex(maps[0].shape):
        counts = Counter(int(m[index]) for m in maps)
        most = max(counts.values())
        tied = [label for label, count in counts.items() if count == most]
        if probabilities is None:
            out[index] = min(tied)
        else:
            out[index] = max(tied, key=lambda label: (probabilities[(label, *index)], -label))
    return out


# --- the views' transposes --------------------------------------------------------------------------

@pytest.mark.parametrize('axis', [0, 1, 2])
def test_view_transpose_matches_nnunet_convention_and_inverts(axis):
    forward, backward = view_transpose(axis)
    # nnU-Net's own determine_transpose puts the coarsest axis first, the others in order
    spacing = np.array([1.0, 1.0, 1.0])
    spacing[axis] = 3.0
    fake = SimpleNamespace(suppress_transpose=False, determine_fullres_target_spacing=lambda: spacing)
    nn_forward, nn_backward = MultiView2DPlanner.__mro__[1].determine_transpose(fake)
    assert forward == [int(i) for i in nn_forward] and backward == [int(i) for i in nn_backward]
    volume = np.arange(np.prod(SHAPE)).reshape(SHAPE)
    assert volume.transpose(forward).shape[0] == SHAPE[axis]
    np.testing.assert_array_equal(volume.transpose(forward).transpose(backward), volume)
    with pytest.raises(ValueError, match='slicing axis'):
        view_transpose(3)


def test_multi_view_planner_writes_one_plans_file_per_view():
    from nnunet_ext.planning import plan_and_preprocess
    assert MultiView2DPlanner.written_plans_identifiers('nnUNetPlans') == \
        ['nnUNetPlansAxial', 'nnUNetPlansCoronal', 'nnUNetPlansSagittal']
    with pytest.raises(ValueError, match='writes several plans files; use plan_and_preprocess_all'):
        plan_and_preprocess(1, 'MultiView2DPlanner')


def test_multi_view_planner_refuses_2d_datasets():
    planner = SimpleNamespace(dataset_name='Dataset001_Flat', dataset_fingerprint={
        'shapes_after_crop': [[1, 64, 64], [1, 60, 70]]})
    with pytest.raises(UserInputError, match=r'Dataset001_Flat has median image shape \(1.0, 62.0, 67.0\): '
                                             r'multi-view planning needs 3D images'):
        MultiView2DPlanner._refuse_2d_datasets(planner)
    MultiView2DPlanner._refuse_2d_datasets(SimpleNamespace(dataset_name='x', dataset_fingerprint={
        'shapes_after_crop': [[12, 24, 32]]}))


# --- majority vote and averaging -----------------------------------------------------------------------

def test_majority_vote_hand_computed_with_ties():
    maps = [np.array([0, 1, 2, 1, 0, 2]), np.array([0, 1, 1, 2, 1, 0]), np.array([1, 2, 0, 2, 2, 1])]
    # voxel 0: 0,0,1 -> 0; 1: 1,1,2 -> 1; 2: 2,1,0 tie; 3: 1,2,2 -> 2; 4: 0,1,2 tie; 5: 2,0,1 tie
    np.testing.assert_array_equal(majority_vote(maps, [0, 1, 2]), [0, 1, 0, 2, 0, 0])
    scores = np.array([[.1, .1, .2, .1, .3, .3],  # label 0
                       [.1, .1, .5, .1, .3, .5],  # label 1
                       [.1, .1, .3, .1, .4, .2]])  # label 2
    # ties: voxel 2 -> 1 (0.5); voxel 4 -> 2 (0.4); voxel 5 -> 1 (0.5)
    np.testing.assert_array_equal(majority_vote(maps, [0, 1, 2], scores), [0, 1, 1, 2, 2, 1])
    scores[:, 4] = [.3, .3, .3]  # equal scores: the lowest label
    assert majority_vote(maps, [0, 1, 2], scores)[4] == 0


def test_majority_vote_of_three_binary_views_is_two_out_of_three():
    rng = np.random.default_rng(0)
    maps = [rng.integers(0, 2, SHAPE) for _ in range(3)]
    np.testing.assert_array_equal(majority_vote(maps, [0, 1]), (sum(maps) >= 2).astype(int))


@pytest.mark.parametrize('num_views', [2, 3])
@pytest.mark.parametrize('with_scores', [False, True])
def test_majority_vote_equals_naive_loop(num_views, with_scores):
    rng = np.random.default_rng(num_views + 10 * with_scores)
    maps = [rng.integers(0, 4, SHAPE) for _ in range(num_views)]
    scores = rng.random((4, *SHAPE)) if with_scores else None
    expected = naive_vote(maps, scores)
    np.testing.assert_array_equal(majority_vote(maps, [0, 1, 2, 3], scores), expected)


def test_majority_vote_refuses_foreign_values_and_shapes():
    with pytest.raises(ValueError, match=r'values \[7\] outside the labels \[0, 1, 2\]'):
        majority_vote([np.array([0, 1]), np.array([7, 1])], [0, 1, 2])
    with pytest.raises(ValueError, match='differ in shape'):
        majority_vote([np.zeros(3, int), np.zeros(4, int)], [0, 1])
    with pytest.raises(ValueError, match='tie_scores must have shape'):
        majority_vote([np.zeros(3, int)], [0, 1], np.zeros((3, 3)))


def test_mean_probabilities_equals_numpy_mean(tmp_path):
    rng = np.random.default_rng(1)
    arrays = [rng.random((3, *SHAPE)).astype(np.float32) for _ in range(3)]
    files = []
    for i, array in enumerate(arrays):
        files.append(str(tmp_path / f'{i}.npz'))
        np.savez_compressed(files[-1], probabilities=array)
    np.testing.assert_allclose(mean_probabilities(files, SHAPE, 3), np.mean(arrays, axis=0), rtol=1e-6)
    with pytest.raises(UserInputError, match=r'probabilities of shape \(3, 4, 5, 6\), expected \(3, 6, 5, 4\)'):
        mean_probabilities(files, SHAPE[::-1], 3)


# --- nnU-Net exports probabilities in the original orientation ---------------------------------------------

def test_nnunet_exports_probabilities_transposed_back_to_the_original_orientation():
    """What fuse-views relies on: for a coronal view (transpose_forward [1, 0, 2]) nnU-Net's export
    turns logits of the transposed volume (y, z, x) into probabilities of the original one (z, y, x)."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    forward, backward = view_transpose(1)
    z, y, x = SHAPE
    spacing_zyx = SPACING_XYZ[::-1]
    plans = PlansManager({'transpose_forward': forward, 'transpose_backward': backward, 'configurations': {'2d': {
        'spacing': [spacing_zyx[a] for a in forward[1:]], 'patch_size': [z, x],
        'resampling_fn_probabilities': 'resample_data_or_seg_to_shape',
        'resampling_fn_probabilities_kwargs': {'is_seg': False, 'order': 1, 'order_z': 0, 'force_separate_z': None},
        'architecture': {'network_class_name': 'none', 'arch_kwargs': {}, '_kw_requires_import': []}}}})
    logits = torch.randn(3, y, z, x)  # the transposed volume, as the 2d network sees it
    properties = {'spacing': list(spacing_zyx), 'shape_after_cropping_and_before_resampling': (y, z, x),
                  'shape_before_cropping': (y, z, x), 'bbox_used_for_cropping': [[0, y], [0, z], [0, x]]}
    segmentation, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, plans, plans.get_configuration('2d'), LabelManager(LABELS, None), properties,
        return_probabilities=True, num_threads_torch=1)
    expected = np.einsum('cyzx->czyx', torch.softmax(logits, 0).numpy())
    assert probabilities.shape == (3, z, y, x) and segmentation.shape == (z, y, x)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(segmentation, expected.argmax(0))


# --- fuse_view_folders on fake prediction folders ------------------------------------------------------------

def write_image(array: np.ndarray, path: str, spacing=SPACING_XYZ) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    sitk.WriteImage(image, path)


def write_view(folder, axis: int, probabilities: dict, labels=LABELS, with_npz=True, spacing=SPACING_XYZ,
               dataset_name='Dataset999_Fake') -> str:
    """An ``nnUNetv2_predict``-like output folder: CASE.nii.gz (argmax), CASE.npz, CASE.pkl,
    plans.json and dataset.json."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    os.makedirs(folder)
    forward, backward = view_transpose(axis)
    with open(os.path.join(folder, 'plans.json'), 'w') as f:
        json.dump({'dataset_name': dataset_name, 'plans_name': f'nnUNetPlansView{axis}', 'transpose_forward': forward,
                   'transpose_backward': backward, 'image_reader_writer': 'SimpleITKIO',
                   'label_manager': 'LabelManager', 'configurations': {}}, f)
    with open(os.path.join(folder, 'dataset.json'), 'w') as f:
        json.dump({'labels': labels, 'file_ending': '.nii.gz', 'channel_names': {'0': 'CT'}, 'numTraining': 1}, f)
    for case, p in probabilities.items():
        path = os.path.join(folder, case + '.nii.gz')
        write_image(p.argmax(0), path, spacing)
        if with_npz:
            np.savez_compressed(os.path.join(folder, case + '.npz'), probabilities=p)
            with open(os.path.join(folder, case + '.pkl'), 'wb') as f:
                pickle.dump(SimpleITKIO().read_seg(path)[1], f)
    return str(folder)


def random_probabilities(rng, cases=('a', 'b'), shape=SHAPE) -> dict:
    out = {}
    for case in cases:
        p = rng.random((3, *shape)).astype(np.float32) ** 3
        out[case] = p / p.sum(0, keepdims=True)
    return out


@pytest.fixture()
def views(tmp_path):
    rng = np.random.default_rng(2)
    probabilities = [random_probabilities(rng) for _ in range(3)]
    folders = [write_view(tmp_path / f'view{axis}', axis, probabilities[axis]) for axis in range(3)]
    return SimpleNamespace(folders=folders, probabilities=probabilities, root=tmp_path)


def read(path):
    image = sitk.ReadImage(path)
    return sitk.GetArrayFromImage(image), image


def test_vote_folders_equal_naive_vote_with_geometry_kept(views):
    out = str(views.root / 'fused')
    summary = fuse_view_folders(views.folders, out, num_processes=1, progress=False)
    lowest = fuse_view_folders(views.folders[::-1], str(views.root / 'lowest'), tie_break='lowest',
                               num_processes=1, progress=False)
    assert sorted(os.listdir(out)) == ['a.nii.gz', 'b.nii.gz', 'dataset.json', 'fuse_views.json', 'plans.json']
    assert [i['view'] for i in summary['inputs']] == ['axial (axis 0)', 'coronal (axis 1)', 'sagittal (axis 2)']
    ties = 0
    for case in ('a', 'b'):
        maps = [p[case].argmax(0) for p in views.probabilities]
        mean = np.mean([p[case] for p in views.probabilities], axis=0)
        fused, image = read(os.path.join(out, case + '.nii.gz'))
        np.testing.assert_array_equal(fused, naive_vote(maps, mean))
        np.testing.assert_array_equal(read(str(views.root / 'lowest' / (case + '.nii.gz')))[0], naive_vote(maps))
        assert image.GetSpacing() == pytest.approx(SPACING_XYZ) and image.GetOrigin() == pytest.approx(ORIGIN)
        assert image.GetDirection() == pytest.approx(DIRECTION)
        entry = next(c for c in summary['cases'] if c['case'] == case)
        assert entry['tie_voxels'] == sum(len(set(v)) == 3 for v in zip(*[m.ravel() for m in maps]))
        ties += entry['tie_voxels']
    assert ties > 0 and lowest['tie_break'] == 'lowest'
    assert not (np.asarray(read(os.path.join(out, 'a.nii.gz'))[0]) ==
                read(str(views.root / 'lowest' / 'a.nii.gz'))[0]).all()  # the tie rules differ here


def test_mean_folders_equal_nnunet_merge_files(views):
    """``--method mean`` gives what nnU-Net's own ensembling (``merge_files``) gives."""
    from nnunetv2.ensembling.ensemble import merge_files
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    out = str(views.root / 'mean')
    summary = fuse_view_folders(views.folders, out, method='mean', num_processes=1, progress=False)
    assert summary['tie_break'] is None
    for case in ('a', 'b'):
        reference = str(views.root / f'nnunet_{case}')
        merge_files([os.path.join(f, case + '.npz') for f in views.folders], reference, '.nii.gz', SimpleITKIO(),
                    LabelManager(LABELS, None))
        fused, image = read(os.path.join(out, case + '.nii.gz'))
        expected, expected_image = read(reference + '.nii.gz')
        np.testing.assert_array_equal(fused, expected)
        np.testing.assert_array_equal(fused, np.mean([p[case] for p in views.probabilities], axis=0).argmax(0))
        assert image.GetDirection() == expected_image.GetDirection()


def test_vote_with_lowest_tie_break_needs_no_probabilities(tmp_path):
    rng = np.random.default_rng(3)
    probabilities = [random_probabilities(rng, cases=('a',)) for _ in range(2)]
    folders = [write_view(tmp_path / f'v{axis}', axis, probabilities[i], with_npz=False)
               for i, axis in enumerate((0, 2))]
    fuse_view_folders(folders, str(tmp_path / 'out'), tie_break='lowest', progress=False)
    maps = [p['a'].argmax(0) for p in probabilities]
    np.testing.assert_array_equal(read(str(tmp_path / 'out' / 'a.nii.gz'))[0], np.minimum(*maps))  # 2 views
    with pytest.raises(UserInputError, match=r'--tie_break probability needs the probabilities.*lacks them for a '
                                             r'\(predict with nnUNetv2_predict --save_probabilities'):
        fuse_view_folders(folders, str(tmp_path / 'out2'), progress=False)
    with pytest.raises(UserInputError, match='--method mean needs the probabilities'):
        fuse_view_folders(folders, str(tmp_path / 'out2'), method='mean', progress=False)
    assert sorted(os.listdir(tmp_path)) == ['out', 'v0', 'v2']


def assert_refused(tmp_path, folders, pattern, **kwargs):
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UserInputError, match=pattern):
        fuse_view_folders(folders, str(tmp_path / 'out'), progress=False, **kwargs)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no temporary folder left


def test_refuses_inputs_that_are_not_different_views_of_the_same_cases(tmp_path):
    rng = np.random.default_rng(4)
    a = write_view(tmp_path / 'axial', 0, random_probabilities(rng))
    c = write_view(tmp_path / 'coronal', 1, random_probabilities(rng))
    assert_refused(tmp_path, [a, c, a], r'axial and .*axial both slice along array axis 0 .*transpose_forward '
                                        r'\[0, 1, 2\].* MultiView2DPlanner')
    assert_refused(tmp_path, [a], 'two or three views, got 1')
    assert_refused(tmp_path, [a, str(tmp_path / 'nope')], 'nope does not exist')
    fewer = write_view(tmp_path / 'fewer', 2, random_probabilities(rng, cases=('a',)))
    assert_refused(tmp_path, [a, fewer], r'not hold the same cases: missing in .*fewer: b')
    other_labels = write_view(tmp_path / 'labels', 2, random_probabilities(rng),
                              labels={'background': 0, 'liver': 1, 'lesion': 2})
    assert_refused(tmp_path, [a, other_labels], 'differ in dataset.json labels')
    other_dataset = write_view(tmp_path / 'dataset', 2, random_probabilities(rng), dataset_name='Dataset998_X')
    assert_refused(tmp_path, [a, other_dataset], 'differ in plans.json dataset_name')
    os.makedirs(tmp_path / 'empty')
    assert_refused(tmp_path, [a, str(tmp_path / 'empty')], r'plans.json is missing: fuse-views reads nnUNetv2_predict')


def test_refuses_mismatched_cases_all_or_nothing(tmp_path):
    rng = np.random.default_rng(5)
    a = write_view(tmp_path / 'axial', 0, random_probabilities(rng))
    probabilities = random_probabilities(rng)
    probabilities['b'] = random_probabilities(rng, cases=('b',), shape=(4, 6, 5))['b']  # second case: transposed
    s = write_view(tmp_path / 'sagittal', 2, probabilities)
    # case a fuses, case b fails (in a worker process): no output at all
    assert_refused(tmp_path, [a, s], r'case b: .*sagittal/b.nii.gz has shape \(4, 6, 5\).*\(4, 5, 6\)', num_processes=2)
    spaced = write_view(tmp_path / 'spaced', 1, random_probabilities(rng), spacing=(0.8, 0.8, 2.5))
    assert_refused(tmp_path, [a, spaced], r"case [ab]: the geometry of .*spaced/[ab].nii.gz \(\{'sitk_stuff': "
                                          r"\{'spacing': \[0.8, 0.8, 2.5\], .* differs from that of "
                                          r".*axial/[ab].nii.gz "
                                          r"\(\{'sitk_stuff': \{'spacing': \[0.8, 0.7, 2.5\]", tie_break='lowest')
    foreign = write_view(tmp_path / 'foreign', 1, random_probabilities(rng))
    write_image(np.full(SHAPE, 5), os.path.join(foreign, 'b.nii.gz'))
    assert_refused(tmp_path, [a, foreign], r'case b: .*foreign/b.nii.gz holds label values \[5\]', tie_break='lowest')
    os.makedirs(tmp_path / 'out')
    (tmp_path / 'out' / 'x').write_text('')
    with pytest.raises(UserInputError, match='exists and is not an empty folder'):
        fuse_view_folders([a, foreign], str(tmp_path / 'out'), progress=False)


def test_cli_reports_errors_without_traceback(views, capsys):
    from nnunet_ext.cli import main
    assert main(['fuse-views', '-i', views.folders[0], views.folders[0], '-o', str(views.root / 'o'),
                 '--no_pbar']) == 2
    err = capsys.readouterr().err
    assert err.startswith('nnunet-ext fuse-views: error: ') and 'both slice along array axis 0' in err
    assert not os.path.exists(views.root / 'o')
