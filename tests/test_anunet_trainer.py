"""The ANU-Net / UNet++ trainers built by hand on a planned phantom (no training): the network they
build, the deep-supervision mapping (full-resolution heads, equal weights), the loss against a direct
computation per head, the pruning variable refused while training, and ANUNetPlanner's plans."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnunet_ext.architectures.anunet import PRUNE_LEVEL_ENV, ANUNet, UNetPlusPlus
from nnunet_ext.losses import GODCLoss
from nnunet_ext.losses.hybrid import HybridLoss
from nnunet_ext.plans.anunet_planners import ANUNetPlanner
from nnunet_ext.trainers.anunet_trainers import (nnUNetTrainerANUNet, nnUNetTrainerANUNetDiceCE,
                                                 nnUNetTrainerANUNetGODC, nnUNetTrainerANUNetPaper,
                                                 nnUNetTrainerUNetPlusPlus)
from nnunet_ext.trainers.godc_trainers import nnUNetTrainerGODC
from trainer_helpers import DATASET_JSON_VARIANTS, DATASET_ID, batch, make_trainer


def _network(trainer, deep_supervision=True):
    lm = trainer.label_manager
    return type(trainer).build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                    1, lm.num_segmentation_heads, deep_supervision)


@pytest.mark.parametrize('cls, network', [(nnUNetTrainerANUNet, ANUNet), (nnUNetTrainerUNetPlusPlus, UNetPlusPlus)])
def test_builds_the_nested_network_with_one_full_resolution_head_per_scale(planned, cls, network):
    trainer = make_trainer(cls, planned, 'labels')
    net = _network(trainer)
    assert type(net) is network
    n_stages = len(trainer.configuration_manager.pool_op_kernel_sizes)
    scales = trainer._get_deep_supervision_scales()
    assert scales == [[1.0, 1.0]] * (n_stages - 1)
    patch = trainer.configuration_manager.patch_size
    outputs = net(torch.randn(2, 1, *patch))
    assert len(outputs) == len(scales)
    assert all(o.shape == (2, 3, *patch) for o in outputs)
    single = _network(trainer, deep_supervision=False)
    assert set(single.state_dict()) == set(net.state_dict())  # nnU-Net's predictor reloads strictly
    single.load_state_dict(net.state_dict())
    single.eval(), net.eval()
    with torch.no_grad():
        torch.testing.assert_close(single(torch.ones(1, 1, *patch)), net(torch.ones(1, 1, *patch))[0])


def _masked(targets, lm):
    """(target, loss mask) per head, from nnU-Net's targets, written out for the oracle."""
    pairs = []
    for t in targets:
        if lm.has_regions and lm.ignore_label is not None:
            pairs.append((t[:, :-1], 1 - t[:, -1:]))
        elif lm.ignore_label is not None:
            mask = (t != lm.ignore_label).double()
            pairs.append((t * mask, mask))
        else:
            pairs.append((t, None))
    return pairs


@pytest.mark.parametrize('variant', sorted(DATASET_JSON_VARIANTS))
def test_hybrid_loss_is_the_mean_of_eq_8_over_the_heads(planned, variant):
    trainer = make_trainer(nnUNetTrainerANUNet, planned, variant)
    lm = trainer.label_manager
    outputs, targets = batch(trainer, batch_size=2)
    value = trainer._build_loss()(outputs, targets)
    hybrid = HybridLoss('sigmoid' if lm.has_regions else 'softmax', alpha=0.75, gamma=2, margin=0.05, smooth=1,
                        batch_dice=trainer.configuration_manager.batch_dice, modulation='hardness')
    per_head = [hybrid(o, t, m) for o, (t, m) in zip(outputs, _masked(targets, lm))]
    assert len(per_head) == len(trainer._get_deep_supervision_scales()) > 1
    expected = sum(per_head) / len(per_head)
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)
    grads = torch.autograd.grad(value, outputs)
    for k, (g, head) in enumerate(zip(grads, per_head)):  # each head's own term, divided by the head count
        reference, = torch.autograd.grad(head / len(per_head), outputs[k])
        torch.testing.assert_close(g, reference)


