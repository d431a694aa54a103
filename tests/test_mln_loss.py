"""The MLN loss (Eqs. 12-13), its schedule and ``nnUNetTrainerMLN`` against hand-computed small cases
and a direct composition of nnU-Net's own loss with the boundary loss, on trainers built by hand on a
tiny planned 2D phantom (labels and an ignore label; deep supervision on)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunet_ext.architectures.mln_unet import MLNOutput, MLNPlainConvUNet
from nnunet_ext.losses import BoundaryLoss, signed_distance_map
from nnunet_ext.losses.mln import (MLN_TERMS, MLNSchedule, MLNTermWeights, PointCrossEntropyLoss,
                                   SignedDistanceRegressionLoss)
from nnunet_ext.trainers.mln_trainers import nnUNetTrainerMLN
from trainer_helpers import make_trainer


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --- schedule ---------------------------------------------------------------------------------------------------
def test_schedule_is_section_4_1_1_with_the_mll_alpha_ramp():
    schedule = MLNSchedule()
    # alpha: 0, 0.2, ..., 1 from epoch 5 (the paper's MLL ramp, our default for the MLN: shared decoder features)
    assert [round(schedule(e).boundary, 6) for e in range(7)] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    assert schedule(11) == MLNTermWeights(1.0, 1.0, 0.0, 0.0)  # beta = gamma = 0 for the first 12 epochs
    assert schedule(12) == MLNTermWeights(1.0, 1.0, 1.0, 1.0) == schedule(10 ** 6)
    literal = MLNSchedule(alpha_increment=None)  # the paper's MLN: alpha = 1 from the start
    assert literal(0) == MLNTermWeights(1.0, 1.0, 0.0, 0.0) == literal(11)
    stretched = MLNSchedule(epochs_per_step=25)
    assert stretched(24).boundary == 0.0 and stretched(25).boundary == pytest.approx(0.2)
    assert stretched(12 * 25 - 1).point == 0 and stretched(12 * 25) == MLNTermWeights(1.0, 1.0, 1.0, 1.0)
    assert MLNSchedule(alpha=0.5, beta=2.0, gamma=3.0)(12) == MLNTermWeights(1.0, 0.5, 2.0, 3.0)
    assert MLNSchedule(alpha=0.5, beta=2.0, gamma=3.0)(1).boundary == pytest.approx(0.2)
    with pytest.raises(ValueError, match='epochs_per_step'):
        MLNSchedule(epochs_per_step=0)
    with pytest.raises(ValueError, match='alpha_increment'):
        MLNSchedule(alpha_increment=0.0)
    with pytest.raises(ValueError, match='epoch'):
        schedule(-1)


# --- Eq. 12 and the point term on hand-computed cases ----------------------------------------------------------
def test_distance_regression_loss_by_hand():
    prediction = torch.tensor([[[[2.0, -1.0]]]])  # (B=1, K=1, 1, 2), positive inside
    phi = torch.tensor([[[[-1.0, 3.0]]]])           # inside at voxel 0, outside at voxel 1
    literal = SignedDistanceRegressionLoss(normalization=None)  # Eq. 12 as written
    boundary = (sigmoid(2) * -1 + sigmoid(-1) * 3) / 2
    squared = ((2 - 1) ** 2 + (-1 + 3) ** 2) / 2
    assert literal(prediction, phi).item() == pytest.approx(boundary + squared, rel=1e-6)
    mask = torch.tensor([[[[1.0, 0.0]]]])
    terms = literal.terms(prediction, phi, mask)
    assert [t.item() for t in terms] == pytest.approx([-sigmoid(2), 1.0], rel=1e-6)
    scaled = SignedDistanceRegressionLoss(normalization=None, distance_scale=2.0).terms(prediction, phi)
    assert scaled[1].item() == pytest.approx(((2 - 0.5) ** 2 + (-1 + 1.5) ** 2) / 2)
    # balanced (default): phi / mean|phi| = (-0.5, 1.5) in both parts of Eq. 12
    balanced = SignedDistanceRegressionLoss().terms(prediction, phi)
    assert [t.item() for t in balanced] == pytest.approx(
        [(sigmoid(2) * -0.5 + sigmoid(-1) * 1.5) / 2, ((2 - 0.5) ** 2 + (-1 + 1.5) ** 2) / 2], rel=1e-5)
    assert SignedDistanceRegressionLoss('max').terms(prediction, phi)[1].item() == pytest.approx(
        ((2 - 1 / 3) ** 2 + (-1 + 1) ** 2) / 2, rel=1e-6)
    with pytest.raises(ValueError, match='same shape'):
        literal(prediction, phi.expand(1, 2, 1, 2))
    with pytest.raises(ValueError, match='literal form'):
        SignedDistanceRegressionLoss(distance_scale=2.0)


@pytest.mark.parametrize('normalization', ['mean', 'max', None])
def test_no_regression_target_where_phi_is_undefined(normalization):
    """B2: a class absent from (or filling) a sample's patch has no signed distance: its head is not trained
    towards Phi = 0. A correct "far outside" head for an absent class gives an L2 term of 0, and the
    defined pairs' mean is unchanged by the undefined ones."""
    loss = SignedDistanceRegressionLoss(normalization)
    phi = torch.zeros(2, 2, 6, 7)
    phi[0, 0, :, :3], phi[0, 0, :, 3:] = -1.0, torch.arange(1.0, 5.0)  # class 1 defined in sample 1 only
    scale = {'mean': phi[0, 0].abs().mean(), 'max': phi[0, 0].abs().max(), None: torch.tensor(1.0)}[normalization]
    prediction = torch.full((2, 2, 6, 7), -5.0, requires_grad=True)  # "far outside" wherever Phi is undefined
    with torch.no_grad():
        prediction[0, 0] = -phi[0, 0] / scale  # exact where defined
    _, squared = loss.terms(prediction, phi)
    assert squared.item() == 0
    grad, = torch.autograd.grad(squared, prediction)
    assert not grad.any()
    # a wrong prediction for the defined pair: its mean over its own voxels only (undefined pairs don't count)
    wrong = prediction.detach().clone()
    wrong[0, 0] += 2.0
    mask = torch.ones(2, 1, 6, 7)
    mask[0, 0, 0] = 0  # ignored voxels do not count either
    assert loss.terms(wrong, phi)[1].item() == pytest.approx(4.0)
    assert loss.terms(wrong, phi, mask)[1].item() == pytest.approx(4.0)
    # nothing defined at all: 0 (no division by zero)
    assert loss.terms(prediction, torch.zeros_like(phi))[1].item() == 0
    # filling the patch gives an all-zero map too (signed_distance_map), hence the same treatment
    assert not signed_distance_map(np.ones((6, 7), bool)).any()


