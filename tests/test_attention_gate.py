"""Attention gate (ANU-Net Eqs. 1-3) against a direct computation with ``F.conv2d``/``F.conv3d`` and
``F.batch_norm`` on the module's own weights, 2D and 3D, train and eval mode."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ext.nn import AttentionGate


def _ops(ndim):
    return (nn.Conv2d, nn.BatchNorm2d, F.conv2d) if ndim == 2 else (nn.Conv3d, nn.BatchNorm3d, F.conv3d)


def _randomise_norms(module):
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def _reference(gate, conv_fn, x, g, training):
    """Eqs. 1-3 written out: F = ReLU(BN(W_x x + b) + BN(W_g g + b)); alpha = sigmoid(BN(psi F + b)); x * alpha."""
    def conv_bn(seq, t):
        conv, bn = seq[0], seq[1]
        t = conv_fn(t, conv.weight, conv.bias)
        return F.batch_norm(t, None if training else bn.running_mean, None if training else bn.running_var,
                            bn.weight, bn.bias, training=True if training else False, eps=bn.eps)
    f = torch.relu(conv_bn(gate.W_x, x) + conv_bn(gate.W_g, g))
    alpha = torch.sigmoid(conv_bn(gate.psi, f))
    return x * alpha, alpha


@pytest.mark.parametrize('ndim', [2, 3])
@pytest.mark.parametrize('training', [False, True])
def test_gate_equals_eqs_1_to_3(ndim, training):
    torch.manual_seed(0)
    conv_op, norm_op, conv_fn = _ops(ndim)
    gate = AttentionGate(6, 5, 4, conv_op, norm_op, {'eps': 1e-5, 'affine': True}, conv_bias=True).double()
    with torch.no_grad():
        _randomise_norms(gate)
    gate.train(training)
    spatial = (7, 9) if ndim == 2 else (3, 5, 4)
    x = torch.randn(3, 6, *spatial, dtype=torch.float64)
    g = torch.randn(3, 5, *spatial, dtype=torch.float64)
    expected, expected_alpha = _reference(gate, conv_fn, x, g, training)
    alpha = gate.attention(x, g)
    out = gate(x, g)
    assert out.shape == x.shape and alpha.shape == (3, 1, *spatial)
    assert ((alpha > 0) & (alpha < 1)).all()
    torch.testing.assert_close(alpha, expected_alpha, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    # alpha is one coefficient per voxel, shared by the channels of x
    torch.testing.assert_close(out / x, alpha.expand_as(x), rtol=1e-8, atol=1e-8)


def test_gate_without_norm_and_its_gradients():
    torch.manual_seed(0)
    gate = AttentionGate(3, 2, 4, nn.Conv2d, None)
    assert [type(m) for m in gate.W_x] == [nn.Conv2d]
    x, g = torch.randn(2, 3, 5, 5, requires_grad=True), torch.randn(2, 2, 5, 5, requires_grad=True)
    w = gate.psi[0]
    wx, wg = gate.W_x[0], gate.W_g[0]
    f = torch.relu(F.conv2d(x, wx.weight, wx.bias) + F.conv2d(g, wg.weight, wg.bias))
    expected = x * torch.sigmoid(F.conv2d(f, w.weight, w.bias))
    torch.testing.assert_close(gate(x, g), expected)
    gate(x, g).sum().backward()
    assert g.grad.abs().sum() > 0 and x.grad.abs().sum() > 0  # the gating signal steers the gate
    assert all(p.grad is not None for p in gate.parameters())


def test_gate_refuses_mismatched_inputs():
    gate = AttentionGate(3, 2, 4, nn.Conv2d, nn.BatchNorm2d)
    with pytest.raises(ValueError, match='spatial size'):
        gate(torch.randn(1, 3, 8, 8), torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match='channels'):
        gate(torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match='positive'):
        AttentionGate(3, 2, 0)


# ---------------------------------------------------------------------------------------------------- psi norm
def test_psi_branch_norm_follows_the_paper_only_for_batch_norm():
    bn = AttentionGate(3, 2, 4, nn.Conv2d, nn.BatchNorm2d)
    assert [type(m) for m in bn.psi] == [nn.Conv2d, nn.BatchNorm2d]  # the paper's BN(psi(...)), Eq. 2
    sync = AttentionGate(3, 2, 4, nn.Conv3d, nn.SyncBatchNorm)  # what nnU-Net's DDP conversion makes of it
    assert isinstance(sync.psi[1], nn.SyncBatchNorm)
    for conv, norm in ((nn.Conv2d, nn.InstanceNorm2d), (nn.Conv3d, nn.InstanceNorm3d)):  # nnU-Net's plans
        gate = AttentionGate(3, 2, 4, conv, norm, {'eps': 1e-5, 'affine': True})
        assert [type(m) for m in gate.psi] == [conv]  # no per-image norm of the one-channel logits
        assert [type(m) for m in gate.W_x] == [conv, norm] and [type(m) for m in gate.W_g] == [conv, norm]
    forced = AttentionGate(3, 2, 4, nn.Conv2d, nn.InstanceNorm2d, {'affine': True}, psi_norm='norm_op')
    assert [type(m) for m in forced.psi] == [nn.Conv2d, nn.InstanceNorm2d]
    assert [type(m) for m in AttentionGate(3, 2, 4, nn.Conv2d, nn.BatchNorm2d, psi_norm='none').psi] == [nn.Conv2d]
    with pytest.raises(ValueError, match='psi_norm'):
        AttentionGate(3, 2, 4, nn.Conv2d, nn.BatchNorm2d, psi_norm='instance')


def _organ_inputs(seed, size=16):
    """Image 0 holds an "organ" (a 6x7 block), image 1 none. ``g``'s channel 0 is an organ detector (3 on
    the organ, ~0 elsewhere: 1e-4 noise); every other channel of ``g`` and all of ``x`` are N(0, 1) noise
    in both images, so the gate's inputs are not constant in the empty image."""
    gen = torch.Generator().manual_seed(seed)
    organ = torch.zeros(2, 1, size, size)
    organ[0, 0, 4:10, 5:12] = 1
    x = torch.randn(2, 4, size, size, generator=gen)
    g = torch.randn(2, 4, size, size, generator=gen)
    g[:, 0] = 3 * organ[:, 0] + 1e-4 * torch.randn(2, size, size, generator=gen)
    return x, g, organ


