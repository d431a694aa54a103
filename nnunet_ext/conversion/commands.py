"""The ``nnunet-ext convert SOURCE ...``, ``stack-slices`` and ``preprocess-images`` subcommands."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from typing import TYPE_CHECKING, List, Optional, Tuple

from nnunet_ext.conversion.ct_intensity import CTIntensity
from nnunet_ext.errors import UserInputError, positive_int

if TYPE_CHECKING:
    from nnunet_ext.conversion.slice_stack import SliceStack


def _raw_root() -> str:
    root = os.environ.get('nnUNet_raw')
    if not root:
        raise UserInputError('nnUNet_raw is not set: eval "$(nnunet-ext env --root DIR)" first')
    return root


def _intensity(args) -> CTIntensity:
    return CTIntensity(window=tuple(args.window) if args.window else None, hist_eq=args.hist_eq)


def _add_common(p: argparse.ArgumentParser, name_default: str) -> None:
    p.add_argument('input', help='source folder (or archive, where supported)')
    p.add_argument('--id', type=int, required=True, help='target dataset id (DatasetNNN)')
    p.add_argument('--name', default=None, help=f'target dataset name (default: {name_default or "from the source"}; '
                                                f'with --crop-to-label L: that name + "_LCrop")')
    p.add_argument('--overwrite', action='store_true', help='replace an existing dataset with this id')
    p.add_argument('-np', type=positive_int, default=2, help='worker processes (default: 2)')
    p.add_argument('--crop-to-label', default=None, metavar='LABEL',
                   help='write the second-stage training set of a two-stage cascade instead: each labelled case '
                        'cropped to the bounding box of LABEL (name or number) and the labels kept inside it, '
                        'kept labels renumbered 1, 2, ...; LABEL itself becomes background unless kept (the '
                        'coarse-to-fine fine stage; the default when LABEL is the only foreground label); cases '
                        'without LABEL are skipped with a warning (see nnunet-ext cascade-predict)')
    p.add_argument('--crop-margin', type=float, default=None, metavar='MM',
                   help='margin around the box in millimetres, per axis ceil(MM / spacing) voxels (default: 10; '
                        'recorded in dataset.json, cascade-predict uses the same)')
    p.add_argument('--crop-keep', nargs='+', default=None, metavar='LABEL',
                   help='labels the second stage learns (default: every label other than --crop-to-label, or '
                        'that label itself when there is no other); name --crop-to-label\'s label to keep it too')
    _add_allow_empty_labels(p)
    p.set_defaults(name_default=name_default)


def _add_allow_empty_labels(p: argparse.ArgumentParser) -> None:
    p.add_argument('--allow-empty-labels', action='store_true',
                   help='write the dataset even if the labels of all training cases are background only (refused '
                        'by default: nnU-Net would learn nothing)')


def _name(args) -> str:
    return args.name if args.name is not None else args.name_default


def _add_ct_options(p: argparse.ArgumentParser) -> None:
    p.add_argument('--window', type=float, nargs=2, metavar=('LOW', 'HIGH'),
                   help='clip CT intensities to [LOW, HIGH] HU (the ResUNet paper: -100 400)')
    p.add_argument('--hist-eq', action='store_true', help='histogram equalisation after windowing (values in [0, 1])')


def _report(target: str, summary, labels) -> str:
    return f"wrote {target}\n{summary.format(labels)}"


def _cmd_lits(args, raw_root: str) -> str:
    from nnunet_ext.conversion.lits import LABELS, convert_lits
    target, summary = convert_lits(args.input, raw_root, args.id, _name(args), args.overwrite, _intensity(args),
                                   args.np)
    return _report(target, summary, LABELS)


def _cmd_msd(args, raw_root: str) -> str:
    from nnunet_ext.conversion.msd import convert_msd
    target, summary = convert_msd(args.input, raw_root, args.id, _name(args), args.overwrite, args.np)
    with open(os.path.join(target, 'dataset.json'), encoding='utf-8') as f:
        return _report(target, summary, json.load(f)['labels'])


def _cmd_folder2d(args, raw_root: str) -> str:
    from nnunet_ext.conversion.folder2d import PRESETS, Layout, MaskRule, convert_folder2d
    preset = PRESETS[args.preset] if args.preset else None
    base = preset.layout if preset else Layout('images', 'masks')
    layout = Layout(args.images or base.images, args.masks or base.masks,
                    base.image_suffix if args.image_suffix is None else args.image_suffix,
                    base.mask_suffix if args.mask_suffix is None else args.mask_suffix)
    rule = MaskRule.from_options(args.threshold, args.mask_values, args.mask_colours)
    target, summary, labels = convert_folder2d(args.input, raw_root, args.id, _name(args), layout, rule, args.grey,
                                               args.resize, args.split, args.overwrite, args.np,
                                               preset.card if preset else None)
    return _report(target, summary, labels)


def _cmd_ircadb(args, raw_root: str) -> str:
    from nnunet_ext.conversion.ircadb import DEFAULT_STRUCTURES, convert_ircadb, parse_structures
    structures = parse_structures(args.structures) if args.structures else DEFAULT_STRUCTURES
    target, summary, labels = convert_ircadb(args.input, raw_root, args.id, _name(args), structures,
                                             args.overwrite, _intensity(args), args.np)
    return _report(target, summary, labels)


def _cmd_nih_pancreas(args, raw_root: str) -> str:
    from nnunet_ext.conversion.nih_pancreas import LABELS, convert_nih_pancreas
    target, summary, notes = convert_nih_pancreas(args.input, raw_root, args.id, _name(args), args.overwrite,
                                                  _intensity(args), args.np)
    lines = [_report(target, summary, LABELS),
             f"labels re-oriented to the CT's orientation (verified by geometry): {len(notes)} case(s)"]
    return "\n".join(lines + [f"  {note}" for note in notes])


def _cmd_chaos(args, raw_root: str) -> str:
    from nnunet_ext.conversion.chaos import convert_chaos
    target, summary, labels = convert_chaos(args.input, raw_root, args.id, args.modality, _name(args),
                                            args.merge_kidneys, args.overwrite, args.np)
    return _report(target, summary, labels)


def _run_convert(args) -> None:
    """Runs the source's converter into nnUNet_raw (``--allow-empty-labels`` for the writers it makes)."""
    from nnunet_ext.conversion.raw_dataset import empty_labels_allowed
    with empty_labels_allowed(args.allow_empty_labels):
        _convert(args)


