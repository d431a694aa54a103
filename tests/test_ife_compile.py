"""IFE networks under nnU-Net's CUDA training setup (issue 15), beyond what test_gpu_readiness.py checks
for every trainer (one graph, DDP, no host sync, float16 autocast on the plain U-Net): the residual-encoder
IFE network compiled with ``fullgraph=True`` gives eager mode's outputs and gradients (train/eval, deep
supervision on/off, 2D/3D, both scores) and does not synchronise host and device; channel selection
(Eq. 3) under fp16/bf16 autocast equals float32's."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from nnunet_ext.architectures.ife_unet import SCORES, IFEPlainConvUNet, IFEResidualEncoderUNet
from nnunet_ext.nn.feature_enhancement import InstructiveFeatureEnhancement
from nnunet_ext.training.architecture_mixins import residual_encoder_kwargs
from test_lfam_architecture import plain_kwargs
from host_sync_trap import trap_host_device_sync

def ife_network(ndim: int, residual: bool, score: str):
    kwargs = plain_kwargs(ndim)
    if residual:  # IFE lives in the decoder; one block per encoder stage keeps compilation short
        kwargs = {**residual_encoder_kwargs(kwargs), 'n_blocks_per_stage': (1,) * kwargs['n_stages']}
    cls = IFEResidualEncoderUNet if residual else IFEPlainConvUNet
    return cls(**kwargs, ife_score=score, ife_stages=(1, 2), ife_ratios=(0.75, 0.5))


def network_input(ndim: int) -> torch.Tensor:
    # 3D: stage 2 is (2, 4, 4), thinner than the curvature kernel (its replicate padding is traced too)
    return torch.randn(2, 2, *((16, 16) if ndim == 2 else (4, 16, 16)))


def as_list(output):
    return list(output) if isinstance(output, (list, tuple)) else [output]


def run(model, net, x, training: bool):
    """Outputs (and, training, the parameters' gradients of a loss on every output) of ``model``."""
    net.zero_grad(set_to_none=True)
    if not training:
        with torch.no_grad():
            return [o.detach() for o in as_list(model(x))], {}
    outputs = as_list(model(x))
    sum(o.float().square().mean() for o in outputs).backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()}
    return [o.detach() for o in outputs], grads


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_compiled_is_eager(net, compiled, x, training: bool, deep_supervision: bool):
    net.train(training)
    net.decoder.deep_supervision = deep_supervision  # as nnU-Net's trainer toggles it
    eager_out, eager_grads = run(net, net, x, training)
    compiled_out, compiled_grads = run(compiled, net, x, training)
    assert len(compiled_out) == len(eager_out) == (3 if deep_supervision else 1)
    for a, b in zip(compiled_out, eager_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert eager_grads.keys() == compiled_grads.keys()
    for name, grad in eager_grads.items():
        if grad is None:  # heads of the other scales without deep supervision
            assert compiled_grads[name] is None, name
        else:
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize('score', ['curvature', 'entropy'])
@pytest.mark.parametrize('ndim', [2, 3])
def test_training_step_compiles_to_one_graph_with_eager_results(ndim, score, fresh_dynamo):
    """nnU-Net's training step: train mode, deep supervision; outputs and every gradient."""
    torch.manual_seed(0)
    net = ife_network(ndim, True, score)
    compiled = torch.compile(net, backend='aot_eager', fullgraph=True)  # a graph break raises
    x = network_input(ndim)
    assert_compiled_is_eager(net, compiled, x, training=True, deep_supervision=True)
    # nnU-Net leaves the zero-weight lowest head out of the loss; in one graph its parameters still
    # get (zero) gradients, which DDP without find_unused_parameters needs
    net.zero_grad(set_to_none=True)
    sum(o.square().mean() for o in compiled(x)[:-1]).backward()
    lowest_head = net.decoder.seg_layers[0]
    assert all(p.grad is not None for p in net.parameters())
    assert all(not p.grad.any() for p in lowest_head.parameters())


@pytest.mark.parametrize('score', ['curvature', 'entropy'])
def test_other_modes_compile_to_one_graph_with_eager_results(score, fresh_dynamo):
    """Train/eval with deep supervision on/off (each a recompilation of the same compiled network)."""
    torch.manual_seed(0)
    net = ife_network(2, False, score)
    compiled = torch.compile(net, backend='aot_eager', fullgraph=True)
    x = network_input(2)
    for training, deep_supervision in ((True, False), (False, True), (False, False)):
        assert_compiled_is_eager(net, compiled, x, training, deep_supervision)


# --------------------------------------------------------------------------------- host synchronisation
@pytest.mark.parametrize('score', ['curvature', 'entropy'])
@pytest.mark.parametrize('residual', [False, True], ids=['plain', 'residual'])
@pytest.mark.parametrize('ndim', [2, 3])
def test_forward_and_backward_do_not_synchronise_host_and_device(ndim, residual, score):
    torch.manual_seed(0)
    net = ife_network(ndim, residual, score)
    x = network_input(ndim)
    with trap_host_device_sync():
        outputs = net(x)
        sum(o.square().mean() for o in outputs).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_curvature_kernels_are_non_persistent_buffers():
    """The kernels move with the network (no copy per call) but stay out of its state_dict, so
    checkpoints written before they were buffers load strictly."""
    net = ife_network(2, False, 'curvature')
    score = net.decoder.enhancers['1'].score
    assert {n for n, _ in score.named_buffers()} == {'kernel_2d', 'kernel_3d'}
    assert not any('kernel' in key for key in net.state_dict())
    net.to(torch.float64)
    assert score.kernel_2d.dtype == torch.float64
    out = net(network_input(2).double())
    assert all(o.dtype == torch.float64 for o in out)


# ----------------------------------------------------------------------------------------------- autocast
def near_tied_channels(spatial):
    """Channels that are one pattern scaled by 1 + 2e-4 * (a permutation of 0..15) per sample:
    float32 curvature orders them by scale; fp16/bf16 arithmetic cannot tell them apart."""
    torch.manual_seed(0)
    base = torch.randn(2, 1, *spatial)
    scale = 1 + 2e-4 * torch.stack([torch.randperm(16), torch.randperm(16)]).float()
    return base * scale.view(2, 16, *([1] * len(spatial))), scale


def textured_channels(spatial):
    torch.manual_seed(1)
    amplitude = torch.linspace(0.2, 3, 16).view(1, 16, *([1] * len(spatial)))
    return torch.randn(2, 16, *spatial) * amplitude + torch.randn(2, 1, *spatial)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['fp16', 'bf16'])
