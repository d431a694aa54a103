"""GPU-readiness of the deformable convolution and LFAM (issue 15), checked on CPU:

* one graph under ``torch.compile(fullgraph=True)`` (aot_eager), forward and backward, equal to eager;
* what LFAM keeps for backward (counted with ``saved_tensors_hooks``, unique storages, parameters
  excluded) is at most 3x the skip it aligns; ``deform_conv`` keeps only its arguments;
* no host synchronisation in forward or backward (``bool(tensor)``, ``.item()`` and friends raise);
* finite results under float16 / bfloat16 autocast;
* ``LateralFeatureAlignment.compute_conv_feature_map_size`` against what is measured: the saved tensors
  (hooks) and the transient peak (the profiler's allocation trace).
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn

from nnunet_ext.nn.deformable_conv import DeformableConv, deform_conv
from nnunet_ext.nn.lateral_alignment import LateralFeatureAlignment, SharedKernelSlice, alignment_memory
from host_sync_trap import HostDeviceSync, trap_host_device_sync

SAMPLERS = ['gather', 'grid_sample']


def _conv(ndim):
    return nn.Conv2d if ndim == 2 else nn.Conv3d


def _lfam(ndim, channels=4, guide=3, kernel=3, modulated=True, shared=False, sampler='auto', offset_groups=1, seed=0):
    """An LFAM whose offset predictor is not zero (offsets reach out of the grid and between pixels)."""
    torch.manual_seed(seed)
    deform = None
    if shared:
        bank = DeformableConv(channels + 2, channels + 2, 5, padding=2, ndim=ndim, offset_groups=offset_groups,
                              sampler=sampler)
        deform = SharedKernelSlice(bank, channels, (kernel,) * ndim)
    elif sampler != 'auto':
        deform = DeformableConv(channels, channels, kernel, padding=kernel // 2, ndim=ndim,
                                offset_groups=offset_groups, sampler=sampler)
    module = LateralFeatureAlignment(channels, guide, _conv(ndim), kernel, offset_groups, modulated, deform)
    nn.init.normal_(module.offset_predictor.weight, std=0.2)
    nn.init.normal_(module.offset_predictor.bias, std=0.5)
    return module


def _inputs(ndim, batch=2, channels=4, guide=3, spatial=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    spatial = spatial or ((7, 6) if ndim == 2 else (4, 5, 6))
    skip = torch.randn(batch, channels, *spatial, generator=g).requires_grad_()
    up = torch.randn(batch, guide, *spatial, generator=g).requires_grad_()
    return skip, up


def _grads(module, inputs, out):
    tensors = list(inputs) + [p for p in module.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(2)
    return torch.autograd.grad(out, tensors, torch.randn(out.shape, generator=g))


# ----------------------------------------------------------------------------------------------
# one graph
# ----------------------------------------------------------------------------------------------
def _compiled(fn):
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    counter = CompileCounterWithBackend('aot_eager')
    return torch.compile(fn, backend=counter, fullgraph=True), counter


@pytest.mark.parametrize('ndim', [2, 3])
@pytest.mark.parametrize('variant', ['modulated', 'unmodulated', 'shared', 'grid_sample'])
def test_lfam_compiles_to_one_graph_forward_and_backward(ndim, variant):
    module = _lfam(ndim, modulated=variant != 'unmodulated', shared=variant == 'shared',
                   sampler='grid_sample' if variant == 'grid_sample' else 'auto')
    compiled, counter = _compiled(module)
    for train in (True, False):
        module.train(train)
        skip, up = _inputs(ndim)
        expected = module(skip, up)
        got = compiled(skip, up)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        for a, b in zip(_grads(module, (skip, up), got), _grads(module, (skip, up), expected)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1  # fullgraph: one graph, no break, no recompilation for eval


@pytest.mark.parametrize('ndim', [2, 3])
@pytest.mark.parametrize('sampler', SAMPLERS)
def test_deform_conv_compiles_to_one_graph(ndim, sampler):
    g = torch.Generator().manual_seed(0)
    spatial, kernel = ((6, 7), (3, 3)) if ndim == 2 else ((4, 5, 6), (3, 1, 3))
    K = math.prod(kernel)
    x = torch.randn(2, 4, *spatial, generator=g).requires_grad_()
    offset = (2 * torch.randn(2, ndim * 2 * K, *spatial, generator=g)).requires_grad_()  # 2 offset groups
    mask = torch.rand(2, 2 * K, *spatial, generator=g).requires_grad_()
    module = DeformableConv(4, 6, kernel, padding=tuple(k // 2 for k in kernel), groups=2, offset_groups=2,
                            ndim=ndim, sampler=sampler)

    def fn(x, offset, mask):
        return deform_conv(x, offset, module.weight, module.bias, 1, module.padding, 1, mask, sampler=sampler) \
            + module(x, offset)

    compiled, counter = _compiled(fn)
    got, expected = compiled(x, offset, mask), fn(x, offset, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    tensors = [x, offset, mask, module.weight, module.bias]
    for a, b in zip(torch.autograd.grad(got.square().sum(), tensors), torch.autograd.grad(expected.square().sum(),
                                                                                          tensors)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


# ----------------------------------------------------------------------------------------------
# what is kept for backward
# ----------------------------------------------------------------------------------------------
def _saved_bytes(fn, exclude=()):
    """Unique storages saved for backward while ``fn`` runs (``exclude``: tensors whose storages exist
    anyway, e.g. parameters)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(kept.values())