def _convert(args) -> None:
    """The source's converter into nnUNet_raw; with ``--crop-to-label``, into a hidden scratch folder of
    nnUNet_raw first (``.DatasetNNN_crop-scratch.partial-PID@HOST-XXXX``: a stale one is removed as the
    writer's, raw_dataset.py), whose result is cropped into the target (crop_to_label.py) and removed."""
    raw_root = _raw_root()
    if args.crop_to_label is None:
        print(args.convert(args, raw_root))
        return
    from nnunet_ext.conversion.crop_to_label import DEFAULT_MARGIN_MM, crop_dataset_to_label, margin_in_voxels
    from nnunet_ext.conversion.raw_dataset import (dataset_folder_name, existing_datasets, owned_temporary_folder,
                                                   remove_stale_partials)
    from nnunet_ext.parallel import signals_deferred
    margin = DEFAULT_MARGIN_MM if args.crop_margin is None else args.crop_margin
    margin_in_voxels(margin, (1.0,))  # refuse a bad margin before converting
    if args.name is not None:
        dataset_folder_name(args.id, args.name)
    taken = existing_datasets(raw_root, args.id)
    if taken and not args.overwrite:
        raise UserInputError(f"dataset id {args.id} is already taken in nnUNet_raw: "
                             f"{', '.join(map(os.path.basename, taken))} (choose another --id or pass --overwrite)")
    os.makedirs(raw_root, exist_ok=True)
    remove_stale_partials(raw_root, args.id)
    with signals_deferred():  # the folder and its name in `scratch`, for the `finally` below
        scratch = owned_temporary_folder(f'.Dataset{args.id:03d}_crop-scratch.partial-', raw_root)
    try:
        full_report = args.convert(args, scratch)
        (converted,) = os.listdir(scratch)
        print("converted (full images, before cropping):\n  " + full_report.replace('\n', '\n  '))
        target, summary, labels, skipped = crop_dataset_to_label(
            os.path.join(scratch, converted), raw_root, args.id, args.name, args.overwrite, args.crop_to_label,
            margin, args.crop_keep, args.np, source=f"nnunet-ext convert {args.source} {os.path.abspath(args.input)}")
    finally:
        with signals_deferred():
            shutil.rmtree(scratch)
    print(_report(target, summary, labels))
    print(f"cropped to the {args.crop_to_label} box + {margin:g} mm; skipped (no {args.crop_to_label}): "
          f"{len(skipped)} case(s){': ' + ', '.join(skipped) if skipped else ''}")


