"""``nnunet-ext deploy-predict`` and ``python -m nnunet_ext.deploy``: predict a folder with an exported model
(no torch, no nnU-Net needed)."""
from __future__ import annotations

import argparse

from nnunet_ext.errors import positive_int

DESCRIPTION = ('Predicts every case of a folder (CASE_0000<file_ending>, ...) with a model exported by '
               '`nnunet-ext export`, as nnUNetv2_predict would, with onnxruntime: no torch, no nnU-Net needed.')


def _step_size(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the command (shared by the subcommand and ``python -m nnunet_ext.deploy``)."""
    p.add_argument('export_folder', metavar='EXPORT_FOLDER', help='folder with model.json and the ONNX files')
    p.add_argument('-i', required=True, metavar='IN',
                   help='input folder (CASE_0000<file_ending>, one file per channel)')
    p.add_argument('-o', required=True, metavar='OUT', help='output folder (created if missing)')
    p.add_argument('-f', nargs='+', metavar='FOLD', help="folds to use (default: all in model.json)")
    p.add_argument('--disable-tta', action='store_true', help='no mirroring (faster, slightly less accurate)')
    p.add_argument('--step-size', type=_step_size, metavar='S',
                   help="sliding-window step as a fraction of the patch (default: model.json's, 0.5)")
    p.add_argument('--save-probabilities', action='store_true',
                   help='also write CASE.npz (key probabilities) and CASE.pkl, like nnU-Net')
    p.add_argument('--threads', type=positive_int, metavar='N', help="onnxruntime threads (default: onnxruntime's)")
    p.add_argument('--providers', nargs='+', metavar='PROVIDER',
                   help='onnxruntime execution providers in order (default: CUDAExecutionProvider if available, '
                        'then CPUExecutionProvider)')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')


def add_parser(sub) -> None:
    """Adds ``deploy-predict`` to the ``nnunet-ext`` subcommands."""
    p = sub.add_parser('deploy-predict', help='predict a folder with an exported (ONNX) model, without torch',
                       description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> None:
    from nnunet_ext.deploy.predict import predict_folder
    written = predict_folder(args.export_folder, args.i, args.o, save_probabilities=args.save_probabilities,
                             use_mirroring=not args.disable_tta, tile_step_size=args.step_size, folds=args.f,
                             threads=args.threads, providers=args.providers, progress=not args.no_progress)
    print(f"wrote {len(written)} segmentation(s) to {args.o}")
