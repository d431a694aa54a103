"""2.5D input (``nnunet_ext.conversion.slice_stack``, ``nnunet-ext stack-slices``): the stacked copies
against a naive loop over slices, the slicing axis against nnU-Net's own ``determine_transpose``, the
refusal of configurations that do not slice along the stacked axis. The end-to-end check through the
stock CLI (planning, training, validation, ``nnUNetv2_predict``) is ``test_stock_cli_slices.py``."""
from __future__ import annotations

import numpy as np
import pytest
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnunet_ext.conversion.slice_stack import SliceStack, check_training_configuration, slicing_axis
from nnunet_ext.errors import UserInputError


def _naive_copy(array: np.ndarray, axis: int, offset: int) -> np.ndarray:
    out = np.empty_like(array)
    n = array.shape[axis]
    for s in range(n):
        source = min(max(s + offset, 0), n - 1)
        index = [slice(None)] * 3
        index[axis] = s
        source_index = list(index)
        source_index[axis] = source
        out[tuple(index)] = array[tuple(source_index)]
    return out


@pytest.mark.parametrize('slices', [3, 5])
@pytest.mark.parametrize('axis', [0, 1, 2])
def test_the_copies_are_the_neighbouring_slices_with_edges_replicated(slices, axis):
    array = np.random.default_rng(axis).normal(size=(4, 6, 5)).astype(np.float32)
    stack = SliceStack(slices, axis)
    copies = stack.stack(array)
    assert len(copies) == slices and stack.offsets == tuple(range(-(slices // 2), slices // 2 + 1))
    for copy, offset in zip(copies, stack.offsets):
        np.testing.assert_array_equal(copy, _naive_copy(array, axis, offset))
    np.testing.assert_array_equal(copies[slices // 2], array)  # the middle channel is the slice itself


def test_channel_names_and_record():
    stack = SliceStack(3, 2)
    assert stack.channel_names({'0': 'CT', '1': 'noNorm'}) == {'0': 'CT', '1': 'CT', '2': 'CT', '3': 'noNorm',
                                                                  '4': 'noNorm', '5': 'noNorm'}
    assert SliceStack.from_record(stack.record({'0': 'CT'}, 'Dataset001_X')) == stack
    for slices in (1, 2, 4):
        with pytest.raises(UserInputError, match='odd and >= 3'):
            SliceStack(slices, 0)
    with pytest.raises(UserInputError, match='3D images'):
        stack.stack(np.zeros((4, 4)))


def _nnunet_slicing_axis(spacings, shapes) -> int:
    """nnU-Net's own transpose_forward[0], from a planner given only the fingerprint it reads."""
    planner = object.__new__(ExperimentPlanner)
    planner.suppress_transpose, planner.overwrite_target_spacing = False, None
    planner.anisotropy_threshold = 3
    planner.dataset_fingerprint = {'spacings': spacings, 'shapes_after_crop': shapes}
    return int(planner.determine_transpose()[0][0])


@pytest.mark.parametrize('spacings, shapes', [
    ([(2.5, 0.8, 0.8), (5.0, 0.7, 0.7), (1.0, 0.9, 0.9)], [(40, 512, 512)] * 3),  # CT, thick slices on axis 0
    ([(0.8, 0.8, 3.0), (0.8, 0.8, 3.0)], [(200, 200, 20)] * 2),  # anisotropic axis 2 (10th percentile branch)
    ([(1.0, 2.0, 1.0), (1.0, 2.5, 1.5), (1.2, 1.8, 1.0)], [(50, 30, 50)] * 3),  # axis 1
    ([(1.0, 1.0, 1.0), (1.0, 1.0, 1.0)], [(64, 64, 64)] * 2),  # isotropic: ties go to the first axis
])
def test_the_slicing_axis_is_nnunets(spacings, shapes):
    assert slicing_axis(spacings) == _nnunet_slicing_axis(spacings, shapes)


def test_configurations_that_do_not_slice_along_the_stacked_axis_are_refused():
    record = {'nnunet_ext_slices': SliceStack(3, 2).record({'0': 'CT'}, 'Dataset321_Source')}
    check_training_configuration(record, [2, 0, 1], 2, '2d')  # the right axis
    check_training_configuration({}, [0, 1, 2], 3, '3d_fullres')  # not stacked: anything goes
    with pytest.raises(UserInputError, match='3D: train it on the source dataset Dataset321_Source'):
        check_training_configuration(record, [2, 0, 1], 3, '3d_fullres')
    with pytest.raises(UserInputError, match='along array axis 2, but these plans slice the 2d configuration along '
                                             'axis 0 .* --axis 0'):
        check_training_configuration(record, [0, 1, 2], 2, '2d')


@pytest.mark.parametrize('trainer', ['nnUNetTrainerMLL', 'nnUNetTrainerANUNetPaper'])
def test_our_trainers_refuse_a_stacked_dataset_on_the_wrong_configuration(trainer, nnunet_folders):
    """The check runs in every trainer of this package (``SliceStackCheckMixin.__init__``): tiny
    plans slice along axis 0 (``transpose_forward [0, 1, 2]``)."""
    from trainer_helpers import make_trainer, tiny

    def build(configuration, axis):
        stacked = {'nnunet_ext_slices': SliceStack(3, axis).record({'0': 'CT'}, 'Dataset9_S'),
                   'channel_names': {'0': 'CT', '1': 'CT', '2': 'CT'}}
        return make_trainer(trainer, tiny(), stacked, configuration=configuration)
    build('2d', 0)  # the stacked axis is the one the 2d plans slice along
    with pytest.raises(UserInputError, match='stacks neighbouring slices along array axis 2'):
        build('2d', 2)
    if trainer == 'nnUNetTrainerMLL':  # the paper networks are 2D only, and say so themselves
        with pytest.raises(UserInputError, match='the 3d_fullres configuration is 3D'):
            build('3d_fullres', 0)
