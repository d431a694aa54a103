"""Hybrid loss of ANU-Net (Eq. 8) against per-voxel loops written with ``math``, torch's BCE, and the
properties the module docstring claims (finite at 0.5, gradient direction, ignore mask, batch Dice)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_ext.losses import HybridLoss


def _naive_terms(probs, targets, alpha=0.25, gamma=2.0, margin=0.05, smooth=1.0):
    """(mean focal-BCE, 1 - Dice) of one channel, from lists of floats."""
    fbce = [-(alpha * t * math.log(p) + (1 - alpha) * (1 - t) * math.log(1 - p)) / max(abs(p - 0.5), margin) ** gamma
            for p, t in zip(probs, targets)]
    dice = (2 * sum(p * t for p, t in zip(probs, targets)) + smooth) / (
        sum(p * p for p in probs) + sum(t * t for t in targets) + smooth)
    return sum(fbce) / len(fbce), 1 - dice


def test_binary_case_by_hand():
    probs = [0.9, 0.2, 0.6, 0.05, 0.52, 0.3]
    targets = [1, 0, 1, 0, 1, 1]
    logits = torch.tensor([math.log(p / (1 - p)) for p in probs], dtype=torch.float64).view(1, 1, 2, 3)
    y = torch.tensor(targets, dtype=torch.float64).view(1, 1, 2, 3)
    fbce, dice_loss = _naive_terms(probs, targets)
    loss = HybridLoss('sigmoid')(logits, y)
    assert loss.item() == pytest.approx(fbce + dice_loss, rel=1e-9)
    # two samples: Dice per sample, averaged; BCE averaged over all voxels
    probs2, targets2 = [0.7, 0.1, 0.4, 0.8, 0.35, 0.6], [0, 0, 1, 1, 0, 1]
    logits2 = torch.tensor([math.log(p / (1 - p)) for p in probs2], dtype=torch.float64).view(1, 1, 2, 3)
    y2 = torch.tensor(targets2, dtype=torch.float64).view(1, 1, 2, 3)
    fbce2, dice_loss2 = _naive_terms(probs2, targets2)
    loss = HybridLoss('sigmoid', alpha=0.4, gamma=1.5, margin=0.1, smooth=0.5)(torch.cat([logits, logits2]),
                                                                                torch.cat([y, y2]))
    a = _naive_terms(probs, targets, 0.4, 1.5, 0.1, 0.5)
    b = _naive_terms(probs2, targets2, 0.4, 1.5, 0.1, 0.5)
    assert loss.item() == pytest.approx((a[0] + b[0]) / 2 + (a[1] + b[1]) / 2, rel=1e-9)
    # batch Dice: one Dice over both samples
    loss = HybridLoss('sigmoid', batch_dice=True)(torch.cat([logits, logits2]), torch.cat([y, y2]))
    fbce_all, dice_all = _naive_terms(probs + probs2, targets + targets2)
    assert loss.item() == pytest.approx(fbce_all + dice_all, rel=1e-9)


def test_multiclass_softmax_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 2, 4, dtype=torch.float64)
    labels = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1]]).view(1, 1, 2, 4)
    flat = logits[0].reshape(3, -1).tolist()
    lab = labels.flatten().tolist()
    fb, dl = [], []
    for c in (1, 2):  # foreground classes, one-vs-rest
        probs = [math.exp(flat[c][v]) / sum(math.exp(flat[k][v]) for k in range(3)) for v in range(8)]
        a, b = _naive_terms(probs, [1.0 if l == c else 0.0 for l in lab])
        fb.append(a), dl.append(b)
    loss = HybridLoss('softmax')(logits, labels)
    assert loss.item() == pytest.approx(sum(fb) / 2 + sum(dl) / 2, rel=1e-9)
    # a one-hot target gives the same
    onehot = F.one_hot(labels[:, 0], 3).permute(0, 3, 1, 2).double()
    assert HybridLoss('softmax')(logits, onehot).item() == pytest.approx(loss.item(), rel=1e-12)
    # with the background kept: three classes averaged
    probs0 = [math.exp(flat[0][v]) / sum(math.exp(flat[k][v]) for k in range(3)) for v in range(8)]
    a, b = _naive_terms(probs0, [1.0 if l == 0 else 0.0 for l in lab])
    loss_bg = HybridLoss('softmax', do_bg=True)(logits, labels)
    assert loss_bg.item() == pytest.approx((sum(fb) + a) / 3 + (sum(dl) + b) / 3, rel=1e-9)


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
    # at exactly 0.5 the factor is the clamp's: margin^-gamma
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    bce = HybridLoss('sigmoid', weight_dice=0.0)(x, y.double())
    expected = (0.25 * math.log(2) * 2 + 0.75 * math.log(2) * 2) / 4 / 0.05 ** 2
    assert bce.item() == pytest.approx(expected, rel=1e-12)
    for detach in (True, False):  # finite either way
        x = torch.zeros(1, 3, 2, 2, requires_grad=True)
        loss = HybridLoss('softmax', detach_modulation=detach)(x, torch.tensor([[[0, 1], [2, 1]]]))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # saturated softmax: log(1 - P) stays finite where P rounds to 1
    x = torch.tensor([[[[60.0]], [[0.0]], [[-60.0]]]], requires_grad=True)
    loss = HybridLoss('softmax')(x, torch.tensor([[[[2]]]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_gradient_points_the_right_way_only_with_a_detached_factor():
    # a positive voxel predicted 0.4 (|Y - 0.5| above the clamp): the loss must fall when its logit rises
    x = torch.tensor([math.log(0.4 / 0.6)], dtype=torch.float64).view(1, 1, 1, 1).requires_grad_()
    y = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    HybridLoss('sigmoid', weight_dice=0.0)(x, y).backward()
    assert x.grad.item() < 0
    x.grad = None
    HybridLoss('sigmoid', weight_dice=0.0, detach_modulation=False)(x, y).backward()
    assert x.grad.item() > 0  # Eq. 8 differentiated literally pushes the voxel away from 0.5, towards 0


def test_ignore_mask_equals_dropping_the_voxels():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 1, 10, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 1, 1, 10))
    keep = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    mask = keep.view(1, 1, 1, 10).expand(2, 1, 1, 10).double()
    labels_ignored = labels.clone()
    labels_ignored[:, :, :, ~keep] = 3  # nnU-Net's ignore label: outside the classes, masked
    loss = HybridLoss('softmax', batch_dice=False)
    masked = loss(x, labels_ignored, loss_mask=mask)
    dropped = loss(x[..., keep], labels[..., keep])
    torch.testing.assert_close(masked, dropped)
    x.requires_grad_()
    loss(x, labels_ignored, loss_mask=mask).backward()
    assert (x.grad[..., ~keep] == 0).all() and (x.grad[..., keep] != 0).any()


def test_errors_say_what_is_wrong():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match='does not match'):
        HybridLoss()(x, torch.zeros(1, 1, 3, 4))
    with pytest.raises(ValueError, match='3 classes'):
        HybridLoss()(x, torch.full((1, 1, 4, 4), 3))
    with pytest.raises(ValueError, match='sigmoid'):
        HybridLoss('softmax')(torch.randn(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match='loss_mask'):
        HybridLoss()(x, torch.zeros(1, 1, 4, 4), loss_mask=torch.ones(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r'\{0, 1\}'):
        HybridLoss('sigmoid')(torch.randn(1, 1, 4, 4), torch.full((1, 1, 4, 4), 2))
    for kwargs in ({'margin': 0.0}, {'alpha': 1.5}, {'gamma': -1.0}, {'apply_nonlin': 'relu'}, {'smooth': -1.0}):
        with pytest.raises(ValueError):
            HybridLoss(**kwargs)
