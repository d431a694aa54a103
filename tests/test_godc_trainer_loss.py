"""The loss our GODC trainers build, against nnU-Net's own trainer on the same plans.

Oracle: with one sample per batch GODC's weight is 1, so the GODC term is ``1 - DC`` while
nnU-Net's Dice term is ``-DC`` (batch Dice of one sample = per-sample Dice). The trainers' whole
losses (deep supervision, CE/BCE, ignore label, regions) must then differ by exactly 1 and have
identical gradients. That pins down that everything except the Dice term is nnU-Net's.
(nnU-Net sums its Dice terms in float32, hence float32 tolerances.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.trainers.godc_trainers import nnUNetTrainerGODC, nnUNetTrainerGODCOnly
from trainer_helpers import DATASET_JSON_VARIANTS, batch, make_trainer


@pytest.mark.parametrize('variant', sorted(DATASET_JSON_VARIANTS))
def test_godc_trainer_loss_is_nnunet_loss_plus_one_for_one_sample(planned, variant):
    ours, theirs = make_trainer(nnUNetTrainerGODC, planned, variant), make_trainer(nnUNetTrainer, planned, variant)
    assert ours.label_manager.has_regions == variant.startswith('regions')
    assert (ours.label_manager.ignore_label is not None) == ('ignore' in variant)
    outputs, targets = batch(ours, batch_size=1)
    loss_ours = ours._build_loss()(outputs, targets)
    grads_ours = torch.autograd.grad(loss_ours, outputs, allow_unused=True, materialize_grads=True)
    loss_theirs = theirs._build_loss()(outputs, targets)
    grads_theirs = torch.autograd.grad(loss_theirs, outputs, allow_unused=True, materialize_grads=True)
    assert loss_ours.item() == pytest.approx(loss_theirs.item() + 1.0, abs=1e-5)
    for a, b in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_godc_is_per_sample_although_plans_use_batch_dice(planned):
    ours, theirs = make_trainer(nnUNetTrainerGODC, planned, 'labels'), make_trainer(nnUNetTrainer, planned, 'labels')
    assert ours.configuration_manager.batch_dice  # nnU-Net's 2d default
    outputs, targets = batch(ours, batch_size=2)
    targets = [t.clone() for t in targets]
    targets[0][0][targets[0][0] == 1] = 0  # sample 0 loses its liver: unions now differ a lot
    difference = ours._build_loss()(outputs, targets).item() - theirs._build_loss()(outputs, targets).item()
    assert abs(difference - 1.0) > 1e-3


def test_godc_only_is_godc_without_cross_entropy(planned):
    godc, only = make_trainer(nnUNetTrainerGODC, planned, 'labels'), make_trainer(nnUNetTrainerGODCOnly, planned,
                                                                                   'labels')
    outputs, targets = batch(godc, batch_size=2)
    n = len(outputs)
    weights = np.array([1 / 2 ** i for i in range(n)])
    weights[-1] = 0
    weights /= weights.sum()
    ce = sum(w * F.cross_entropy(o, t[:, 0].long()) for w, o, t in zip(weights, outputs, targets))
    assert only._build_loss()(outputs, targets).item() == pytest.approx(
        godc._build_loss()(outputs, targets).item() - ce.item(), abs=1e-5)


def test_deep_supervision_length_mismatch_is_an_error(planned):
    trainer = make_trainer(nnUNetTrainerGODC, planned, 'labels')
    outputs, targets = batch(trainer, batch_size=1)
    with pytest.raises(ValueError, match='differ in length'):
        trainer._build_loss()(outputs[:-1], targets)


def test_without_deep_supervision_the_loss_takes_single_tensors(planned):
    trainer = make_trainer(nnUNetTrainerGODC, planned, 'labels')
    outputs, targets = batch(trainer, batch_size=1)
    trainer.enable_deep_supervision = False
    reference = make_trainer(nnUNetTrainer, planned, 'labels')
    reference.enable_deep_supervision = False
    assert trainer._build_loss()(outputs[0], targets[0]).item() == pytest.approx(
        reference._build_loss()(outputs[0], targets[0]).item() + 1.0, abs=1e-5)


def _per_sample_gradient_norms(loss, outputs, targets):
    grads = torch.autograd.grad(loss(outputs, targets), outputs, allow_unused=True, materialize_grads=True)
    return [torch.sqrt(sum((g[b] ** 2).sum() for g in grads)).item() for b in range(outputs[0].shape[0])]


@pytest.mark.parametrize('variant', sorted(DATASET_JSON_VARIANTS))
def test_godc_only_pushes_false_positives_down_on_background_only_patches(planned, variant):
    """nnUNetTrainerGODCOnly (no CE) on a batch whose sample 1 is background only: its gradient is at least
    1e-3 of sample 0's (measured ~1); with the weights detached everywhere it is ~1e-8."""
    trainer = make_trainer(nnUNetTrainerGODCOnly, planned, variant)
    outputs, targets = batch(trainer, batch_size=2)
    targets = [t.clone() for t in targets]
    for t in targets:
        if trainer.label_manager.has_regions:
            t[1, :2] = 0  # both regions empty; the ignore channel (if any) stays
        else:
            t[1][t[1] != 3] = 0  # background, except the ignore label's voxels
    fg, empty = _per_sample_gradient_norms(trainer._build_loss(), outputs, targets)
    assert empty >= 1e-3 * fg

    class Detached(nnUNetTrainerGODCOnly):
        godc_empty_gradient = False

    fg, empty = _per_sample_gradient_norms(make_trainer(Detached, planned, variant)._build_loss(), outputs, targets)
    assert empty < 1e-5 * fg


@pytest.mark.parametrize('variant', sorted(DATASET_JSON_VARIANTS))
def test_godc_trainer_losses_read_no_tensor_on_the_host(planned, variant, monkeypatch):
    """The losses the GODC trainers build (deep supervision included) run forward and backward without a
    host-device synchronisation. Exception, nnU-Net's own: its DC_and_CE_loss reads the number of
    non-ignored voxels (``num_fg > 0``) when CE is on and there is an ignore label, as for nnUNetTrainer."""
    from host_sync_trap import trap_host_device_sync
    classes = [nnUNetTrainerGODCOnly]
    if variant != 'ignore_label':
        classes.append(nnUNetTrainerGODC)
    for cls in classes:
        trainer = make_trainer(cls, planned, variant)
        outputs, targets = batch(trainer, batch_size=2)
        loss = trainer._build_loss()
        with trap_host_device_sync():
            value = loss(outputs, targets)
            grads = torch.autograd.grad(value, outputs, allow_unused=True, materialize_grads=True)
        assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads)