@pytest.mark.parametrize('ndim', [2, 3])
@pytest.mark.parametrize('modulated', [True, False])
def test_lfam_keeps_at_most_three_times_the_skip(ndim, modulated):
    """C = 32 skip (and guide) channels, kernel 3^n, batch 2: in 3D the offsets alone have 81 channels."""
    module = _lfam(ndim, channels=32, guide=32, modulated=modulated)
    skip, up = _inputs(ndim, channels=32, guide=32, spatial=(16, 16) if ndim == 2 else (6, 8, 8))
    out, saved = _saved_bytes(lambda: module(skip, up), exclude=list(module.parameters()))
    skip_bytes = skip.numel() * skip.element_size()
    assert saved <= 3 * skip_bytes, saved / skip_bytes
    assert saved == 2 * skip_bytes  # exactly skip and up
    out.sum().backward()  # and the backward runs from what was kept
    assert skip.grad is not None and up.grad is not None


@pytest.mark.parametrize('ndim', [2, 3])
def test_deform_conv_keeps_only_its_arguments(ndim):
    g = torch.Generator().manual_seed(0)
    spatial = (10, 9) if ndim == 2 else (5, 6, 7)
    x = torch.randn(2, 8, *spatial, generator=g).requires_grad_()
    module = DeformableConv(8, 8, 3, padding=1, ndim=ndim)
    offset = torch.randn(2, module.offset_channels, *spatial, generator=g).requires_grad_()
    mask = torch.rand(2, module.mask_channels, *spatial, generator=g).requires_grad_()
    _, saved = _saved_bytes(lambda: module(x, offset, mask), exclude=[x, offset, mask, module.weight])
    assert saved == 0  # the im2col tensor (27x the input in 3D) is not kept


# ----------------------------------------------------------------------------------------------
# no host synchronisation
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def no_host_sync():
    """Host-device synchronisations raise while the test runs (on CUDA each would wait for the device)."""
    with trap_host_device_sync():
        yield


@pytest.mark.parametrize('ndim', [2, 3])
@pytest.mark.parametrize('sampler', SAMPLERS)
def test_no_host_synchronisation_in_forward_and_backward(ndim, sampler, no_host_sync):
    module = _lfam(ndim, sampler=sampler, offset_groups=2)
    skip, up = _inputs(ndim)
    module(skip, up).square().sum().backward()
    x = skip.detach().requires_grad_()
    offset = torch.zeros(2, module.deform.offset_channels, *skip.shape[2:], requires_grad=True)
    mask = torch.ones(2, module.deform.mask_channels, *skip.shape[2:], requires_grad=True)
    module.deform(x, offset, mask).sum().backward()
    with pytest.raises(HostDeviceSync):
        bool(skip.sum() > 0)  # the fixture is active


