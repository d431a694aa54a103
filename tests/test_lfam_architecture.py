"""LFAM module and LFAM U-Nets against independent references (F.conv2d/3d, nnU-Net's own networks)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnunet_ext.architectures.lfam_unet import LFAMPlainConvUNet, LFAMResidualEncoderUNet
from nnunet_ext.nn.deformable_conv import DeformableConv
from nnunet_ext.nn.lateral_alignment import LateralFeatureAlignment, SharedKernelSlice
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


# ---------------------------------------------------------------- the fused operator against autograd
def _random_predictor(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.offset_predictor.weight.copy_(0.3 * torch.randn(module.offset_predictor.weight.shape, generator=g))
        module.offset_predictor.bias.copy_(0.5 * torch.randn(module.offset_predictor.bias.shape, generator=g))


@pytest.fixture(scope='module')
def tv_deform_conv2d():
    try:
        from torchvision.ops import deform_conv2d
        deform_conv2d(torch.zeros(1, 1, 3, 3, dtype=torch.float64), torch.zeros(1, 2, 3, 3, dtype=torch.float64),
                      torch.ones(1, 1, 1, 1, dtype=torch.float64))
    except Exception as e:  # noqa: BLE001 - any failure means "cannot compare here"
        pytest.skip(f"torchvision.ops.deform_conv2d cannot run here: {type(e).__name__}: {e}")
    return deform_conv2d


@pytest.mark.parametrize('modulated,offset_groups', [(True, 1), (False, 1), (True, 2)])
def test_alignment_equals_autograd_through_conv_sigmoid_and_torchvision(tv_deform_conv2d, modulated, offset_groups):
    """Oracle: the module's reading written with autograd, the offsets predicted by ``F.conv2d`` over
    ``cat(skip, up)``, the mask a sigmoid, the deformable convolution torchvision's: values and the
    gradients of skip, up and every parameter (LFAM's own backward recomputes the prediction)."""
    torch.manual_seed(0)
    module = LateralFeatureAlignment(4, 3, nn.Conv2d, 3, offset_groups, modulated).double()
    _random_predictor(module)
    skip = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    pred = F.conv2d(torch.cat((skip, up), 1), module.offset_predictor.weight, module.offset_predictor.bias, padding=1)
    oc = module.deform.offset_channels
    mask = torch.sigmoid(pred[:, oc:]) if modulated else None
    expected = tv_deform_conv2d(skip, pred[:, :oc], module.deform.weight, module.deform.bias, padding=1, mask=mask)
    got = module(skip, up)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tensors = [skip, up, *module.parameters()]
    for a, b in zip(torch.autograd.grad(got, tensors, grad), torch.autograd.grad(expected, tensors, grad)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('kernel,offset_groups,modulated,shared', [
    (3, 1, True, False), ((1, 3, 3), 2, True, False), (3, 1, False, False), (3, 1, True, True)])
def test_alignment_3d_gradcheck(kernel, offset_groups, modulated, shared):
    """3D (no torchvision oracle): the fused backward against finite differences, for skip, up and the
    parameters (shared: a slice of a kernel bank)."""
    torch.manual_seed(0)
    deform = None
    if shared:
        deform = SharedKernelSlice(DeformableConv(6, 6, 5, padding=2, ndim=3).double(), 2, (3, 3, 3))
    module = LateralFeatureAlignment(2, 2, nn.Conv3d, kernel, offset_groups, modulated, deform).double()
    _random_predictor(module)
    skip = torch.randn(1, 2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    up = torch.randn(1, 2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    params = [p for p in module.parameters()]

    def fn(skip, up, *values):
        with torch.nn.utils.stateless._reparametrize_module(module, dict(zip(
                [n for n, _ in module.named_parameters()], values))):
            return module(skip, up)

    inputs = (skip, up, *[p.detach().clone().requires_grad_() for p in params])
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, fast_mode=True)  # random projections
    assert torch.autograd.gradcheck(lambda s, u: module(s, u), (skip, up), eps=1e-6, atol=1e-5)  # full, features


@pytest.mark.parametrize('ndim', [2, 3])
def test_decoder_estimate_adds_each_alignments_own_estimate(ndim):
    """The LFAM decoder's ``compute_conv_feature_map_size`` is nnU-Net's decoder's plus each level's
    ``LateralFeatureAlignment.compute_conv_feature_map_size`` in nnU-Net's unit (halved)."""
    from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
    net = LFAMPlainConvUNet(**plain_kwargs(ndim))
    size = (32, 32) if ndim == 2 else (8, 32, 32)
    levels, current = [], list(size)
    for stride in plain_kwargs(ndim)['strides']:
        current = [c // s for c, s in zip(current, stride)]
        levels.append(current)
    lfam = sum(a.compute_conv_feature_map_size(levels[-(s + 2)]) // 2 for s, a in enumerate(net.decoder.alignments))
    assert net.decoder.compute_conv_feature_map_size(size) == \
        UNetDecoder.compute_conv_feature_map_size(net.decoder, size) + lfam
    # the top level's alignment: kept skip + up, plus its largest temporary
    top = net.decoder.alignments[-1]
    assert top.compute_conv_feature_map_size(size) > (4 + 4) * math.prod(size)
