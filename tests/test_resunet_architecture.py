"""The pre-activation residual U-Net (Zhang et al.) against independent references: residual units
against F.conv / F.batch_norm / F.instance_norm written out, output shapes and deep-supervision scales
against nnU-Net's own PlainConvUNet on the same plans keywords, the paper preset's parameter count
against a hand count, the memory estimate against forward hooks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch import nn

from nnunet_ext.architectures.resunet import LFAMPreActResUNet, PreActResidualUnit, PreActResUNet
from nnunet_ext.training.resunet_mixins import ResUNetArchitectureMixin, ResUNetLFAMArchitectureMixin
from trainer_helpers import kept_for_backward


def plain_kwargs(ndim: int, deep_supervision: bool = True, n_conv: int = 2) -> dict:
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if ndim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    if ndim == 2:
        kernels, strides = ((3, 3),) * 4, ((1, 1), (2, 2), (2, 2), (2, 1))
    else:  # anisotropic, as nnU-Net plans thick-slice CT
        kernels = ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3))
        strides = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (1, 2, 2))
    return dict(input_channels=2, n_stages=4, features_per_stage=(4, 8, 16, 16), conv_op=conv,
                kernel_sizes=kernels, strides=strides, n_conv_per_stage=n_conv, num_classes=3,
                n_conv_per_stage_decoder=n_conv, conv_bias=True, norm_op=norm,
                norm_op_kwargs={'eps': 1e-5, 'affine': True}, nonlin=nn.LeakyReLU,
                nonlin_kwargs={'inplace': True}, deep_supervision=deep_supervision)


def _randomise_norms(net: nn.Module) -> None:
    """Non-trivial affine norm parameters and running statistics (PyTorch starts them at 1/0)."""
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm2d, nn.InstanceNorm3d)) and m.affine:
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=m.running_mean.dtype))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g, dtype=m.running_var.dtype))


# ---------------------------------------------------------------- residual unit vs a direct computation
def _bn(x, norm):  # eval mode: running statistics
    return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)


def _conv2d(x, conv):
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)


@pytest.mark.parametrize('case', ['projection_stride2', 'identity', 'stem'])
def test_2d_unit_is_bn_relu_conv_twice_plus_shortcut(case):
    torch.manual_seed(0)
    c_in, c_out, stride, stem = {'projection_stride2': (3, 5, 2, False), 'identity': (4, 4, 1, False),
                                 'stem': (1, 4, 1, True)}[case]
    unit = PreActResidualUnit(nn.Conv2d, c_in, c_out, 3, stride, True, nn.BatchNorm2d, {'eps': 1e-5},
                              nonlin=nn.ReLU, nonlin_kwargs={'inplace': True}, stem=stem).double()
    unit.apply(PreActResUNet.initialize)
    _randomise_norms(unit)
    unit.eval()
    x = torch.randn(2, c_in, 9, 10, dtype=torch.float64)
    pre = x if stem else F.relu(_bn(x, unit.norm1))  # the stem has no pre-activation
    residual = _conv2d(F.relu(_bn(_conv2d(pre, unit.conv1), unit.norm2)), unit.conv2)
    if case == 'identity':
        assert isinstance(unit.shortcut, nn.Identity)
        shortcut = x
    else:  # 1x1 projection with the unit's stride, no norm
        assert unit.shortcut.kernel_size == (1, 1) and unit.shortcut.stride == (stride, stride)
        shortcut = _conv2d(x, unit.shortcut)
    x_before = x.clone()
    out = unit(x)
    torch.testing.assert_close(out, residual + shortcut, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)  # in-place nonlinearities never touch the input
    assert out.shape == (2, c_out, -(-9 // stride), -(-10 // stride))


def test_3d_unit_with_anisotropic_stride_instance_norm_and_leaky_relu():
    torch.manual_seed(0)
    unit = PreActResidualUnit(nn.Conv3d, 3, 6, (1, 3, 3), (1, 2, 2), True, nn.InstanceNorm3d,
                              {'eps': 1e-5, 'affine': True}, nonlin=nn.LeakyReLU,
                              nonlin_kwargs={'negative_slope': 0.01, 'inplace': True}).double()
    unit.apply(PreActResUNet.initialize)
    _randomise_norms(unit)
    x = torch.randn(2, 3, 4, 8, 6, dtype=torch.float64)

    def inorm(t, norm):
        return F.instance_norm(t, weight=norm.weight, bias=norm.bias, eps=norm.eps)

    def conv(t, c):
        return F.conv3d(t, c.weight, c.bias, c.stride, c.padding)

    h = conv(F.leaky_relu(inorm(x, unit.norm1), 0.01), unit.conv1)
    expected = conv(F.leaky_relu(inorm(h, unit.norm2), 0.01), unit.conv2) + conv(x, unit.shortcut)
    assert unit.conv1.padding == (0, 1, 1) and unit.conv1.stride == (1, 2, 2)
    torch.testing.assert_close(unit(x), expected, rtol=1e-12, atol=1e-12)
    assert expected.shape == (2, 6, 4, 4, 3)


# ---------------------------------------------------------------- the network on nnU-Net's plans keywords
@pytest.mark.parametrize('ndim', [2, 3])
def test_shapes_and_deep_supervision_scales_match_nnunets_plain_unet(ndim):
    torch.manual_seed(0)
    kwargs = plain_kwargs(ndim)
    ours, theirs = PreActResUNet(**kwargs), PlainConvUNet(**kwargs)
    ours.apply(ours.initialize)
    x = torch.randn(2, 2, *((16, 16) if ndim == 2 else (4, 16, 16)))
    out_ours, out_theirs = ours(x), theirs(x)
    assert isinstance(out_ours, list) and len(out_ours) == kwargs['n_stages'] - 1
    assert [o.shape for o in out_ours] == [o.shape for o in out_theirs]
    # nnUNetTrainer._get_deep_supervision_scales: 1 / cumprod(pool_op_kernel_sizes), the last dropped
    scales = (1 / np.cumprod(np.vstack(kwargs['strides']), axis=0))[:-1]
    for out, scale in zip(out_ours, scales):
        assert list(out.shape[2:]) == [int(s * f) for s, f in zip(x.shape[2:], scale)]
    # strides along one axis only: (2, 1) in 2D, (1, 2, 2) in 3D keep the other axes
    assert ours.encoder.strides == [list(s) for s in kwargs['strides']]


@pytest.mark.parametrize('ndim', [2, 3])
def test_inference_network_loads_strictly_and_equals_the_first_deep_supervision_output(ndim):
    torch.manual_seed(0)
    kwargs = plain_kwargs(ndim)
    training = PreActResUNet(**kwargs)
    training.apply(training.initialize)
    _randomise_norms(training)
    inference = PreActResUNet(**{**kwargs, 'deep_supervision': False})
    inference.load_state_dict(training.state_dict(), strict=True)
    assert not any(k.startswith('decoder.encoder') for k in training.state_dict())  # encoder registered once
    training.eval(), inference.eval()
    x = torch.randn(1, 2, *((16, 16) if ndim == 2 else (4, 16, 16)))
    torch.testing.assert_close(inference(x), training(x)[0])
    training.decoder.deep_supervision = False  # what nnUNetTrainer.set_deep_supervision_enabled toggles
    torch.testing.assert_close(training(x), inference(x))


def test_units_per_stage_follow_n_conv_per_stage():
    net = PreActResUNet(**plain_kwargs(2, n_conv=4))
    assert [len(stage) for stage in net.encoder.stages] == [2, 2, 2, 2]
    assert [len(stage) for stage in net.decoder.stages] == [2, 2, 2]
    assert net.encoder.stages[0][0].stem and not net.encoder.stages[0][1].stem
    assert not any(unit.stem for stage in net.encoder.stages[1:] for unit in stage)
    assert isinstance(net.encoder.stages[1][1].shortcut, nn.Identity)  # second unit: same width, stride 1


def test_bad_topologies_are_refused():
    with pytest.raises(ValueError, match='even number'):
        PreActResUNet(**plain_kwargs(2, n_conv=3))
    with pytest.raises(ValueError, match='nonlin_first'):
        PreActResUNet(**plain_kwargs(2), nonlin_first=True)
    with pytest.raises(ValueError, match='strides needs 4 entries'):
        PreActResUNet(**{**plain_kwargs(2), 'strides': ((1, 1), (2, 2))})


def _paper_count_by_hand(c_in=3, classes=1):
    """Zhang et al. Table 1 written out: per unit (c_in -> c_out, 3x3): two 3x3 convs with bias, a 1x1
    projection with bias (every unit here changes width or resolution), BatchNorm scale+shift on its
    two pre-activations (only the second one in the stem); + one 1x1 head per decoder level."""
    def unit(a, b, stem=False):
        return (9 * a * b + b) + (9 * b * b + b) + (a * b + b) + 2 * b + (0 if stem else 2 * a)
    encoder = unit(c_in, 64, stem=True) + unit(64, 128) + unit(128, 256) + unit(256, 512)
    decoder = unit(512 + 256, 256) + unit(256 + 128, 128) + unit(128 + 64, 64)
    heads = [(c + 1) * classes for c in (64, 128, 256)]  # full resolution + two auxiliary (deep supervision)
    return encoder + decoder + heads[0], sum(heads[1:])


def test_paper_preset_parameter_count():
    net = PreActResUNet.paper_preset()
    paper_network, auxiliary_heads = _paper_count_by_hand()
    count = sum(p.numel() for p in net.parameters())
    assert count == paper_network + auxiliary_heads == 8_221_379
    assert paper_network == 8_220_993
    conv3x3 = sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv3x3 == 7_780_032  # Zhang et al.'s "7.8 M"
    assert all(isinstance(m, (nn.BatchNorm2d, nn.ReLU)) for m in net.modules()
               if isinstance(m, (nn.BatchNorm2d, nn.ReLU, nn.InstanceNorm2d, nn.LeakyReLU)))
    x = torch.randn(1, 3, 32, 32)
    assert net(x).shape == (1, 1, 32, 32)
    assert [s.shape[2:] for s in net.encoder(x)] == [(32, 32), (16, 16), (8, 8), (4, 4)]  # three down-samplings


@pytest.mark.parametrize('network', [PreActResUNet, LFAMPreActResUNet])
@pytest.mark.parametrize('deep_supervision', [True, False])
def test_feature_map_estimate_counts_the_stored_tensors(network, deep_supervision):
    """Oracle: what autograd keeps for backward (``saved_tensors_hooks``), in nnU-Net's unit of
    ``compute_conv_feature_map_size`` (one map per conv-norm-nonlinearity block, which keeps two: half of
    what is kept). The plain network's estimate (without the heads' logits, which the loss keeps) equals it
    within 2 %; LFAM's also counts its largest temporary (recomputed sampled columns), so it is at least it."""
    kwargs = plain_kwargs(3, deep_supervision)
    net = network(**kwargs)
    size = (4, 16, 16)
    x = torch.randn(1, 2, *size)
    kept = kept_for_backward(net, x)
    estimate = int(net.compute_conv_feature_map_size(size))
    with torch.no_grad():
        outputs = net(x)
    logits = sum(o.numel() for o in outputs) if deep_supervision else outputs.numel()
    if network is PreActResUNet:
        assert estimate - logits == pytest.approx(kept / 2, rel=0.02)
    else:
        assert estimate >= kept / 2


