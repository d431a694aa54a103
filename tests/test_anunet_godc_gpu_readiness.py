"""GPU readiness of ANU-Net's and GODC's losses and of the nested networks, checked on the CPU:

* no host-device synchronisation: forward and backward run with ``torch.Tensor.__bool__``, ``item``,
  ``tolist``, ``__int__`` and ``__float__`` made to raise (each of those reads a device tensor on the
  host, a synchronisation on CUDA);
* ``torch.compile(..., backend='aot_eager', fullgraph=True)`` captures each as one graph (nnU-Net
  compiles the network and ``loss.dc`` on CUDA; DDP with a zero-weight head needs a single graph) and
  computes what eager mode computes;
* finite values and gradients under ``torch.autocast`` in float16 and bfloat16 (nnU-Net trains in fp16
  autocast on CUDA).
"""
from __future__ import annotations


import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from torch import nn

from nnunet_ext.architectures.anunet import PRUNE_LEVEL_ENV, ANUNet, UNetPlusPlus
from nnunet_ext.losses import GODCLoss, HybridLoss
from nnunet_ext.losses.hybrid import NNUNetTargetHybridLoss
from test_anunet_architecture import nnunet_kwargs
from host_sync_trap import HostDeviceSync, trap_host_device_sync

def _labels(shape, num_classes, gen, ignore_label=None):
    labels = torch.randint(0, num_classes, shape, generator=gen)
    labels[0] = 0  # sample 0: background only
    if ignore_label is not None:
        labels[torch.rand(shape, generator=gen) < 0.2] = ignore_label
    return labels.float()


def _regions(labels, with_ignore_channel):
    """nnU-Net's region target (bool, as its transform makes it): {1, 2}, {2}, then the ignore channel."""
    regions = [(labels == 1) | (labels == 2), labels == 2] + ([labels == 3] if with_ignore_channel else [])
    return torch.cat(regions, 1)


def loss_cases():
    """(name, loss, number of output channels, target maker) for every loss configuration a trainer builds."""
    godc_kwargs = {'smooth': 1e-5, 'ddp': True, 'exponent': 1.0}

    def label_map(shape, gen):
        return _labels(shape, 3, gen)

    def with_ignore(shape, gen):
        return _labels(shape, 3, gen, ignore_label=3)

    def regions_ignore(shape, gen):
        return _regions(_labels(shape, 3, gen, ignore_label=3), True)

    return [
        ('hybrid_softmax', HybridLoss('softmax'), 3, label_map),
        ('hybrid_softmax_batch_dice', HybridLoss('softmax', batch_dice=True), 3, label_map),
        ('hybrid_voxels', HybridLoss('softmax', bce_normalization='voxels'), 3, label_map),
        ('hybrid_sigmoid', HybridLoss('sigmoid', batch_dice=True), 2,
         lambda shape, gen: _regions(label_map(shape, gen), False).float()),
        ('nnunet_hybrid_ignore_label', NNUNetTargetHybridLoss(HybridLoss('softmax', batch_dice=True), ignore_label=3),
         3, with_ignore),
        ('nnunet_hybrid_regions_ignore', NNUNetTargetHybridLoss(HybridLoss('sigmoid'), has_ignore_channel=True), 2,
         regions_ignore),
        ('godc', GODCLoss(apply_nonlin=lambda x: torch.softmax(x, 1), do_bg=False), 3, label_map),
        ('godc_only_ignore_label', DC_and_CE_loss({**godc_kwargs, 'do_bg': False}, {}, weight_ce=0, weight_dice=1,
                                                  ignore_label=3, dice_class=GODCLoss), 3, with_ignore),
        ('godc_ce', DC_and_CE_loss({**godc_kwargs, 'do_bg': False}, {}, weight_ce=1, weight_dice=1,
                                   dice_class=GODCLoss), 3, label_map),
        ('godc_only_regions_ignore', DC_and_BCE_loss({}, {**godc_kwargs, 'do_bg': True}, weight_ce=0, weight_dice=1,
                                                     use_ignore_label=True, dice_class=GODCLoss), 2, regions_ignore),
    ]


CASES = loss_cases()
IDS = [c[0] for c in CASES]


def _inputs(channels, make_target, spatial=(2, 6, 7), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, channels, *spatial, generator=gen)
    return x, make_target((3, 1, *spatial), gen)


