"""2.5D input for nnU-Net's ``2d`` configurations: every image channel becomes ``k`` channels, the slice
itself and its ``(k - 1) / 2`` neighbours on each side, so a 2D network sees the through-plane context
(the multi-level paper, Section 4.1: "the batch size is set to 1 with 3 slices concatenated together";
Fig. 2 and 4, "a 3-slice unit is used in the network").

**Why in the raw data, not in a trainer.** nnU-Net builds a 2d batch by picking one slice of a
preprocessed 3D case (``nnUNetDataLoader``), validates and predicts by feeding the network one slice
at a time (``nnUNetPredictor``, sliding window with a 2D patch over a 3D volume) and lets no trainer
choose the predictor: ``nnUNetv2_predict`` and the trainer's final validation always pass ``(c, y, x)``
of one slice. A trainer mixin could stack neighbours into training batches, but prediction would then
see a different input. Written as extra channels of the raw images, the neighbours travel through
everything nnU-Net does unchanged: cropping, normalisation (per channel, by the channel's name: the
copies keep the source channel's name, e.g. ``CT``), in-plane resampling, augmentation (the same spatial
transform for every channel), training, validation, ``nnUNetv2_predict`` and ensembling. It works with
any trainer. The cost is ``k`` times the disk space of the images.

**Which axis.** nnU-Net's 2d configuration slices along the axis it transposes first: the axis of the
largest median spacing (``ExperimentPlanner.determine_transpose``: ``argmax`` of the fullres target
spacing, which is the median spacing, the anisotropic axis staying the largest; ties: the first axis).
:func:`slicing_axis` computes the same from the training images' headers, in nnU-Net's array order
(``z, y, x`` for SimpleITK-read files), and the 2d configuration keeps that axis' original spacing (no
resampling across slices), so raw neighbours are preprocessed neighbours. The test checks the plans'
``transpose_forward[0]`` against the recorded axis.

**Edges.** At the first and last slices the missing neighbours are the edge slice itself (replicated,
like ``np.pad(mode='edge')``): zero is a real intensity in CT (water), and replicating adds no
structure that is not there.

**Channel order.** Source channel ``c``, offset ``o`` in ``-h .. h`` (``h = (k - 1) / 2``) becomes channel
``c * k + o + h``: ``k = 3`` turns ``{0: CT}`` into ``{0: CT (slice - 1), 1: CT, 2: CT (slice + 1)}``,
all named ``CT``. dataset.json records ``nnunet_ext_slices`` (``k``, axis, source channels and dataset);
``nnunet-ext preprocess-images -d ID`` repeats the stacking (after any recorded CT intensity options)
on new images for ``nnUNetv2_predict``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from nnunet_ext.conversion.geometry import check_same_grid
from nnunet_ext.conversion.raw_dataset import ConversionSummary, RawDatasetWriter, case_channel_files
from nnunet_ext.conversion.readers import checked_label_counts, dataset_label_values, read_image, read_label
from nnunet_ext.errors import UserInputError
from nnunet_ext.parallel import run_cases

RECORD_KEY = 'nnunet_ext_slices'


@dataclass(frozen=True)
class SliceStack:
    """``slices`` neighbouring slices along array ``axis`` as channels (module docstring)."""
    slices: int
    axis: int

    def __post_init__(self):
        if self.slices < 3 or self.slices % 2 == 0:
            raise UserInputError(f"--slices must be odd and >= 3 (the slice and its neighbours), got {self.slices}")
        if self.axis not in (0, 1, 2):
            raise UserInputError(f"the slicing axis must be 0, 1 or 2, got {self.axis}")

    @property
    def offsets(self) -> Tuple[int, ...]:
        half = self.slices // 2
        return tuple(range(-half, half + 1))

    def stack(self, array: np.ndarray) -> List[np.ndarray]:
        """The ``slices`` shifted copies of a 3D ``array``: copy ``j`` holds at slice ``s`` the slice
        ``clip(s + offsets[j], 0, n - 1)`` (edges replicated)."""
        if array.ndim != 3:
            raise UserInputError(f"2.5D stacking needs 3D images, got an array of shape {array.shape}")
        n = array.shape[self.axis]
        return [np.take(array, np.clip(np.arange(n) + offset, 0, n - 1), axis=self.axis) for offset in self.offsets]

    def channel_names(self, source: Dict[str, str]) -> Dict[str, str]:
        """Every source channel's name ``slices`` times (nnU-Net picks the normalisation by the name)."""
        return {str(int(c) * self.slices + j): name for c, name in sorted(source.items(), key=lambda i: int(i[0]))
                for j in range(self.slices)}

    def record(self, source_channels: Dict[str, str], source: str) -> dict:
        return {'slices': self.slices, 'axis': self.axis, 'offsets': list(self.offsets),
                'source_channels': dict(source_channels), 'source': source,
                'edges': 'replicated', 'channel': 'source channel c, offset o -> c * slices + o + slices // 2'}

    @classmethod
    def from_record(cls, record: dict) -> 'SliceStack':
        return cls(int(record['slices']), int(record['axis']))


def stack_image(image: sitk.Image, stack: SliceStack) -> List[sitk.Image]:
    """The shifted copies of ``image`` as images on its grid."""
    out = []
    for array in stack.stack(sitk.GetArrayFromImage(image)):
        copy = sitk.GetImageFromArray(array)
        copy.CopyInformation(image)
        out.append(copy)
    return out


def slicing_axis(spacings_zyx: Sequence[Sequence[float]]) -> int:
    """nnU-Net's 2d slicing axis: ``argmax`` of the median spacing (array order), as
    ``ExperimentPlanner.determine_transpose`` (module docstring)."""
    return int(np.argmax(np.percentile(np.asarray(spacings_zyx, float), 50, axis=0)))