def add_convert_parsers(sub) -> None:
    """Registers ``convert`` (one sub-subcommand per source), ``stack-slices`` and ``preprocess-images`` on the CLI."""
    convert = sub.add_parser('convert', help="convert a dataset into nnU-Net's raw format (nnUNet_raw/DatasetNNN_NAME)",
                             description='Writes nnUNet_raw/DatasetNNN_NAME/{imagesTr,labelsTr,imagesTs,dataset.json} '
                                         'all-or-nothing (a temporary folder moved into place on success).')
    sources = convert.add_subparsers(dest='source', required=True, metavar='SOURCE')
    p = sources.add_parser('lits', help='LiTS: volume-N.nii[.gz] + segmentation-N.nii[.gz] (any layout), '
                                        'test-volume-N to imagesTs')
    _add_common(p, 'LiTS')
    _add_ct_options(p)
    p.set_defaults(func=_run_convert, convert=_cmd_lits)
    p = sources.add_parser('ircadb', help='3D-IRCADb-01: 3Dircadb1.N/{PATIENT_DICOM,MASKS_DICOM/<structure>} '
                                          '(folders or .zip)')
    _add_common(p, 'IRCADb')
    p.add_argument('--structures', nargs='+', default=None, metavar='PATTERN=LABEL',
                   help='mask folders (fnmatch patterns) to labels, later ones on top (default: liver=1 livertumor*=2)')
    _add_ct_options(p)
    p.set_defaults(func=_run_convert, convert=_cmd_ircadb)
    p = sources.add_parser('nih-pancreas', help='NIH Pancreas-CT: PANCREAS_NNNN/<study>/<series>/*.dcm + '
                                                'labelNNNN.nii.gz (orientation verified by geometry)')
    _add_common(p, 'PancreasCT')
    _add_ct_options(p)
    p.set_defaults(func=_run_convert, convert=_cmd_nih_pancreas)
    p = sources.add_parser('chaos', help='CHAOS CT or MR (T1DUAL in/out phase as two channels, T2SPIR) DICOM + '
                                         'PNG ground truth, one modality per dataset')
    _add_common(p, '')
    p.add_argument('--modality', required=True, choices=['CT', 'T1DUAL', 'T2SPIR'])
    p.add_argument('--merge-kidneys', action='store_true', help='one kidney label (as in the ANU-Net paper)')
    p.set_defaults(func=_run_convert, convert=_cmd_chaos)
    p = sources.add_parser('msd', help="a Medical Segmentation Decathlon task folder or .tar (nnU-Net's converter)")
    _add_common(p, '')
    p.set_defaults(func=_run_convert, convert=_cmd_msd)

    p = sources.add_parser('folder2d', help='2D image/mask collections (Kvasir-SEG, ISIC, DRIVE, CVC-ClinicDB, '
                                            'images/ + masks/), PNG/JPG/TIF/GIF/BMP -> PNG (float images: TIF)')
    _add_common(p, 'Images2D')
    p.add_argument('--preset', choices=['kvasir', 'isic', 'drive', 'cvc'], default=None,
                   help='a public collection: its layout (folders and suffixes; the options below override it), '
                        'its label name, reference, citation and licence in dataset.json')
    p.add_argument('--images', default=None, help='image folder below INPUT (default: images)')
    p.add_argument('--masks', default=None, help='mask folder below INPUT (default: masks)')
    p.add_argument('--image-suffix', default=None, help='stem suffix of the images, e.g. _training (DRIVE)')
    p.add_argument('--mask-suffix', default=None, help='stem suffix of the masks, e.g. _segmentation (ISIC)')
    p.add_argument('--grey', action='store_true',
                   help='one grey channel per image (default: keep RGB); colour becomes 8-bit grey, grey images '
                        'keep their bit depth (16-bit, float)')
    p.add_argument('--threshold', type=int, default=None,
                   help='binarise the masks: grey >= T is foreground (default: the encoding is read from all masks)')
    p.add_argument('--mask-values', type=int, nargs='+', default=None, metavar='GREY',
                   help='multi-class masks: these grey values become labels 0, 1, 2, ... (exact match)')
    p.add_argument('--mask-colours', nargs='+', default=None, metavar='R,G,B',
                   help='colour masks: these colours become labels 0, 1, 2, ... (exact match), e.g. 0,0,0 255,0,0')
    p.add_argument('--resize', type=int, nargs=2, default=None, metavar=('ROWS', 'COLUMNS'),
                   help='resize images (bilinear) and masks (nearest)')
    p.add_argument('--split', default=None, help='file listing the test case stems (lines, or JSON {"test": [...]})')
    p.set_defaults(func=_run_convert, convert=_cmd_folder2d)

    p = sub.add_parser('stack-slices', help='2.5D input for 2d configurations: a copy of a raw dataset whose '
                                            'channels are each slice and its neighbours',
                       description='Writes nnUNet_raw/DatasetNNN_NAME: the raw dataset SOURCE with every image channel '
                                   'replaced by --slices channels, the slice itself and its neighbours along the axis '
                                   'nnU-Net\'s 2d configuration slices (edge slices replicated), labels copied, '
                                   'all-or-nothing. Plan and train it with the stock commands, 2d configuration, any '
                                   'trainer; apply "nnunet-ext preprocess-images IN OUT -d NNN" to new images before '
                                   'nnUNetv2_predict.')
    p.add_argument('source', metavar='SOURCE', help='raw dataset id or name (3D images)')
    p.add_argument('--id', type=int, required=True, help='target dataset id (DatasetNNN)')
    p.add_argument('--name', default=None, help='target dataset name (default: the source\'s + "_<K>slices")')
    p.add_argument('--slices', type=int, default=3, metavar='K',
                   help='slices per channel, odd (default: 3, the multi-level paper\'s)')
    p.add_argument('--axis', default=None, metavar='AXIS',
                   help='array axis to stack along: 0, 1, 2, or the view of MultiView2DPlanner\'s plans to train '
                        '(Axial, Coronal, Sagittal) (default: nnU-Net\'s 2d slicing axis, the largest median spacing)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing dataset with this id')
    p.add_argument('-np', type=positive_int, default=2, help='worker processes (default: 2)')
    _add_allow_empty_labels(p)
    p.set_defaults(func=_cmd_stack_slices)

    p = sub.add_parser('preprocess-images', help='apply the conversion-time CT options (--window/--hist-eq) and the '
                                                 '2.5D slice stacking of a dataset to new images before '
                                                 'nnUNetv2_predict')
    p.add_argument('input', help='folder of images (nnU-Net naming, e.g. case_0000.nii.gz)')
    p.add_argument('output', help='output folder (created; existing files of the same name are replaced)')
    p.add_argument('-d', dest='dataset_id', type=int, default=None,
                   help='take --window/--hist-eq and the slice stacking (nnunet-ext stack-slices) from this '
                        'dataset\'s dataset.json')
    _add_ct_options(p)
    p.add_argument('--file-ending', default='.nii.gz')
    p.set_defaults(func=_cmd_preprocess_images)