@pytest.mark.parametrize('spatial', [(12, 10), (4, 9, 8)])
@pytest.mark.parametrize('score', ['curvature', 'entropy'])
def test_selection_under_autocast_is_float32s(score, spatial, dtype):
    conv = F.conv2d if len(spatial) == 2 else F.conv3d
    with torch.autocast('cpu', dtype=dtype):  # autocast is active on CPU convolutions
        assert conv(torch.randn(1, 1, *[3] * len(spatial)), torch.randn(1, 1, *[3] * len(spatial))).dtype == dtype
    ife = InstructiveFeatureEnhancement(SCORES[score](), 0.5, channels=16)
    near, scale = near_tied_channels(spatial)
    if score == 'curvature':  # proportional channels: the score is proportional to the scale
        assert torch.equal(ife.selection(near), scale.argsort(1, descending=True)[:, :8])
    for x in (near, textured_channels(spatial)):
        reference = ife.selection(x)
        with torch.autocast('cpu', dtype=dtype):
            scores = ife.score(x)
            selection = ife.selection(x)
            enhanced = ife(x.to(dtype))
        assert scores.dtype == torch.float32
        assert torch.equal(selection, reference)
        # features arriving in fp16/bf16 (as a network under autocast produces them) keep their dtype
        assert enhanced.dtype == dtype and enhanced.shape[1] == 24