# ---------------------------------------------------------------- LFAM variant
@pytest.mark.parametrize('ndim', [2, 3])
def test_lfam_variant_adds_only_alignments_and_with_identity_kernels_equals_the_plain_resunet(ndim):
    torch.manual_seed(0)
    kwargs = plain_kwargs(ndim)
    plain, lfam = PreActResUNet(**kwargs), LFAMPreActResUNet(**kwargs)
    lfam.apply(lfam.initialize)
    plain_keys, lfam_keys = set(plain.state_dict()), set(lfam.state_dict())
    assert plain_keys <= lfam_keys and all(k.startswith('decoder.alignments.') for k in lfam_keys - plain_keys)
    assert len(lfam.decoder.alignments) == kwargs['n_stages'] - 1
    for s, alignment in enumerate(lfam.decoder.alignments):
        assert alignment.offset_predictor.weight.abs().sum() == 0  # regular grid after initialisation
        assert alignment.deform.kernel_size == tuple(kwargs['kernel_sizes'][-(s + 2)])  # the skip's kernel
        assert alignment.offset_predictor.in_channels == lfam.decoder.skip_channels[s] + lfam.decoder.up_channels[s]
    # zero offsets, mask sigmoid(0) = 0.5: a kernel of 2 at the centre and zero bias makes LFAM the identity
    lfam.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        for alignment in lfam.decoder.alignments:
            w = alignment.deform.weight
            w.zero_()
            centre = tuple(k // 2 for k in w.shape[2:])
            for c in range(w.shape[0]):
                w[(c, c, *centre)] = 2.0
            alignment.deform.bias.zero_()
    x = torch.randn(2, 2, *((16, 16) if ndim == 2 else (4, 16, 16)))
    for a, b in zip(lfam(x), plain(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    inference = LFAMPreActResUNet(**{**kwargs, 'deep_supervision': False})
    inference.load_state_dict(lfam.state_dict(), strict=True)


# ---------------------------------------------------------------- the trainer hook on nnU-Net plans
def _plans_configuration(network_class_name: str = 'dynamic_network_architectures.architectures.unet.PlainConvUNet'):
    """A 2d configuration as nnU-Net 2.8.1's default planner writes it into nnUNetPlans.json (dotted op
    names resolved through ``_kw_requires_import``; 48x48 phantom: 4 stages)."""
    return ConfigurationManager({
        'patch_size': [48, 48], 'spacing': [0.8, 0.8], 'batch_size': 12,
        'architecture': {
            'network_class_name': network_class_name,
            'arch_kwargs': {'n_stages': 4, 'features_per_stage': [32, 64, 128, 256],
                            'conv_op': 'torch.nn.modules.conv.Conv2d',
                            'kernel_sizes': [[3, 3]] * 4, 'strides': [[1, 1], [2, 2], [2, 2], [2, 2]],
                            'n_conv_per_stage': [2, 2, 2, 2], 'n_conv_per_stage_decoder': [2, 2, 2],
                            'conv_bias': True, 'norm_op': 'torch.nn.modules.instancenorm.InstanceNorm2d',
                            'norm_op_kwargs': {'eps': 1e-05, 'affine': True}, 'dropout_op': None,
                            'dropout_op_kwargs': None, 'nonlin': 'torch.nn.LeakyReLU',
                            'nonlin_kwargs': {'inplace': True}},
            '_kw_requires_import': ['conv_op', 'norm_op', 'dropout_op', 'nonlin']}})


@pytest.mark.parametrize('mixin, network', [(ResUNetArchitectureMixin, PreActResUNet),
                                            (ResUNetLFAMArchitectureMixin, LFAMPreActResUNet)])
def test_mixins_build_from_nnunet_default_plans(mixin, network):
    torch.manual_seed(0)
    configuration = _plans_configuration()
    net = mixin.build_network_architecture(None, configuration, 1, 3, enable_deep_supervision=True)
    assert type(net) is network
    assert net.encoder.output_channels == [32, 64, 128, 256]
    assert isinstance(net.encoder.stages[1][0].norm1, nn.InstanceNorm2d)  # the plans' ops
    assert isinstance(net.encoder.stages[1][0].nonlin1, nn.LeakyReLU)
    outputs = net(torch.randn(1, 1, *configuration.patch_size))
    # nnUNetTrainer._get_deep_supervision_scales
    scales = (1 / np.cumprod(np.vstack(configuration.pool_op_kernel_sizes), axis=0))[:-1]
    assert [list(o.shape[2:]) for o in outputs] == [[int(48 * f) for f in scale] for scale in scales]
    inference = mixin.build_network_architecture(None, configuration, 1, 3, enable_deep_supervision=False)
    inference.load_state_dict(net.state_dict(), strict=True)


def test_mixin_refuses_plans_of_another_network():
    configuration = _plans_configuration('dynamic_network_architectures.architectures.unet.ResidualEncoderUNet')
    with pytest.raises(ValueError, match='PlainConvUNet plans'):
        ResUNetArchitectureMixin.build_network_architecture(None, configuration, 1, 3)
