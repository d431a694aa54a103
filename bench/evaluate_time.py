"""End-to-end time of ``nnunet-ext evaluate`` on synthetic cases (issue 8: 20 cases of 128x128x64
with 3 classes must take under 30 s on 2 cores).

Writes ``--cases`` reference/prediction pairs of 128x128x64 voxels (SimpleITK size x, y, z; spacing
0.8 x 0.8 x 2.5 mm) as .nii.gz into a temporary folder: per class a few ellipsoid blobs in the
reference, and in the prediction the same blobs shifted and resized, one sometimes missed, plus a
false-positive blob. Then times the console script in a subprocess (reading, metrics, JSON; process
start included) and prints the machine, the versions, the command and the seconds.

    python bench/evaluate_time.py                 # 20 cases, -np 2
    python bench/evaluate_time.py --cases 40 --np 4
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version

import numpy as np
import SimpleITK as sitk

SHAPE = (64, 128, 128)            # array z, y, x
SITK_SPACING = (0.8, 0.8, 2.5)    # x, y, z
NUM_CLASSES = 3


def _add_ellipsoid(volume: np.ndarray, label: int, center, radii) -> None:
    lo = [max(int(c - r) - 1, 0) for c, r in zip(center, radii)]
    hi = [min(int(c + r) + 2, n) for c, r, n in zip(center, radii, volume.shape)]
    grid = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing='ij')
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1
    box = volume[tuple(slice(a, b) for a, b in zip(lo, hi))]
    box[inside] = label


def _case(rng: np.random.Generator):
    ref = np.zeros(SHAPE, np.uint8)
    pred = np.zeros(SHAPE, np.uint8)
    for label in range(1, NUM_CLASSES + 1):
        for _ in range(rng.integers(2, 5)):
            center = [rng.uniform(8, n - 8) for n in SHAPE]
            radii = [rng.uniform(2, 6), rng.uniform(5, 20), rng.uniform(5, 20)]
            _add_ellipsoid(ref, label, center, radii)
            if rng.random() < 0.9:  # sometimes missed
                _add_ellipsoid(pred, label, [c + rng.normal(0, 1.5) for c in center],
                               [r * rng.uniform(0.8, 1.2) for r in radii])
        if rng.random() < 0.5:      # a false-positive blob
            _add_ellipsoid(pred, label, [rng.uniform(8, n - 8) for n in SHAPE], [2, 4, 4])
    return pred, ref


def _write(path: str, array: np.ndarray) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SITK_SPACING)
    sitk.WriteImage(image, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--cases', type=int, default=20)
    parser.add_argument('--np', type=int, default=2, help='processes for nnunet-ext evaluate (default: 2)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()

    script = os.path.join(os.path.dirname(sys.executable), 'nnunet-ext')
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix='nnunet_ext_evaluate_bench_') as root:
        pred_folder, gt_folder = os.path.join(root, 'pred'), os.path.join(root, 'gt')
        os.mkdir(pred_folder)
        os.mkdir(gt_folder)
        for i in range(args.cases):
            pred, ref = _case(rng)
            _write(os.path.join(pred_folder, f'case_{i:03d}.nii.gz'), pred)
            _write(os.path.join(gt_folder, f'case_{i:03d}.nii.gz'), ref)
        output = os.path.join(root, 'summary.json')
        command = [script, 'evaluate', pred_folder, gt_folder, '-np', str(args.np), '-o', output, '--no_pbar']
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, encoding='utf-8')
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"nnunet-ext evaluate failed ({result.returncode}):\n{result.stderr}")
        with open(output) as f:
            summary = json.load(f)

    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} logical CPUs")
    print("versions: " + ", ".join(f"{p} {version(p)}" for p in
                                   ('nnunet-ext', 'nnunetv2', 'numpy', 'scipy', 'SimpleITK'))
          + f", python {platform.python_version()}")
    print(f"data: {args.cases} cases of {SHAPE[::-1]} voxels (x, y, z), spacing {SITK_SPACING} mm, "
          f"{NUM_CLASSES} classes, .nii.gz")
    print(f"command: nnunet-ext evaluate PRED GT -np {args.np} -o summary.json --no_pbar")
    print(result.stdout.strip())
    print(f"seconds: {seconds:.1f} (end to end, process start included; "
          f"{len(summary['metric_per_case'])} cases evaluated)")


if __name__ == '__main__':
    main()