def test_hybrid_loss_settings_come_from_the_plans_and_class_attributes(planned):
    trainer = make_trainer(nnUNetTrainerANUNet, planned, 'labels')
    hybrid = trainer._build_output_loss().hybrid
    assert hybrid.batch_dice == trainer.configuration_manager.batch_dice
    assert hybrid.ddp == trainer.is_ddp  # global batch Dice under DDP, as nnU-Net's own Dice
    assert hybrid.bce_normalization == 'weights' and not hybrid.check_values
    assert (hybrid.alpha, hybrid.gamma, hybrid.modulation) == (0.75, 2.0, 'hardness')

    class Literal(nnUNetTrainerANUNet):
        hybrid_bce_normalization = 'voxels'

    literal = make_trainer(Literal, planned, 'labels')
    outputs, targets = batch(literal, batch_size=2)
    outputs = [torch.zeros_like(o, requires_grad=True) for o in outputs]  # every voxel at Y = 1/3
    ratio = literal._build_loss()(outputs, targets).item() / trainer._build_loss()(outputs, targets).item()
    assert ratio > 5  # Eq. 8's voxel mean carries |1/3 - 1/2|^-2 = 36 on its BCE term


class _Eq8Literal(nnUNetTrainerANUNet):
    """The hybrid loss as it was until issue 26: Eq. 8's |Y - 0.5|^-gamma everywhere, RetinaNet's alpha 0.25."""
    hybrid_modulation = 'literal'
    hybrid_alpha = 0.25


def _confidently_wrong_patch(uncertain: float, regions: bool):
    """A 64^2 patch as a network that predicts background everywhere sees it: 8 % of the voxels are class 2
    (a small object), predicted at P = 0.02; the rest is background, predicted right at P(background) =
    0.96, except a fraction ``uncertain`` of it predicted 0.45 for class 1. Returns (logits, target, object
    mask). Regions: sigmoid logits of the two regions (class 2 lies in both), 0.02 / 0.45 likewise."""
    n, fg = 64 * 64, int(0.08 * 64 * 64)
    unsure = slice(fg, fg + int(uncertain * n))
    labels = torch.zeros(n, dtype=torch.long)
    labels[:fg] = 2
    if regions:
        p = torch.full((2, n), 0.02, dtype=torch.float64)
        p[0, unsure] = 0.45
        logits = (p / (1 - p)).log()
        target = torch.stack([labels >= 1, labels == 2]).double()
    else:
        p = torch.tensor([0.96, 0.02, 0.02], dtype=torch.float64)[:, None].repeat(1, n)
        p[:, unsure] = torch.tensor([0.53, 0.45, 0.02], dtype=torch.float64)[:, None]
        logits = p.log()
        target = labels[None].double()
    return logits.view(1, -1, 64, 64).requires_grad_(), target.view(1, -1, 64, 64), (labels == 2).view(64, 64)


@pytest.mark.parametrize('variant', ['labels', 'regions'])
def test_hybrid_loss_learns_from_confidently_wrong_object_voxels_like_cross_entropy(planned, variant):
    """Issue 26's failure without real data: a network that has settled on background (every object voxel
    at P = 0.02) must be pushed back towards the object at least as hard as cross-entropy pushes it
    (closed form: CE's mean over N voxels gives each object logit -(1 - P)/N), also when part of the
    background is uncertain. Eq. 8's literal weighting gives those voxels ~100x less weight than the
    uncertain ones and fails this (measured on this patch: 0.37x CE without uncertain voxels, 0.26x with 20 %); so did
    ANU-Net's training on real polyp and nerve-ultrasound images, whose pseudo-Dice stayed 0 while
    nnU-Net's left 0 (docs/methods/anunet.md). The defaults measure 2.2-7.7x CE."""
    channel = 1 if variant == 'regions' else 2  # the object's logit: region 'tumour' / class 2
    ce_gradient = -(1 - 0.02) / (64 * 64)
    for cls in (nnUNetTrainerANUNet, nnUNetTrainerUNetPlusPlus, nnUNetTrainerANUNetPaper, _Eq8Literal):
        loss = make_trainer(cls, planned, variant)._build_output_loss()
        ratios = []
        for uncertain in (0.0, 0.05, 0.2):
            logits, target, obj = _confidently_wrong_patch(uncertain, variant == 'regions')
            gradient, = torch.autograd.grad(loss(logits, target), logits)
            ratios.append(gradient[0, channel][obj].mean().item() / ce_gradient)
        if cls is _Eq8Literal:
            assert min(ratios) < 0.5, ratios  # the check tells the failing loss apart
        else:
            assert min(ratios) >= 1, (cls.__name__, ratios)


