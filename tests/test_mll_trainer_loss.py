"""The loss and data pipeline our multi-level structural loss trainers build, against nnU-Net's own
trainer on the same plans (labels, ignore label, regions, regions + ignore; deep supervision).

Oracles: with the boundary and point weights at 0 (epoch 0 of the paper schedule) the loss and its
gradients are exactly nnU-Net's; with the weights on, the extra terms equal the boundary loss and
the point loss computed directly on the unpacked targets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.losses import BoundaryLoss, TermWeights, UncertainPointLoss
from nnunet_ext.trainers.godc_trainers import nnUNetTrainerGODC
from nnunet_ext.trainers.mll_trainers import (nnUNetTrainerMLL, nnUNetTrainerMLLGODC, nnUNetTrainerRegionBoundary,
                                              nnUNetTrainerRegionPoint)
from nnunet_ext.training.distance_transform import SignedDistanceTransform
from trainer_helpers import DATASET_JSON_VARIANTS, batch, make_trainer


def packed_targets(trainer, targets):
    """What the trainer's data pipeline makes of nnU-Net's targets: each sample through the trainer's
    own SignedDistanceTransform (the last of its transforms), then stacked."""
    transform = trainer._distance_transform()
    per_sample = [transform(segmentation=[t[b].to(torch.int16) for t in targets])['segmentation']
                  for b in range(targets[0].shape[0])]
    return [torch.stack([s[i] for s in per_sample]).double() for i in range(len(targets))]


@pytest.mark.parametrize('variant', sorted(DATASET_JSON_VARIANTS))
def test_with_extra_weights_zero_the_loss_is_nnunets(planned, variant):
    ours, theirs = make_trainer(nnUNetTrainerMLL, planned, variant), make_trainer(nnUNetTrainer, planned, variant)
    outputs, targets = batch(ours, batch_size=2)
    loss = ours._build_loss()
    assert loss.weights == TermWeights(1.0, 0.0, 0.0) == ours.mll_schedule(0)
    value = loss(outputs, packed_targets(ours, targets))
    grads = torch.autograd.grad(value, outputs, allow_unused=True, materialize_grads=True)
    reference = theirs._build_loss()(outputs, targets)
    grads_reference = torch.autograd.grad(reference, outputs, allow_unused=True, materialize_grads=True)
    assert value.item() == pytest.approx(reference.item(), rel=1e-6)
    for a, b in zip(grads, grads_reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize('variant', sorted(DATASET_JSON_VARIANTS))
def test_extra_terms_are_the_boundary_and_point_losses(planned, variant):
    trainer = make_trainer(nnUNetTrainerMLL, planned, variant)
    lm = trainer.label_manager
    outputs, targets = batch(trainer, batch_size=2)
    packed = packed_targets(trainer, targets)
    loss = trainer._build_loss()
    base = loss(outputs, packed).item()
    loss.weights = TermWeights(1.0, 0.7, 1.3)
    torch.manual_seed(3)
    value = loss(outputs, packed).item()

    # direct computation on the unpacked targets
    n_label = 1 if not lm.has_regions else len(lm.foreground_regions) + (lm.ignore_label is not None)
    weights = trainer._deep_supervision_weights()
    boundary, masks, point_targets = BoundaryLoss(use_sigmoid=lm.has_regions), [], []
    for t in targets:
        if lm.has_regions:
            mask = 1 - t[:, -1:] if lm.ignore_label is not None else None
            point_targets.append(t[:, :-1] if lm.ignore_label is not None else t)
        else:
            mask = (t != lm.ignore_label).double() if lm.ignore_label is not None else None
            point_targets.append(torch.where(t == lm.ignore_label, 0, t) if lm.ignore_label is not None else t)
        masks.append(mask)
    expected_boundary = sum(w * boundary(o, p[:, n_label:], m)
                            for w, o, p, m in zip(weights, outputs, packed, masks) if w)
    torch.manual_seed(3)
    expected_point = UncertainPointLoss(use_sigmoid=lm.has_regions)(outputs[0], point_targets[0], masks[0])
    assert value == pytest.approx(base + 0.7 * expected_boundary.item() + 1.3 * expected_point.item(), rel=1e-5)


def test_distance_maps_follow_the_configuration_spacing_and_labels(planned):
    trainer = make_trainer(nnUNetTrainerMLL, planned, 'ignore_label')
    transform = trainer._distance_transform()
    assert transform.spacing == tuple(trainer.configuration_manager.spacing)
    assert transform.foreground_labels == (1, 2)  # the ignore label (3) gets no map
    regions = make_trainer(nnUNetTrainerMLL, planned, 'regions_ignore')._distance_transform()
    assert regions.num_regions == 2


def test_transforms_end_with_the_distance_maps(planned):
    trainer = make_trainer(nnUNetTrainerMLL, planned, 'labels')
    ds = trainer._get_deep_supervision_scales()
    train = trainer.get_training_transforms(trainer.configuration_manager.patch_size, (0, 0), ds, (0, 1), False,
                                            use_mask_for_norm=[False])
    val = trainer.get_validation_transforms(ds)
    for composed in (train, val):
        assert isinstance(composed.transforms[-1], SignedDistanceTransform)
        assert type(composed.transforms[-2]).__name__ == 'DownsampleSegForDSTransform'
    seg = torch.zeros((1, *trainer.configuration_manager.patch_size), dtype=torch.int16)
    seg[0, 4:20, 6:18] = 1
    out = val(image=torch.zeros((1, *seg.shape[1:])), segmentation=seg)['segmentation']
    assert len(out) == len(ds) and all(t.shape[0] == 3 for t in out)
    assert (out[0][1][4:20, 6:18] <= 0).all() and (out[0][1][:4] > 0).all()


def test_ablations_and_godc_composition(planned):
    assert make_trainer(nnUNetTrainerRegionBoundary, planned, 'labels')._build_loss().point_loss is None
    assert make_trainer(nnUNetTrainerRegionPoint, planned, 'labels')._build_loss().boundary_loss is None
    mll_godc = make_trainer(nnUNetTrainerMLLGODC, planned, 'labels')
    godc = make_trainer(nnUNetTrainerGODC, planned, 'labels')
    outputs, targets = batch(mll_godc, batch_size=2)
    np.testing.assert_allclose(mll_godc._build_loss()(outputs, packed_targets(mll_godc, targets)).item(),
                               godc._build_loss()(outputs, targets).item(), rtol=1e-6)


def test_without_deep_supervision_the_loss_takes_single_tensors(planned):
    trainer = make_trainer(nnUNetTrainerMLL, planned, 'labels')
    outputs, targets = batch(trainer, batch_size=2)
    trainer.enable_deep_supervision = False
    reference = make_trainer(nnUNetTrainer, planned, 'labels')
    reference.enable_deep_supervision = False
    packed = packed_targets(trainer, targets[:1])[0]
    assert trainer._build_loss()(outputs[0], packed).item() == pytest.approx(
        reference._build_loss()(outputs[0], targets[0]).item(), rel=1e-6)