def test_point_cross_entropy_by_hand():
    labels = torch.tensor([[[[0, 1], [2, 1]]]])          # (1, 1, 2, 2); flat: 0, 1, 2, 1
    logits = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]])  # (B=1, C=3, N=2)
    indices = torch.tensor([[2, 1]])                      # labels 2 and 1
    first = -math.log(math.exp(0) / (math.exp(1) + 2))   # label 2, logits (1, 0, 0)
    second = -math.log(math.exp(2) / (2 + math.exp(2)))  # label 1, logits (0, 2, 0)
    loss = PointCrossEntropyLoss()
    assert loss(logits, indices, labels).item() == pytest.approx((first + second) / 2, rel=1e-6)
    mask = torch.tensor([[[[1, 1], [0, 1]]]])            # the first point is ignored
    assert loss(logits, indices, labels, mask).item() == pytest.approx(second, rel=1e-6)
    assert loss(logits, indices, labels, torch.zeros_like(mask)).item() == 0


# --- Eq. 13 as the trainer builds it, against a direct composition -------------------------------------------------
def mln_batch(trainer, batch_size=2, num_points=9, seed=0):
    """A random MLN output and the packed targets the trainer's data pipeline would deliver."""
    g = torch.Generator().manual_seed(seed)
    lm = trainer.label_manager
    patch = trainer.configuration_manager.patch_size
    shapes = [[max(1, int(round(p * s))) for p, s in zip(patch, scale)]
              for scale in trainer._get_deep_supervision_scales()]
    C = lm.num_segmentation_heads

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    output = MLNOutput(region=[randn(batch_size, C, *s) for s in shapes], distance=randn(batch_size, C - 1, *patch),
                       point_logits=randn(batch_size, C, num_points),
                       point_indices=torch.stack([torch.randperm(int(np.prod(patch)), generator=g)[:num_points]
                                                  for _ in range(batch_size)]),
                       fused=randn(batch_size, C, *patch))
    labels = torch.randint(0, 3, (batch_size, 1, *patch), generator=g)
    labels[:, :, :4] = 1  # some structure for the distance maps
    labels[-1][labels[-1] == 2] = 0  # class 2 absent from the last sample: its Phi is undefined
    if lm.ignore_label is not None:
        labels[torch.rand(labels.shape, generator=g) < 0.2] = lm.ignore_label
    targets = [F.interpolate(labels.double(), size=s, mode='nearest-exact') for s in shapes]
    transform = trainer._distance_transform()
    per_sample = [transform(segmentation=[t[b].to(torch.int16) for t in targets])['segmentation']
                  for b in range(batch_size)]
    packed = [torch.stack([s[i] for s in per_sample]).double() for i in range(len(targets))]
    return output, targets, packed


