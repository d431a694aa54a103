"""ANU-Net / UNet++ on nnU-Net's plans: Table 6 parameter counts, Eq. 4 wiring against a hand-written
forward, pruning (deeper weights do not matter, deeper modules do not run, a level-j network loads
the level's weights strictly), the deep-supervision contract in 2D and anisotropic 3D, construction
from a plans-style dictionary through nnU-Net's ``get_network_from_plans``."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nnunet_ext.architectures.anunet import PRUNE_LEVEL_ENV, ANUNet, UNetPlusPlus


def nnunet_kwargs(ndim: int, deep_supervision: bool = True, n_stages: int = 4) -> dict:
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if ndim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    if ndim == 2:
        kernels, strides = [[3, 3]] * n_stages, [[1, 1]] + [[2, 2]] * (n_stages - 1)
    else:  # anisotropic, as nnU-Net plans thick-slice CT
        kernels = [[1, 3, 3]] + [[3, 3, 3]] * (n_stages - 1)
        strides = [[1, 1, 1], [1, 2, 2]] + [[2, 2, 2]] * (n_stages - 2)
    return dict(input_channels=2, n_stages=n_stages, features_per_stage=[4, 8, 16, 16][:n_stages], conv_op=conv,
                kernel_sizes=kernels, strides=strides, n_conv_per_stage=2, num_classes=3,
                n_conv_per_stage_decoder=[1] * (n_stages - 1), conv_bias=True, norm_op=norm,
                norm_op_kwargs={'eps': 1e-5, 'affine': True}, nonlin=nn.LeakyReLU, nonlin_kwargs={'inplace': True},
                deep_supervision=deep_supervision)


def _input(ndim, batch=2):
    return torch.randn(batch, 2, *((16, 16) if ndim == 2 else (4, 16, 16)))


def _n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True)
def _no_prune_env(monkeypatch):
    monkeypatch.delenv(PRUNE_LEVEL_ENV, raising=False)


# ---------------------------------------------------------------------------------------------------- Table 6
@pytest.mark.parametrize('level, millions', [(1, 0.1038), (2, 0.5134), (3, 2.1918), (4, 8.9506)])
def test_paper_preset_reproduces_table_6(level, millions):
    net = ANUNet.paper_preset(level)
    assert round(_n_params(net) / 1e6, 4) == millions
    assert net.prune_level == level and len(net.decoder.heads) == level


def test_unet_plus_plus_preset_is_anunet_without_its_gates():
    f, f_int = (32, 64, 128, 256), (32, 32, 64, 128)
    for level in (1, 2, 3, 4):
        # closed form of one gate (Eqs. 1-3): two 1x1 convs (bias) + BN to F_int, 1x1 conv (bias) + BN to 1 channel
        gates = sum((2 * (f[i] * f_int[i] + f_int[i] + 2 * f_int[i]) + f_int[i] + 1 + 2) * (level - i)
                    for i in range(level))
        assert _n_params(ANUNet.paper_preset(level)) - _n_params(UNetPlusPlus.paper_preset(level)) == gates
    assert len(UNetPlusPlus.paper_preset(4).decoder.gates) == 0


# ---------------------------------------------------------------------------------------------------- gate norm
def test_gate_psi_branch_takes_no_per_image_norm_on_nnunet_plans():
    """nnU-Net's plans (InstanceNorm): W_x and W_g normalised as the plans say, the one-channel psi branch
    without norm; the paper preset (BatchNorm): BatchNorm on psi as Eq. 2. The parameter set does not depend
    on deep supervision (strict reload) and survives a pruned copy."""
    kwargs = nnunet_kwargs(2)
    net = ANUNet(**kwargs)
    for gate in net.decoder.gates.values():
        assert [type(m) for m in gate.psi] == [nn.Conv2d]
        assert type(gate.W_x[1]) is nn.InstanceNorm2d and type(gate.W_g[1]) is nn.InstanceNorm2d
    assert not any(k.startswith('decoder.gates.') and '.psi.1.' in k for k in net.state_dict())
    inference = ANUNet(**{**kwargs, 'deep_supervision': False})
    inference.load_state_dict(net.state_dict(), strict=True)
    assert [type(m) for m in net.pruned_copy(2).decoder.gates['0_2'].psi] == [nn.Conv2d]
    paper = ANUNet.paper_preset(2)
    assert all(type(g.psi[1]) is nn.BatchNorm2d for g in paper.decoder.gates.values())
    forced = ANUNet(**kwargs, gate_psi_norm='norm_op')  # the former layout, kept for ablations
    assert all(type(g.psi[1]) is nn.InstanceNorm2d for g in forced.decoder.gates.values())
    assert [type(m) for m in forced.pruned_copy(1).decoder.gates['0_1'].psi] == [nn.Conv2d, nn.InstanceNorm2d]
    for cls in (ANUNet, UNetPlusPlus):
        with pytest.raises(ValueError, match='psi_norm'):
            cls(**kwargs, gate_psi_norm='batch')


# ---------------------------------------------------------------------------------------------------- Eq. 4
@pytest.mark.parametrize('cls', [ANUNet, UNetPlusPlus])
def test_level_2_output_is_eq_4_written_out(cls):
    torch.manual_seed(0)
    net = cls(**nnunet_kwargs(2, deep_supervision=False), prune_level=2).eval()
    enc, dec = net.encoder.stages, net.decoder
    gate = (lambda key, x, g: dec.gates[key](x, g)) if cls is ANUNet else (lambda key, x, g: x)
    x = _input(2)
    with torch.no_grad():
        x00 = enc[0](x)
        x10 = enc[1](x00)
        x20 = enc[2](x10)
        u = dec.ups[0](x10)
        a00 = gate('0_1', x00, u)
        x01 = dec.nodes['0_1'](torch.cat([a00, u], 1))
        u = dec.ups[1](x20)
        x11 = dec.nodes['1_1'](torch.cat([gate('1_1', x10, u), u], 1))
        u = dec.ups[0](x11)  # the row's up-sampling is shared
        x02 = dec.nodes['0_2'](torch.cat([a00, gate('0_2', x01, u), u], 1))
        expected = dec.heads[1](x02)
        torch.testing.assert_close(net(x), expected)
        if cls is ANUNet:  # the gates do change the result
            assert not torch.allclose(expected, dec.heads[1](dec.nodes['0_2'](torch.cat([x00, x01, u], 1))))


# ---------------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize('ndim', [2, 3])
@pytest.mark.parametrize('cls', [ANUNet, UNetPlusPlus])
def test_deep_supervision_contract(ndim, cls):
    torch.manual_seed(0)
    kwargs = nnunet_kwargs(ndim)
    net = cls(**kwargs)
    x = _input(ndim)
    assert net.prune_level == net.num_levels == 3
    outputs = net(x)
    assert isinstance(outputs, list) and len(outputs) == 3
    for o in outputs:  # all heads at full resolution, raw logits
        assert o.shape == (2, 3, *x.shape[2:])
    # main output first: the deepest head X_0,3, then X_0,2, X_0,1
    net.eval()
    outputs = net(x)
    with torch.no_grad():
        for level, o in zip((3, 2, 1), outputs):
            net.prune_level = level
            torch.testing.assert_close(net(x)[0], o)
    net.prune_level = None
    assert net.prune_level == 3
    # deep supervision off: the same parameters, strict reload, the main head only
    inference = cls(**{**kwargs, 'deep_supervision': False})
    inference.load_state_dict(net.state_dict(), strict=True)
    inference.eval()
    torch.testing.assert_close(inference(x), outputs[0])
    inference.decoder.deep_supervision = True  # what nnU-Net's trainer toggles
    assert len(inference(x)) == 3
    for level in (1, 2):
        net.prune_level = level
        out = net(x)
        assert len(out) == level and all(o.shape == (2, 3, *x.shape[2:]) for o in out)
    # training reaches every parameter through the deep-supervision heads
    net.train()
    net.prune_level = None
    sum(o.sum() for o in net(x)).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_anisotropic_strides_use_the_stages_stride_for_upsampling():
    net = ANUNet(**nnunet_kwargs(3))
    assert [tuple(up[0].stride) for up in net.decoder.ups] == [(1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert [tuple(up[0].kernel_size) for up in net.decoder.ups] == [(1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert tuple(net.decoder.nodes['0_1'].convs[0].conv.kernel_size) == (1, 3, 3)
    assert tuple(net.decoder.nodes['1_2'].convs[0].conv.kernel_size) == (3, 3, 3)
    # nnU-Net's per-stage decoder convs (deepest first) map onto the rows
    kwargs = {**nnunet_kwargs(2), 'n_conv_per_stage_decoder': [3, 2, 1]}
    net = ANUNet(**kwargs)
    assert [len(net.decoder.nodes[f'{i}_1'].convs) for i in range(3)] == [1, 2, 3]


def test_five_and_two_stage_plans():
    for n_stages in (2, 5):
        kwargs = nnunet_kwargs(2, n_stages=n_stages)
        kwargs['features_per_stage'] = [4, 8, 16, 16, 16][:n_stages]
        net = ANUNet(**kwargs)
        out = net(torch.randn(1, 2, 32, 32))
        assert len(out) == n_stages - 1 and len(net.decoder.nodes) == n_stages * (n_stages - 1) // 2


# ---------------------------------------------------------------------------------------------------- pruning
def _deeper_only_modules(net, level):
    """Modules used only by levels deeper than ``level``, named from Fig. 7 (not from the network's own
    bookkeeping): encoder stages > level, nodes and gates X_i,k with i + k > level, rows' up-sampling
    for rows >= level, heads of X_0,k for k > level."""
    dec = net.decoder
    modules = list(net.encoder.stages[level + 1:]) + list(dec.ups[level:]) + list(dec.heads[level:])
    for key in list(dec.nodes):
        i, k = map(int, key.split('_'))
        if i + k > level:
            modules.append(dec.nodes[key])
            if key in dec.gates:
                modules.append(dec.gates[key])
    return modules


@pytest.mark.parametrize('ndim', [2, 3])
@pytest.mark.parametrize('deep_supervision', [False, True])
def test_level_j_ignores_deeper_weights_and_does_not_run_them(ndim, deep_supervision):
    torch.manual_seed(0)
    net = ANUNet(**nnunet_kwargs(ndim, deep_supervision)).eval()
    x = _input(ndim)
    for level in (1, 2):
        net.prune_level = level
        with torch.no_grad():
            before = net(x)
            deeper = _deeper_only_modules(net, level)
            calls = []
            hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in deeper]
            for m in deeper:
                for p in m.parameters():
                    p.add_(torch.randn_like(p))
            after = net(x)
            for h in hooks:
                h.remove()
            assert not calls  # real work skipped, not masked
            torch.testing.assert_close(after, before, rtol=0, atol=0)
            # a weight the level does use changes the output
            node = net.decoder.nodes[f'0_{level}'].convs[0].conv
            node.weight.add_(1.0)
            changed = net(x)
            node.weight.sub_(1.0)
            first = (lambda o: o[0]) if deep_supervision else (lambda o: o)
            assert not torch.allclose(first(changed), first(before))
        # the keys the network reports for the level are exactly those of the modules Fig. 7 keeps
        deeper_ids = {id(p) for m in deeper for p in m.parameters()}
        used = set(net.level_state_dict_keys(level))
        for name, p in net.named_parameters():
            assert (name in used) == (id(p) not in deeper_ids), name


@pytest.mark.parametrize('ndim', [2, 3])
@pytest.mark.parametrize('cls', [ANUNet, UNetPlusPlus])
def test_level_built_network_loads_the_levels_weights_strictly(ndim, cls):
    torch.manual_seed(0)
    kwargs = nnunet_kwargs(ndim, deep_supervision=False)
    full = cls(**kwargs).eval()
    x = _input(ndim)
    for level in (1, 2, 3):
        pruned = cls(**kwargs, max_level=level)
        assert pruned.prune_level == level
        state = full.level_state_dict(level)
        assert set(pruned.state_dict()) == set(state)  # construction and key selection agree
        pruned.load_state_dict(state, strict=True)
        pruned.eval()
        full.prune_level = level
        with torch.no_grad():
            torch.testing.assert_close(pruned(x), full(x), rtol=0, atol=0)
            torch.testing.assert_close(full.pruned_copy(level).eval()(x), full(x), rtol=0, atol=0)
        if level < 3:
            assert _n_params(pruned) < _n_params(full)
            with pytest.raises(RuntimeError):  # the full network's weights do not fit
                pruned.load_state_dict(full.state_dict(), strict=True)
    assert _n_params(cls(**kwargs, max_level=3)) == _n_params(full)


def test_bad_levels_are_refused(monkeypatch):
    kwargs = nnunet_kwargs(2)
    net = ANUNet(**kwargs)
    for bad in (0, 4, -1, 2.5, '2', True):
        with pytest.raises(ValueError, match='1..3'):
            net.prune_level = bad
    with pytest.raises(ValueError, match='max_level'):
        ANUNet(**kwargs, max_level=4)
    with pytest.raises(ValueError, match='1..2'):
        ANUNet(**kwargs, max_level=2, prune_level=3)
    with pytest.raises(ValueError, match='1..2'):
        ANUNet(**kwargs, max_level=2).pruned_copy(3)
    with pytest.raises(ValueError, match='at least 2 stages'):
        ANUNet(**{**nnunet_kwargs(2, n_stages=2), 'n_stages': 1, 'features_per_stage': [4], 'kernel_sizes': [[3, 3]],
                  'strides': [[1, 1]], 'n_conv_per_stage_decoder': []})
    with pytest.raises(ValueError, match='attention_channels'):
        ANUNet(**kwargs, attention_channels=[4, 4])
    monkeypatch.setenv(PRUNE_LEVEL_ENV, '2')
    assert ANUNet(**kwargs).prune_level == 2
    assert len(ANUNet(**kwargs)(_input(2))) == 2
    assert ANUNet(**kwargs, prune_level=1).prune_level == 1  # an explicit keyword wins
    for bad in ('4', '0', 'three'):
        monkeypatch.setenv(PRUNE_LEVEL_ENV, bad)
        with pytest.raises(ValueError, match=PRUNE_LEVEL_ENV):
            ANUNet(**kwargs)


# ---------------------------------------------------------------------------------------------------- plans
@pytest.mark.parametrize('arch', ['nnunet_ext.architectures.anunet.ANUNet',
                                  'nnunet_ext.architectures.anunet.UNetPlusPlus'])
def test_built_by_nnunet_from_a_plans_entry(arch):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    arch_kwargs = {  # as nnU-Net writes them into plans.json (3d_fullres, thick slices)
        "n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True}}
    requires_import = ["conv_op", "norm_op", "dropout_op", "nonlin"]
    net = get_network_from_plans(arch, arch_kwargs, requires_import, 1, 2, allow_init=True, deep_supervision=True)
    assert type(net).__module__ + '.' + type(net).__name__ == arch
    assert net.decoder.deep_supervision is True and net.max_level == 2
    x = torch.randn(1, 1, 4, 16, 16)
    out = net(x)
    assert len(out) == 2 and all(o.shape == (1, 2, 4, 16, 16) for o in out)
    inference = get_network_from_plans(arch, arch_kwargs, requires_import, 1, 2, allow_init=True,
                                       deep_supervision=False)
    inference.load_state_dict(net.state_dict(), strict=True)
    net.eval(), inference.eval()
    torch.testing.assert_close(inference(x), net(x)[0])
    # nnU-Net's VRAM estimate counts the nested decoder
    est = net.compute_conv_feature_map_size((4, 16, 16))
    assert est > net.encoder.compute_conv_feature_map_size((4, 16, 16))
