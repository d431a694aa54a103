"""The ``nnunet-ext cascade-predict`` subcommand (the work is in ``cascade.py``, imported when it runs)."""
from __future__ import annotations

import argparse
import sys


def _cmd_cascade_predict(args) -> None:
    from nnunet_ext.errors import UserInputError
    from nnunet_ext.inference.cascade import PredictorSettings, StageModel, run_cascade
    if len(args.p) > 2:
        raise UserInputError(f"-p takes one plans identifier (both stages) or two (liver, tumour), got {args.p}")
    liver_plans, tumour_plans = (args.p * 2)[:2] if len(args.p) == 1 else args.p
    if args.device == 'cuda':
        import torch
        if not torch.cuda.is_available():
            raise UserInputError("-device cuda: PyTorch sees no CUDA GPU here; use -device cpu")
    liver = StageModel.parse(args.liver, liver_plans, '--liver') if args.liver else None
    tumour = StageModel.parse(args.tumour, tumour_plans, '--tumour')
    settings = PredictorSettings(device=args.device, checkpoint=args.chk, step_size=args.step_size,
                                 disable_tta=args.disable_tta, npp=args.npp, nps=args.nps, progress=not args.no_pbar)
    result = run_cascade(args.i, args.o, tumour, liver, args.liver_masks, settings, args.margin,
                         args.save_liver_masks, log=lambda line: print(line, file=sys.stderr))
    print(f"wrote {len(result.cases)} segmentation(s) to {args.o}")
    print(f"cases without liver (all background): {len(result.without_liver)}"
          f"{': ' + ', '.join(result.without_liver) if result.without_liver else ''}")


def add_cascade_parser(sub) -> None:
    """Registers ``cascade-predict`` on the CLI."""
    p = sub.add_parser('cascade-predict', help='two-stage prediction: liver model, crop to the liver box, tumour '
                                               'model, paste back (the ResUNet paper\'s cascade)',
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description='Stage 1 (--liver) segments the liver in every image of -i; each image is cropped '
                                   'to the liver bounding box + the margin the tumour model was trained with; stage 2 '
                                   '(--tumour, trained on a dataset made with "nnunet-ext convert ... --crop-to-label '
                                   'liver") segments the crops; the result is pasted back: liver label where stage 1 '
                                   'found liver, tumour label where stage 2 found tumour (inside the box), background '
                                   'elsewhere. Labels are numbered as the source dataset (e.g. LiTS: liver 1, '
                                   'tumor 2).')
    p.add_argument('-i', required=True, help='input folder (nnU-Net naming CASE_0000.nii.gz; apply '
                                             'nnunet-ext preprocess-images first if the datasets were converted with '
                                             '--window/--hist-eq)')
    p.add_argument('-o', required=True, help='output folder (created; files of the same name are replaced)')
    stage1 = p.add_mutually_exclusive_group(required=True)
    stage1.add_argument('--liver', nargs='+', metavar=('DATASET CONFIG TRAINER', 'FOLD'),
                        help='the liver model: dataset (id or name), configuration, trainer, folds '
                             '(default 0 1 2 3 4)')
    stage1.add_argument('--liver_masks', metavar='DIR', default=None,
                        help='use these stage-1 label maps (CASE.nii.gz, numbered as the source dataset) instead of '
                             'a liver model')
    p.add_argument('--tumour', '--tumor', dest='tumour', nargs='+', required=True,
                   metavar=('DATASET CONFIG TRAINER', 'FOLD'), help='the tumour model (trained on liver crops)')
    p.add_argument('-p', nargs='+', default=['nnUNetPlans'], metavar='PLANS',
                   help='plans identifier, one for both stages or liver then tumour (default: nnUNetPlans)')
    p.add_argument('-chk', default='checkpoint_final.pth', help='checkpoint name (default: checkpoint_final.pth)')
    p.add_argument('-device', default='cuda', choices=['cuda', 'cpu', 'mps'], help='default: cuda')
    p.add_argument('-npp', type=int, default=3, help='preprocessing processes (default: 3; -npp 0 -nps 0: no '
                                                     'multiprocessing)')
    p.add_argument('-nps', type=int, default=3, help='segmentation export processes (default: 3)')
    p.add_argument('-step_size', '--step_size', type=float, default=0.5, help='sliding-window step (default: 0.5)')
    p.add_argument('--disable_tta', action='store_true', help='no mirroring test-time augmentation')
    p.add_argument('--margin', type=float, default=None, metavar='MM',
                   help='check that the tumour model was trained with this crop margin (default: use its record)')
    p.add_argument('--save_liver_masks', metavar='DIR', default=None, help='also write the stage-1 label maps here')
    p.add_argument('--no_pbar', action='store_true')
    p.set_defaults(func=_cmd_cascade_predict)
