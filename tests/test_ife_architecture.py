"""IFE U-Nets against nnU-Net's own networks: with the weights of the extra (selected) input channels
zeroed, an IFE U-Net computes exactly nnU-Net's U-Net; shapes, deep-supervision contract, strict
reload without deep supervision, 2D and anisotropic 3D, plain and residual encoders."""
from __future__ import annotations

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from nnunet_ext.architectures.ife_unet import IFEPlainConvUNet, IFEResidualEncoderUNet
from nnunet_ext.training.architecture_mixins import residual_encoder_kwargs
from test_lfam_architecture import plain_kwargs


def _ife_kwargs(score):
    return dict(ife_score=score, ife_stages=(1, 2), ife_ratios=(0.75, 0.5))


@pytest.mark.parametrize('ndim', [2, 3])
@pytest.mark.parametrize('residual', [False, True])
@pytest.mark.parametrize('score', ['curvature', 'entropy'])
def test_ife_unet_is_nnunets_unet_plus_selected_channels(ndim, residual, score):
    torch.manual_seed(0)
    kwargs = plain_kwargs(ndim)
    ours_cls, theirs_cls = (IFEResidualEncoderUNet, ResidualEncoderUNet) if residual else (IFEPlainConvUNet,
                                                                                         PlainConvUNet)
    if residual:
        kwargs = residual_encoder_kwargs(kwargs)
    ours, theirs = ours_cls(**kwargs, **_ife_kwargs(score)), theirs_cls(**kwargs)
    features = kwargs['features_per_stage']  # (4, 8, 16, 16): skips at stages 0, 1, 2
    # decoder stage consuming encoder stage st: n_stages - 2 - st; input = up + skip + int(r * skip)
    widened = {2 - 1: features[1] * 2 + int(0.75 * features[1]), 2 - 2: features[2] * 2 + int(0.5 * features[2])}
    for s, width in widened.items():
        assert ours.decoder.stages[s].convs[0].conv.in_channels == width
    assert ours.decoder.stages[2].convs[0].conv.in_channels == 2 * features[0]  # stage 0: no IFE

    # same weights as nnU-Net's network; the extra input channels' weights zeroed
    theirs_state = theirs.state_dict()
    state = ours.state_dict()
    for key, value in theirs_state.items():
        if state[key].shape == value.shape:
            state[key] = value.clone()
        else:  # a widened first conv of a decoder stage
            state[key] = torch.zeros_like(state[key])
            state[key][:, :value.shape[1]] = value
    assert set(state) == set(theirs_state)  # IFE adds no parameters, only input width
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 2, *((16, 16) if ndim == 2 else (4, 16, 16)))
    ours.eval(), theirs.eval()
    out_ours, out_theirs = ours(x), theirs(x)
    assert len(out_ours) == len(out_theirs) == kwargs['n_stages'] - 1
    for a, b in zip(out_ours, out_theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # the selected channels do reach the widened convs
    ours.train()
    loss = sum(o.sum() for o in ours(x))
    loss.backward()
    for s in widened:
        grad = ours.decoder.stages[s].convs[0].conv.weight.grad
        assert grad[:, 2 * features[2 - s]:].abs().sum() > 0

    # inference: deep supervision off, strict reload
    inference = ours_cls(**{**kwargs, 'deep_supervision': False}, **_ife_kwargs(score))
    inference.load_state_dict(ours.state_dict(), strict=True)
    ours.eval(), inference.eval()
    torch.testing.assert_close(inference(x), ours(x)[0])


def test_stage_without_a_skip_is_refused():
    with pytest.raises(ValueError, match='skips at stages'):
        IFEPlainConvUNet(**plain_kwargs(2), ife_stages=(1, 3), ife_ratios=(0.5, 0.5))
    with pytest.raises(ValueError, match='equally long'):
        IFEPlainConvUNet(**plain_kwargs(2), ife_stages=(1, 2), ife_ratios=(0.5,))
    with pytest.raises(ValueError, match='ife_score'):
        IFEPlainConvUNet(**plain_kwargs(2), ife_score='sharpness')
