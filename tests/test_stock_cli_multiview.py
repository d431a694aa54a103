"""Multi-view 2D through the command line, as README tells users: ``nnunet-ext plan ID -pl
MultiView2DPlanner -c 2d`` -> the stock ``nnUNetv2_train ID 2d 0 -p nnUNetPlans<View>`` for the three
views -> ``nnUNetv2_predict --save_probabilities`` -> ``nnunet-ext fuse-views`` (vote and mean), on a
tiny 3D phantom whose three axes have different lengths (12, 24, 32) and whose images carry a
non-trivial origin and direction, so that a wrong slicing axis or orientation shows."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import stats

from cli_helpers import SHORT_TRAINING, run, run_parallel, user_environment, write_default_splits

pytestmark = pytest.mark.cli

DATASET_ID = 231
SHAPE = (12, 24, 32)  # z, y, x
VIEWS = {'Axial': [0, 1, 2], 'Coronal': [1, 0, 2], 'Sagittal': [2, 0, 1]}  # expected transpose_forward
TRAINER = 'nnUNetTrainerMLL'
ORIGIN = (12.5, -30.0, 100.0)
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def set_geometry(dataset_folder: str) -> None:
    """Gives every image and label the same non-identity origin and direction."""
    for path in glob.glob(os.path.join(dataset_folder, '*', '*.nii.gz')):
        image = sitk.ReadImage(path)
        image.SetOrigin(ORIGIN)
        image.SetDirection(DIRECTION)
        sitk.WriteImage(image, path, useCompression=True)


@pytest.fixture(scope='module')
def multiview(tmp_path_factory):
    from nnunet_ext.demo.phantom import write_phantom_dataset
    root = str(tmp_path_factory.mktemp('multiview'))
    env = user_environment(root)  # OMP_WAIT_POLICY=PASSIVE: three nnU-Net processes at a time on 2 cores
    folder = write_phantom_dataset(env['nnUNet_raw'], DATASET_ID, 'MultiViewPhantom', num_train=5, num_test=2,
                                   shape=SHAPE, seed=DATASET_ID, progress=False)
    set_geometry(folder)
    plan_out = run(['nnunet-ext', 'plan', str(DATASET_ID), '-pl', 'MultiView2DPlanner', '-c', '2d', '-np', '1',
                    '-npfp', '1', '--no_pbar'], {**env, 'nnUNet_n_proc_DA': '1'}).stdout
    write_default_splits(env, os.path.basename(folder))  # before the three trainings start together
    images = os.path.join(folder, 'imagesTs')
    predictions = {view: os.path.join(root, f'pred_{view}') for view in VIEWS}
    # nnUNet_def_n_proc=1: each training's validation spawns one export and one metrics worker (each imports
    # torch and nnU-Net) instead of two
    train_env = {**env, **SHORT_TRAINING, 'nnUNet_n_proc_DA': '0', 'nnUNet_def_n_proc': '1'}
    run_parallel([['bash', '-c', f'nnUNetv2_train {DATASET_ID} 2d 0 -tr {TRAINER} -p nnUNetPlans{view} -device cpu '
                                 f'&& nnUNetv2_predict -i {images} -o {predictions[view]} -d {DATASET_ID} -c 2d '
                                 f'-tr {TRAINER} -p nnUNetPlans{view} -f 0 -device cpu -npp 0 -nps 0 '
                                 f'--save_probabilities --disable_tta']
                  for view in VIEWS], train_env, workers=3)
    inputs = [predictions[view] for view in VIEWS]
    fused = {name: os.path.join(root, f'fused_{name}') for name in ('vote', 'lowest', 'mean')}
    results = run_parallel([
        ['nnunet-ext', 'fuse-views', '-i', *inputs, '-o', fused['vote'], '-np', '1', '--no_pbar'],
        ['nnunet-ext', 'fuse-views', '-i', *reversed(inputs), '-o', fused['lowest'], '--tie_break', 'lowest',
         '--no_pbar'],
        ['nnunet-ext', 'fuse-views', '-i', *inputs, '-o', fused['mean'], '--method', 'mean', '-np', '1',
         '--no_pbar']], env, workers=3)
    refused = run(['nnunet-ext', 'fuse-views', '-i', inputs[0], inputs[1], inputs[0], '-o',
                   os.path.join(root, 'refused')], env, check=False)
    return dict(env=env, root=root, plan_out=plan_out, images=images, predictions=predictions, fused=fused,
                fuse_out=[r.stdout for r in results], refused=refused,
                preprocessed=os.path.join(env['nnUNet_preprocessed'], os.path.basename(folder)))


def read(path: str):
    image = sitk.ReadImage(path)
    return sitk.GetArrayFromImage(image), image


def cases(images: str):
    return sorted(os.path.basename(p)[:-len('_0000.nii.gz')] for p in glob.glob(os.path.join(images, '*_0000.nii.gz')))


def test_each_view_is_planned_and_preprocessed_along_its_axis(multiview):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    for view in VIEWS:
        assert f'plans written: nnUNetPlans{view} ' in multiview['plan_out']
    data = {}
    for view, forward in VIEWS.items():
        plans = json.load(open(os.path.join(multiview['preprocessed'], f'nnUNetPlans{view}.json')))
        assert plans['plans_name'] == f'nnUNetPlans{view}'
        assert plans['transpose_forward'] == forward
        assert [forward[i] for i in plans['transpose_backward']] == [0, 1, 2]
        assert list(plans['configurations']) == ['2d']
        configuration = plans['configurations']['2d']
        assert configuration['data_identifier'] == f'nnUNetPlans{view}_2d'
        # tiny images: the 2d patch is the whole slice, i.e. the two axes that are not sliced
        assert configuration['patch_size'] == [SHAPE[a] for a in forward[1:]]
        assert np.allclose(configuration['spacing'], [(2.5, 0.8, 0.8)[a] for a in forward[1:]])
        folder = os.path.join(multiview['preprocessed'], configuration['data_identifier'])
        case_data, case_seg, _, _ = infer_dataset_class(folder)(folder).load_case('phantom_tr000')
        data[view] = (np.asarray(case_data[:]), np.asarray(case_seg[:]))
        assert data[view][0].shape == (1, *[SHAPE[a] for a in forward])
    for view, forward in VIEWS.items():  # the same normalised volume, transposed
        for i in (0, 1):
            np.testing.assert_array_equal(data[view][i], data['Axial'][i].transpose([0, *[a + 1 for a in forward]]))


def test_each_view_predicts_in_the_original_orientation(multiview):
    for view in VIEWS:
        for case in cases(multiview['images']):
            image, image_itk = read(os.path.join(multiview['images'], case + '_0000.nii.gz'))
            segmentation, seg_itk = read(os.path.join(multiview['predictions'][view], case + '.nii.gz'))
            assert segmentation.shape == image.shape == SHAPE
            assert np.allclose(seg_itk.GetOrigin(), ORIGIN) and np.allclose(seg_itk.GetDirection(), DIRECTION)
            probabilities = np.load(os.path.join(multiview['predictions'][view], case + '.npz'))['probabilities']
            assert probabilities.shape == (3, *SHAPE)
            np.testing.assert_array_equal(probabilities.argmax(0), segmentation)


def view_maps(multiview, case: str):
    maps = np.stack([read(os.path.join(multiview['predictions'][v], case + '.nii.gz'))[0] for v in VIEWS])
    probabilities = np.mean([np.load(os.path.join(multiview['predictions'][v], case + '.npz'))['probabilities']
                             for v in VIEWS], axis=0)
    return maps, probabilities


def test_fused_vote_is_the_numpy_majority_vote(multiview):
    summary = json.load(open(os.path.join(multiview['fused']['vote'], 'fuse_views.json')))
    assert [i['slicing_axis'] for i in summary['inputs']] == [0, 1, 2]
    disagreements = ties_seen = 0
    for case in cases(multiview['images']):
        image, image_itk = read(os.path.join(multiview['images'], case + '_0000.nii.gz'))
        maps, probabilities = view_maps(multiview, case)
        mode = stats.mode(maps, axis=0, keepdims=False)  # most frequent; the smallest among equally frequent
        ties = mode.count == 1  # three views, three different labels
        expected = mode.mode.copy()
        for z, y, x in zip(*np.nonzero(ties)):  # naive tie rule: highest mean probability among the tied labels
            tied = sorted(set(maps[:, z, y, x].tolist()))
            expected[z, y, x] = max(tied, key=lambda label: (probabilities[label, z, y, x], -label))
        for name, reference in (('vote', expected), ('lowest', mode.mode)):
            fused, fused_itk = read(os.path.join(multiview['fused'][name], case + '.nii.gz'))
            np.testing.assert_array_equal(fused, reference)
            assert fused_itk.GetSize() == image_itk.GetSize()
            for attribute in ('GetSpacing', 'GetOrigin', 'GetDirection'):
                assert np.allclose(getattr(fused_itk, attribute)(), getattr(image_itk, attribute)()), attribute
        entry = next(c for c in summary['cases'] if c['case'] == case)
        assert entry['tie_voxels'] == int(ties.sum())
        assert entry['voxels_where_views_disagree'] == int((maps != maps[0]).any(0).sum())
        disagreements += entry['voxels_where_views_disagree']
        ties_seen += entry['tie_voxels']
    # three barely trained views disagree a lot (thousands of voxels, hundreds of three-way ties)
    assert disagreements > 0 and ties_seen > 0, 'no disagreement or no tie: the vote would not be tested'
    assert 'cases fused (majority vote, ties by probability) from axial (axis 0), coronal (axis 1), sagittal ' \
           '(axis 2)' in multiview['fuse_out'][0]


def test_fused_mean_is_the_argmax_of_the_mean_probability(multiview):
    for case in cases(multiview['images']):
        _, probabilities = view_maps(multiview, case)
        fused, _ = read(os.path.join(multiview['fused']['mean'], case + '.nii.gz'))
        np.testing.assert_array_equal(fused, probabilities.argmax(0))
    assert sorted(os.listdir(multiview['fused']['mean'])) == sorted(
        ['dataset.json', 'plans.json', 'fuse_views.json'] + [c + '.nii.gz' for c in cases(multiview['images'])])


def test_the_same_view_twice_is_refused_and_nothing_is_written(multiview):
    refused = multiview['refused']
    assert refused.returncode == 2, refused.stderr
    assert 'both slice along array axis 0' in refused.stderr and 'Traceback' not in refused.stderr
    assert not glob.glob(os.path.join(multiview['root'], '*refused*'))
