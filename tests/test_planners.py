"""Planners of the heavier networks (LFAM, ResUNet, ResUNet+LFAM, MLN; ANU-Net's is tested with its
trainer) and the trainers' start-up memory check.

Oracles: nnU-Net's own ``ExperimentPlanner`` on the same fictitious images (512^2 2D, 160x192x192 3D),
its planning criterion, the reference values of real nnU-Net planner instances, and what PyTorch's
autograd really keeps for backward (``saved_tensors_hooks``) for the honesty of the estimates."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
    ResEncUNetPlanner, nnUNetPlannerResEncL, nnUNetPlannerResEncM, nnUNetPlannerResEncXL)
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from nnunet_ext.architectures.anunet import ANUNet, UNetPlusPlus
from nnunet_ext.architectures.lfam_unet import LFAMPlainConvUNet, LFAMResidualEncoderUNet
from nnunet_ext.architectures.mln_unet import MLNPlainConvUNet
from nnunet_ext.architectures.resunet import LFAMPreActResUNet, PreActResUNet
from nnunet_ext.cli import main as cli_main
from nnunet_ext.plans.cpu_planners import nnUNetPlannerCPUTrial
from nnunet_ext.plans.lfam_planners import LFAMPlanner
from nnunet_ext.plans.mln_planners import MLNPlanner
from nnunet_ext.plans.network_planners import dotted_name
from nnunet_ext.plans.resunet_planners import ResUNetLFAMPlanner, ResUNetPlanner
from nnunet_ext.registry import planner_classes
from nnunet_ext.trainers.lfam_trainers import nnUNetTrainerLFAM
from nnunet_ext.trainers.mln_trainers import nnUNetTrainerMLN
from nnunet_ext.trainers.resunet_trainers import nnUNetTrainerResUNet, nnUNetTrainerResUNetGODCLFAM
from nnunet_ext.training.architecture_mixins import PLAIN_UNET, residual_encoder_kwargs
from nnunet_ext.memory_check import memory_message, plans_memory_reference
from nnunet_ext.training.memory_reference import (MEMORY_TARGET_KEY, NNUNET_PLANNER_REFERENCES, MemoryReference,
                                                  memory_ratio, memory_record)
from trainer_helpers import DATASET_ID, kept_for_backward, make_trainer

PLANNERS = {  # planner: (trainer that trains on its plans, network that trainer builds, plans name)
    LFAMPlanner: (nnUNetTrainerLFAM, LFAMPlainConvUNet, 'nnUNetPlansLFAM'),
    ResUNetPlanner: (nnUNetTrainerResUNet, PreActResUNet, 'nnUNetPlansResUNet'),
    ResUNetLFAMPlanner: (nnUNetTrainerResUNetGODCLFAM, LFAMPreActResUNet, 'nnUNetPlansResUNetLFAM'),
    MLNPlanner: (nnUNetTrainerMLN, MLNPlainConvUNet, 'nnUNetPlansMLN'),
}
IMAGES = {2: ((1.0, 1.0), (512, 512)), 3: ((1.0, 1.0, 1.0), (160, 192, 192))}


def _plan(planner, ndim):
    spacing, median_shape = IMAGES[ndim]
    return planner.get_plans_for_configuration(spacing, median_shape, 'x', float(np.prod(median_shape)) * 1000, {})


def _estimate(planner, plan, num_classes=3):
    arch = plan['architecture']
    return planner.static_estimate_VRAM_usage(plan['patch_size'], 1, num_classes, arch['network_class_name'],
                                              arch['arch_kwargs'], arch['_kw_requires_import'])


def _reference(planner, ndim):
    if ndim == 2:
        return planner.UNet_reference_val_2d, planner.UNet_reference_val_corresp_bs_2d
    return planner.UNet_reference_val_3d, planner.UNet_reference_val_corresp_bs_3d


@pytest.fixture(scope='module')
def nnunet_plans(planned):
    """nnU-Net's default planner's plans of the fictitious images, per dimension."""
    planner = ExperimentPlanner(DATASET_ID)
    return {ndim: _plan(planner, ndim) for ndim in IMAGES}


@pytest.mark.parametrize('ndim', sorted(IMAGES))
@pytest.mark.parametrize('planner_class', list(PLANNERS), ids=lambda c: c.__name__)
def test_planner_plans_less_than_nnunet_and_its_estimate_fits_the_target(planned, nnunet_plans, planner_class, ndim):
    planner = planner_class(DATASET_ID)
    plan, default = _plan(planner, ndim), nnunet_plans[ndim]
    assert plan['architecture']['network_class_name'] == PLAIN_UNET  # the trainers build their variant from it
    assert plan['architecture']['arch_kwargs'].keys() == default['architecture']['arch_kwargs'].keys()
    voxels = np.prod(plan['patch_size']) * plan['batch_size']
    assert voxels < np.prod(default['patch_size']) * default['batch_size']
    estimate = _estimate(planner, plan)
    reference, ref_bs = _reference(planner, ndim)
    assert estimate / ref_bs * 2 <= reference  # nnU-Net's criterion for the patch (8 GB target)
    assert estimate * (plan['batch_size'] - 0.5) / ref_bs <= reference  # batch: round(reference / estimate * ref_bs)
    network = get_network_from_plans(dotted_name(planner.planned_network), plan['architecture']['arch_kwargs'],
                                     plan['architecture']['_kw_requires_import'], 1, 3, allow_init=False)
    assert estimate == network.compute_conv_feature_map_size(plan['patch_size'])  # the trainers' network's
    assert estimate > ExperimentPlanner.static_estimate_VRAM_usage(
        plan['patch_size'], 1, 3, PLAIN_UNET, plan['architecture']['arch_kwargs'],
        plan['architecture']['_kw_requires_import'])


@pytest.mark.parametrize('planner_class', list(PLANNERS), ids=lambda c: c.__name__)
def test_planners_write_plans_their_trainers_build_the_planned_network_from(planned, planner_class):
    trainer_class, network_class, plans_name = PLANNERS[planner_class]
    assert planner_class.planned_network is network_class
    assert trainer_class.variant_networks[PLAIN_UNET] == dotted_name(network_class)
    assert planner_class.estimate_kwargs == trainer_class.variant_kwargs()
    planner = planner_class(DATASET_ID)
    plans = planner.plan_experiment()  # the phantom: writes <plans name>.json next to nnU-Net's
    assert planner.plans_identifier == plans['plans_name'] == plans_name
    assert plans['experiment_planner_used'] == planner_class.__name__
    assert plans[MEMORY_TARGET_KEY]['target_gb'] == 8
    assert plans[MEMORY_TARGET_KEY]['planned_network'] == dotted_name(network_class)
    assert plans_memory_reference(plans)[0] == NNUNET_PLANNER_REFERENCES['ExperimentPlanner']
    trainer = make_trainer(trainer_class, (plans, planned[1]), 'labels')
    network = trainer_class.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                                       trainer.label_manager.num_segmentation_heads, True)
    assert type(network) is network_class


def test_planners_are_listed_and_found_by_name(capsys):
    ours = planner_classes()
    for planner_class in (*PLANNERS, nnUNetPlannerCPUTrial):
        assert ours[planner_class.__name__] is planner_class
    assert not any(name.startswith('_') for name in ours)
    assert cli_main(['planners']) == 0
    listing = capsys.readouterr().out
    for planner_class, (_, _, plans_name) in PLANNERS.items():
        line = next(line for line in listing.splitlines() if line.startswith(planner_class.__name__ + ' '))
        assert plans_name in line




def _small_kwargs(ndim):
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if ndim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    kernels = [[3, 3]] * 4 if ndim == 2 else [[1, 3, 3]] + [[3, 3, 3]] * 3
    strides = [[1, 1]] + [[2, 2]] * 3 if ndim == 2 else [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    return dict(input_channels=1, n_stages=4, features_per_stage=[32, 64, 128, 256], conv_op=conv,
                kernel_sizes=kernels, strides=strides, n_conv_per_stage=[2] * 4, num_classes=3,
                n_conv_per_stage_decoder=[2] * 3, conv_bias=True, norm_op=norm,
                norm_op_kwargs={'eps': 1e-5, 'affine': True}, nonlin=nn.LeakyReLU, nonlin_kwargs={'inplace': True},
                deep_supervision=True)


@pytest.mark.parametrize('ndim, size', [(2, (64, 64)), (3, (16, 32, 32))])
def test_estimates_relative_to_nnunets_unet_match_what_autograd_keeps(ndim, size):
    """nnU-Net's reference values are calibrated on PlainConvUNet's estimate, so a network's estimate is
    honest when its ratio to PlainConvUNet's is the ratio of what the two keep for backward. Ours (ResUNet,
    MLN heads) within 10%; the LFAM networks (whose estimate may add the deformable convolution's transient
    peak) and ANU-Net at least what they keep."""
    torch.manual_seed(0)
    kwargs, x = _small_kwargs(ndim), torch.randn(1, 1, *size)
    plain = PlainConvUNet(**kwargs)
    plain_estimate, plain_kept = plain.compute_conv_feature_map_size(size), kept_for_backward(plain, x)
    for network_class, tolerance in ((PreActResUNet, 0.1), (MLNPlainConvUNet, 0.1), (LFAMPlainConvUNet, None),
                                     (LFAMPreActResUNet, None), (ANUNet, None)):
        network = network_class(**kwargs)
        estimated = network.compute_conv_feature_map_size(size) / plain_estimate
        kept = kept_for_backward(network, x) / plain_kept
        assert estimated >= kept * 0.95, (network_class.__name__, estimated, kept)
        if tolerance is not None:
            assert estimated == pytest.approx(kept, rel=tolerance), network_class.__name__


@pytest.mark.parametrize('planner_class', [ExperimentPlanner, ResEncUNetPlanner, nnUNetPlannerResEncM,
                                           nnUNetPlannerResEncL, nnUNetPlannerResEncXL], ids=lambda c: c.__name__)
def test_the_table_of_nnunet_planners_is_what_their_instances_use(planned, planner_class):
    assert MemoryReference.of_planner(planner_class(DATASET_ID)) == NNUNET_PLANNER_REFERENCES[planner_class.__name__]


def test_memory_reference_is_read_from_the_plans_or_the_planner_named_there(planned):
    plans = copy.deepcopy(planned[0])
    reference, how = plans_memory_reference(plans)
    assert reference == NNUNET_PLANNER_REFERENCES['ExperimentPlanner'] and 'default 8 GB' in how
    cpu = nnUNetPlannerCPUTrial(DATASET_ID)
    cpu_plans = cpu.plan_experiment()
    reference, how = plans_memory_reference(cpu_plans)
    assert reference.target_gb == 1 and reference.reference(2) == (85000000 / 8, 12) and 'recorded' in how
    reference, how = plans_memory_reference({**plans, 'experiment_planner_used': 'nnUNetPlannerResEncL'})
    assert reference.target_gb == 24 and reference.reference(3) == (2100000000, 2)
    reference, how = plans_memory_reference({**plans, 'experiment_planner_used': 'MultiView2DPlanner'})
    assert reference == NNUNET_PLANNER_REFERENCES['ExperimentPlanner'] and "ExperimentPlanner's default" in how
    reference, how = plans_memory_reference({**plans, 'experiment_planner_used': 'SomeonesPlanner'})
    assert reference == NNUNET_PLANNER_REFERENCES['ExperimentPlanner'] and 'not a planner known here' in how
    with pytest.raises(ValueError, match='incomplete'):
        plans_memory_reference({**plans, MEMORY_TARGET_KEY: {'target_gb': 8}})


@pytest.mark.parametrize('ndim', sorted(IMAGES))
def test_nnunets_unet_on_its_own_plans_fills_at_most_the_target(planned, nnunet_plans, ndim):
    """The ratio the check computes is nnU-Net's planning criterion: at most 1 for its U-Net on its plans
    (up to the rounding of the batch size)."""
    plan = nnunet_plans[ndim]
    estimate = _estimate(ExperimentPlanner, plan)
    ratio = memory_ratio(estimate, plan['batch_size'], ndim, NNUNET_PLANNER_REFERENCES['ExperimentPlanner'])
    assert 0.5 < ratio <= 1 + 0.5 / plan['batch_size']


def _with_configuration(planned, plan, planner_name, record=None):
    plans, dataset_json = planned
    configuration = {**copy.deepcopy(plan), 'batch_dice': True}
    plans = {**copy.deepcopy(plans), 'configurations': {'2d': configuration}, 'experiment_planner_used': planner_name}
    if record is not None:
        plans[MEMORY_TARGET_KEY] = record
    return plans, dataset_json


def _start(trainer, monkeypatch):
    """Our trainer's ``on_train_start`` with nnU-Net's reduced to its first step, ``initialize`` (the network
    is built); nnU-Net's data loaders need preprocessed cases, which the fictitious plans have none of.
    ``initialize`` infers the dataset format from the file endings in the data folder: one empty file."""
    os.makedirs(trainer.preprocessed_dataset_folder, exist_ok=True)
    open(os.path.join(trainer.preprocessed_dataset_folder, 'case_000.b2nd'), 'a').close()
    monkeypatch.setattr(nnUNetTrainer, 'on_train_start', lambda self: self.initialize())
    trainer.on_train_start()


def test_trainer_warns_on_plans_sized_for_nnunets_unet_and_not_on_its_planners(planned, nnunet_plans, monkeypatch,
                                                                               capsys):
    trainer = make_trainer(nnUNetTrainerLFAM, _with_configuration(planned, nnunet_plans[2], 'ExperimentPlanner'),
                           'labels')
    _start(trainer, monkeypatch)
    err = capsys.readouterr().err
    assert 'nnunet-ext memory check: LFAMPlainConvUNet' in err
    assert f'nnunet-ext plan {DATASET_ID} -pl LFAMPlanner' in err and '-p nnUNetPlansLFAM' in err
    assert 'reference 85,000,000 of ExperimentPlanner at its default 8 GB' in err
    assert 'times batch 12 / reference batch 12' in err
    with open(trainer.log_file) as f:
        assert 'nnunet-ext plan 203 -pl LFAMPlanner' in f.read()

    planner = LFAMPlanner(DATASET_ID)
    record = memory_record(planner, dotted_name(LFAMPlainConvUNet))  # what its save_plans writes
    trainer = make_trainer(nnUNetTrainerLFAM, _with_configuration(planned, _plan(planner, 2), 'LFAMPlanner', record),
                           'labels')
    _start(trainer, monkeypatch)
    assert 'memory check' not in capsys.readouterr().err
    with open(trainer.log_file) as f:
        assert 'memory check: LFAMPlainConvUNet needs about' in f.read().splitlines()[-1]  # logged, no warning


def test_the_warning_names_a_planner_by_network_class_or_a_lower_target(planned, nnunet_plans):
    plan = nnunet_plans[3]
    plans = {**planned[0], 'experiment_planner_used': 'ExperimentPlanner', 'dataset_name': 'Dataset042_X'}
    arch = plan['architecture']

    def message(network_class, kwargs=None):
        with torch.device('meta'):
            network = get_network_from_plans(dotted_name(network_class), {**arch['arch_kwargs'], **(kwargs or {})},
                                             arch['_kw_requires_import'], 1, 3, allow_init=False)
        return memory_message(network, plans, '3d_fullres', plan['patch_size'], plan['batch_size'])

    for network_class in (ANUNet, UNetPlusPlus):  # UNet++ is an ANUNet subclass: ANU-Net's planner serves it
        ratio, text = message(network_class)
        assert ratio > 1.5 and 'nnunet-ext plan 42 -pl ANUNetPlanner' in text, network_class
    ratio, text = message(LFAMPreActResUNet)
    assert ratio > 1.5 and '-pl ResUNetLFAMPlanner' in text and '-p nnUNetPlansResUNetLFAM' in text
    with torch.device('meta'):  # nnUNetTrainerLFAMResEnc's network: no planner of ours
        network = get_network_from_plans(dotted_name(LFAMResidualEncoderUNet),
                                         residual_encoder_kwargs(arch['arch_kwargs']), arch['_kw_requires_import'],
                                         1, 3, allow_init=False)
    plans_resenc = {**plans, 'experiment_planner_used': 'nnUNetPlannerResEncM'}
    ratio, text = memory_message(network, plans_resenc, '3d_fullres', plan['patch_size'], plan['batch_size'])
    assert ratio > 1.5 and 'no planner of nnunet-ext estimates LFAMResidualEncoderUNet' in text
    assert f'-pl nnUNetPlannerResEncM -gpu_memory_target {8 / ratio:.1f}' in text
    assert message(PreActResUNet)[1] is None  # 1.3x nnU-Net's U-Net: under the 1.5x threshold
    plans = {**plans, 'experiment_planner_used': 'LFAMPlanner',  # the planner's own plans, batch raised by hand
             MEMORY_TARGET_KEY: memory_record(LFAMPlanner(DATASET_ID), dotted_name(LFAMPlainConvUNet))}
    ratio, text = message(LFAMPlainConvUNet)
    assert ratio > 1.5 and "these plans are LFAMPlanner's already" in text and '-pl' not in text
    with torch.device('meta'):  # a recipe's own batch (e.g. IFE's 32): the plans' batch is not the knob
        network = get_network_from_plans(dotted_name(LFAMPlainConvUNet), arch['arch_kwargs'],
                                         arch['_kw_requires_import'], 1, 3, allow_init=False)
    ratio, text = memory_message(network, plans, '3d_fullres', plan['patch_size'], 32, recipe_batch_size=32)
    assert "sets batch 32 itself (a paper's recipe), so the plans' batch_size does not change it" in text
    assert 'lower the configuration' not in text and '-pl' not in text


def test_memory_check_can_be_turned_off(planned, nnunet_plans, monkeypatch, capsys):
    class Quiet(nnUNetTrainerLFAM):
        memory_check_threshold = None

    trainer = make_trainer(Quiet, _with_configuration(planned, nnunet_plans[2], 'ExperimentPlanner'), 'labels')
    _start(trainer, monkeypatch)
    assert 'memory check' not in capsys.readouterr().err
    assert os.path.isfile(trainer.log_file)
