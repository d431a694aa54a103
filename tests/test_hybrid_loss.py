"""Hybrid loss of ANU-Net (Eq. 8) against per-voxel loops written with ``math``, torch's BCE, and the
properties the module docstring claims (finite at 0.5, gradient direction, ignore mask, batch Dice)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_ext.losses import HybridLoss


def _weight(p, t, gamma, margin, modulation):
    """The modulating weight of one voxel, written case by case."""
    if modulation == 'literal':
        return max(abs(p - 0.5), margin) ** -gamma  # Eq. 8: |Y - 0.5|^-gamma
    p_true = p if t == 1 else 1 - p  # probability of the right answer
    if p_true <= 0.5:  # wrong (or undecided): the largest weight
        return margin ** -gamma
    return max(p_true - 0.5, margin) ** -gamma  # right: Eq. 8's, since p_true - 0.5 = |p - 0.5|


def _naive_sums(probs, targets, alpha=0.75, gamma=2.0, margin=0.05, smooth=1.0, modulation='hardness'):
    """(sum of w * bce, sum of w, voxel count, 1 - Dice) of one channel, from lists of floats."""
    weights = [_weight(p, t, gamma, margin, modulation) for p, t in zip(probs, targets)]
    bce = [-(alpha * t * math.log(p) + (1 - alpha) * (1 - t) * math.log(1 - p)) for p, t in zip(probs, targets)]
    dice = (2 * sum(p * t for p, t in zip(probs, targets)) + smooth) / (
        sum(p * p for p in probs) + sum(t * t for t in targets) + smooth)
    return sum(w * b for w, b in zip(weights, bce)), sum(weights), len(probs), 1 - dice


def _fbce(sums, normalization='weights'):
    """The focal-BCE term over several channels/samples' ``_naive_sums``: weighted mean or voxel mean."""
    numerator = sum(s[0] for s in sums)
    return numerator / sum(s[1] for s in sums) if normalization == 'weights' else numerator / sum(s[2] for s in sums)


def _naive_terms(probs, targets, alpha=0.75, gamma=2.0, margin=0.05, smooth=1.0, normalization='weights',
                 modulation='hardness'):
    """(focal-BCE term, 1 - Dice) of one channel."""
    sums = _naive_sums(probs, targets, alpha, gamma, margin, smooth, modulation)
    return _fbce([sums], normalization), sums[3]


def _logits(probs):
    return torch.tensor([math.log(p / (1 - p)) for p in probs], dtype=torch.float64).view(1, 1, 2, 3)


@pytest.mark.parametrize('modulation', ['hardness', 'literal'])
@pytest.mark.parametrize('normalization', ['weights', 'voxels'])
def test_binary_case_by_hand(normalization, modulation):
    probs = [0.9, 0.2, 0.6, 0.05, 0.52, 0.3]
    targets = [1, 0, 1, 0, 1, 1]
    logits = _logits(probs)
    y = torch.tensor(targets, dtype=torch.float64).view(1, 1, 2, 3)
    fbce, dice_loss = _naive_terms(probs, targets, normalization=normalization, modulation=modulation)
    loss = HybridLoss('sigmoid', bce_normalization=normalization, modulation=modulation)(logits, y)
    assert loss.item() == pytest.approx(fbce + dice_loss, rel=1e-9)
    fbce, dice_loss = _naive_terms(probs, targets, alpha=0.25, normalization=normalization, modulation=modulation)
    loss = HybridLoss('sigmoid', alpha=0.25, bce_normalization=normalization, modulation=modulation)(logits, y)
    assert loss.item() == pytest.approx(fbce + dice_loss, rel=1e-9)
    # two samples: Dice per sample, averaged; focal BCE one (weighted) mean over all voxels
    probs2, targets2 = [0.7, 0.1, 0.4, 0.8, 0.35, 0.6], [0, 0, 1, 1, 0, 1]
    logits2 = _logits(probs2)
    y2 = torch.tensor(targets2, dtype=torch.float64).view(1, 1, 2, 3)
    loss = HybridLoss('sigmoid', alpha=0.4, gamma=1.5, margin=0.1, smooth=0.5, bce_normalization=normalization,
                      modulation=modulation)(torch.cat([logits, logits2]), torch.cat([y, y2]))
    a = _naive_sums(probs, targets, 0.4, 1.5, 0.1, 0.5, modulation)
    b = _naive_sums(probs2, targets2, 0.4, 1.5, 0.1, 0.5, modulation)
    assert loss.item() == pytest.approx(_fbce([a, b], normalization) + (a[3] + b[3]) / 2, rel=1e-9)
    # batch Dice: one Dice over both samples
    loss = HybridLoss('sigmoid', batch_dice=True, bce_normalization=normalization, modulation=modulation)(
        torch.cat([logits, logits2]), torch.cat([y, y2]))
    fbce_all, dice_all = _naive_terms(probs + probs2, targets + targets2, normalization=normalization,
                                      modulation=modulation)
    assert loss.item() == pytest.approx(fbce_all + dice_all, rel=1e-9)