@pytest.mark.parametrize('name, loss, channels, make_target', CASES, ids=IDS)
def test_losses_read_no_tensor_on_the_host(monkeypatch, name, loss, channels, make_target):
    x, y = _inputs(channels, make_target)
    x.requires_grad_(True)
    with trap_host_device_sync():
        value = loss(x, y)
        value.backward()
        with pytest.raises(HostDeviceSync):  # the trap is armed
            bool(value > 0)
    assert torch.isfinite(value) and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize('name, loss, channels, make_target', CASES, ids=IDS)
def test_losses_compile_to_one_graph(name, loss, channels, make_target):
    torch._dynamo.reset()
    x, y = _inputs(channels, make_target)
    compiled = torch.compile(loss, backend='aot_eager', fullgraph=True)
    xc, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    value_c, value_e = compiled(xc, y), loss(xe, y)
    value_c.backward()
    value_e.backward()
    torch.testing.assert_close(value_c, value_e)
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('name, loss, channels, make_target', CASES, ids=IDS)
def test_losses_are_finite_under_autocast(name, loss, channels, make_target, dtype):
    """The logits come from a convolution under autocast (half precision, as nnU-Net's network outputs),
    the loss runs inside the same autocast region, the backward outside it."""
    x, y = _inputs(channels, make_target, spatial=(4, 8, 8))
    conv = nn.Conv3d(channels, channels, 1)
    for scale in (1.0, 30.0):  # ordinary and saturated logits
        conv.zero_grad()
        with torch.autocast('cpu', dtype=dtype):
            logits = conv(scale * x)
            assert logits.dtype == dtype
            value = loss(logits, y)
        value.backward()
        assert torch.isfinite(value), (name, dtype, scale)
        assert all(torch.isfinite(p.grad).all() for p in conv.parameters()), (name, dtype, scale)


# ---------------------------------------------------------------------------------------------------- networks
@pytest.fixture(autouse=True)
def _no_prune_env(monkeypatch):
    monkeypatch.delenv(PRUNE_LEVEL_ENV, raising=False)


def _small(cls, ndim, deep_supervision=True):
    torch.manual_seed(0)
    return cls(**nnunet_kwargs(ndim, deep_supervision, n_stages=3))


def _x(ndim, batch=2):
    return torch.randn(batch, 2, *((16, 16) if ndim == 2 else (4, 16, 16)))


def _total(out):
    return sum(o.float().sum() for o in out) if isinstance(out, list) else out.float().sum()


@pytest.mark.parametrize('cls', [ANUNet, UNetPlusPlus])
def test_networks_read_no_tensor_on_the_host(monkeypatch, cls):
    for ndim in (2, 3):
        net = _small(cls, ndim)
        x = _x(ndim)
        with trap_host_device_sync():
            _total(net(x)).backward()
            net.eval()
            net.prune_level = 1
            with torch.no_grad():
                net(x)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize('ndim', [2, 3])
@pytest.mark.parametrize('cls', [ANUNet, UNetPlusPlus])
def test_networks_compile_to_one_graph(cls, ndim):
    """Training (deep supervision, backward) at the full level, then inference at a pruned level."""
    torch._dynamo.reset()
    net = _small(cls, ndim)
    x = _x(ndim)
    compiled = torch.compile(net, backend='aot_eager', fullgraph=True)
    out = compiled(x)
    assert isinstance(out, list) and len(out) == 2
    _total(out).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    _total(net(x)).backward()
    for g, p in zip(grads, net.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)
    net.eval()
    net.decoder.deep_supervision = False
    net.prune_level = 1
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('cls', [ANUNet, UNetPlusPlus])
def test_networks_are_finite_under_autocast(cls):
    """float16, nnU-Net's CUDA autocast dtype. (bfloat16 is left out: PyTorch 2.14's CPU Conv3d under bfloat16
    autocast returns NaN weight gradients now and then on feature maps 2 voxels deep, for nnU-Net's own
    PlainConvUNet too; see test_mll_mln_device_readiness.)"""
    dtype = torch.float16
    for ndim in (2, 3):
        net = _small(cls, ndim)
        with torch.autocast('cpu', dtype=dtype):
            out = net(_x(ndim))
            assert all(o.dtype == dtype for o in out)
            loss = NNUNetTargetHybridLoss(HybridLoss('softmax', batch_dice=True))
            value = sum(loss(o, torch.randint(0, 3, (2, 1, *o.shape[2:])).float()) for o in out)
        value.backward()
        assert torch.isfinite(value)
        assert all(torch.isfinite(p.grad).all() for p in net.parameters())
