"""The real tumour cases shipped in the pyradiomics 3.0.1 source distribution (``data/``: two brain MRI,
one breast MRI, two lung CT volumes, one tumour mask each) as a 2D nnU-Net dataset for
``bench/ab_real.py``: the axial slices that show the tumour, plus ``--margin`` slices either side,
written as grey PNG image/mask pairs and converted with our own ``nnunet-ext convert folder2d`` (resized
to ``--size``). The test set is whole patients: lung1 and brain2 (one of each modality that has two
cases) go to ``imagesTs``/``labelsTs``, the other three cases train, so no test slice has a neighbour
in training.

    pip download --no-deps --no-binary :all: --no-build-isolation pyradiomics==3.0.1 -d /tmp/pyrad
    tar xzf /tmp/pyrad/pyradiomics-3.0.1.tar.gz -C /tmp/pyrad
    eval "$(nnunet-ext env --root /tmp/pyrad_root)"
    python bench/pyradiomics_slices.py /tmp/pyrad/pyradiomics-3.0.1/data --id 979
    nnUNetv2_plan_and_preprocess -d 979 -c 2d --verify_dataset_integrity
    python bench/ab_real.py --dataset 979 -tr nnUNetTrainerGODC nnUNetTrainerMLN --seeds 0 1 2 --jobs 2

Intensities for the PNGs: CT windowed to [-1000, 400] HU (lung), MRI scaled between the volume's 0.5 and
99.5 percentiles; nnU-Net then normalises the grey values as any 2D collection's (``convert folder2d``).
Patient data: the files stay where they are and in nnU-Net's folders, never in this repository.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import SimpleITK as sitk
from PIL import Image

CASES = ('brain1', 'brain2', 'breast1', 'lung1', 'lung2')
TEST_CASES = ('brain2', 'lung1')
CT_WINDOW = (-1000.0, 400.0)


def grey(volume: np.ndarray, case: str) -> np.ndarray:
    """uint8 grey values of a volume: the lung CT window, or the MRI's 0.5-99.5 percentile range."""
    low, high = CT_WINDOW if case.startswith('lung') else np.percentile(volume, (0.5, 99.5))
    return (np.clip((volume - low) / (high - low), 0, 1) * 255).round().astype(np.uint8)


def write_slices(data: str, out: str, margin: int) -> dict:
    """Writes ``out/images/<case>_zNNN.png`` and ``out/masks/<case>_zNNN.png``; returns the slice counts."""
    os.makedirs(os.path.join(out, 'images'))
    os.makedirs(os.path.join(out, 'masks'))
    counts = {}
    for case in CASES:
        image = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(data, f'{case}_image.nrrd'))).astype(np.float32)
        mask = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(data, f'{case}_label.nrrd'))) > 0
        if image.shape != mask.shape:
            raise SystemExit(f'{case}: image {image.shape} and label {mask.shape} differ')
        tumour = np.nonzero(mask.reshape(mask.shape[0], -1).any(1))[0]
        slices = range(max(0, tumour.min() - margin), min(mask.shape[0], tumour.max() + margin + 1))
        pixels = grey(image, case)
        for z in slices:
            stem = f'{case}_z{z:03d}'
            Image.fromarray(pixels[z]).save(os.path.join(out, 'images', stem + '.png'))
            Image.fromarray((mask[z] * 255).astype(np.uint8)).save(os.path.join(out, 'masks', stem + '.png'))
        counts[case] = (len(slices), int(mask[list(slices)].reshape(len(slices), -1).any(1).sum()))
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('data', help="the sdist's data/ folder (brain1_image.nrrd, brain1_label.nrrd, ...)")
    parser.add_argument('--id', type=int, required=True, help='target dataset id')
    parser.add_argument('--name', default='PyradiomicsSlices')
    parser.add_argument('--margin', type=int, default=2, help='slices without tumour kept either side (default 2)')
    parser.add_argument('--size', type=int, nargs=2, default=(128, 128), metavar=('ROWS', 'COLUMNS'))
    args = parser.parse_args(argv)
    missing = [f for c in CASES for f in (f'{c}_image.nrrd', f'{c}_label.nrrd')
               if not os.path.isfile(os.path.join(args.data, f))]
    if missing:
        raise SystemExit(f'{args.data}: missing {", ".join(missing)} (the pyradiomics 3.0.1 sdist data/ folder?)')
    with tempfile.TemporaryDirectory() as scratch:
        counts = write_slices(args.data, scratch, args.margin)
        stems = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(scratch, 'images')))
        split = os.path.join(scratch, 'split.json')
        with open(split, 'w', encoding='utf-8') as f:
            json.dump({'test': [s for s in stems if s.split('_z')[0] in TEST_CASES]}, f)
        for case, (n, with_tumour) in counts.items():
            print(f"{case}: {n} slices, {with_tumour} with tumour -> {'test' if case in TEST_CASES else 'training'}")
        command = [os.path.join(os.path.dirname(sys.executable), 'nnunet-ext'), 'convert', 'folder2d', scratch,
                   '--id', str(args.id), '--name', args.name, '--grey', '--resize', *map(str, args.size),
                   '--split', split]
        subprocess.run(command, check=True)


if __name__ == '__main__':
    main()
