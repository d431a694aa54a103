"""Unit tests of ``GODCLoss`` (gradient-optimized Dice, Eq. 8 of
``docs/methods/godc-lfam.md``) against independent oracles.

    L = mean_{b,c} (1 - DC_bc) * w_bc,   w_bc = stopgrad(U_bc / mean_b' U_b'c) ** p,
    DC_bc = (2 I_bc + s) / (sum P_bc + sum G_bc + s),   U_bc = sum (P + G - P G).

The oracle below never touches torch: it loops in plain Python floats over samples, channels and
voxels (numpy arrays are only containers), and returns the value together with the *analytic*
gradient w.r.t. the probabilities, the weights being constants where the class is present:

    dL/dP_bcv = -w_bc / n_terms * (2 G_bcv / den_bc - num_bc / den_bc ** 2)

and, where class c is absent from sample b (sum G_bc = 0; ``empty_gradient``), the weight's own
derivative on top: ``+ (1 - DC_bc) / n_terms * p (U_bc / mean U)^(p - 1) / mean U``.

Gradients w.r.t. logits go through hand-written softmax / sigmoid Jacobians. Closed forms
(P = 0.6 G gives U = |G| and DC = 3/4) pin down the paper's key property: the gradient of GODC
per object pixel does not depend on the object's size, while that of the soft Dice loss scales
with 1 / size.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

from nnunet_ext.losses.godc import GODCLoss

SMOOTH = 1e-5


# ----------------------------------------------------------------------------------------------
# independent oracles (no torch)
# ----------------------------------------------------------------------------------------------
def naive_sums(P, G, M, chans):
    """Per (b, c): intersection, sum P, sum G, soft union, by a plain loop over the voxels.
    P, G: (B, C, N) float64 arrays, M: (B, N) mask (1 = counts)."""
    B, _, N = P.shape
    out = {}
    for b in range(B):
        for c in chans:
            i = sp = sg = u = 0.0
            for v in range(N):
                if M[b, v] == 0:
                    continue
                p, g = float(P[b, c, v]), float(G[b, c, v])
                i += p * g
                sp += p
                sg += g
                u += p + g - p * g
            out[b, c] = (i, sp, sg, u)
    return out


def naive_weights(sums, B, chans, exponent):
    """w_bc = (U_bc / mean_b U_bc) ** p as Python floats (i.e. constants: no gradient);
    a class whose union is 0 in every sample gets weight 0."""
    w = {}
    for c in chans:
        mean_u = sum(sums[b, c][3] for b in range(B)) / B
        for b in range(B):
            w[b, c] = 0.0 if mean_u == 0 else (sums[b, c][3] / mean_u) ** exponent
    return w


def oracle(P, G, mask=None, do_bg=True, smooth=SMOOTH, exponent=1.0, weighted=True, details=False,
           empty_gradient=True):
    """GODC (``weighted=True``) or per-sample soft Dice loss mean_{b,c} (1 - DC_bc)
    (``weighted=False``). P, G: (B, C, *spatial) arrays of probabilities and one-hot targets;
    mask: (B, 1, *spatial) or None. ``empty_gradient``: the weight of a (sample, class) without
    foreground is differentiated (dU/dP_v = 1 there). Returns (loss, dL/dP of P's shape[, per-term
    details])."""
    P = np.asarray(P, dtype=np.float64)
    G = np.asarray(G, dtype=np.float64)
    B, C = P.shape[:2]
    Pf, Gf = P.reshape(B, C, -1), G.reshape(B, C, -1)
    N = Pf.shape[2]
    M = np.ones((B, N)) if mask is None else np.asarray(mask, dtype=np.float64).reshape(B, N)
    chans = list(range(C)) if do_bg else list(range(1, C))
    sums = naive_sums(Pf, Gf, M, chans)
    w = naive_weights(sums, B, chans, exponent) if weighted else {k: 1.0 for k in sums}
    n_terms = B * len(chans)
    loss = 0.0
    grad = np.zeros_like(Pf)
    dcs = {}
    for (b, c), (i, sp, sg, u) in sums.items():
        num, den = 2 * i + smooth, sp + sg + smooth
        dc = num / den
        dcs[b, c] = dc
        loss += (1 - dc) * w[b, c] / n_terms
        mean_u = sum(sums[k, c][3] for k in range(B)) / B
        dw = 0.0
        if weighted and empty_gradient and sg == 0 and u > 0 and mean_u > 1e-8:
            dw = exponent * (u / mean_u) ** (exponent - 1) / mean_u if exponent != 1 else 1 / mean_u
        for v in range(N):
            if M[b, v]:
                grad[b, c, v] = -w[b, c] / n_terms * (2 * Gf[b, c, v] / den - num / den ** 2) + (1 - dc) * dw / n_terms
    grad = grad.reshape(P.shape)
    if details:
        return loss, grad, {'sums': sums, 'w': w, 'dc': dcs}
    return loss, grad


def np_softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def np_sigmoid(z):
    return 1 / (1 + np.exp(-z))


def softmax_backward(p, g):
    """dL/dz from dL/dp for p = softmax(z) over axis 1: p_k (g_k - sum_j g_j p_j)."""
    return p * (g - (g * p).sum(1, keepdims=True))


def sigmoid_backward(p, g):
    return g * p * (1 - p)


def np_one_hot(labels, C):
    """(B, *spatial) integer labels -> (B, C, *spatial) one-hot, via an identity matrix."""
    return np.moveaxis(np.eye(C)[labels], -1, 1)


def softmax(t):
    return torch.softmax(t, 1)


def run(loss_fn, x, y, mask=None):
    """Value and gradient of ``loss_fn`` w.r.t. x (float64)."""
    x = x.detach().clone().requires_grad_(True)
    loss = loss_fn(x, y, loss_mask=mask)
    loss.backward()
    return loss.item(), x.grad.detach().numpy()


def rng(seed):
    return np.random.default_rng(seed)


def t64(a):
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def close(a, b, rtol=1e-9, atol=1e-12):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# sanity of the oracle itself (hand-computed numbers)
# ----------------------------------------------------------------------------------------------
def test_oracle_hand_computed():
    # one sample, 4 pixels: P = [1, .5, 0, .25], G = [1, 1, 0, 0]
    P = np.array([[[1, .5, 0, .25]]])
    G = np.array([[[1., 1, 0, 0]]])
    loss, grad = oracle(P, G, smooth=0.0)
    # I = 1.5, sum P = 1.75, sum G = 2 -> DC = 3 / 3.75 = 0.8
    assert loss == pytest.approx(0.2, abs=1e-15)
    # dL/dP_v = -(2 G_v / 3.75 - 3 / 3.75^2)
    expected = -(2 * G[0, 0] / 3.75 - 3 / 3.75 ** 2)
    close(grad[0, 0], expected)


# ----------------------------------------------------------------------------------------------
# 1. one sample: GODC == soft Dice loss
# ----------------------------------------------------------------------------------------------
def test_single_sample_equals_soft_dice_probabilities():
    r = rng(1)
    P = r.uniform(0, 1, (1, 2, 7, 9))
    labels = r.integers(0, 2, (1, 7, 9))
    G = np_one_hot(labels, 2)
    exp_loss, exp_grad = oracle(P, G, weighted=False)
    assert exp_loss > 0.1  # not trivially 0
    for y in (torch.as_tensor(labels)[:, None], torch.as_tensor(labels), t64(G)):  # (B,1,..), (B,..), one-hot
        loss, grad = run(GODCLoss(apply_nonlin=None, do_bg=True, smooth=SMOOTH, ddp=False), t64(P), y)
        close(loss, exp_loss)
        close(grad, exp_grad)


def test_single_sample_softmax_equals_mean_foreground_dice():
    r = rng(2)
    Z = r.normal(0, 2, (1, 3, 8, 6))
    labels = r.integers(0, 3, (1, 1, 8, 6))
    P = np_softmax(Z)
    G = np_one_hot(labels[:, 0], 3)
    # oracle: mean over the foreground classes of 1 - dice, gradient through the softmax
    dices = []
    for c in (1, 2):
        i = sum(float(P[0, c].flat[v] * G[0, c].flat[v]) for v in range(48))
        s = sum(float(P[0, c].flat[v] + G[0, c].flat[v]) for v in range(48))
        dices.append((2 * i + SMOOTH) / (s + SMOOTH))
    exp_loss = sum(1 - d for d in dices) / 2
    _, dldp = oracle(P, G, do_bg=False, weighted=False)
    exp_grad = softmax_backward(P, dldp)
    assert np.abs(exp_grad[:, 0]).max() > 1e-4  # background logits get gradient through the softmax
    loss, grad = run(GODCLoss(apply_nonlin=softmax, do_bg=False, smooth=SMOOTH), t64(Z), torch.as_tensor(labels))
    close(loss, exp_loss)
    close(grad, exp_grad)


# ----------------------------------------------------------------------------------------------
# 2. equal unions: GODC == mean Dice loss
# ----------------------------------------------------------------------------------------------
def test_equal_unions_equal_mean_dice():
    """Predictions inside the object give U = |G|. Samples 0, 1: objects of 12 pixels (different
    shapes), random in-object predictions; sample 2: 10-pixel object plus 4 false-positive pixels
    of 0.5 -> U = 10 + 2 = 12 as well. The Dice values differ, the unions do not."""
    r = rng(3)
    H = W = 8
    G = np.zeros((3, 1, H, W))
    G[0, 0, 1:4, 1:5] = 1  # 3 x 4
    G[1, 0, 2:8, 5:7] = 1  # 6 x 2
    G[2, 0, 0:2, 0:5] = 1  # 2 x 5 = 10
    P = G * r.uniform(0.05, 0.95, G.shape)
    P[2, 0, 6, 0:4] = 0.5  # false positives outside the object
    _, _, det = oracle(P, G, details=True)
    unions = [det['sums'][b, 0][3] for b in range(3)]
    close(unions, [12.0] * 3, rtol=1e-14)
    dcs = [det['dc'][b, 0] for b in range(3)]
    assert max(dcs) - min(dcs) > 0.05  # the samples are genuinely different
    exp_loss, exp_grad = oracle(P, G, weighted=False)  # plain mean over samples of 1 - DC_b
    close(exp_loss, np.mean([1 - d for d in dcs]))
    loss, grad = run(GODCLoss(smooth=SMOOTH), t64(P), t64(G))
    close(loss, exp_loss)
    close(grad, exp_grad)


# ----------------------------------------------------------------------------------------------
# 3. the key property: gradient per object pixel independent of object size
# ----------------------------------------------------------------------------------------------
def _two_objects():
    G = np.zeros((2, 1, 64, 64))
    G[0, 0, 10:14, 10:14] = 1  # 16 pixels
    G[1, 0, 12:52, 12:52] = 1  # 1600 pixels
    return 0.6 * G, G


def _fg_mean_abs(grad, G):
    return [np.abs(grad[b][G[b] == 1]).mean() for b in range(grad.shape[0])]


def test_gradient_scale_invariance_small_vs_large_object():
    P, G = _two_objects()
    areas = np.array([16.0, 1600.0])
    mean_area = areas.mean()  # 808
    # closed form, checked on the oracle's own sums: U = A, DC = 3/4 for both samples
    _, _, det = oracle(P, G, details=True)
    for b in range(2):
        assert det['sums'][b, 0][3] == pytest.approx(areas[b], rel=1e-12)
        assert det['dc'][b, 0] == pytest.approx(0.75, rel=1e-6)

    loss, grad = run(GODCLoss(apply_nonlin=None, do_bg=True, smooth=SMOOTH, ddp=False), t64(P), t64(G))
    # L = mean_b (1 - 3/4) * A_b / mean A = 1/4
    assert loss == pytest.approx(0.25, rel=1e-6)
    exp_loss, exp_grad = oracle(P, G)
    close(loss, exp_loss)
    close(grad, exp_grad)
    # per object pixel: dL/dP = -(1/2) (A/808) (2 - 3/4) / (1.6 A) = -(1/2) (1.25 / 1.6) / 808 for both samples
    closed = -0.5 * (1.25 / 1.6) / mean_area
    for b in range(2):
        np.testing.assert_allclose(grad[b][G[b] == 1], closed, rtol=1e-5)
    godc_small, godc_large = _fg_mean_abs(grad, G)
    assert godc_small / godc_large == pytest.approx(1.0, rel=0.01)

    # the soft Dice loss (oracle): the small object gets ~100x the gradient of the large one
    _, dice_grad = oracle(P, G, weighted=False)
    dice_small, dice_large = _fg_mean_abs(dice_grad, G)
    assert dice_small / dice_large == pytest.approx(100.0, rel=0.05)


def test_exponent_two_gradient_grows_with_object_size():
    P, G = _two_objects()
    areas = np.array([16.0, 1600.0])
    w = areas / areas.mean()
    loss, grad = run(GODCLoss(smooth=SMOOTH, exponent=2.0, ddp=False), t64(P), t64(G))
    assert loss == pytest.approx(0.25 * np.mean(w ** 2), rel=1e-6)
    exp_loss, exp_grad = oracle(P, G, exponent=2.0)
    close(loss, exp_loss)
    close(grad, exp_grad)
    small, large = _fg_mean_abs(grad, G)
    assert large / small == pytest.approx(100.0, rel=0.01)  # now in favour of the large object


def test_exponent_zero_is_soft_dice():
    P, G = _two_objects()
    loss, grad = run(GODCLoss(smooth=SMOOTH, exponent=0.0), t64(P), t64(G))
    exp_loss, exp_grad = oracle(P, G, weighted=False)
    close(loss, exp_loss)
    close(grad, exp_grad)


# ----------------------------------------------------------------------------------------------
# 4. multi-class softmax, 7. 3D
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('exponent', [1.0, 2.0, 0.5])
def test_multiclass_softmax_2d(exponent):
    r = rng(4)
    B, C = 3, 3
    Z = r.normal(0, 1.5, (B, C, 6, 7))
    labels = np.zeros((B, 6, 7), dtype=np.int64)
    labels[0, 1:3, 1:3] = 1
    labels[0, 4:6, :] = 2
    labels[1, :, 2:6] = 1  # large class 1, small class 2
    labels[1, 0, 0] = 2
    labels[2] = r.integers(0, 3, (6, 7))
    P = np_softmax(Z)
    G = np_one_hot(labels, C)
    exp_loss, dldp, det = oracle(P, G, do_bg=False, exponent=exponent, details=True)
    ws = np.array([[det['w'][b, c] for c in (1, 2)] for b in range(B)])
    assert ws.std() > 0.1  # unequal weights, so this is not the plain Dice
    exp_grad = softmax_backward(P, dldp)
    loss, grad = run(GODCLoss(apply_nonlin=softmax, do_bg=False, smooth=SMOOTH, exponent=exponent),
                     t64(Z), torch.as_tensor(labels)[:, None])
    close(loss, exp_loss)
    close(grad, exp_grad)
    # and it differs from the plain Dice loss
    dice_loss, _ = oracle(P, G, do_bg=False, weighted=False)
    assert abs(loss - dice_loss) > 1e-3


def test_3d_input():
    r = rng(7)
    B, C = 2, 3
    Z = r.normal(0, 1.0, (B, C, 4, 5, 6))
    labels = np.zeros((B, 4, 5, 6), dtype=np.int64)
    labels[0, 1:3, 1:4, 1:5] = 1
    labels[0, 0, 0, 0] = 2
    labels[1, :, :, :4] = 2
    labels[1, 3, 4, 5] = 1
    P = np_softmax(Z)
    G = np_one_hot(labels, C)
    exp_loss, dldp = oracle(P, G, do_bg=False)
    loss, grad = run(GODCLoss(apply_nonlin=softmax, do_bg=False, smooth=SMOOTH), t64(Z), torch.as_tensor(labels))
    close(loss, exp_loss)
    close(grad, softmax_backward(P, dldp))


# ----------------------------------------------------------------------------------------------
# 5. loss mask (ignore label)
# ----------------------------------------------------------------------------------------------
def test_loss_mask():
    r = rng(5)
    B, C, H, W = 2, 3, 6, 8
    Z = r.normal(0, 1.5, (B, C, H, W))
    labels = r.integers(0, C, (B, 1, H, W))
    mask = (r.uniform(0, 1, (B, 1, H, W)) > 0.3).astype(np.float64)
    mask[0, 0, 0, :] = 0
    P = np_softmax(Z)
    G = np_one_hot(labels[:, 0], C)
    exp_loss, dldp = oracle(P, G, mask=mask, do_bg=False)
    exp_grad = softmax_backward(P, dldp)
    fn = GODCLoss(apply_nonlin=softmax, do_bg=False, smooth=SMOOTH)
    loss, grad = run(fn, t64(Z), torch.as_tensor(labels), mask=t64(mask))
    close(loss, exp_loss)
    close(grad, exp_grad)
    off = np.broadcast_to(mask == 0, grad.shape)
    assert (grad[off] == 0).all()
    # masking matters: without the mask the value differs
    assert abs(fn(t64(Z), torch.as_tensor(labels)).item() - loss) > 1e-3

    # changing logits and labels where the mask is 0 changes nothing
    Z2, labels2 = Z.copy(), labels.copy()
    Z2[off] = r.normal(0, 5, off.sum())
    labels2[mask == 0] = (labels2[mask == 0] + 1) % C
    loss2, grad2 = run(fn, t64(Z2), torch.as_tensor(labels2), mask=t64(mask))
    close(loss2, loss)
    close(grad2[~off], grad[~off])
    assert (grad2[off] == 0).all()
    # boolean mask behaves the same
    loss3, _ = run(fn, t64(Z), torch.as_tensor(labels), mask=torch.as_tensor(mask > 0))
    close(loss3, loss)


def test_loss_mask_probabilities_do_bg():
    r = rng(6)
    P = r.uniform(0, 1, (3, 2, 5, 5))
    G = np_one_hot(r.integers(0, 2, (3, 5, 5)), 2)
    mask = (r.uniform(0, 1, (3, 1, 5, 5)) > 0.5).astype(np.float64)
    exp_loss, exp_grad = oracle(P, G, mask=mask)
    loss, grad = run(GODCLoss(smooth=SMOOTH), t64(P), t64(G), mask=t64(mask))
    close(loss, exp_loss)
    close(grad, exp_grad)


# ----------------------------------------------------------------------------------------------
# 6. empty ground truth
# ----------------------------------------------------------------------------------------------
def test_empty_gt_zero_prediction_term_is_zero():
    G = np.zeros((2, 1, 6, 6))
    G[1, 0, 1:4, 1:4] = 1
    P = np.zeros_like(G)
    P[1] = 0.5 * G[1]
    P[1, 0, 5, 5] = 0.25
    loss, grad = run(GODCLoss(smooth=SMOOTH), t64(P), t64(G))
    # sample 0: U = 0 -> w = 0 and DC = s / s = 1: term 0. sample 1: U = 9 + .25, w = U / (U / 2) = 2,
    # DC = (2 * 4.5 + s) / (4.75 + 9 + s); L = (0 + 2 (1 - DC)) / 2
    dc1 = (9 + SMOOTH) / (13.75 + SMOOTH)
    assert loss == pytest.approx(1 - dc1, rel=1e-12)
    exp_loss, exp_grad = oracle(P, G)
    close(loss, exp_loss)
    close(grad, exp_grad)
    assert np.isfinite(grad).all()
    assert (grad[0] == 0).all()  # w = 0 for the empty sample: no gradient (plain Dice would give -1/s)


def test_empty_gt_nonzero_prediction_costs_its_weight():
    G = np.zeros((2, 1, 6, 6))
    G[1, 0, 0:3, 0:3] = 1  # 9 pixels, predicted perfectly -> DC = 1
    P = G.copy()
    P[0, 0, 0, 0:5] = 0.3  # empty GT, predicted mass 1.5
    P[0, 0, 3, 0:5] = 0.3  # ... 3 in total
    loss, grad = run(GODCLoss(smooth=SMOOTH), t64(P), t64(G))
    # U_0 = 3, U_1 = 9, mean 6 -> w_0 = 0.5; DC_0 = s / (3 + s) ~ 0 -> L = (w_0 (1 - DC_0) + 0) / 2 ~ 0.25
    assert loss == pytest.approx(0.5 * (1 - SMOOTH / (3 + SMOOTH)) / 2, rel=1e-12)
    assert loss == pytest.approx(0.25, rel=1e-5)
    exp_loss, exp_grad = oracle(P, G)
    close(loss, exp_loss)
    close(grad, exp_grad)
    assert np.isfinite(grad).all()


@pytest.mark.parametrize('smooth', [SMOOTH, 0.0])
def test_class_empty_everywhere_gets_weight_zero(smooth):
    r = rng(8)
    G = np.zeros((2, 2, 5, 5))
    G[:, 0] = (r.uniform(0, 1, (2, 5, 5)) > 0.5)
    P = np.zeros_like(G)
    P[:, 0] = r.uniform(0.1, 0.9, (2, 5, 5))  # channel 1: empty GT, zero prediction in every sample
    x = t64(P).requires_grad_(True)
    loss = GODCLoss(smooth=smooth)(x, t64(G))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all()
    # channel 1 contributes 0 to the value and, with w = 0, nothing to the gradient
    # (with w = 1 its gradient would be -dDC/dP = 1/s = 1e5 per voxel, divided by B*C)
    assert (x.grad[:, 1] == 0).all()
    if smooth > 0:
        exp_loss, exp_grad = oracle(P, G, smooth=smooth)
        close(loss.item(), exp_loss)
        close(x.grad.numpy(), exp_grad)
    # the value is the channel-0 GODC, averaged over the 2 * 2 terms
    ch0, _ = oracle(P[:, :1], G[:, :1], smooth=smooth)
    close(loss.item(), ch0 / 2)


def test_tiny_unions_are_normalised_not_clamped():
    """Empty GT in both samples, faint false positives: U = 0.004 and 0.012, mean 0.008, so
    w = 0.5 and 1.5 (the normalisation must not be swamped by its lower bound)."""
    G = np.zeros((2, 1, 4, 4))
    P = np.zeros_like(G)
    P[0, 0, 0, :] = 1e-3
    P[1, 0, 1:4, :] = 1e-3
    loss, grad = run(GODCLoss(smooth=SMOOTH), t64(P), t64(G))
    expected = (0.5 * (1 - SMOOTH / (0.004 + SMOOTH)) + 1.5 * (1 - SMOOTH / (0.012 + SMOOTH))) / 2
    assert loss == pytest.approx(expected, rel=1e-9)
    exp_loss, exp_grad = oracle(P, G)
    close(loss, exp_loss)
    close(grad, exp_grad)


def test_empty_gt_softmax_finite():
    """All-background labels through a softmax: finite value and gradients."""
    r = rng(9)
    Z = t64(r.normal(0, 1, (2, 3, 4, 4))).requires_grad_(True)
    labels = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    labels[1, 0, :2, :2] = 1
    loss = GODCLoss(apply_nonlin=softmax, do_bg=False)(Z, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(Z.grad).all()
    P = np_softmax(Z.detach().numpy())
    exp_loss, dldp = oracle(P, np_one_hot(labels[:, 0].numpy(), 3), do_bg=False)
    close(loss.item(), exp_loss)
    close(Z.grad.numpy(), softmax_backward(P, dldp))


# ----------------------------------------------------------------------------------------------
# 8. sigmoid / regions
# ----------------------------------------------------------------------------------------------
def test_sigmoid_regions():
    r = rng(10)
    B, H, W = 2, 6, 6
    labels = np.zeros((B, H, W), dtype=np.int64)
    labels[0, 1:5, 1:5] = 1
    labels[0, 2:4, 2:4] = 2
    labels[1, :, :3] = 1
    labels[1, 0, 0] = 2
    # regions (overlapping): 0 = {1, 2}, 1 = {2}
    G = np.stack([(labels >= 1), (labels == 2)], 1).astype(np.float64)
    Z = r.normal(0, 1.5, (B, 2, H, W))
    P = np_sigmoid(Z)
    exp_loss, dldp = oracle(P, G, do_bg=True)
    loss, grad = run(GODCLoss(apply_nonlin=torch.sigmoid, do_bg=True, smooth=SMOOTH), t64(Z), t64(G))
    close(loss, exp_loss)
    close(grad, sigmoid_backward(P, dldp))


# ----------------------------------------------------------------------------------------------
# 9. the weights carry no gradient
# ----------------------------------------------------------------------------------------------
def _case_weights():
    r = rng(11)
    G = np.zeros((2, 1, 5, 5))
    G[0, 0, 1:3, 1:3] = 1
    G[1, 0, 0:4, 0:5] = 1
    P = r.uniform(0.05, 0.95, G.shape)  # mass outside the objects: dU/dP = 1 - G != 0 there
    return P, G


def _fixed_weight_loss(P, G, w):
    """mean_b (1 - DC_b) * w_b with the weights w given as constants (single channel)."""
    total = 0.0
    for b in range(P.shape[0]):
        p, g = P[b].ravel(), G[b].ravel()
        dc = (2 * float(np.dot(p, g)) + SMOOTH) / (float(p.sum() + g.sum()) + SMOOTH)
        total += (1 - dc) * w[b]
    return total / P.shape[0]


def test_weights_carry_no_gradient():
    P, G = _case_weights()
    fn = GODCLoss(smooth=SMOOTH)
    loss, grad = run(fn, t64(P), t64(G))
    exp_loss, exp_grad, det = oracle(P, G, details=True)
    close(loss, exp_loss)
    close(grad, exp_grad)  # the oracle's gradient treats w as a constant

    # finite differences of the loss with w frozen agree with autograd
    w = [det['w'][b, 0] for b in range(2)]
    h = 1e-6
    for idx in [(0, 0, 0, 0), (0, 0, 1, 1), (1, 0, 4, 4), (1, 0, 2, 3)]:
        Pp, Pm = P.copy(), P.copy()
        Pp[idx] += h
        Pm[idx] -= h
        fd = (_fixed_weight_loss(Pp, G, w) - _fixed_weight_loss(Pm, G, w)) / (2 * h)
        assert grad[idx] == pytest.approx(fd, rel=1e-6, abs=1e-10)

    # ... whereas finite differences of the loss itself (w moving with P) do not, outside the objects
    idx = (0, 0, 0, 0)  # background pixel of the small object's sample
    Pp, Pm = P.copy(), P.copy()
    Pp[idx] += h
    Pm[idx] -= h
    fd_full = (fn(t64(Pp), t64(G)).item() - fn(t64(Pm), t64(G)).item()) / (2 * h)
    assert abs(fd_full - grad[idx]) > 1e-3

    # and differentiating through the weights (torch, written here without stop-gradient) gives another gradient
    x = t64(P).requires_grad_(True)
    y = t64(G)
    inter = (x * y).sum((2, 3))
    sp, sg = x.sum((2, 3)), y.sum((2, 3))
    union = sp + sg - inter
    w_diff = union / union.mean(0)
    ((1 - (2 * inter + SMOOTH) / (sp + sg + SMOOTH)) * w_diff).mean().backward()
    diff_grad = x.grad.numpy()
    assert np.abs(diff_grad - grad).max() > 1e-3
    assert fd_full == pytest.approx(diff_grad[idx], rel=1e-5)  # consistency of that alternative


# ----------------------------------------------------------------------------------------------
# 10. bad input
# ----------------------------------------------------------------------------------------------
def test_bad_input():
    fn = GODCLoss()
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match='does not match prediction'):
        fn(x, torch.zeros(2, 1, 8, 7, dtype=torch.long))  # spatial mismatch
    with pytest.raises(ValueError, match='does not match prediction'):
        fn(x, torch.zeros(3, 1, 8, 8, dtype=torch.long))  # batch mismatch
    with pytest.raises(ValueError, match='does not match prediction'):
        fn(x, torch.zeros(2, 2, 8, 8))  # one-hot with the wrong number of channels
    with pytest.raises(ValueError, match='loss_mask'):
        fn(x, torch.zeros(2, 1, 8, 8, dtype=torch.long), loss_mask=torch.ones(2, 8, 8))
    with pytest.raises(ValueError, match='exponent'):
        GODCLoss(exponent=-1.0)
    with pytest.raises(ValueError, match='smooth'):
        GODCLoss(smooth=-1.0)
    with pytest.raises(ValueError):
        fn(torch.rand(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match='exponent'):
        GODCLoss(exponent=float('nan'))
    with pytest.raises(ValueError, match='leaves no class'):
        GODCLoss(do_bg=False)(torch.rand(2, 1, 4, 4), torch.ones(2, 1, 4, 4))


def test_float64_soft_targets_keep_their_precision():
    x = torch.full((1, 1, 4, 4), 0.5, dtype=torch.float64)
    y = torch.full((1, 1, 4, 4), 0.1, dtype=torch.float64)
    expected = 1 - (2 * 0.05 * 16 + 1e-5) / (0.5 * 16 + 0.1 * 16 + 1e-5)  # B=1: weight 1
    assert GODCLoss()(x, y).item() == pytest.approx(expected, rel=1e-14)


def test_float32_input_stays_float32_and_matches_oracle():
    r = rng(12)
    P = r.uniform(0, 1, (2, 2, 6, 6)).astype(np.float32)
    G = np_one_hot(r.integers(0, 2, (2, 6, 6)), 2)
    x = torch.as_tensor(P).requires_grad_(True)
    loss = GODCLoss()(x, torch.as_tensor(G, dtype=torch.float32))
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.float32
    exp_loss, exp_grad = oracle(P.astype(np.float64), G)
    close(loss.item(), exp_loss, rtol=1e-5, atol=1e-6)
    close(x.grad.numpy(), exp_grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# nnU-Net's compound loss with GODC as its Dice class
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('ignore_label', [None, 3])
def test_nnunet_dc_and_ce_single_sample(ignore_label):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    r = rng(13)
    Z = r.normal(0, 1.5, (1, 3, 10, 12))
    labels = r.integers(0, 3 if ignore_label is None else 4, (1, 1, 10, 12))
    target = torch.as_tensor(labels, dtype=torch.float64)  # nnU-Net hands float label maps to the loss
    ours = DC_and_CE_loss({'do_bg': False, 'smooth': 1e-5, 'ddp': False}, {}, weight_ce=1, weight_dice=1,
                          ignore_label=ignore_label, dice_class=GODCLoss)
    ref = DC_and_CE_loss({'batch_dice': False, 'do_bg': False, 'smooth': 1e-5, 'ddp': False}, {}, weight_ce=1,
                         weight_dice=1, ignore_label=ignore_label, dice_class=MemoryEfficientSoftDiceLoss)
    assert isinstance(ours.dc, GODCLoss)
    x1 = t64(Z).requires_grad_(True)
    x2 = t64(Z).requires_grad_(True)
    l1, l2 = ours(x1, target), ref(x2, target)
    l1.backward()
    l2.backward()
    # nnU-Net's Dice term is -DC, ours 1 - DC (nnU-Net sums in float32: float32 tolerances)
    assert (l1 - l2).item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-7)
    assert x1.grad.abs().max() > 1e-4
    # and the Dice term itself against the oracle (softmax, foreground classes, masked ignore label)
    P = np_softmax(Z)
    valid = labels != ignore_label if ignore_label is not None else np.ones_like(labels, dtype=bool)
    G = np_one_hot(np.where(valid, labels, 0)[:, 0], 3)
    exp_dc, _ = oracle(P, G, mask=valid.astype(np.float64), do_bg=False)
    got_dc = ours.dc(t64(Z), torch.where(torch.as_tensor(valid), target, 0),
                     loss_mask=torch.as_tensor(valid) if ignore_label is not None else None)
    close(got_dc.item(), exp_dc)


# ----------------------------------------------------------------------------------------------
# 11. samples without foreground (background-only patches, GODC alone)
# ----------------------------------------------------------------------------------------------
def _fg_and_empty_batch(spatial, fraction, seed=0):
    """Two-class softmax logits at initialisation (N(0, 1)); sample 0 holds an object covering
    ``fraction`` of the patch, sample 1 is background only."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.zeros(2, 1, *spatial, dtype=torch.long)
    labels[0].view(-1)[:max(1, int(fraction * labels[0].numel()))] = 1
    return torch.randn(2, 2, *spatial, generator=gen, dtype=torch.float64), labels