def _dataset_json(dataset_id: int) -> Tuple[str, dict]:
    from nnunet_ext.conversion.raw_dataset import existing_datasets
    matches = [os.path.join(d, 'dataset.json') for d in existing_datasets(_raw_root(), dataset_id)
               if os.path.isfile(os.path.join(d, 'dataset.json'))]
    if len(matches) != 1:
        raise UserInputError(f"-d {dataset_id}: expected one nnUNet_raw/Dataset{dataset_id:03d}_*/dataset.json, "
                             f"found {len(matches)}")
    with open(matches[0], encoding='utf-8') as f:
        return matches[0], json.load(f)


def _slicing_axis(given: str) -> int:
    from nnunet_ext.inference.fuse_views import VIEW_AXES
    views = {name.lower(): axis for name, axis in VIEW_AXES.items()}
    if given in ('0', '1', '2'):
        return int(given)
    if given.lower() in views:
        return views[given.lower()]
    raise UserInputError(f"--axis {given!r}: give 0, 1, 2 or a view ({', '.join(VIEW_AXES)})")


def _cmd_stack_slices(args) -> None:
    from nnunet_ext.conversion.slice_stack import stack_dataset
    from nnunet_ext.nnunet_glue import dataset_name
    raw_root = _raw_root()
    source = dataset_name(args.source)
    name = args.name if args.name is not None else f"{source.split('_', 1)[1]}_{args.slices}slices"
    axis = None if args.axis is None else _slicing_axis(args.axis)
    from nnunet_ext.conversion.raw_dataset import empty_labels_allowed
    with empty_labels_allowed(args.allow_empty_labels):
        target, summary, stack = stack_dataset(os.path.join(raw_root, source), raw_root, args.id, name, args.slices,
                                               args.overwrite, args.np, axis)
    with open(os.path.join(target, 'dataset.json'), encoding='utf-8') as f:
        labels = json.load(f)['labels']
    print(_report(target, summary, labels))
    print(f"{stack.slices} slices per channel (offsets {list(stack.offsets)}) along array axis {stack.axis}, "
          f"edge slices replicated; train it with a 2d configuration whose plans slice along axis {stack.axis}")