@pytest.mark.parametrize('modulation', ['hardness', 'literal'])
@pytest.mark.parametrize('normalization', ['weights', 'voxels'])
def test_multiclass_softmax_by_hand(normalization, modulation):
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 2, 4, dtype=torch.float64)
    labels = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1]]).view(1, 1, 2, 4)
    flat = logits[0].reshape(3, -1).tolist()
    lab = labels.flatten().tolist()
    per_class = []
    for c in (0, 1, 2):  # one-vs-rest
        probs = [math.exp(flat[c][v]) / sum(math.exp(flat[k][v]) for k in range(3)) for v in range(8)]
        per_class.append(_naive_sums(probs, [1.0 if label == c else 0.0 for label in lab], modulation=modulation))
    fg = per_class[1:]
    loss = HybridLoss('softmax', bce_normalization=normalization, modulation=modulation)(logits, labels)
    assert loss.item() == pytest.approx(_fbce(fg, normalization) + sum(s[3] for s in fg) / 2, rel=1e-9)
    # a one-hot target gives the same
    onehot = F.one_hot(labels[:, 0], 3).permute(0, 3, 1, 2).double()
    assert HybridLoss('softmax', bce_normalization=normalization, modulation=modulation)(
        logits, onehot).item() == pytest.approx(loss.item(), rel=1e-12)
    # with the background kept: three classes
    loss_bg = HybridLoss('softmax', do_bg=True, bce_normalization=normalization, modulation=modulation)(
        logits, labels)
    assert loss_bg.item() == pytest.approx(_fbce(per_class, normalization) + sum(s[3] for s in per_class) / 3,
                                           rel=1e-9)


def test_without_modulation_it_is_balanced_bce_plus_dice():
    torch.manual_seed(0)
    x, y = torch.randn(2, 1, 5, 5, dtype=torch.float64), (torch.rand(2, 1, 5, 5) > 0.5).double()
    loss = HybridLoss('sigmoid', alpha=0.5, gamma=0.0, weight_dice=0.0)(x, y)
    torch.testing.assert_close(loss, 0.5 * F.binary_cross_entropy_with_logits(x, y))