@pytest.mark.parametrize('spatial, fraction', [((256, 256), 0.01), ((256, 256), 0.2), ((48, 48, 48), 0.05)])
def test_background_only_sample_gets_a_gradient(spatial, fraction):
    """The issue's measurement: gradient norm (w.r.t. the logits) of the background-only sample against the
    sample with foreground. Detached weights (the literal stop-gradient of every weight): ~1e-8 and below,
    false positives there are not pushed down; with ``empty_gradient`` the same order as the foreground
    sample's (measured 1.4-5)."""
    x, labels = _fg_and_empty_batch(spatial, fraction)
    ratios = {}
    for empty_gradient in (False, True):
        z = x.clone().requires_grad_(True)
        GODCLoss(apply_nonlin=softmax, do_bg=False, empty_gradient=empty_gradient)(z, labels).backward()
        ratios[empty_gradient] = (z.grad[1].norm() / z.grad[0].norm()).item()
    assert ratios[False] < 1e-6
    assert 1e-3 <= ratios[True] < 100


def test_false_positive_on_a_background_only_sample_is_pushed_down():
    """Later in training: sample 0's object found (logit +4 inside, -4 outside), sample 1 background only
    with confident background (-6) except a 5x5 false-positive blob (+2). The blob's gradient per voxel is
    at least 1e-3 of the object's, and a descent step lowers its probability; the loss value is Eq. 8's
    either way."""
    labels = torch.zeros(2, 1, 64, 64, dtype=torch.long)
    labels[0, 0, 10:30, 10:30] = 1
    x = torch.zeros(2, 2, 64, 64, dtype=torch.float64)
    x[:, 1] = -6.0
    x[0, 1] = torch.where(labels[0, 0] > 0, 4.0, -4.0)
    x[1, 1, 40:45, 40:45] = 2.0
    values = {}
    for empty_gradient in (False, True):
        z = x.clone().requires_grad_(True)
        loss = GODCLoss(apply_nonlin=softmax, do_bg=False, empty_gradient=empty_gradient)(z, labels)
        loss.backward()
        values[empty_gradient] = loss.item()
        blob = z.grad[1, 1, 40:45, 40:45].abs().mean()
        obj = z.grad[0, 1][labels[0, 0] > 0].abs().mean()
        if empty_gradient:
            assert blob >= 1e-3 * obj
            assert (z.grad[1, 1, 40:45, 40:45] > 0).all()  # descent lowers the foreground logit of the blob
            p_before = softmax(x)[1, 1, 40:45, 40:45].sum()
            p_after = softmax((z - 0.5 * z.grad / z.grad.abs().max()).detach())[1, 1, 40:45, 40:45].sum()
            assert p_after < p_before
        else:
            assert blob < 1e-4 * obj
    assert values[True] == pytest.approx(values[False], rel=1e-12)
