"""The ``nnunet-ext cascade-predict`` subcommand (the work is in ``cascade.py``, imported when it runs)."""
from __future__ import annotations

import argparse
import sys


def _cmd_cascade_predict(args) -> None:
    from nnunet_ext.errors import UserInputError
    from nnunet_ext.inference.cascade import PredictorSettings, Refinement, StageModel, run_cascade
    if len(args.p) > 2:
        raise UserInputError(f"-p takes one plans identifier (both stages) or two (coarse, fine), got {args.p}")
    coarse_plans, fine_plans = (args.p * 2)[:2] if len(args.p) == 1 else args.p
    if args.device == 'cuda':
        import torch
        if not torch.cuda.is_available():
            raise UserInputError("-device cuda: PyTorch sees no CUDA GPU here; use -device cpu")
    refinement = Refinement(args.refine, args.refine_tol)
    coarse = StageModel.parse(args.coarse, coarse_plans, '--coarse') if args.coarse else None
    fine = StageModel.parse(args.fine, fine_plans, '--fine')
    settings = PredictorSettings(device=args.device, checkpoint=args.chk, step_size=args.step_size,
                                 disable_tta=args.disable_tta, npp=args.npp, nps=args.nps, progress=not args.no_pbar)
    result = run_cascade(args.i, args.o, fine, coarse, args.coarse_masks, settings, args.margin,
                         args.save_coarse_masks, refinement, log=lambda line: print(line, file=sys.stderr))
    print(f"wrote {len(result.cases)} segmentation(s) to {args.o}")
    print(f"cases without {result.crop_label} (all background): {len(result.without_region)}"
          f"{': ' + ', '.join(result.without_region) if result.without_region else ''}")
    if refinement.max_rounds > 1:
        print(f"refinement (at most {refinement.max_rounds} fine rounds, RDSC tolerance {refinement.tolerance:g}):")
        for case in sorted(result.rounds):
            rdsc = f", RDSC {result.rdsc[case]:.4f}" if case in result.rdsc else ''
            print(f"  {case}: {result.rounds[case]} round(s){rdsc}, stopped: {result.stopped[case]}")


def add_cascade_parser(sub) -> None:
    """Registers ``cascade-predict`` on the CLI."""
    p = sub.add_parser('cascade-predict', help='two-stage prediction: a coarse model, a crop to its bounding box, '
                                               'a fine model inside it, pasted back (the ResUNet paper\'s liver -> '
                                               'tumour cascade, the multi-level paper\'s coarse-to-fine)',
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description='The coarse stage (--coarse, or --liver) segments every image of -i; each image is '
                                   'cropped to the bounding box of the fine model\'s region labels + the margin the '
                                   'fine model was trained with; the fine stage (--fine, or --tumour; trained on a '
                                   'dataset made with "nnunet-ext convert ... --crop-to-label LABEL") segments the '
                                   'crops; the result is pasted back. If the fine dataset keeps LABEL (coarse-to-'
                                   'fine of one structure), the fine output replaces the coarse one inside the box and '
                                   '--refine re-crops from it (the multi-level paper\'s Algorithm 1); otherwise '
                                   '(liver -> tumour) LABEL is kept where the coarse stage found it and the fine '
                                   'labels are painted over it inside the box. Labels are numbered as the source '
                                   'dataset (e.g. LiTS: liver 1, tumor 2).')
    p.add_argument('-i', required=True, help='input folder (nnU-Net naming CASE_0000.nii.gz; apply '
                                             'nnunet-ext preprocess-images first if the datasets were converted with '
                                             '--window/--hist-eq)')
    p.add_argument('-o', required=True, help='output folder (created; files of the same name are replaced)')
    stage1 = p.add_mutually_exclusive_group(required=True)
    stage1.add_argument('--coarse', '--liver', dest='coarse', nargs='+', metavar=('DATASET CONFIG TRAINER', 'FOLD'),
                        help='the coarse model: dataset (id or name), configuration, trainer, folds '
                             '(default 0 1 2 3 4)')
    stage1.add_argument('--coarse_masks', '--liver_masks', dest='coarse_masks', metavar='DIR', default=None,
                        help='use these coarse label maps (CASE.nii.gz, numbered as the source dataset) instead of '
                             'a coarse model')
    p.add_argument('--fine', '--tumour', '--tumor', dest='fine', nargs='+', required=True,
                   metavar=('DATASET CONFIG TRAINER', 'FOLD'), help='the fine model (trained on crops)')
    p.add_argument('-p', nargs='+', default=['nnUNetPlans'], metavar='PLANS',
                   help='plans identifier, one for both stages or coarse then fine (default: nnUNetPlans)')
    p.add_argument('-chk', default='checkpoint_final.pth', help='checkpoint name (default: checkpoint_final.pth)')
    p.add_argument('-device', default='cuda', choices=['cuda', 'cpu', 'mps'], help='default: cuda')
    p.add_argument('-npp', type=int, default=3, help='preprocessing processes (default: 3; -npp 0 -nps 0: no '
                                                     'multiprocessing)')
    p.add_argument('-nps', type=int, default=3, help='segmentation export processes (default: 3)')
    p.add_argument('-step_size', '--step_size', type=float, default=0.5, help='sliding-window step (default: 0.5)')
    p.add_argument('--disable_tta', action='store_true', help='no mirroring test-time augmentation')
    p.add_argument('--margin', type=float, default=None, metavar='MM',
                   help='check that the fine model was trained with this crop margin (default: use its record)')
    p.add_argument('--refine', type=int, default=1, metavar='T',
                   help='at most T fine rounds in all, each re-cropped to the previous fine prediction (the '
                        'multi-level paper: 10; default 1, no refinement; needs a fine model that keeps the crop '
                        'label)')
    p.add_argument('--refine_tol', type=float, default=0.99, metavar='TOL',
                   help='stop refining a case when the relative Dice of two successive fine predictions reaches TOL '
                        '(the paper\'s Eq. 14; default 0.99)')
    p.add_argument('--save_coarse_masks', '--save_liver_masks', dest='save_coarse_masks', metavar='DIR', default=None,
                   help='also write the coarse label maps here')
    p.add_argument('--no_pbar', action='store_true')
    p.set_defaults(func=_cmd_cascade_predict)