def test_predictions_at_and_near_one_half_stay_finite():
    y = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 2, 2)
    for logit in (0.0, 1e-6, -1e-6, 1e-3):
        x = torch.full((1, 1, 2, 2), logit, requires_grad=True)
        loss = HybridLoss('sigmoid')(x, y)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # at exactly 0.5 the factor is the clamp's, margin^-gamma: the literal (voxel-mean) term carries it,
    # the weighted mean divides it out and is the alpha-balanced BCE
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    balanced = (0.75 * math.log(2) * 2 + 0.25 * math.log(2) * 2) / 4  # alpha 0.75
    bce = HybridLoss('sigmoid', weight_dice=0.0, bce_normalization='voxels')(x, y.double())
    assert bce.item() == pytest.approx(balanced / 0.05 ** 2, rel=1e-12)
    bce = HybridLoss('sigmoid', weight_dice=0.0)(x, y.double())
    assert bce.item() == pytest.approx(balanced, rel=1e-12)
    for detach in (True, False):  # finite either way
        for normalization in ('weights', 'voxels'):
            x = torch.zeros(1, 3, 2, 2, requires_grad=True)
            loss = HybridLoss('softmax', detach_modulation=detach, bce_normalization=normalization)(
                x, torch.tensor([[[0, 1], [2, 1]]]))
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # saturated softmax: log(1 - P) stays finite where P rounds to 1
    x = torch.tensor([[[[60.0]], [[0.0]], [[-60.0]]]], requires_grad=True)
    loss = HybridLoss('softmax')(x, torch.tensor([[[[2]]]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # everything masked: both terms 0, no NaN
    x = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = HybridLoss('softmax')(x, torch.zeros(1, 1, 2, 2), loss_mask=torch.zeros(1, 1, 2, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_gradient_points_the_right_way_only_with_a_detached_factor():
    # a positive voxel predicted 0.4 (|Y - 0.5| above the clamp): the loss must fall when its logit rises
    x = torch.tensor([math.log(0.4 / 0.6)], dtype=torch.float64).view(1, 1, 1, 1).requires_grad_()
    y = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    for modulation in ('hardness', 'literal'):
        x.grad = None
        HybridLoss('sigmoid', weight_dice=0.0, modulation=modulation)(x, y).backward()
        assert x.grad.item() < 0
    x.grad = None
    HybridLoss('sigmoid', weight_dice=0.0, detach_modulation=False, modulation='literal')(x, y).backward()
    assert x.grad.item() > 0  # Eq. 8 differentiated literally pushes the voxel away from 0.5, towards 0
    x.grad = None  # on the wrong side the 'hardness' weight is the constant margin^-gamma: no such pull
    HybridLoss('sigmoid', weight_dice=0.0, detach_modulation=False)(x, y).backward()
    assert x.grad.item() < 0


def _ball_labels(spatial, fraction, batch=2):
    """Label maps whose foreground is a centred disc/ball covering ``fraction`` of the patch."""
    labels = torch.zeros(batch, 1, *spatial, dtype=torch.long)
    if fraction >= 1:
        labels[:] = 1
    elif fraction > 0:
        grids = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in spatial], indexing='ij')
        r2 = sum(g ** 2 for g in grids)
        labels[:, 0] = (r2 <= torch.quantile(r2.flatten()[::97], fraction)).long()
    return labels


def _terms(x, labels, gradients=True, **kwargs):
    """(focal-BCE term, Dice term, norms of their gradients w.r.t. the logits), each term alone."""
    x = x.detach().requires_grad_(gradients)
    bce = HybridLoss(weight_dice=0.0, **kwargs)(x, labels)
    dice = HybridLoss(weight_bce=0.0, **{k: v for k, v in kwargs.items() if k != 'bce_normalization'})(x, labels)
    if not gradients:
        return bce.item(), dice.item(), None, None
    bce_grad, = torch.autograd.grad(bce, x)
    dice_grad, = torch.autograd.grad(dice, x)
    return bce.item(), dice.item(), bce_grad.norm().item(), dice_grad.norm().item()


@pytest.mark.parametrize('spatial', [(256, 256), (128, 128, 128)], ids=['2d_256', '3d_128'])
@pytest.mark.parametrize('fraction', [0.0, 0.01, 0.2, 1.0], ids=['empty', '1%', '20%', 'filled'])
def test_terms_are_balanced_at_initialisation(spatial, fraction):
    """Two-class softmax logits as a network starts (N(0, sigma^2), sigma 0.1 and 1), per-sample and batch
    Dice (2D: batch of 2; 3D: one sample): the focal-BCE term is within 10x of the Dice term (measured
    0.5-0.9x), and so is its gradient where the patch holds foreground (the Dice term has no gradient on an
    empty patch; measured 0.5-6x). Eq. 8's literal voxel mean is 46-330x the Dice term on the same patches."""
    batch = 2 if len(spatial) == 2 else 1
    labels = _ball_labels(spatial, fraction, batch)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(batch, 2, *spatial, generator=gen)
    for sigma in (0.1, 1.0):
        for batch_dice in ((False, True) if batch > 1 else (False,)):
            bce, dice, bce_grad, dice_grad = _terms(sigma * noise, labels, batch_dice=batch_dice)
            assert 0.1 <= bce / dice <= 10, (sigma, batch_dice, bce, dice)
            if fraction > 0:
                assert 0.1 <= bce_grad / dice_grad <= 10, (sigma, batch_dice, bce_grad, dice_grad)
        literal, dice, _, _ = _terms(sigma * noise, labels, gradients=False, bce_normalization='voxels')
        assert literal / dice > 40


def test_terms_are_balanced_on_an_initialised_anunet_and_for_more_classes():
    """The logits of an ANU-Net at nnU-Net's initialisation (2D 256^2 patch, every head), and three-class
    softmax / sigmoid region outputs: every weighted term within 10x of the Dice term."""
    from nnunet_ext.architectures.anunet import ANUNet
    from test_anunet_architecture import nnunet_kwargs
    torch.manual_seed(0)
    net = ANUNet(**{**nnunet_kwargs(2), 'input_channels': 1, 'num_classes': 2}, prune_level=3)
    net.apply(net.initialize)
    labels = torch.cat([_ball_labels((256, 256), 0.0, 1), _ball_labels((256, 256), 0.15, 1)])
    with torch.no_grad():
        heads = net(torch.randn(2, 1, 256, 256))
    for logits in heads:
        bce, dice, _, _ = _terms(logits, labels)
        assert 0.1 <= bce / dice <= 10
    gen = torch.Generator().manual_seed(1)
    labels3 = torch.randint(0, 3, (2, 1, 64, 64), generator=gen)
    bce, dice, _, _ = _terms(torch.randn(2, 3, 64, 64, generator=gen), labels3)
    assert 0.1 <= bce / dice <= 10
    regions = torch.cat([labels3 >= 1, labels3 == 2], 1).float()
    bce, dice, _, _ = _terms(torch.randn(2, 2, 64, 64, generator=gen), regions, apply_nonlin='sigmoid')
    assert 0.1 <= bce / dice <= 10


@pytest.mark.parametrize('modulation', ['hardness', 'literal'])
def test_weighted_mean_keeps_the_relative_weights(modulation):
    """'weights' and 'voxels' differ by one scalar per batch (the mean weight): the per-voxel gradients of the
    focal-BCE term are proportional, so the relative emphasis on hard voxels is the modulation's."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 1, 8, 8))
    grads = []
    for normalization in ('weights', 'voxels'):
        z = x.clone().requires_grad_(True)
        HybridLoss(weight_dice=0.0, bce_normalization=normalization, modulation=modulation)(z, labels).backward()
        grads.append(z.grad)
    p = torch.softmax(x, 1)[:, 1:].flatten().tolist()
    t = F.one_hot(labels[:, 0], 3).permute(0, 3, 1, 2)[:, 1:].flatten().tolist()
    mean_weight = sum(_weight(pv, tv, 2.0, 0.05, modulation) for pv, tv in zip(p, t)) / len(p)
    torch.testing.assert_close(grads[0] * mean_weight, grads[1])
