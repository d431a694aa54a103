"""Median forward+backward time of ``DeformableConv`` (pure PyTorch on ``grid_sample``, the LFAM operator)
relative to a plain ``nn.Conv2d`` / ``nn.Conv3d`` of the same shape, and to ``torchvision.ops.deform_conv2d``
(2D only) where torchvision runs.

Each step is ``y = op(x, ...); y.backward(g)`` with ``x`` (and, for the deformable ops, random offsets in
[-2, 2] pixels and a random modulation mask) requiring gradients, so the backward computes the gradients
of input, offsets, mask, weight and bias. Ops are timed round by round, alternating the order, so drifts
of the machine hit all alike; one warm-up round is dropped. Prints a Markdown table, with what
``DeformableConv`` keeps for backward beyond its arguments (unique storages seen by
``torch.autograd.graph.saved_tensors_hooks``; input, offsets, mask and parameters excluded).

    python bench/deformable_conv_time.py                       # CPU, default shapes, ~1-2 min on 2 cores
    python bench/deformable_conv_time.py --device cuda --rounds 50
    python bench/deformable_conv_time.py --cases 2d-96 --rounds 3
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time

import torch
from torch import nn

from nnunet_ext.nn.deformable_conv import DeformableConv

# name: (ndim, batch, in_channels, out_channels, kernel, spatial)
CASES = {
    '2d-96': (2, 2, 32, 32, 3, (96, 96)),
    '2d-48': (2, 2, 64, 64, 3, (48, 48)),
    '3d': (3, 2, 32, 32, 3, (24, 48, 48)),
}


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _torchvision_op():
    """``torchvision.ops.deform_conv2d`` if it imports and runs here, else ``(None, reason)``."""
    try:
        from torchvision.ops import deform_conv2d
        deform_conv2d(torch.zeros(1, 1, 3, 3), torch.zeros(1, 2, 3, 3), torch.ones(1, 1, 1, 1))
        return deform_conv2d, None
    except Exception as e:  # noqa: BLE001 - any failure: report and go on without it
        return None, f"{type(e).__name__}: {e}"


def _steps(name: str, device: torch.device, tv_op):
    """The (label -> zero-argument step) dict of one case, all ops sharing input and weights."""
    ndim, batch, cin, cout, k, spatial = CASES[name]
    gen = torch.Generator().manual_seed(0)
    dc = DeformableConv(cin, cout, k, padding=k // 2, ndim=ndim).to(device)
    conv = (nn.Conv2d if ndim == 2 else nn.Conv3d)(cin, cout, k, padding=k // 2).to(device)
    with torch.no_grad():
        conv.weight.copy_(dc.weight)
        conv.bias.copy_(dc.bias)
    out = dc.output_size(spatial)
    x = torch.randn(batch, cin, *spatial, generator=gen).to(device).requires_grad_()
    offset = (torch.rand(batch, dc.offset_channels, *out, generator=gen) * 4 - 2).to(device).requires_grad_()
    mask = torch.rand(batch, dc.mask_channels, *out, generator=gen).to(device).requires_grad_()
    grad = torch.randn(batch, cout, *out, generator=gen).to(device)

    def step(fn):
        def run():
            fn().backward(grad)
        return run

    steps = {'conv': step(lambda: conv(x)),
             'DeformableConv': step(lambda: dc(x, offset, mask))}
    if ndim == 2 and tv_op is not None:
        steps['torchvision'] = step(lambda: tv_op(x, offset, dc.weight, dc.bias, padding=k // 2, mask=mask))
    return steps


def saved_beyond_arguments(name: str, device: torch.device) -> int:
    """Bytes ``DeformableConv`` saves for backward that are not its arguments (input, offset, mask,
    weight, bias): e.g. an im2col tensor kept by autograd."""
    ndim, batch, cin, cout, k, spatial = CASES[name]
    dc = DeformableConv(cin, cout, k, padding=k // 2, ndim=ndim).to(device)
    out = dc.output_size(spatial)
    x = torch.randn(batch, cin, *spatial, device=device, requires_grad=True)
    offset = torch.zeros(batch, dc.offset_channels, *out, device=device, requires_grad=True)
    mask = torch.ones(batch, dc.mask_channels, *out, device=device, requires_grad=True)
    arguments = {t.untyped_storage().data_ptr() for t in (x, offset, mask, dc.weight, dc.bias)}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in arguments:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dc(x, offset, mask)
    return sum(kept.values())


def measure(name: str, device: torch.device, rounds: int, tv_op) -> dict:
    steps = _steps(name, device, tv_op)
    times = {label: [] for label in steps}
    order = list(steps)
    for r in range(rounds + 1):  # round 0 is warm-up
        for label in (order if r % 2 == 0 else order[::-1]):
            _sync(device)
            t0 = time.perf_counter()
            steps[label]()
            _sync(device)
            if r > 0:
                times[label].append(time.perf_counter() - t0)
    return {label: statistics.median(v) for label, v in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--cases', nargs='+', default=list(CASES), choices=list(CASES))
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (default: cpu)")
    parser.add_argument('--rounds', type=int, default=5, help='timed rounds per case, after one warm-up (default 5)')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but torch.cuda.is_available() is False")
    tv_op, tv_reason = _torchvision_op()
    try:
        import torchvision
        tv_version = torchvision.__version__
    except Exception:  # noqa: BLE001
        tv_version = 'not importable'

    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {platform.platform()}, {platform.machine()}, python {platform.python_version()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), torchvision {tv_version}")
    if device.type == 'cuda':
        print(f"device: {torch.cuda.get_device_name(device)}")
    else:
        print(f"device: cpu ({platform.processor() or 'unknown processor'})")
    if tv_op is None:
        print(f"torchvision.ops.deform_conv2d not timed: {tv_reason}")
    print(f"forward+backward, median of {args.rounds} rounds (after 1 warm-up); offsets uniform in [-2, 2] px, "
          f"random mask, padding k//2, float32\n")
    print("| case | input (B, C, *spatial) -> C_out, kernel | im2col MiB | conv ms | DeformableConv ms | "
          "ratio DeformableConv / conv | torchvision ms | ratio torchvision / DeformableConv | "
          "DeformableConv keeps beyond its arguments MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.cases:
        ndim, batch, cin, cout, k, spatial = CASES[name]
        t = measure(name, device, args.rounds, tv_op)
        mib = batch * cin * k ** ndim * math.prod(spatial) * 4 / 2 ** 20
        tv = (f"{1e3 * t['torchvision']:.1f} | {t['torchvision'] / t['DeformableConv']:.2f}"
              if 'torchvision' in t else ('n/a (3D) | -' if ndim == 3 else 'n/a | -'))
        kept = saved_beyond_arguments(name, device) / 2 ** 20
        print(f"| {name} | ({batch}, {cin}, {', '.join(map(str, spatial))}) -> {cout}, {k}^{ndim} | {mib:.0f} | "
              f"{1e3 * t['conv']:.1f} | {1e3 * t['DeformableConv']:.1f} | {t['DeformableConv'] / t['conv']:.1f} | "
              f"{tv} | {kept:.0f} |", flush=True)


if __name__ == '__main__':
    main()