def _header_spacing_zyx(path: str) -> Tuple[float, ...]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    if reader.GetDimension() != 3:
        raise UserInputError(f"{path}: 2.5D stacking needs 3D images, this one is {reader.GetDimension()}D")
    return tuple(reversed(reader.GetSpacing()))


def stack_case(case: str, image_paths: Sequence[str], outputs: Sequence[Sequence[str]], stack: SliceStack,
               label_path: Optional[str] = None, label_out: Optional[str] = None, allowed_labels: Sequence[int] = ()
               ) -> Tuple[Tuple[float, ...], Optional[Dict[int, int]]]:
    """Writes the stacked channels of one case (runs in a worker): ``outputs[c][j]`` is copy ``j`` of
    source channel ``c``; copies the label, if any, to ``label_out``. Returns (spacing, label voxel counts)."""
    for path, channel_outputs in zip(image_paths, outputs):
        image = read_image(case, path)
        for copy, out in zip(stack_image(image, stack), channel_outputs):
            sitk.WriteImage(copy, out, useCompression=True)
    if label_path is None:
        return tuple(image.GetSpacing()), None
    label = read_label(case, label_path)
    check_same_grid(case, image, label, what='label')
    counts = checked_label_counts(case, sitk.GetArrayViewFromImage(label), allowed_labels, label_path)
    sitk.WriteImage(label, label_out, useCompression=True)
    return tuple(label.GetSpacing()), counts


def stack_dataset(source_folder: str, raw_root: str, dataset_id: int, name: str, slices: int,
                  overwrite: bool = False, num_processes: int = 2, axis: int | None = None
                  ) -> Tuple[str, ConversionSummary, SliceStack]:
    """Writes ``nnUNet_raw/DatasetNNN_NAME``: the raw dataset ``source_folder`` with every image channel
    stacked (module docstring), labels copied, all-or-nothing. ``axis`` None: nnU-Net's 2d slicing axis
    of the training images."""
    with open(os.path.join(source_folder, 'dataset.json'), encoding='utf-8') as f:
        source_json = json.load(f)
    if RECORD_KEY in source_json:
        raise UserInputError(f"{source_folder} is already stacked ({source_json[RECORD_KEY]['slices']} slices)")
    file_ending, channel_names = source_json['file_ending'], source_json['channel_names']
    channels = len(channel_names)
    folders = {split: os.path.join(source_folder, f'images{split}') for split in ('Tr', 'Ts')}
    splits = {split: case_channel_files(folder, file_ending, channels, "dataset.json's channel_names")
              if os.path.isdir(folder) else {} for split, folder in folders.items()}
    if not splits['Tr']:
        raise UserInputError(f"{source_folder}/imagesTr has no *_0000{file_ending} image")
    if axis is None:
        axis = slicing_axis([_header_spacing_zyx(paths[0]) for paths in splits['Tr'].values()])
    stack = SliceStack(slices, axis)
    summary = ConversionSummary()
    with RawDatasetWriter(raw_root, dataset_id, name, overwrite, file_ending=file_ending) as writer:
        jobs, job_splits = [], []
        for split, cases in splits.items():
            for case, paths in cases.items():
                writer.claim_case(case, paths[0])
                outputs = [[writer.image_path(case, c * slices + j, split) for j in range(slices)]
                           for c in range(channels)]
                label = os.path.join(source_folder, f'labels{split}', case + file_ending)
                if not os.path.isfile(label):
                    if split == 'Tr':
                        raise UserInputError(f"{case}: no training label {label}")
                    label = None
                jobs.append((case, paths, outputs, stack, label, label and writer.label_path(case, split),
                             dataset_label_values(source_json['labels'])))
                job_splits.append(split)
        results = run_cases(stack_case, jobs, num_processes, f'stacking {slices} slices')
        for split, result in zip(job_splits, results):
            summary.add(split, *result)
        extra = {k: v for k, v in source_json.items()
                 if k not in ('channel_names', 'labels', 'numTraining', 'file_ending', 'name')}
        extra['description'] = (f"{source_json.get('description', os.path.basename(source_folder))}; "
                                f"{slices} neighbouring slices per channel (2.5D) by nnunet-ext stack-slices")
        extra[RECORD_KEY] = stack.record(channel_names, os.path.basename(os.path.normpath(source_folder)))
        extra['converted_by'] = source_json.get('converted_by', 'nnunet-ext stack-slices')
        target = writer.finish(stack.channel_names(channel_names), source_json['labels'], **extra)
    return target, summary, stack



def check_training_configuration(dataset_json: dict, transpose_forward: Sequence[int], patch_dimensions: int,
                                 configuration: str) -> None:
    """Refuses to train a stacked dataset (``nnunet_ext_slices`` in ``dataset_json``) where the stacking
    would not be the neighbouring slices: a 3d configuration, or 2d plans slicing along another axis than
    the stacked one (``transpose_forward[0]``, e.g. another view's plans of ``MultiView2DPlanner``)."""
    record = dataset_json.get(RECORD_KEY)
    if record is None:
        return
    stack = SliceStack.from_record(record)
    if patch_dimensions != 2:
        raise UserInputError(f"this dataset stacks {stack.slices} neighbouring slices (2.5D) for 2d configurations; "
                             f"the {configuration} configuration is {patch_dimensions}D: train it on the source "
                             f"dataset {record['source']} instead")
    if int(transpose_forward[0]) != stack.axis:
        raise UserInputError(f"this dataset stacks neighbouring slices along array axis {stack.axis}, but these plans "
                             f"slice the {configuration} configuration along axis {int(transpose_forward[0])} "
                             f"(transpose_forward {list(transpose_forward)}): stack it again with "
                             f"nnunet-ext stack-slices --axis {int(transpose_forward[0])}")