def _instance_norm_gate(psi_norm='auto'):
    return AttentionGate(4, 4, 4, nn.Conv2d, nn.InstanceNorm2d, {'eps': 1e-5, 'affine': True}, psi_norm=psi_norm)


def test_gate_on_instance_norm_plans_can_close_on_an_image_without_foreground():
    """Weights set by hand: W_g picks the detector channel, W_x passes x's noise (scaled by 0.02 after its
    InstanceNorm), psi = 10 F_0 - 10. In one forward the empty image gets alpha < 1e-3 at every voxel
    while the organ gets alpha > 0.99: the gate says "nothing here" for one image only."""
    gate = _instance_norm_gate()
    with torch.no_grad():
        for p in gate.parameters():
            p.zero_()
        gate.W_x[0].weight[0, 0] = 1.0
        gate.W_x[1].weight[0], gate.W_x[1].bias[0] = 0.02, 0.2
        gate.W_g[0].weight[0, 0] = 1.0
        gate.W_g[1].weight[0] = 1.0
        gate.psi[0].weight[0, 0], gate.psi[0].bias[0] = 10.0, -10.0
        x, g, organ = _organ_inputs(0)
        alpha = gate.attention(x, g)
        assert alpha[1].max() < 1e-3
        assert alpha[0][organ[0] > 0].min() > 0.99 and alpha[0][organ[0] == 0].max() < 1e-3
        assert gate.logits(x, g)[1].std() > 0  # the empty image's logits are not constant: no trick of IN(const)


def test_gate_trained_on_instance_norm_plans_learns_to_close_on_empty_images():
    """A few Adam steps from nnU-Net's initialisation on fresh draws of the inputs above, alpha trained towards
    the organ mask: on unseen draws alpha stays below 0.01 everywhere in the image without foreground."""
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He
    torch.manual_seed(0)
    gate = _instance_norm_gate()
    gate.apply(InitWeights_He(1e-2))
    optimiser = torch.optim.Adam(gate.parameters(), lr=0.05)
    for step in range(200):
        x, g, organ = _organ_inputs(step)
        loss = F.binary_cross_entropy_with_logits(gate.logits(x, g), organ)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        for seed in range(10_000, 10_005):
            x, g, organ = _organ_inputs(seed)
            alpha = gate.attention(x, g)
            assert alpha[1].max() < 0.01
            assert alpha[0][organ[0] > 0].mean() > 0.8


def test_instance_norm_on_psi_standardises_every_images_logits():
    """Why the psi branch takes no per-image norm: with InstanceNorm there, every image's attention logits have
    mean beta and standard deviation |gamma| (the norm's affine parameters), whatever the input, so an image
    without the organ has as many open voxels as one with it."""
    torch.manual_seed(0)
    gate = _instance_norm_gate('norm_op')
    with torch.no_grad():
        gate.psi[1].weight.fill_(2.5)
        gate.psi[1].bias.fill_(-1.0)
        x, g, _ = _organ_inputs(0)
        logits = gate.logits(x, g).flatten(1)
    torch.testing.assert_close(logits.mean(1), torch.full((2,), -1.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(logits.std(1, unbiased=False), torch.full((2,), 2.5), atol=1e-2, rtol=0)
