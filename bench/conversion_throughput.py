"""Conversion throughput of ``nnunet-ext convert lits`` on a synthetic LiTS-like source: MB/s of input
(compressed NIfTI on disk, volumes + segmentations) with ``-np 1`` and ``-np 2``. Prints a Markdown table.

    python bench/conversion_throughput.py                      # 8 cases of 512 x 512 x 48, ~1 min on 2 cores
    python bench/conversion_throughput.py --cases 4 --size 256 256 32
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import nibabel as nib
import numpy as np


def write_source(root: str, cases: int, size) -> int:
    """LiTS-like: int16 CT with noise and a liver/tumour blob, uint8 segmentation, .nii.gz. Returns bytes."""
    rng = np.random.default_rng(0)
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, s) for s in size), indexing='ij')
    liver = (x / 0.6) ** 2 + (y / 0.4) ** 2 + (z / 0.8) ** 2 < 1
    tumour = (x - 0.2) ** 2 + y ** 2 + z ** 2 < 0.03
    label = liver.astype(np.uint8) + (liver & tumour)
    total = 0
    for i in range(cases):
        folder = os.path.join(root, f'Training Batch {1 + i % 2}')
        os.makedirs(folder, exist_ok=True)
        image = (rng.normal(-200, 150, size) + 250 * liver + 100 * tumour).astype(np.int16)
        for array, name in ((image, f'volume-{i}.nii.gz'), (label, f'segmentation-{i}.nii.gz')):
            path = os.path.join(folder, name)
            nib.save(nib.Nifti1Image(array, affine), path)
            total += os.path.getsize(path)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--cases', type=int, default=8)
    parser.add_argument('--size', type=int, nargs=3, default=[512, 512, 48])
    parser.add_argument('-np', type=int, nargs='+', default=[1, 2])
    args = parser.parse_args()
    cli = os.path.join(os.path.dirname(sys.executable), 'nnunet-ext')
    with tempfile.TemporaryDirectory(prefix='nnunet_ext_convert_bench_') as tmp:
        source = os.path.join(tmp, 'LiTS')
        size_bytes = write_source(source, args.cases, args.size)
        print(f"# conversion throughput: {platform.machine()}, {os.cpu_count()} cores, "
              f"python {platform.python_version()}")
        print(f"# command: python bench/conversion_throughput.py {' '.join(sys.argv[1:])}")
        print(f"# source: {args.cases} LiTS-like cases of {' x '.join(map(str, args.size))}, "
              f"{size_bytes / 1e6:.1f} MB of .nii.gz")
        print("| -np | seconds | MB/s of input |\n|---|---|---|")
        for n in args.np:
            raw = os.path.join(tmp, f'raw_{n}')
            env = {**os.environ, 'nnUNet_raw': raw}
            start = time.perf_counter()
            subprocess.run([cli, 'convert', 'lits', source, '--id', '900', '-np', str(n)], env=env, check=True,
                           capture_output=True)
            seconds = time.perf_counter() - start
            print(f"| {n} | {seconds:.1f} | {size_bytes / 1e6 / seconds:.1f} |")
            shutil.rmtree(raw)


if __name__ == '__main__':
    main()