def _cmd_preprocess_images(args) -> None:
    from nnunet_ext.conversion.slice_stack import RECORD_KEY as SLICES_KEY, SliceStack
    stack, channels = None, None
    if args.dataset_id is not None:
        if args.window or args.hist_eq:
            raise UserInputError("give either -d DATASET or --window/--hist-eq, not both")
        path, dataset_json = _dataset_json(args.dataset_id)
        record = dataset_json.get('nnunet_ext_intensity')
        intensity = CTIntensity(window=tuple(record['window']) if record and record['window'] else None,
                                hist_eq=bool(record and record['hist_eq']))
        if SLICES_KEY in dataset_json:
            stack = SliceStack.from_record(dataset_json[SLICES_KEY])
            channels = len(dataset_json[SLICES_KEY]['source_channels'])
        if record is None and stack is None:
            raise UserInputError(f"{path} records no CT intensity options and no slice stacking (a dataset not "
                                 f"made by nnunet-ext convert or stack-slices): nothing to do")
    else:
        intensity = _intensity(args)
        if not intensity.active:
            raise UserInputError("nothing to do: no --window, no --hist-eq (and -d not given)")
    if not os.path.isdir(args.input):
        raise UserInputError(f"{args.input!r} is not a folder")
    files = sorted(f for f in os.listdir(args.input) if f.endswith(args.file_ending))
    if not files:
        raise UserInputError(f"no *{args.file_ending} files in {args.input}")
    what = ', '.join(([intensity.describe()] if intensity.active else []) +
                     ([f'{stack.slices} slices per channel along axis {stack.axis}'] if stack else []))
    from nnunet_ext.parallel import signals_deferred
    created = not os.path.isdir(args.output)
    with signals_deferred():  # the folders and their names, for the `finally` below
        os.makedirs(args.output, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix='.preprocess-images-', dir=args.output)
    try:
        written = _preprocess_files(args.input, files, scratch, intensity, stack, channels, args.file_ending, what)
        with signals_deferred():  # no interrupt between the moves
            for name in written:
                os.replace(os.path.join(scratch, name), os.path.join(args.output, name))
    finally:
        with signals_deferred():
            shutil.rmtree(scratch)
            if created and not os.listdir(args.output):  # an error before anything was moved into place
                os.rmdir(args.output)
    print(f"wrote {len(written)} images to {args.output} ({what})")


def _preprocess_files(folder: str, files: List[str], output: str, intensity: CTIntensity,
                      stack: Optional['SliceStack'], channels: Optional[int], file_ending: str, what: str) -> List[str]:
    """Writes every file of ``files`` (intensity options applied; with ``stack``, as its stacked channels:
    ``CASE_XXXX`` channel ``c`` -> ``CASE_{c * k + j}``) into ``output``; returns the names written."""
    import SimpleITK as sitk
    from tqdm import tqdm
    from nnunet_ext.conversion.readers import read_image
    from nnunet_ext.conversion.slice_stack import stack_image
    pattern = re.compile(r'^(.+)_(\d{4})' + re.escape(file_ending) + '$')
    written = []
    for name in tqdm(files, desc=what, unit='image'):
        image = read_image(name, os.path.join(folder, name))  # complete, finite (the checks of every case)
        if intensity.active:
            image = intensity.apply_to_image(image)
        if stack is None:
            outputs = [(name, image)]
        else:
            match = pattern.match(name)
            if match is None or int(match.group(2)) >= channels:
                raise UserInputError(f"{name}: the dataset stacks slices of {channels} channel(s), named "
                                     f"CASE_0000{file_ending} .. CASE_{channels - 1:04d}{file_ending}")
            case, channel = match.group(1), int(match.group(2))
            outputs = [(f'{case}_{channel * stack.slices + j:04d}{file_ending}', copy)
                       for j, copy in enumerate(stack_image(image, stack))]
        for out_name, out_image in outputs:
            sitk.WriteImage(out_image, os.path.join(output, out_name), useCompression=True)
            written.append(out_name)
    return written
