"""GPU readiness of the multi-level structural loss (MLL, Eq. 11), the MLN loss (Eq. 13) and the MLN network
(issue 15), checked on the CPU:

- no host-device synchronisation in forward and backward: ``Tensor.__bool__``, ``.item()``, ``.tolist()``,
  ``int()``/``float()`` of a tensor, ``nonzero``/``unique`` and ``torch.tensor``/``torch.as_tensor`` (a
  per-call host-to-device copy) raise while they run;
- finite values and gradients under ``torch.autocast('cpu', float16 / bfloat16)``, in the balanced and
  the literal (millimetre) forms;
- ``torch.compile(backend='aot_eager', fullgraph=True)`` of the MLN network (2D and 3D, training output
  with deep supervision, inference output without) and of both losses, with the eager values.

Not ours: nnU-Net's ``DC_and_CE_loss`` with an ignore label branches on ``num_fg > 0`` (a tensor), a
synchronisation (and a graph break) in the region term; the last test records it. With an ignore label
our terms are checked with a sync-free region term instead.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_ext.losses import BoundaryLoss, StructuralLoss, TermWeights, signed_distance_maps
from nnunet_ext.losses.mln import MLNLoss, MLNTermWeights, SignedDistanceRegressionLoss
from test_mln_architecture import SHAPES, build
from host_sync_trap import HostDeviceSync, trap_host_device_sync

IGNORE = 3
def nnunet_region_loss(ignore_label=None):
    return DC_and_CE_loss({'batch_dice': False, 'smooth': 1e-5, 'do_bg': False, 'ddp': False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=ignore_label, dice_class=MemoryEfficientSoftDiceLoss)


def sync_free_region_loss(logits, labels):
    """CE with the ignore label (stands in for nnU-Net's region term, which synchronises with one)."""
    return F.cross_entropy(logits.float(), labels[:, 0].long(), ignore_index=IGNORE)


def packed(labels: torch.Tensor, spacing, classes=(1, 2)) -> torch.Tensor:
    """``cat([labels, Phi])`` per sample, Phi in the units of ``spacing``."""
    phi = np.stack([signed_distance_maps(l[0].numpy(), list(classes), spacing) for l in labels])
    return torch.cat((labels.float(), torch.from_numpy(phi)), 1)


def case(ndim, ignore=False, spacing=1.0, seed=0, shape=None):
    """A small MLN network, an input batch and packed targets at the network's deep-supervision scales."""
    torch.manual_seed(seed)
    network, _ = build(ndim, mln_num_points=6)
    shape = shape or SHAPES[ndim]
    x = torch.randn(2, 2, *shape)
    labels = torch.randint(0, 3, (2, 1, *shape))
    labels[1][labels[1] == 2] = 0  # class 2 absent from sample 2 (undefined Phi)
    if ignore:
        labels[:, :, :1] = IGNORE
    with torch.no_grad():
        shapes = [o.shape[2:] for o in network(x).region]
    targets = [packed(F.interpolate(labels.float(), size=s, mode='nearest-exact').long(), (spacing,) * ndim)
               for s in shapes]
    return network, x, targets


def mln_loss(ignore=False, normalization='mean'):
    loss = MLNLoss(sync_free_region_loss if ignore else nnunet_region_loss(), ignore_label=IGNORE if ignore else None,
                   deep_supervision_weights=[2 / 3, 1 / 3], distance_loss=SignedDistanceRegressionLoss(normalization))
    loss.weights = MLNTermWeights(1.0, 1.0, 1.0, 1.0)
    return loss


def mll_loss(ignore=False, normalization='mean'):
    loss = StructuralLoss(sync_free_region_loss if ignore else nnunet_region_loss(),
                          ignore_label=IGNORE if ignore else None, deep_supervision_weights=[2 / 3, 1 / 3],
                          boundary_loss=BoundaryLoss(normalization=normalization))
    loss.weights = TermWeights(1.0, 1.0, 1.0)
    return loss


# --- no host-device synchronisation --------------------------------------------------------------------------------
@pytest.mark.parametrize('ignore', [False, True], ids=['labels', 'ignore_label'])
@pytest.mark.parametrize('ndim', [2, 3])
def test_mln_network_and_both_losses_run_without_host_sync(ndim, ignore):
    network, x, targets = case(ndim, ignore)
    mln, mll = mln_loss(ignore), mll_loss(ignore)
    with trap_host_device_sync():
        output = network(x)
        value = mln(output, targets) + mll(output.region, targets)
        value.backward()
        assert output.points.shape == (2, 6, ndim)  # the points' coordinates (voxel centres)
    assert torch.isfinite(value.detach())
    assert all(p.grad is not None for p in network.parameters())
    network.eval()
    network.decoder.deep_supervision = False  # nnU-Net's predictor
    with trap_host_device_sync(), torch.no_grad():
        network(x)


def test_the_mll_loss_with_regions_and_an_ignore_channel_runs_without_host_sync():
    """Region-based training (sigmoid, nnU-Net's Dice + BCE with its ignore channel)."""
    torch.manual_seed(1)
    regions = (torch.rand(2, 2, 12, 10) > 0.5).float()
    ignore = (torch.rand(2, 1, 12, 10) > 0.8).float()
    phi = torch.from_numpy(np.stack([signed_distance_maps(r.numpy(), [[1]], (1.0, 1.0))[0] for r in
                                     regions.reshape(-1, 12, 10)]).reshape(2, 2, 12, 10))
    target = torch.cat((regions, ignore, phi), 1)
    region = DC_and_BCE_loss({}, {'batch_dice': False, 'smooth': 1e-5, 'do_bg': True, 'ddp': False},
                             use_ignore_label=True, dice_class=MemoryEfficientSoftDiceLoss)
    loss = StructuralLoss(region, label_channels=3, use_sigmoid=True, has_ignore_channel=True)
    loss.weights = TermWeights(1.0, 1.0, 1.0)
    logits = torch.randn(2, 2, 12, 10, requires_grad=True)
    with trap_host_device_sync():
        loss(logits, target).backward()
    assert torch.isfinite(logits.grad).all()


# --- mixed precision -------------------------------------------------------------------------------------------
@pytest.mark.parametrize('normalization', ['mean', None], ids=['balanced', 'literal'])
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['float16', 'bfloat16'])
@pytest.mark.parametrize('ndim', [2, 3])
def test_autocast_forward_and_backward_are_finite(ndim, dtype, normalization):
    """nnU-Net trains under autocast; distances of 300 mm per voxel step (Phi^2 ~ 1e6 in the literal form,
    beyond float16) must not overflow: the distance terms are computed in float32.

    The 3D patch is larger than elsewhere: PyTorch 2.14's CPU ``Conv3d`` under bfloat16 autocast returns
    NaN weight gradients now and then when a feature map is 2 voxels deep with 16 channels (a plain
    ``nn.Conv3d(16, 16, 3, padding=1)`` on a (2, 16, 2, 4, 6) input: ~1 run in 3), whatever the loss."""
    network, x, targets = case(ndim, ignore=True, spacing=300.0, shape={2: None, 3: (8, 16, 24)}[ndim])
    mln, mll = mln_loss(True, normalization), mll_loss(True, normalization)
    with torch.autocast('cpu', dtype=dtype):
        output = network(x)
        assert output.fused.dtype == dtype and output.distance.dtype == dtype  # really in low precision
        terms = [mln(output, targets), mll(output.region, targets)]
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in terms)
    sum(terms).backward()
    grads = [p.grad for p in network.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# --- torch.compile, one graph -------------------------------------------------------------------------------------
@pytest.mark.parametrize('ndim', [2, 3])
def test_the_mln_network_compiles_to_one_graph_for_training_and_inference(ndim):
    torch._dynamo.reset()
    network, x, _ = case(ndim)
    compiled = torch.compile(network, backend='aot_eager', fullgraph=True)
    torch.manual_seed(5)
    eager = network(x)
    torch.manual_seed(5)
    traced = compiled(x)  # training mode, deep supervision on: the MLNOutput
    assert type(traced) is type(eager)
    for name in ('distance', 'point_logits', 'point_indices', 'fused'):
        torch.testing.assert_close(getattr(traced, name), getattr(eager, name))
    for a, b in zip(traced.region, eager.region):
        torch.testing.assert_close(a, b)
    traced.fused.square().mean().backward()
    network.eval()
    network.decoder.deep_supervision = False  # nnU-Net's predictor: the fused logits only
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), network(x))


@pytest.mark.parametrize('method', ['MLL', 'MLN'])
def test_both_losses_compile_to_one_graph(method):
    torch._dynamo.reset()
    network, x, targets = case(2)
    loss = mll_loss() if method == 'MLL' else mln_loss()
    with torch.no_grad():
        output = network(x)
    prediction = output.region if method == 'MLL' else output
    compiled = torch.compile(loss, backend='aot_eager', fullgraph=True)
    torch.manual_seed(2)
    value = compiled(prediction, targets)
    torch.manual_seed(2)
    torch.testing.assert_close(value, loss(prediction, targets))


def test_nnunets_region_term_with_an_ignore_label_synchronises():
    """Recorded, not ours: DC_and_CE_loss(ignore_label=...) evaluates ``num_fg > 0`` on the host."""
    logits = torch.randn(1, 3, 6, 6)
    labels = torch.randint(0, 4, (1, 1, 6, 6)).float()
    with trap_host_device_sync(), pytest.raises(HostDeviceSync, match='__bool__'):
        nnunet_region_loss(IGNORE)(logits, labels)
    with trap_host_device_sync():
        nnunet_region_loss()(logits, labels.clamp_max(2))