@pytest.mark.parametrize('variant', ['labels', 'ignore_label'])
def test_loss_is_eq_13_composed_of_nnunets_loss_and_the_boundary_loss(planned, variant):
    ours, theirs = make_trainer(nnUNetTrainerMLN, planned, variant), make_trainer(nnUNetTrainer, planned, variant)
    ignore = ours.label_manager.ignore_label
    output, targets, packed = mln_batch(ours)
    loss = ours._build_loss()
    loss.weights = MLNTermWeights(1.0, 0.7, 1.3, 0.4)
    value = loss(output, packed)

    nnunet_loss = theirs._build_loss()  # nnU-Net's deep-supervised Dice + CE
    region = nnunet_loss(output.region, targets)
    fusion = nnunet_loss.loss(output.fused, targets[0])
    phi = packed[0][:, 1:]
    mask = (targets[0] != ignore).double() if ignore is not None else torch.ones_like(targets[0])
    scale = phi.abs().mean((2, 3), keepdim=True)  # default normalisation: Phi / mean |Phi| per sample and class
    assert scale[-1, 1] == 0 and (scale[:-1] > 0).all() and scale[-1, 0] > 0
    defined = (scale > 0).double()
    phi_n = phi / torch.where(scale > 0, scale, 1.0)
    boundary = BoundaryLoss(use_sigmoid=True, normalization=None)(output.distance, phi_n, mask)
    squared = ((output.distance + phi_n) ** 2 * mask * defined).sum() / (mask * defined).sum()
    point_sum, point_count = 0.0, 0
    for b in range(2):
        flat = targets[0][b, 0].flatten()
        for n, v in enumerate(output.point_indices[b].tolist()):
            if ignore is not None and flat[v] == ignore:
                continue
            point_sum = point_sum - torch.log_softmax(output.point_logits[b, :, n], 0)[int(flat[v])]
            point_count += 1
    expected = region + 0.7 * (boundary + squared) + 1.3 * point_sum / point_count + 0.4 * fusion
    assert value.item() == pytest.approx(expected.item(), rel=1e-9)
    inputs = [*output.region, output.distance, output.point_logits, output.fused]
    grads = torch.autograd.grad(value, inputs, allow_unused=True, materialize_grads=True)
    for a, b in zip(grads, torch.autograd.grad(expected, inputs, allow_unused=True, materialize_grads=True)):
        torch.testing.assert_close(a, b)
    means = loss.pop_term_means()
    assert list(means) == list(MLN_TERMS)
    assert [means['region'], means['boundary'], means['distance_l2'], means['fusion']] == pytest.approx(
        [region.item(), boundary.item(), squared.item(), fusion.item()], rel=1e-9)


def test_terms_of_weight_zero_carry_no_gradient_unless_ddp_needs_one(planned):
    trainer = make_trainer(nnUNetTrainerMLN, planned, 'labels')
    output, _, packed = mln_batch(trainer)
    loss = trainer._build_loss()
    loss.weights = trainer.mll_schedule(0)  # as the trainer sets them at the start of epoch 0
    assert loss.weights == MLNTermWeights(1.0, 0.0, 0.0, 0.0)  # region only
    heads = [output.distance, output.point_logits, output.fused]
    value = loss(output, packed)
    assert torch.autograd.grad(value, heads, allow_unused=True) == (None, None, None)
    assert all(math.isfinite(v) for v in loss.pop_term_means().values())  # still evaluated, for the log
    loss.keep_zero_weight_terms = True  # what the trainer sets under DDP
    grads = torch.autograd.grad(loss(output, packed), heads)
    assert all(g is not None and g.abs().sum() == 0 for g in grads)
    loss.weights = trainer.mll_schedule(1)  # alpha 0.2: the boundary head learns
    assert torch.autograd.grad(loss(output, packed), output.distance)[0].abs().sum() > 0


