"""``nnunet-ext export`` (``docs/commands/export.md``)."""
from __future__ import annotations

import os

from nnunet_ext.errors import UserInputError, positive_int


def add_parser(sub) -> None:
    """Adds ``export`` to the ``nnunet-ext`` subcommands."""
    p = sub.add_parser('export', help='trained model folder -> ONNX (one file per fold) + model.json for '
                                      'deploy-predict',
                       description='Exports a trained nnU-Net model folder (any of our trainers or nnU-Net\'s own) '
                                   'to ONNX, one file per fold, with model.json holding what prediction needs from '
                                   'the plans; nnunet-ext deploy-predict runs it without PyTorch. Name the folder, '
                                   'or the dataset, configuration and trainer as nnUNetv2_predict does.')
    p.add_argument('model_folder', nargs='?', metavar='MODEL_DIR', help='trained model folder (TRAINER__PLANS__CONFIG)')
    p.add_argument('-d', metavar='DATASET', help='dataset id or name (instead of MODEL_DIR)')
    p.add_argument('-c', metavar='CONFIG', help='configuration (with -d)')
    p.add_argument('-tr', default='nnUNetTrainer', metavar='TRAINER', help='trainer (with -d; default nnUNetTrainer)')
    p.add_argument('-p', default='nnUNetPlans', metavar='PLANS', help='plans identifier (with -d; default nnUNetPlans)')
    p.add_argument('-f', nargs='+', default=None, metavar='FOLD',
                   help='folds (default: every fold_* with the checkpoint)')
    p.add_argument('-o', required=True, metavar='OUT', help='output folder (must not exist)')
    p.add_argument('-chk', default='checkpoint_final.pth', help='checkpoint file name (default: checkpoint_final.pth)')
    p.add_argument('--prune-level', type=positive_int, metavar='L',
                   help='ANU-Net / UNet++: export the model pruned to level L (nnunet-ext prune)')
    p.add_argument('--opset', type=positive_int,
                   help='ONNX opset (default and lowest: 17)')
    p.set_defaults(func=_export)


def _model_folder(args) -> str:
    if (args.model_folder is None) == (args.d is None):
        raise UserInputError("name the model either as MODEL_DIR or with -d DATASET -c CONFIG [-tr TRAINER] [-p PLANS]")
    if args.model_folder is not None:
        return args.model_folder
    if args.c is None:
        raise UserInputError("-d needs -c CONFIG (the configuration the model was trained on)")
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    from nnunet_ext.nnunet_glue import dataset_name
    folder = get_output_folder(dataset_name(args.d), args.tr, args.p, args.c)
    if not os.path.isdir(folder):
        raise UserInputError(f"{folder}: no such model folder (train {args.tr} on {args.c} first, or check -tr/-p/-c)")
    return folder


def _export(args) -> None:
    from nnunet_ext.export.export import export_model_folder
    document = export_model_folder(_model_folder(args), args.o, args.f, args.chk, args.prune_level, args.opset)
    folds = ' '.join(entry['fold'] for entry in document['folds'])
    print(f"exported {document['source']['trainer']} ({document['source']['configuration']}, folds {folds}) to "
          f"{os.path.abspath(args.o)}; predict with: nnunet-ext deploy-predict {args.o} -i IN -o OUT")