@pytest.mark.parametrize('variant', sorted(DATASET_JSON_VARIANTS))
def test_anunet_trainer_losses_read_no_tensor_on_the_host(planned, variant, monkeypatch):
    from host_sync_trap import trap_host_device_sync
    for cls in (nnUNetTrainerANUNet, nnUNetTrainerUNetPlusPlus):
        trainer = make_trainer(cls, planned, variant)
        outputs, targets = batch(trainer, batch_size=2)
        loss = trainer._build_loss()
        with trap_host_device_sync():
            value = loss(outputs, targets)
            grads = torch.autograd.grad(value, outputs)
        assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads)


def test_godc_and_dice_ce_variants_weight_nnunets_per_output_losses_equally(planned):
    trainer = make_trainer(nnUNetTrainerANUNetGODC, planned, 'ignore_label')
    godc = make_trainer(nnUNetTrainerGODC, planned, 'ignore_label')
    outputs, targets = batch(trainer, batch_size=2)
    per_output = godc._build_output_loss()
    assert isinstance(per_output.dc, GODCLoss)
    expected = np.mean([per_output(o, t).item() for o, t in zip(outputs, targets)])
    assert trainer._build_loss()(outputs, targets).item() == pytest.approx(expected, rel=1e-10)
    dice_ce = make_trainer(nnUNetTrainerANUNetDiceCE, planned, 'labels')
    outputs, targets = batch(dice_ce, batch_size=2)
    per_output = dice_ce._build_output_loss()
    expected = np.mean([per_output(o, t).item() for o, t in zip(outputs, targets)])
    assert dice_ce._build_loss()(outputs, targets).item() == pytest.approx(expected, rel=1e-10)


def test_head_weights_can_be_set_and_are_checked(planned):
    n = len(make_trainer(nnUNetTrainerANUNet, planned, 'labels')._get_deep_supervision_scales())

    class Weighted(nnUNetTrainerANUNet):
        anunet_head_weights = [2.0] + [1.0] * (n - 1)

    np.testing.assert_allclose(make_trainer(Weighted, planned, 'labels')._deep_supervision_weights(),
                               np.array([2.0] + [1.0] * (n - 1)) / (n + 1))
    Weighted.anunet_head_weights = [1.0]
    with pytest.raises(ValueError, match=f'need {n} non-negative weights'):
        make_trainer(Weighted, planned, 'labels')._build_loss()


def test_training_refuses_the_prediction_time_pruning_variable(planned, monkeypatch):
    trainer = make_trainer(nnUNetTrainerANUNet, planned, 'labels')
    monkeypatch.setenv(PRUNE_LEVEL_ENV, '2')
    with pytest.raises(RuntimeError, match='training must run the full network'):
        trainer.on_train_start()


def test_other_architectures_in_the_plans_are_refused(planned):
    plans, dataset_json = planned
    plans = {**plans, 'configurations': {
        '2d': {**plans['configurations']['2d'], 'architecture': {
            **plans['configurations']['2d']['architecture'],
            'network_class_name': 'dynamic_network_architectures.architectures.unet.ResidualEncoderUNet'}}}}
    trainer = make_trainer(nnUNetTrainerANUNet, (plans, dataset_json), 'labels')
    with pytest.raises(ValueError, match='nnunet-ext plan ID -pl ANUNetPlanner'):
        _network(trainer)


