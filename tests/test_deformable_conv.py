"""Unit tests of the pure-PyTorch deformable convolution (``nnunet_ext.nn.deformable_conv``), the operator of
LFAM (Fig. 2 of ``docs/methods/godc-lfam.md``; DCNv1 of Dai et al. 2017, modulated
DCNv2 of Zhu et al. 2019), against independent oracles:

* ``F.conv2d`` / ``F.conv3d``: zero offsets and unit mask; integer offsets equal a conv of the shifted,
  zero-filled input; a half-pixel offset the mean of the two neighbouring integer shifts; an offset or a mask
  on a single kernel position a conv with the weight split between that position and the others (pins the
  channel layout ``ndim * (g * K + k) + axis``).
* a naive Python loop with bilinear / trilinear sampling written here (torchvision's rules: zero outside,
  a point at -1 or ``size`` reads zero), random offsets reaching outside the image, random mask, groups
  and offset groups.
* ``torch.autograd.gradcheck`` (input, offsets, mask, weight, bias; 2D and 3D, groups and offset groups).
* ``torchvision.ops.deform_conv2d`` (values and gradients) when it runs here.

Both samplers (``'gather'``: embedding-bag gathers and a sorted transposed bag, the CPU default;
``'grid_sample'``: ``F.grid_sample`` and its aten backward, the default elsewhere) meet the oracles.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ext.nn.deformable_conv import DeformableConv, deform_conv, deform_conv_output_size
from nnunet_ext.nn.lateral_alignment import SharedKernelSlice


F64 = torch.float64
TOL = dict(rtol=0, atol=1e-10)


@pytest.fixture(params=['gather', 'gather-one-position-per-step', 'grid_sample'])
def sampler(request, monkeypatch):
    """Both samplers; the 'gather' sampler in its two regimes: several kernel positions per step (small
    maps such as these tests': ``positions_per_step``) and one (large maps; forced here)."""
    import nnunet_ext.nn.deformable_conv.sampling as deformable_sampling
    if request.param == 'gather-one-position-per-step':
        monkeypatch.setattr(deformable_sampling, 'STEP_ELEMENTS', 1)
        return 'gather'
    return request.param


def _out_size(spatial, kernel, stride, padding, dilation):
    """Conv output size computed independently of the module under test."""
    n = len(spatial)
    t = lambda v: (v,) * n if isinstance(v, int) else tuple(v)
    return tuple((s + 2 * p - d * (k - 1) - 1) // st + 1
                 for s, k, st, p, d in zip(spatial, kernel, t(stride), t(padding), t(dilation)))


def _rand(*shape, gen, low=-1.0, high=1.0):
    return torch.rand(*shape, generator=gen, dtype=F64) * (high - low) + low


def _problem(spatial, cin, cout, kernel, groups=1, offset_groups=1, stride=1, padding=0, dilation=1, batch=2,
             seed=0, offset_range=2.5, fractional=False):
    """Random input, weight, bias, offsets and mask (float64). ``fractional``: every sampling coordinate has
    a fractional part in [0.1, 0.9] (no kinks of the interpolation, for gradcheck)."""
    g = torch.Generator().manual_seed(seed)
    n = len(spatial)
    K = math.prod(kernel)
    out = _out_size(spatial, kernel, stride, padding, dilation)
    x = _rand(batch, cin, *spatial, gen=g)
    w = _rand(cout, cin // groups, *kernel, gen=g)
    b = _rand(cout, gen=g)
    shape = (batch, n * offset_groups * K, *out)
    if fractional:
        off = torch.randint(-2, 2, shape, generator=g).to(F64) + _rand(*shape, gen=g, low=0.1, high=0.9)
    else:
        off = _rand(*shape, gen=g, low=-offset_range, high=offset_range)
    m = _rand(batch, offset_groups * K, *out, gen=g, low=0.0, high=1.0)
    return x, off, w, b, m


# ----------------------------------------------------------------------------------------------
# naive oracle (plain Python floats, torchvision's sampling rules)
# ----------------------------------------------------------------------------------------------
def _naive_sample(img, pos):
    """Multilinear interpolation of ``img`` (numpy, n axes) at ``pos``; neighbours outside count as zero."""
    size = img.shape
    if any(p <= -1 or p >= s for p, s in zip(pos, size)):
        return 0.0
    low = [math.floor(p) for p in pos]
    val = 0.0
    for corner in itertools.product((0, 1), repeat=len(pos)):
        idx = tuple(l + c for l, c in zip(low, corner))
        if not all(0 <= i < s for i, s in zip(idx, size)):
            continue
        wgt = 1.0
        for p, l, c in zip(pos, low, corner):
            frac = p - l
            wgt *= frac if c else 1.0 - frac
        val += wgt * float(img[idx])
    return val


def naive_deform_conv(x, off, w, b, stride, padding, dilation, mask):
    x, off, w, b = (t.detach().numpy() for t in (x, off, w, b))
    mask = None if mask is None else mask.detach().numpy()
    B, C = x.shape[:2]
    n = x.ndim - 2
    O, Cg = w.shape[:2]
    kernel = w.shape[2:]
    K = math.prod(kernel)
    groups = C // Cg
    G = off.shape[1] // (n * K)
    out = _out_size(x.shape[2:], kernel, stride, padding, dilation)
    t = lambda v: (v,) * n if isinstance(v, int) else tuple(v)
    stride, padding, dilation = t(stride), t(padding), t(dilation)
    y = np.zeros((B, O, *out))
    for bi in range(B):
        for po in itertools.product(*(range(s) for s in out)):
            # sample every (channel, kernel position) once
            cols = np.zeros((C, K))
            for c in range(C):
                gi = c // (C // G)
                for k, kk in enumerate(itertools.product(*(range(s) for s in kernel))):
                    pos = [po[i] * stride[i] - padding[i] + kk[i] * dilation[i]
                           + float(off[(bi, n * (gi * K + k) + i) + po]) for i in range(n)]
                    m = 1.0 if mask is None else float(mask[(bi, gi * K + k) + po])
                    cols[c, k] = m * _naive_sample(x[bi, c], pos)
            for o in range(O):
                gc = o // (O // groups)
                acc = float(b[o])
                for cl in range(Cg):
                    for k in range(K):
                        acc += float(w[o, cl].reshape(-1)[k]) * cols[gc * Cg + cl, k]
                y[(bi, o) + po] = acc
    return torch.from_numpy(y)


# ----------------------------------------------------------------------------------------------
# zero offsets == convolution
# ----------------------------------------------------------------------------------------------
CONV_CASES = [  # spatial, cin, cout, kernel, groups, offset_groups, stride, padding, dilation
    ((7, 6), 3, 4, (3, 3), 1, 1, 1, 0, 1),
    ((8, 7), 4, 6, (3, 3), 2, 2, 2, 1, 1),
    ((9, 8), 4, 4, (3, 2), 4, 1, (2, 1), (2, 0), (1, 2)),
    ((1, 6), 2, 3, (1, 3), 1, 2, 1, (0, 1), 1),  # size-1 axis
    ((5, 6, 4), 2, 3, (3, 3, 3), 1, 1, 1, 1, 1),
    ((6, 5, 7), 4, 4, (3, 2, 3), 2, 4, (2, 1, 2), (1, 0, 2), (1, 2, 1)),
    ((1, 5, 4), 2, 2, (1, 3, 3), 1, 1, 1, (0, 1, 1), 1),  # size-1 depth
]


@pytest.mark.parametrize('case', CONV_CASES, ids=lambda c: f"{len(c[0])}d-{c}")
@pytest.mark.parametrize('with_mask', [False, True])
def test_zero_offsets_equal_conv(case, with_mask):
    spatial, cin, cout, kernel, groups, og, stride, padding, dilation = case
    x, off, w, b, m = _problem(spatial, cin, cout, kernel, groups, og, stride, padding, dilation)
    conv = F.conv2d if len(spatial) == 2 else F.conv3d
    ref = conv(x, w, b, stride, padding, dilation, groups)
    got = deform_conv(x, torch.zeros_like(off), w, b, stride, padding, dilation,
                      mask=torch.ones_like(m) if with_mask else None)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, **TOL)


def test_zero_offsets_float32_and_constant_mask():
    x, off, w, b, m = _problem((10, 9), 4, 5, (3, 3), padding=1)
    ref = F.conv2d(x, w, None, padding=1)
    half = deform_conv(x, torch.zeros_like(off), w, None, padding=1, mask=torch.full_like(m, 0.5))
    torch.testing.assert_close(half, 0.5 * ref, **TOL)
    got32 = deform_conv(x.float(), torch.zeros_like(off).float(), w.float(), b.float(), padding=1)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32, F.conv2d(x.float(), w.float(), b.float(), padding=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_reduced_precision_samples_exact_positions(dtype):
    """Grid coordinates in half precision would be off by ~0.15 px (float16) to ~1 px (bfloat16) at width
    300; sampling must stay at the integer positions (up to float32 rounding of the coordinates)."""
    x = torch.randn(1, 1, 2, 300, generator=torch.Generator().manual_seed(0)).to(dtype)
    w = torch.ones(1, 1, 1, 1, dtype=dtype)
    tol = dict(rtol=1e-2, atol=1e-2)
    y = deform_conv(x, torch.zeros(1, 2, 2, 300, dtype=dtype), w)
    assert y.dtype == dtype
    torch.testing.assert_close(y, x, **tol)
    y = deform_conv(x, _const_offset(torch.zeros(1, 2, 2, 300), (0, -3)), w)  # float32 offsets
    torch.testing.assert_close(y[..., 3:], x[..., :-3], **tol)


# ----------------------------------------------------------------------------------------------
# integer and half-pixel shifts == shifted convolution
# ----------------------------------------------------------------------------------------------
def _shifted_conv(x, w, b, shift, stride=1, padding=0, dilation=1):
    """Conv whose every tap reads ``x`` at ``p * stride - padding + k * dilation + shift`` (zeros outside ``x``),
    built from ``F.conv2d`` / ``F.conv3d`` on an explicitly zero-padded, shifted crop (no grid_sample)."""
    n = x.ndim - 2
    t = lambda v: (v,) * n if isinstance(v, int) else tuple(v)
    padding = t(padding)
    M = max(padding) + max(abs(s) for s in shift) + 1
    big = F.pad(x, [M] * (2 * n))
    crop = (slice(None), slice(None)) + tuple(slice(M - p + s, None) for p, s in zip(padding, shift))
    out = _out_size(x.shape[2:], w.shape[2:], stride, padding, dilation)
    y = (F.conv2d if n == 2 else F.conv3d)(big[crop], w, b, stride, 0, dilation)
    return y[(slice(None), slice(None)) + tuple(slice(0, o) for o in out)]


def _const_offset(off, shift):
    n = len(shift)
    o = torch.zeros_like(off)
    for i, s in enumerate(shift):
        o[:, i::n] = s
    return o


@pytest.mark.parametrize('shift,stride,padding,dilation', [
    ((1, -2), 1, 1, 1), ((1, -2), 2, (2, 1), (1, 2)), ((-1, 2, 1), 1, 1, 1), ((2, 0, -1), (1, 2, 1), 1, (2, 1, 1))])
def test_integer_offset_equals_shifted_conv(shift, stride, padding, dilation):
    n = len(shift)
    spatial = (8, 9) if n == 2 else (5, 6, 7)
    kernel = (3, 3) if n == 2 else (3, 2, 3)
    x, off, w, b, m = _problem(spatial, 4, 3, kernel, groups=1, offset_groups=2, stride=stride, padding=padding,
                               dilation=dilation)
    ref = _shifted_conv(x, w, b, shift, stride, padding, dilation)
    got = deform_conv(x, _const_offset(off, shift), w, b, stride, padding, dilation)
    torch.testing.assert_close(got, ref, **TOL)


def test_half_pixel_offset_is_mean_of_neighbour_shifts():
    x, off, w, b, m = _problem((7, 8), 3, 4, (3, 3), padding=1)
    got = deform_conv(x, _const_offset(off, (0.5, -1.5)), w, b, padding=1)
    ref = sum(_shifted_conv(x, w, b, s, padding=1) for s in ((0, -1), (1, -1), (0, -2), (1, -2))) / 4
    torch.testing.assert_close(got, ref, **TOL)
    got_y = deform_conv(x, _const_offset(off, (0.5, 0)), w, b, padding=1)
    ref_y = 0.5 * (F.conv2d(x, w, b, padding=1) + _shifted_conv(x, w, b, (1, 0), padding=1))
    torch.testing.assert_close(got_y, ref_y, **TOL)


@pytest.mark.parametrize('n', [2, 3])
def test_single_kernel_position_layout(n):
    """Offset and mask on kernel position k only: the conv splits into position k (shifted / scaled) plus
    the rest, which pins the channel order ``n * (g * K + k) + axis`` and ``g * K + k``."""
    spatial = (7, 8) if n == 2 else (5, 6, 7)
    kernel = (3, 2) if n == 2 else (2, 3, 2)
    shift = (1, -2) if n == 2 else (1, -1, 2)
    K = math.prod(kernel)
    k = 4
    x, off, w, b, m = _problem(spatial, 2, 3, kernel, padding=1)
    conv = F.conv2d if n == 2 else F.conv3d
    onehot = torch.zeros(K, dtype=F64)
    onehot[k] = 1
    wk = w * onehot.view(1, 1, *kernel)
    offset = torch.zeros_like(off)
    for i, s in enumerate(shift):
        offset[:, n * k + i] = s
    ref = _shifted_conv(x, wk, b, shift, padding=1) + conv(x, w - wk, None, padding=1)
    torch.testing.assert_close(deform_conv(x, offset, w, b, padding=1), ref, **TOL)
    mask = torch.ones_like(m)
    mask[:, k] = 0.25
    ref = conv(x, w - 0.75 * wk, b, padding=1)
    torch.testing.assert_close(deform_conv(x, torch.zeros_like(off), w, b, padding=1, mask=mask), ref, **TOL)


def test_3d_depth1_kernel_equals_per_slice_2d():
    g = torch.Generator().manual_seed(3)
    B, C, O, D, H, W = 2, 4, 3, 3, 6, 5
    kernel2 = (3, 3)
    K = 9
    x = _rand(B, C, D, H, W, gen=g)
    w = _rand(O, C, 1, *kernel2, gen=g)
    b = _rand(O, gen=g)
    off2 = _rand(B, 2 * 2 * K, D, H, W, gen=g, low=-2, high=2)  # offset_groups=2, padding 1 keeps H, W
    mask = _rand(B, 2 * K, D, H, W, gen=g, low=0, high=1)
    off3 = torch.zeros(B, 3 * 2 * K, D, H, W, dtype=F64)
    off3[:, 1::3] = off2[:, 0::2]
    off3[:, 2::3] = off2[:, 1::2]
    got = deform_conv(x, off3, w, b, padding=(0, 1, 1), mask=mask)
    for d in range(D):
        ref = deform_conv(x[:, :, d], off2[:, :, d], w[:, :, 0], b, padding=1, mask=mask[:, :, d])
        torch.testing.assert_close(got[:, :, d], ref, **TOL)


# ----------------------------------------------------------------------------------------------
# random offsets == naive loop
# ----------------------------------------------------------------------------------------------
NAIVE_CASES = [  # spatial, cin, cout, kernel, groups, offset_groups, stride, padding, dilation, mask
    ((5, 6), 4, 4, (3, 3), 2, 2, 1, 1, 1, True),
    ((6, 5), 2, 3, (2, 3), 1, 1, (2, 1), (0, 1), (2, 1), False),
    ((4, 5, 4), 4, 2, (2, 3, 2), 2, 2, 1, (0, 1, 1), 1, True),
    ((3, 4, 5), 2, 2, (2, 2, 2), 1, 1, (1, 2, 1), 0, (1, 1, 2), False),
]


@pytest.mark.parametrize('case', NAIVE_CASES, ids=lambda c: f"{len(c[0])}d-{c}")
def test_random_offsets_match_naive_loop(case, sampler):
    spatial, cin, cout, kernel, groups, og, stride, padding, dilation, with_mask = case
    x, off, w, b, m = _problem(spatial, cin, cout, kernel, groups, og, stride, padding, dilation, seed=7,
                               offset_range=3.0)
    n = len(spatial)
    # a few points exactly on and just inside the -1 / size borders
    pad0 = padding if isinstance(padding, int) else padding[0]
    off[(0, 0) + (0,) * n] = -1.0 + pad0  # kernel position 0 samples row -1: zero
    off[(0, n) + (0,) * n] = spatial[0] - 0.5 + pad0  # position 1 samples row size - 0.5: half the last row
    mask = m if with_mask else None
    got = deform_conv(x, off, w, b, stride, padding, dilation, mask=mask, sampler=sampler)
    ref = naive_deform_conv(x, off, w, b, stride, padding, dilation, mask)
    torch.testing.assert_close(got, ref, **TOL)


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('spatial,kernel,groups,og,padding,with_mask,fast', [
    ((4, 5), (3, 3), 1, 1, 1, True, False),
    ((4, 4), (2, 3), 2, 2, 0, False, False),
    ((4, 5), (3, 3), 2, 2, 1, True, True),
    ((3, 4, 3), (2, 2, 2), 1, 2, 0, True, True),
    ((2, 3, 3), (3, 1, 3), 2, 2, 1, True, True),
    ((3, 3, 4), (2, 2, 2), 2, 1, 0, False, True),
])
def test_gradcheck(spatial, kernel, groups, og, padding, with_mask, fast, sampler):
    """The kernel-position-chunked backward (recomputed samples, bags of the weights' derivatives, the
    sorted transposed bag for the input) against finite differences; groups and offset groups (``fast``:
    gradcheck's random-projection mode, for the larger cases)."""
    cin = 4 if groups == 2 and og == 2 else 2
    x, off, w, b, m = _problem(spatial, cin, 2, kernel, groups, og, padding=padding, batch=1, fractional=True)
    args = [t.clone().requires_grad_() for t in (x, off, w, b, m)]
    if with_mask:
        fn = lambda x, off, w, b, m: deform_conv(x, off, w, b, padding=padding, mask=m, sampler=sampler)
        inputs = args
    else:
        fn = lambda x, off, w, b: deform_conv(x, off, w, b, padding=padding, sampler=sampler)
        inputs = args[:4]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=fast)


def test_offsets_far_outside_read_zero_and_have_zero_gradient(sampler):
    """Points at -1 / size or beyond read zero (torchvision's rule) and do not move: zero offset gradient."""
    x, off, w, b, m = _problem((5, 6), 2, 3, (3, 3), padding=1, seed=3)
    far = torch.full_like(off, 40.0).requires_grad_()
    y = deform_conv(x, far, w, None, padding=1, sampler=sampler)
    torch.testing.assert_close(y, torch.zeros_like(y), **TOL)
    y.sum().backward()
    torch.testing.assert_close(far.grad, torch.zeros_like(far), **TOL)
    if sampler == 'gather':  # infinite offsets too (grid_sample's result for them is not specified)
        inf = torch.full_like(off, float('inf'))
        torch.testing.assert_close(deform_conv(x, inf, w, None, padding=1, sampler=sampler), torch.zeros_like(y), **TOL)


@pytest.mark.parametrize('n', [2, 3])
def test_samplers_agree_in_value_and_gradient(n, monkeypatch):
    spatial, kernel = ((9, 8), (3, 3)) if n == 2 else ((5, 6, 4), (3, 2, 3))
    x, off, w, b, m = _problem(spatial, 4, 6, kernel, groups=2, offset_groups=2, stride=(1,) + (2,) * (n - 1),
                               padding=1, dilation=(2,) + (1,) * (n - 1), seed=5, offset_range=3.0)
    import nnunet_ext.nn.deformable_conv.sampling as deformable_sampling
    results = []
    for sampler, step_elements in (('gather', deformable_sampling.STEP_ELEMENTS), ('gather', 1), ('grid_sample', 1)):
        monkeypatch.setattr(deformable_sampling, 'STEP_ELEMENTS', step_elements)
        args = [t.clone().requires_grad_() for t in (x, off, w, b, m)]
        y = deform_conv(args[0], args[1], args[2], args[3], (1,) + (2,) * (n - 1), 1, (2,) + (1,) * (n - 1),
                        mask=args[4], sampler=sampler)
        y.backward(_rand(*y.shape, gen=torch.Generator().manual_seed(2)))
        results.append([y] + [t.grad for t in args])
    for other in results[1:]:
        for a, r in zip(results[0], other):
            torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# torchvision
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def tv_deform_conv2d():
    try:
        from torchvision.ops import deform_conv2d
        deform_conv2d(torch.zeros(1, 1, 3, 3, dtype=F64), torch.zeros(1, 2, 3, 3, dtype=F64),
                      torch.ones(1, 1, 1, 1, dtype=F64))
    except Exception as e:  # noqa: BLE001 - any failure means "cannot compare here"
        pytest.skip(f"torchvision.ops.deform_conv2d cannot run here: {type(e).__name__}: {e}")
    return deform_conv2d


@pytest.mark.parametrize('groups,og,stride,padding,dilation,with_mask', [
    (1, 1, 1, 1, 1, True), (1, 1, 1, 1, 1, False), (2, 2, 2, (1, 2), (1, 2), True), (4, 2, (1, 2), 0, 1, False)])
def test_matches_torchvision(tv_deform_conv2d, groups, og, stride, padding, dilation, with_mask, sampler):
    x, off, w, b, m = _problem((7, 8), 4, 4, (3, 3), groups, og, stride, padding, dilation, seed=11)
    a = [t.clone().requires_grad_() for t in (x, off, w, b, m)]
    r = [t.clone().requires_grad_() for t in (x, off, w, b, m)]
    ya = deform_conv(a[0], a[1], a[2], a[3], stride, padding, dilation, mask=a[4] if with_mask else None,
                     sampler=sampler)
    yr = tv_deform_conv2d(r[0], r[1], r[2], r[3], stride, padding, dilation, mask=r[4] if with_mask else None)
    torch.testing.assert_close(ya, yr, **TOL)
    grad = _rand(*ya.shape, gen=torch.Generator().manual_seed(1))
    ya.backward(grad)
    yr.backward(grad)
    for name, ta, tr in zip(('input', 'offset', 'weight', 'bias', 'mask'), a, r):
        if name == 'mask' and not with_mask:
            continue
        torch.testing.assert_close(ta.grad, tr.grad, rtol=1e-9, atol=1e-9, msg=f"gradient of {name} differs")


# ----------------------------------------------------------------------------------------------
# module
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('ndim', [2, 3])
def test_module_init_like_conv_and_forward(ndim):
    conv_cls = nn.Conv2d if ndim == 2 else nn.Conv3d
    torch.manual_seed(5)
    ref = conv_cls(4, 6, 3, stride=2, padding=1, groups=2)
    torch.manual_seed(5)
    dc = DeformableConv(4, 6, 3, stride=2, padding=1, groups=2, offset_groups=2, ndim=ndim)
    assert torch.equal(dc.weight, ref.weight) and torch.equal(dc.bias, ref.bias)
    assert dc.offset_channels == ndim * 2 * 3 ** ndim and dc.mask_channels == 2 * 3 ** ndim
    spatial = (7, 6) if ndim == 2 else (5, 6, 4)
    out = dc.output_size(spatial)
    assert out == _out_size(spatial, (3,) * ndim, 2, 1, 1) == deform_conv_output_size(spatial, (3,) * ndim, 2, 1)
    x = torch.randn(2, 4, *spatial)
    y = dc(x, torch.zeros(2, dc.offset_channels, *out), torch.ones(2, dc.mask_channels, *out))
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    assert DeformableConv(2, 2, 3, bias=False).bias is None
    assert 'offset_groups=2' in repr(dc)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
def _args2d(**kw):
    a = dict(input=torch.zeros(1, 4, 6, 6), offset=torch.zeros(1, 18, 4, 4), weight=torch.zeros(3, 4, 3, 3),
             bias=None, stride=1, padding=0, dilation=1, mask=None)
    a.update(kw)
    return a


@pytest.mark.parametrize('kw,match', [
    (dict(weight=torch.zeros(3, 4, 3)), r'2D or 3D kernel'),
    (dict(input=torch.zeros(4, 6, 6)), r'expects input of shape \(B, C, H, W\)'),
    (dict(weight=torch.zeros(3, 3, 3, 3)), r'not a multiple of weight.shape\[1\] = 3'),
    (dict(weight=torch.zeros(3, 2, 3, 3)), r'out_channels = 3 must be divisible by groups = 2'),
    (dict(offset=torch.zeros(1, 17, 4, 4)), r'offset has 17 channels; expected a positive multiple of 2 \* 9'),
    (dict(offset=torch.zeros(1, 18 * 3, 4, 4)), r'not divisible by the 3 offset groups'),
    (dict(offset=torch.zeros(1, 18, 6, 6)), r'offset must have shape .*\(out = conv output size\)'),
    (dict(offset=torch.zeros(2, 18, 4, 4)), r'offset must have shape'),
    (dict(offset=torch.zeros(1, 18, 4, 4, dtype=torch.int64)), r'floating-point'),
    (dict(mask=torch.ones(1, 18, 4, 4)), r'mask must have shape .*\(1, 9, 4, 4\)'),
    (dict(bias=torch.zeros(4)), r'bias must have shape \(3,\)'),
    (dict(stride=0), r'stride must hold ints >= 1'),
    (dict(padding=-1), r'padding must hold ints >= 0'),
    (dict(dilation=(1, 1, 1)), r'tuple of 2 ints'),
    (dict(input=torch.zeros(1, 4, 2, 6)), r'too small for kernel'),
])
def test_bad_input_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        deform_conv(**_args2d(**kw))


def test_module_bad_input_raises():
    with pytest.raises(ValueError, match='ndim must be 2 or 3'):
        DeformableConv(2, 2, 3, ndim=1)
    with pytest.raises(ValueError, match=r'divisible by groups \(2\)'):
        DeformableConv(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match=r'divisible by offset_groups \(2\)'):
        DeformableConv(3, 4, 3, offset_groups=2)
    with pytest.raises(ValueError, match='kernel_size must be an int or a tuple of 3 ints'):
        DeformableConv(2, 2, (3, 3), ndim=3)
    dc = DeformableConv(4, 2, 3, offset_groups=2, padding=1)
    x = torch.zeros(1, 4, 5, 5)
    with pytest.raises(ValueError, match=r'4 input channels.*got \(1, 3, 5, 5\)'):
        dc(torch.zeros(1, 3, 5, 5), torch.zeros(1, 36, 5, 5))
    with pytest.raises(ValueError, match=r'offset must have 36 channels'):
        dc(x, torch.zeros(1, 18, 5, 5))
    with pytest.raises(ValueError, match=r'mask must have 18 channels'):
        dc(x, torch.zeros(1, 36, 5, 5), torch.zeros(1, 9, 5, 5))
    with pytest.raises(ValueError, match=r'offset must have shape'):
        dc(x, torch.zeros(1, 36, 4, 5))
    with pytest.raises(ValueError, match=r"sampler must be one of \('auto', 'gather', 'grid_sample'\), got 'cuda'"):
        DeformableConv(2, 2, 3, sampler='cuda')
    with pytest.raises(ValueError, match=r"sampler must be one of"):
        deform_conv(**_args2d(), sampler='bilinear')


def test_shared_kernel_slice_is_plain_python_and_checks_the_bank():
    bank = DeformableConv(8, 8, 5, padding=2, ndim=3)
    level = SharedKernelSlice(bank, 4, (1, 3, 3))
    assert level.kernel_numel == 9 and type(level.kernel_numel) is int
    assert level.offset_channels == 27 and level.mask_channels == 9
    weight, bias = level.weight_and_bias()
    assert weight.shape == (4, 4, 1, 3, 3) and weight.data_ptr() == bank.weight[:4, :4, 2:3, 1:4, 1:4].data_ptr()
    with pytest.raises(ValueError, match='does not fit the shared bank'):
        SharedKernelSlice(bank, 16, (3, 3, 3))
    with pytest.raises(ValueError, match='centred sub-kernel'):
        SharedKernelSlice(bank, 4, (2, 3, 3))
    with pytest.raises(ValueError, match='square, ungrouped'):
        SharedKernelSlice(DeformableConv(8, 4, 3, ndim=3), 4, (3, 3, 3))