# ----------------------------------------------------------------------------------------------
# mixed precision
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('ndim', [2, 3])
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_autocast_gives_finite_results(ndim, dtype):
    module = _lfam(ndim, channels=8, guide=8)
    skip, up = _inputs(ndim, channels=8, guide=8)
    reference = module(skip, up)
    with torch.autocast('cpu', dtype=dtype):
        out = module(skip, up)
    assert out.dtype == skip.dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out, reference, rtol=0.05, atol=0.05)  # the predictor ran in reduced precision
    grads = _grads(module, (skip, up), out)
    assert all(torch.isfinite(g).all() for g in grads)
    # half-precision features (what a network under autocast hands over)
    with torch.autocast('cpu', dtype=dtype):
        half = module(skip.detach().to(dtype).requires_grad_(), up.detach().to(dtype).requires_grad_())
    assert half.dtype == dtype and torch.isfinite(half.float()).all()
    half.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# the memory estimate against measurements
# ----------------------------------------------------------------------------------------------
def _peak_allocated(fn, tmp_path):
    """Peak of the bytes allocated (and not yet freed) while ``fn`` runs, from the profiler's allocation
    trace, leaving out the convolutions' own scratch buffers (allocated and freed inside one
    ``aten::convolution`` / ``aten::convolution_backward`` call: im2col columns, oneDNN reorders), which
    depend on the backend and which no nnU-Net estimate counts."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    path = os.path.join(tmp_path, 'trace.json')
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)['traceEvents']
    memory = sorted([e for e in events if e.get('name') == '[memory]'], key=lambda e: e['ts'])
    convolutions = [(e['ts'], e['ts'] + e['dur']) for e in events if e.get('ph') == 'X'
                    and e.get('name') in ('aten::convolution', 'aten::convolution_backward')]

    def inside(ts):
        return next((c for c in convolutions if c[0] <= ts <= c[1]), None)

    allocated, scratch = {}, set()
    for i, e in enumerate(memory):
        address, size = e['args']['Addr'], e['args']['Bytes']
        if size > 0:
            allocated[address] = i
        elif address in allocated:
            j = allocated.pop(address)
            if inside(memory[j]['ts']) is not None and inside(memory[j]['ts']) == inside(e['ts']):
                scratch.update((i, j))
    current = peak = 0
    for i, e in enumerate(memory):
        if i not in scratch:
            current += e['args']['Bytes']
            peak = max(peak, current)
    return peak


@pytest.mark.parametrize('ndim,kernel,offset_groups,modulated', [
    (2, 3, 1, True), (3, 3, 1, True), (3, 3, 1, False), (3, (1, 3, 3), 2, True)])
@pytest.mark.parametrize('steps', ['one position per step', 'several positions per step'])
def test_memory_estimate_matches_what_is_measured(ndim, kernel, offset_groups, modulated, steps, tmp_path,
                                                  monkeypatch):
    """``compute_conv_feature_map_size`` (batch 1, elements) = kept + largest temporary. Measured at batch 2
    against ``alignment_memory(..., batch=2)``: the saved tensors exactly; the peak of forward and backward
    (the output, the input gradients and every temporary of the operator, not the convolutions' own
    scratch) within 0.75x - 1.05x of the estimated temporary (forward within ~1%, backward up to ~20%
    above what is measured). Both regimes of the 'gather' sampler: one kernel position per step (large
    maps) and several (small maps, ``positions_per_step``)."""
    import nnunet_ext.nn.deformable_conv.sampling as deformable_sampling
    if steps == 'one position per step':
        monkeypatch.setattr(deformable_sampling, 'STEP_ELEMENTS', 1)
    torch.set_num_threads(1)
    channels, spatial = 32, ((24, 24) if ndim == 2 else (6, 10, 10))
    module = _lfam(ndim, channels=channels, guide=channels, kernel=kernel, offset_groups=offset_groups,
                   modulated=modulated)
    skip, up = _inputs(ndim, batch=2, channels=channels, guide=channels, spatial=spatial)
    assert module.compute_conv_feature_map_size(spatial) == alignment_memory(module, spatial)['total']
    estimate = alignment_memory(module, spatial, batch=2)
    element = skip.element_size()
    out, saved = _saved_bytes(lambda: module(skip, up), exclude=list(module.parameters()))
    assert saved == estimate['kept'] * element
    forward = _peak_allocated(lambda: module(skip, up), tmp_path) / element
    grad = torch.ones_like(out)
    backward = _peak_allocated(lambda: out.backward(grad), tmp_path) / element
    assert 0.75 * estimate['forward'] <= forward <= 1.05 * estimate['forward'], (forward, estimate)
    assert 0.75 * estimate['backward'] <= backward <= 1.05 * estimate['backward'], (backward, estimate)