@pytest.mark.parametrize('spacing, median_shape', [((1.0, 1.0), (512, 512)), ((1.0, 1.0, 1.0), (160, 192, 192))])
def test_planner_counts_the_nested_decoder(planned, spacing, median_shape):
    """On a large (fictitious) image the nested network gets a smaller patch x batch than nnU-Net's U-Net
    for the same memory target, and its own estimate for what it got fits that target."""
    ours, theirs = ANUNetPlanner(DATASET_ID), ExperimentPlanner(DATASET_ID)
    n_voxels = float(np.prod(median_shape)) * 1000
    plan = ours.get_plans_for_configuration(spacing, median_shape, 'x', n_voxels, {})
    reference_plan = theirs.get_plans_for_configuration(spacing, median_shape, 'x', n_voxels, {})
    assert plan['architecture']['network_class_name'] == 'nnunet_ext.architectures.anunet.ANUNet'
    assert ours.plans_identifier == 'nnUNetPlansANUNet'
    voxels = np.prod(plan['patch_size']) * plan['batch_size']
    assert voxels < np.prod(reference_plan['patch_size']) * reference_plan['batch_size']
    arch = plan['architecture']
    estimate = ours.static_estimate_VRAM_usage(plan['patch_size'], 1, 3, arch['network_class_name'],
                                               arch['arch_kwargs'], arch['_kw_requires_import'])
    ndim = len(spacing)
    reference = ours.UNet_reference_val_2d if ndim == 2 else ours.UNet_reference_val_3d
    ref_bs = ours.UNet_reference_val_corresp_bs_2d if ndim == 2 else ours.UNet_reference_val_corresp_bs_3d
    assert estimate / ref_bs * 2 <= reference  # nnU-Net's own criterion (8 GB target)
    plain = ExperimentPlanner.static_estimate_VRAM_usage(
        plan['patch_size'], 1, 3, 'dynamic_network_architectures.architectures.unet.PlainConvUNet',
        arch['arch_kwargs'], arch['_kw_requires_import'])
    assert estimate > plain


def test_trainer_builds_from_the_planners_plans(planned):
    """ANUNetPlanner plans the phantom (its ``plan_experiment``, as ``nnunet-ext plan ID -pl ANUNetPlanner``
    runs it): the plans it writes name ANU-Net's class with PlainConvUNet's keywords, and the nested-U-Net
    trainers build ANU-Net / UNet++ from them."""
    plans, dataset_json = planned
    planner = ANUNetPlanner(DATASET_ID)
    written = planner.plan_experiment()  # writes nnUNetPlansANUNet.json next to nnU-Net's plans
    assert written['plans_name'] == 'nnUNetPlansANUNet' and written['experiment_planner_used'] == 'ANUNetPlanner'
    on_disk = load_json(os.path.join(os.environ['nnUNet_preprocessed'], plans['dataset_name'],
                                     'nnUNetPlansANUNet.json'))
    assert on_disk['configurations'].keys() == written['configurations'].keys()
    architecture = on_disk['configurations']['2d']['architecture']
    assert architecture['network_class_name'] == 'nnunet_ext.architectures.anunet.ANUNet'
    default = plans['configurations']['2d']['architecture']  # nnU-Net's ExperimentPlanner's plans
    assert default['network_class_name'] == 'dynamic_network_architectures.architectures.unet.PlainConvUNet'
    assert architecture['arch_kwargs'].keys() == default['arch_kwargs'].keys()
    for cls, network in ((nnUNetTrainerANUNet, ANUNet), (nnUNetTrainerUNetPlusPlus, UNetPlusPlus)):
        trainer = make_trainer(cls, (on_disk, dataset_json), 'labels')
        net = _network(trainer)
        assert type(net) is network
        n_stages = architecture['arch_kwargs']['n_stages']
        patch = on_disk['configurations']['2d']['patch_size']
        outputs = net(torch.randn(1, 1, *patch))  # one full-resolution head per nested row below the top
        assert [tuple(o.shape) for o in outputs] == [(1, 3, *patch)] * (n_stages - 1)
