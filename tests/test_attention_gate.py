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
