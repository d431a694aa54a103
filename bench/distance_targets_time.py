"""Seconds per sample of the signed-distance targets of the multi-level structural loss trainers (MLL,
MLN): ``SignedDistanceTransform`` as nnU-Net's augmentation workers run it, on one sample's label patch
and all its deep-supervision down-samplings (nnU-Net's ``DownsampleSegForDSTransform``), one core.

Compared: ``before``, the previous implementation (scipy ``binary_erosion`` + ``distance_transform_edt``
per class and scale, float64, then ``np.stack`` + ``torch.cat``; kept verbatim below), and the current
transform: its default (``auto``: ITK's Maurer EDT on arrays of at least 2**17 voxels, scipy below) and
each backend forced at every scale. The values are checked against ``before`` (max abs difference:
float32 rounding).

Patches: ``3d-128`` (128^3 at 1 mm, 5 deep-supervision scales 1 .. 1/16, as nnU-Net's 3d_fullres plans
for a 128^3 patch) and ``2d-256`` (256^2 at 0.8 mm, 6 scales 1 .. 1/32); two foreground labels (a large
organ cut by the patch border and a small lesion inside it).

    OMP_NUM_THREADS=1 python bench/distance_targets_time.py              # ~30 s
    python bench/distance_targets_time.py --cases 3d-128 --rounds 10

CPU time (``time.process_time``) is the number to read on a shared machine; wall time is printed too.
"""
from __future__ import annotations

import argparse
import os

os.environ['OMP_NUM_THREADS'] = os.environ.get('OMP_NUM_THREADS', '1')  # one core, before numpy/torch load

import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform  # noqa: E402
from scipy import ndimage  # noqa: E402

from nnunet_ext.training.distance_transform import SignedDistanceTransform  # noqa: E402

CASES = {  # name: (patch shape, spacing, number of deep-supervision scales)
    '3d-128': ((128, 128, 128), (1.0, 1.0, 1.0), 5),
    '2d-256': ((256, 256), (0.8, 0.8), 6),
}


# --- the previous implementation, verbatim (for the "before" column) -----------------------------------------------
def legacy_signed_distance_map(mask, spacing):
    mask = np.asarray(mask).astype(bool, copy=False)
    if not mask.any() or mask.all():
        return np.zeros(mask.shape, dtype=np.float32)
    face = ndimage.generate_binary_structure(mask.ndim, 1)
    interior = ndimage.binary_erosion(mask, structure=face, border_value=1)
    boundary = mask & ~interior
    distance = ndimage.distance_transform_edt(~boundary, sampling=spacing)
    return (np.where(mask, -distance, distance) + 0.0).astype(np.float32, copy=False)


def legacy_transform(segmentations, spacing, labels):
    full_shape = segmentations[0].shape[1:]
    out = []
    for segmentation in segmentations:
        shape = segmentation.shape[1:]
        scaled = [s * f / n for s, f, n in zip(spacing, full_shape, shape)]
        seg = segmentation.numpy()
        maps = [legacy_signed_distance_map(seg[0] == c, scaled) for c in labels]
        out.append(torch.cat((segmentation.float(), torch.from_numpy(np.stack(maps))), 0))
    return out


# --- the sample --------------------------------------------------------------------------------------------------
def phantom(shape, spacing, seed=0):
    """A label patch: an organ (1) with a wavy surface, partly outside the patch, and a lesion (2) inside it."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing='ij')
    extent = np.array([n * s for n, s in zip(shape, spacing)])
    centre = extent * rng.uniform(0.45, 0.65, len(shape))
    radii = extent * rng.uniform(0.3, 0.42, len(shape))
    r = np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, radii)))
    wave = 0.06 * np.sin(sum(g / 9.0 for g in grid)) * np.cos(grid[0] / 13.0)
    seg = np.zeros(shape, np.int16)
    seg[r < 1 + wave] = 1
    lesion_centre = centre + radii * 0.3
    lesion = np.sqrt(sum(((g - c) / (0.12 * e)) ** 2 for g, c, e in zip(grid, lesion_centre, extent)))
    seg[lesion < 1] = 2
    return torch.from_numpy(seg)[None]


def deep_supervision_targets(seg, num_scales):
    scales = [[1 / 2 ** i] * (seg.ndim - 1) for i in range(num_scales)]
    return DownsampleSegForDSTransform(scales)(segmentation=seg)['segmentation']


def _time(function, rounds):
    cpu, wall = [], []
    for _ in range(rounds + 1):  # the first round warms up
        c, w = time.process_time(), time.perf_counter()
        function()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return statistics.median(cpu[1:]), statistics.median(wall[1:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--cases', nargs='+', default=list(CASES), choices=list(CASES))
    parser.add_argument('--rounds', type=int, default=5, help='timed rounds per variant (median reported)')
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error('--rounds must be >= 1')
    torch.set_num_threads(1)
    print(f"# distance targets, seconds per sample (median of {args.rounds}); OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}, {platform.processor() or platform.machine()}")
    print("| patch | scales | variant | CPU s/sample | wall s/sample | max abs diff vs before |")
    print("|---|---|---|---|---|---|")
    for name in args.cases:
        shape, spacing, num_scales = CASES[name]
        targets = deep_supervision_targets(phantom(shape, spacing), num_scales)
        before = legacy_transform(targets, spacing, (1, 2))
        variants = {'before (scipy, erosion, float64)': lambda: legacy_transform(targets, spacing, (1, 2))}
        for backend in ('auto', 'itk', 'scipy'):
            transform = SignedDistanceTransform(spacing, foreground_labels=(1, 2), backend=backend)
            label = 'now (default, auto)' if backend == 'auto' else f'now, backend {backend} at every scale'
            variants[label] = (lambda t=transform: t(segmentation=targets)['segmentation'])
        for label, function in variants.items():
            diff = max(float((a - b).abs().max()) for a, b in zip(function(), before))
            cpu, wall = _time(function, args.rounds)
            print(f"| {name} | {num_scales} | {label} | {cpu:.3f} | {wall:.3f} | {diff:.2g} |")


if __name__ == '__main__':
    main()
