"""LFAM module and LFAM U-Nets against independent references (F.conv2d/3d, nnU-Net's own networks)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnunet_ext.architectures.lfam_unet import LFAMPlainConvUNet, LFAMResidualEncoderUNet
from nnunet_ext.nn.deformable_conv import DeformableConv
from nnunet_ext.nn.lateral_alignment import LateralFeatureAlignment
from nnunet_ext.training.architecture_mixins import residual_encoder_kwargs


def plain_kwargs(ndim: int, deep_supervision: bool = True) -> dict:
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if ndim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    if ndim == 2:
        kernels, strides = ((3, 3),) * 4, ((1, 1), (2, 2), (2, 2), (2, 1))
    else:  # anisotropic, as nnU-Net plans thick-slice CT
        kernels = ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3))
        strides = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (1, 2, 2))
    return dict(input_channels=2, n_stages=4, features_per_stage=(4, 8, 16, 16), conv_op=conv,
                kernel_sizes=kernels, strides=strides, n_conv_per_stage=2, num_classes=3,
                n_conv_per_stage_decoder=1, conv_bias=True, norm_op=norm,
                norm_op_kwargs={'eps': 1e-5, 'affine': True}, nonlin=nn.LeakyReLU,
                nonlin_kwargs={'inplace': True}, deep_supervision=deep_supervision)


@pytest.mark.parametrize('ndim', [2, 3])
@pytest.mark.parametrize('modulated', [True, False])
def test_alignment_starts_as_a_plain_convolution_of_the_skip(ndim, modulated):
    torch.manual_seed(0)
    conv = nn.Conv2d if ndim == 2 else nn.Conv3d
    module = LateralFeatureAlignment(3, 5, conv, kernel_size=3, modulated=modulated).double()
    skip = torch.randn(2, 3, *(6,) * ndim, dtype=torch.float64)
    up = torch.randn(2, 5, *(6,) * ndim, dtype=torch.float64)
    w, b = module.deform.weight, module.deform.bias
    conv_fn = F.conv2d if ndim == 2 else F.conv3d
    scale = 0.5 if modulated else 1.0  # DCNv2 mask starts at sigmoid(0)
    expected = scale * conv_fn(skip, w, None, padding=1) + b.view(1, -1, *(1,) * ndim)
    torch.testing.assert_close(module(skip, up), expected, rtol=1e-10, atol=1e-10)


def test_offset_predictor_learns_from_the_start():
    torch.manual_seed(0)
    module = LateralFeatureAlignment(4, 4, nn.Conv2d, kernel_size=3)
    skip, up = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    module(skip, up).square().sum().backward()
    assert module.offset_predictor.weight.grad.abs().sum() > 0  # zero weights, non-zero gradient


@pytest.mark.parametrize('ndim', [2, 3])
@pytest.mark.parametrize('residual', [False, True])
def test_lfam_unet_follows_the_plans_and_keeps_the_deep_supervision_contract(ndim, residual):
    torch.manual_seed(0)
    kwargs = plain_kwargs(ndim)
    ours_cls, theirs_cls = (LFAMResidualEncoderUNet, ResidualEncoderUNet) if residual else (LFAMPlainConvUNet,
                                                                                           PlainConvUNet)
    if residual:
        kwargs = residual_encoder_kwargs(kwargs)
    ours, theirs = ours_cls(**kwargs), theirs_cls(**kwargs)
    ours.apply(ours.initialize)
    x = torch.randn(2, 2, *((16, 16) if ndim == 2 else (4, 16, 16)))
    out_ours, out_theirs = ours(x), theirs(x)
    assert [o.shape for o in out_ours] == [o.shape for o in out_theirs]  # nnU-Net's heads and scales
    # encoder and decoder blocks are nnU-Net's: LFAM only adds parameters
    theirs_keys = set(theirs.state_dict())
    ours_keys = set(ours.state_dict())
    assert theirs_keys <= ours_keys
    assert all(k.startswith('decoder.alignments.') for k in ours_keys - theirs_keys)
    assert len(ours.decoder.alignments) == kwargs['n_stages'] - 1
    for s, alignment in enumerate(ours.decoder.alignments):  # kernel of the skip's stage (anisotropic in 3D)
        assert alignment.deform.kernel_size == tuple(kwargs['kernel_sizes'][-(s + 2)])
        assert alignment.offset_predictor.weight.abs().sum() == 0  # survived nnU-Net's He initialisation
    # inference: deep supervision off, same parameters, strict load
    inference = ours_cls(**{**kwargs, 'deep_supervision': False})
    inference.load_state_dict(ours.state_dict(), strict=True)
    ours.eval(), inference.eval()
    torch.testing.assert_close(inference(x), ours(x)[0])


def test_residual_encoder_kwargs_use_nnunets_resenc_blocks():
    kwargs = residual_encoder_kwargs(plain_kwargs(2))
    assert kwargs['n_blocks_per_stage'] == (1, 3, 4, 6)
    assert 'n_conv_per_stage' not in kwargs and 'nonlin_first' not in kwargs


def test_shared_levels_use_slices_of_one_kernel_bank():
    torch.manual_seed(0)
    kwargs = plain_kwargs(3)
    net = LFAMPlainConvUNet(**kwargs, lfam_shared=True)
    net.apply(net.initialize)
    independent = LFAMPlainConvUNet(**kwargs)
    unique = lambda m: sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    banks = {id(a.deform.bank) for a in net.decoder.alignments}
    assert len(banks) == 1
    bank = net.decoder.alignments[0].deform.bank
    assert bank.in_channels == max(kwargs['features_per_stage'][:-1]) and bank.kernel_size == (3, 3, 3)
    assert unique(net) < unique(independent)
    # level with 4 channels and kernel (1, 3, 3): the leading 4x4 block, the central kernel slice
    top = net.decoder.alignments[-1]
    assert top.deform.kernel_size == (1, 3, 3) and top.deform.in_channels == 4
    reference = DeformableConv(4, 4, (1, 3, 3), padding=(0, 1, 1), ndim=3)
    with torch.no_grad():
        reference.weight.copy_(bank.weight[:4, :4, 1:2])
        reference.bias.copy_(bank.bias[:4])
    x, offset = torch.randn(1, 4, 3, 6, 6), 0.3 * torch.randn(1, 27, 3, 6, 6)
    mask = torch.rand(1, 9, 3, 6, 6)
    torch.testing.assert_close(top.deform(x, offset, mask), reference(x, offset, mask))
    # every level trains the bank
    net(torch.randn(1, 2, 4, 16, 16))[0].sum().backward()
    assert bank.weight.grad[:4, :4, 1].abs().sum() > 0 and bank.weight.grad[:, :, 0].abs().sum() > 0
