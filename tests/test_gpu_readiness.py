"""Every network and loss of ours under nnU-Net's CUDA defaults, with CPU stand-ins (issue: GPU-ready).

* one graph: ``torch.compile(fullgraph=True)``, 2D and 3D, training and inference mode;
* ``DDP(compiled network, find_unused_parameters=False)`` over gloo with two processes, the loss as
  nnU-Net builds it on CUDA (lowest deep-supervision weight 0): every parameter gets a gradient in
  every step, and where the loss is global (nnU-Net's batch Dice, GODC's union normalisation, the
  hybrid loss's batch Dice) the gradients equal one process on the concatenated batch;
* no host-device synchronisation in forward, loss or backward (a trap on the calls that wait);
* mixed precision: forward and backward under CPU autocast are finite: float16 (nnU-Net's CUDA dtype) in 2D
  and 3D, bfloat16 in 2D.

The trainers, plans and batches are in ``trainer_helpers.py`` (the tiny hand-written plans).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.multiprocessing as mp

import trainer_helpers as h
from ddp_gpu_readiness_worker import STEPS, worker
from host_sync_trap import HostDeviceSync, trap_host_device_sync

# losses whose value is a mean of per-sample terms with batch statistics made global: under DDP, the
# averaged gradients equal those of one process on the whole batch (nnU-Net's Dice all-gathers its sums)
GLOBAL_LOSS_TRAINERS = ('nnUNetTrainerGODC', 'nnUNetTrainerGODCOnly', 'nnUNetTrainerGODCLFAM',
                        'nnUNetTrainerLFAMResEnc', 'nnUNetTrainerLFAMShared', 'nnUNetTrainerIFECurvature',
                        'nnUNetTrainerGODCIFEEntropy', 'nnUNetTrainerANUNet', 'nnUNetTrainerUNetPlusPlus',
                        'nnUNetTrainerResUNet', 'nnUNetTrainerResUNetGODCLFAM')
# the multi-level trainers draw random points (Eq. 10's PointRend sampling): different draws per process

# under DDP: every network class once, each in the 2d configuration; left out, a trainer whose network and loss
# are made of another listed trainer's parts: MLL's and GODCOnly's network is GODC's (GODCOnly's loss is GODC's
# without the cross-entropy), UNet++'s is ANU-Net's without gates, IFE curvature's is IFE entropy's module with
# another score, the plain residual U-Net is inside ResUNetGODCLFAM's, LFAMResEnc is nnU-Net's residual encoder
# with GODCLFAM's alignments, and the ANU-Net paper's network is ANU-Net's with max-pooling and a fixed topology
# (the ResUNet paper's network, residual units with BatchNorm, stays: the one network with BatchNorm)
DDP_TRAINERS = tuple(n for n in h.TRAINERS if n not in ('nnUNetTrainerMLL', 'nnUNetTrainerGODCOnly',
                                                         'nnUNetTrainerUNetPlusPlus', 'nnUNetTrainerIFECurvature',
                                                         'nnUNetTrainerResUNet', 'nnUNetTrainerLFAMResEnc',
                                                         'nnUNetTrainerANUNetPaper'))


@pytest.fixture(autouse=True)
def quiet_and_roomy():
    """No warnings; room in dynamo's cache for the graphs of every test of the module (its recompile limit,
    8, is per code object: nnU-Net's compiled Dice loss recompiles for each shape and autocast dtype; the
    networks of other tests must not use it up). Compiled graphs are kept from test to test: compiling
    nnU-Net's Dice loss again for each trainer takes seconds and tests nothing new (the one-graph test starts
    from an empty cache)."""
    with warnings.catch_warnings(), torch._dynamo.config.patch(recompile_limit=256,
                                                               accumulated_recompile_limit=4096):
        warnings.simplefilter('ignore')
        yield


def test_ddp_two_processes_every_parameter_gets_a_gradient(nnunet_folders, tmp_path):
    results = mp.Manager().dict()
    mp.spawn(worker, args=(2, str(tmp_path / 'init'), '2d', DDP_TRAINERS, nnunet_folders, results), nprocs=2,
             join=True)
    failures = {name: results[(rank, name)]['error'] for rank in (0, 1) for name in DDP_TRAINERS
                if 'error' in results[(rank, name)]}
    assert not failures, '\n\n'.join(f'{name}:\n{tb}' for name, tb in failures.items())
    for name in DDP_TRAINERS:
        for rank in (0, 1):
            out = results[(rank, name)]
            assert out['missing'] == [[]] * STEPS, f'{name}: parameters without gradient: {out["missing"]}'
            assert all(torch.isfinite(torch.tensor(out['losses']))), (name, out['losses'])
        if name in GLOBAL_LOSS_TRAINERS:
            out = results[(0, name)]
            expected = single_process_gradients(name, out['initial'], out['batch'])
            assert set(expected) <= set(out['grads'])
            for key in set(out['grads']) - set(expected):  # the zero-weight head: eager skips it
                assert not out['grads'][key].any(), f'{name} {key}: a zero-weight head got a non-zero gradient'
            for key, grad in expected.items():
                torch.testing.assert_close(out['grads'][key], grad, rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f'{name} {key}: DDP gradient != one process: {m}')


def single_process_gradients(name: str, state: dict, batch: dict) -> dict:
    """The oracle: one process (no DDP, not compiled) on the whole batch, the same loss as nnU-Net builds it."""
    trainer, network, loss = h.build(name, '2d', compile_network=False)
    assert not trainer.is_ddp
    network.load_state_dict(state)
    h.forward_loss(network, loss, batch).backward()
    return {n: p.grad for n, p in network.named_parameters() if p.grad is not None}


# networks whose 3D training graph (aot_eager, fullgraph, backward) a dedicated test compiles already:
# test_anunet_godc_gpu_readiness.py (ANU-Net), test_mll_mln_device_readiness.py (MLN), test_ife_compile.py (IFE,
# both scores); the residual encoders with deformable skips: their 3D deformable alignment is GODCLFAM's (compiled
# here in 3D), their encoders are nnU-Net's residual encoder (LFAMResEnc: nnU-Net compiles it on CUDA itself) and our
# pre-activation units (ResUNetGODCLFAM: trained compiled in 2D by the DDP test)
TRAINING_GRAPH_3D_TESTED_ELSEWHERE = ('nnUNetTrainerANUNet', 'nnUNetTrainerMLN', 'nnUNetTrainerIFECurvature',
                                      'nnUNetTrainerGODCIFEEntropy', 'nnUNetTrainerLFAMResEnc',
                                      'nnUNetTrainerResUNetGODCLFAM')


@pytest.mark.parametrize('name, configuration',
                         h.cases(['2d', '3d_fullres'], [n for n in h.TRAINERS if n not in h.SAME_NETWORK_AS_GODC]))
def test_one_graph_in_training_and_inference(nnunet_folders, name, configuration):
    """``fullgraph=True`` fails on any graph break. Training mode on ``aot_eager`` (traces the backward too;
    2D training is the DDP test's, some 3D networks' the dedicated tests' above), inference mode
    (``network.eval()``, deep supervision off as nnU-Net's predictor builds it) on dynamo alone; the outputs
    equal the eager network's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    trainer, network, loss = h.build(name, configuration, compile_network=False)
    batch = h.make_batch(trainer)
    if configuration != '2d' and name not in TRAINING_GRAPH_3D_TESTED_ELSEWHERE:
        compiled = h.aot_eager_compile(network, fullgraph=True)
        h.forward_loss(compiled, loss, batch).backward()
        assert h.parameters_without_gradient(network) == []  # the zero-weight head gets a zero gradient

    predictor_network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                                           trainer.label_manager.num_segmentation_heads, False)
    predictor_network.load_state_dict(network.state_dict())
    predictor_network.eval()
    with torch.no_grad():
        expected = predictor_network(batch['data'])
        got = torch.compile(predictor_network, backend='eager', fullgraph=True)(batch['data'])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize('name, configuration', h.cases(['2d', '3d_fullres']))
def test_no_host_device_sync_in_a_training_step(nnunet_folders, name, configuration):
    torch.manual_seed(0)
    trainer, network, loss = h.build(name, configuration, compile_network=False)
    batch = h.make_batch(trainer)
    h.forward_loss(network, loss, batch).backward()  # the first call compiles nnU-Net's loss.dc (not a step)
    with trap_host_device_sync():
        value = h.forward_loss(network, loss, batch)
        value.backward()
    assert torch.isfinite(value)


def test_the_trap_catches_a_sync():
    t = torch.ones(3)
    for call in (lambda: bool(t.sum() > 0), lambda: t.sum().item(), lambda: t.nonzero(), lambda: torch.unique(t),
                 lambda: torch.tensor([1, 2]), lambda: [0, 1][t[0].long()], lambda: t.tolist(), lambda: float(t[0]),
                 lambda: torch.masked_select(t, t > 0)):
        with trap_host_device_sync(), pytest.raises(HostDeviceSync):
            call()
    assert bool(t.sum() > 0) and torch.tensor([1]).item() == 1  # restored


# float16 is nnU-Net's CUDA autocast dtype (nnU-Net autocasts on CUDA only, and never to bfloat16). bfloat16
# for the networks with numerics of their own (deformable sampling, curvature/entropy, point attention,
# attention gates), in 2D: PyTorch 2.14's CPU Conv3d under bfloat16 autocast returns NaN weight gradients
# now and then on feature maps 2 voxels deep (these plans' deepest 3D stage), for nnU-Net's own PlainConvUNet
# too; 3D bfloat16 is checked on deeper maps in test_mll_mln_device_readiness.py and
# test_deformable_conv_memory.py.
BFLOAT16_2D = ('nnUNetTrainerGODCLFAM', 'nnUNetTrainerIFECurvature', 'nnUNetTrainerMLN', 'nnUNetTrainerANUNet')
# float16 in 2D only for the residual encoders with deformable skips: in 3D their own numerics, the deformable
# sampling, are GODCLFAM's (checked in 3D), the rest is convolution and normalisation
FLOAT16_2D_ONLY = ('nnUNetTrainerLFAMResEnc', 'nnUNetTrainerResUNetGODCLFAM')


@pytest.mark.parametrize('name, configuration, dtype', [
    pytest.param(n, c, d, id=f'{n}-{c}-{str(d).split(".")[-1]}')
    for n, c in h.cases(['2d', '3d_fullres']) for d in (torch.float16, torch.bfloat16)
    if (d == torch.float16 and (c == '2d' or n not in FLOAT16_2D_ONLY)) or (c == '2d' and n in BFLOAT16_2D)])
def test_mixed_precision_is_finite(nnunet_folders, name, configuration, dtype):
    torch.manual_seed(0)
    trainer, network, loss = h.build(name, configuration, compile_network=False)
    batch = h.make_batch(trainer)
    with torch.autocast('cpu', dtype=dtype):
        value = h.forward_loss(network, loss, batch)
    assert torch.isfinite(value), f'{name}: loss {value} under {dtype} autocast'
    value.backward()
    bad = [n for n, p in network.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f'{name}: non-finite gradients under {dtype} autocast: {bad[:5]}'