def test_loss_refuses_outputs_and_targets_it_cannot_use(planned):
    trainer = make_trainer(nnUNetTrainerMLN, planned, 'labels')
    output, targets, packed = mln_batch(trainer)
    loss = trainer._build_loss()
    with pytest.raises(ValueError, match='deep supervision off'):
        loss(output.fused, packed)
    with pytest.raises(ValueError, match='SignedDistanceTransform'):
        loss(output, targets)  # labels without the distance maps
    with pytest.raises(ValueError, match='region outputs'):
        loss(output, packed[:1])


# --- the trainer ---------------------------------------------------------------------------------------------------
def test_trainer_builds_the_mln_network_from_default_plans_for_training_and_prediction(planned):
    trainer = make_trainer(nnUNetTrainerMLN, planned, 'labels')
    cm = trainer.configuration_manager
    training = trainer.build_network_architecture(trainer.plans_manager, cm, 1, 3, True)
    inference = nnUNetTrainerMLN.build_network_architecture(trainer.plans_manager, cm, 1, 3,
                                                            enable_deep_supervision=False)
    assert type(training) is MLNPlainConvUNet and training.decoder.deep_supervision
    inference.load_state_dict(training.state_dict(), strict=True)  # as nnU-Net's predictor does
    # the U-Net is the plans' own
    plain = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                   cm.network_arch_init_kwargs_req_import, 1, 3, deep_supervision=True)
    assert set(plain.state_dict()) < set(training.state_dict())
    x = torch.randn(2, 1, *cm.patch_size)
    assert len(training(x).region) == len(trainer._get_deep_supervision_scales())


def test_trainer_refuses_regions_and_deep_supervision_off(planned):
    with pytest.raises(ValueError, match='regions'):
        make_trainer(nnUNetTrainerMLN, planned, 'regions')._build_loss()
    trainer = make_trainer(nnUNetTrainerMLN, planned, 'labels')
    trainer.enable_deep_supervision = False
    with pytest.raises(ValueError, match='deep supervision on'):
        trainer._build_loss()


def hand_initialised(planned, variant='ignore_label'):
    """A trainer with network, optimizer and loss as ``initialize()`` sets them (without its dataset)."""
    trainer = make_trainer(nnUNetTrainerMLN, planned, variant)
    trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                                         trainer.label_manager.num_segmentation_heads, True)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()
    return trainer


def test_train_step_trains_every_branch_at_full_weights(planned):
    torch.manual_seed(11)
    trainer = hand_initialised(planned)
    _, targets, packed = mln_batch(trainer)
    trainer.loss.weights = trainer.mll_schedule(12)
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    data = torch.randn(2, 1, *trainer.configuration_manager.patch_size)
    result = trainer.train_step({'data': data, 'target': [t.float() for t in packed]})
    assert np.isfinite(result['loss'])
    changed = {k.split('.')[0] for k, v in trainer.network.state_dict().items()
               if v.dtype.is_floating_point and not torch.equal(v, before[k])}
    assert changed == {'encoder', 'decoder', 'boundary_branch', 'distance_head', 'pixel_branch', 'fusion'}


def test_trainer_predicts_with_the_region_branch_until_gamma_turns_the_fusion_on(planned):
    trainer = hand_initialised(planned)
    trainer.print_to_log_file = lambda *args, **kwargs: None
    for epoch, active in ((0, False), (11, False), (12, True)):
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        assert trainer.loss.weights.fusion == (1.0 if active else 0.0)
        assert bool(trainer.network.fusion_active) == active, epoch


def test_online_validation_scores_the_fused_prediction(planned):
    torch.manual_seed(12)
    trainer = hand_initialised(planned)
    trainer.network.eval()
    _, targets, packed = mln_batch(trainer)
    data = torch.randn(2, 1, *trainer.configuration_manager.patch_size)
    result = trainer.validation_step({'data': data, 'target': [t.float() for t in packed]})
    with torch.no_grad():
        fused = trainer.network(data).fused
    predicted, labels = fused.argmax(1), targets[0][:, 0]
    valid = labels != trainer.label_manager.ignore_label
    for c in (1, 2):  # foreground classes, ignored voxels excluded
        tp = ((predicted == c) & (labels == c) & valid).sum().item()
        fp = ((predicted == c) & (labels != c) & valid).sum().item()
        fn = ((predicted != c) & (labels == c) & valid).sum().item()
        assert (result['tp_hard'][c - 1], result['fp_hard'][c - 1], result['fn_hard'][c - 1]) == (tp, fp, fn)
    assert np.isfinite(result['loss'])
