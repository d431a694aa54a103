"""Two-stage liver -> tumour prediction, the ResUNet paper's pipeline (``docs/methods/resunet.md``,
Sections II-E/F, Fig. 4 and 8: a first network segments the liver, a second one the tumours "based on the
region of interest detected by the previous network"), on nnU-Net's own predictor (``nnUNetPredictor``).

1. **Stage 1**: the liver model predicts every input case (or ``--liver_masks`` gives the masks).
2. **Crop**: the liver region of a case is the stage-1 voxels labelled with the tumour dataset's region
   labels (the crop label and the labels kept inside it, by name: for LiTS-like models, liver and
   tumour); every channel of the image is cropped to its bounding box + the margin the tumour model's
   training crops used (read from its dataset.json, ``nnunet_ext_crop``; ``--margin`` must agree), with
   ``crop_to_label``'s functions, so prediction-time crops are made exactly like the training crops.
3. **Stage 2**: the tumour model predicts the crops.
4. **Paste**: output = the liver label where stage 1 found the liver region, each kept label (tumour)
   where stage 2 predicts it inside the box (it wins over liver), background elsewhere; labels are
   numbered as in the dataset the tumour crops came from (e.g. LiTS: liver 1, tumor 2) and written with
   the input image's geometry. A case without any liver voxel gets an all-background output and a
   warning (listed at the end).

Outputs are written into a hidden scratch folder inside the output folder and moved into place only
after every case succeeded; on any error nothing new is left (an output folder created by this run is
removed again).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunet_ext.conversion.crop_to_label import (RECORD_KEY, Box, CropLabels, bounding_box, crop_image,
                                                 margin_in_voxels, sitk_spacing)
from nnunet_ext.conversion.geometry import check_same_grid
from nnunet_ext.conversion.readers import checked_label_counts, read_image
from nnunet_ext.errors import UserInputError

DEFAULT_FOLDS = ('0', '1', '2', '3', '4')  # nnUNetv2_predict's default


# ---------------------------------------------------------------- the pure part: fusing the two stages
def fuse_stages(liver_region: np.ndarray, liver_value: int, box: Optional[Box] = None,
                tumour_crop: Optional[np.ndarray] = None, tumour_values: Optional[Dict[int, int]] = None) -> np.ndarray:
    """The cascade's output label map: ``liver_value`` on ``liver_region`` (bool, full image), then inside
    ``box`` every voxel where the stage-2 crop ``tumour_crop`` has a value ``v`` of ``tumour_values`` gets
    ``tumour_values[v]``; everything else 0."""
    top = max([liver_value, *(tumour_values or {}).values()])
    out = np.zeros(liver_region.shape, np.uint8 if top < 256 else np.uint16)
    out[liver_region] = liver_value
    if box is None:
        return out
    expected = tuple(b.stop - b.start for b in box)
    if tumour_crop is None or tumour_crop.shape != expected:
        raise ValueError(f"stage-2 prediction of shape {None if tumour_crop is None else tumour_crop.shape} does "
                         f"not fit the box {box} (shape {expected})")
    unknown = sorted(set(np.unique(tumour_crop).tolist()) - {0, *tumour_values})
    if unknown:
        raise ValueError(f"stage-2 prediction has labels {unknown}; expected {sorted({0, *tumour_values})}")
    window = out[box]
    for crop_value, value in tumour_values.items():
        window[tumour_crop == crop_value] = value
    return out


# ---------------------------------------------------------------- models and inputs
@dataclass(frozen=True)
class StageModel:
    """A trained nnU-Net model: ``DATASET CONFIG TRAINER [FOLD ...]`` and the plans identifier."""
    dataset: str
    configuration: str
    trainer: str
    plans: str
    folds: Tuple[str, ...]
    option: str  # the command-line option, for messages

    @classmethod
    def parse(cls, values: Sequence[str], plans: str, option: str) -> 'StageModel':
        if len(values) < 3:
            raise UserInputError(f"{option} takes DATASET CONFIG TRAINER [FOLD ...], got {' '.join(values)}")
        folds = tuple(values[3:]) or DEFAULT_FOLDS
        bad = [f for f in folds if f != 'all' and not re.fullmatch(r'\d+', f)]
        if bad:
            raise UserInputError(f"{option}: folds are numbers or 'all', got {bad}")
        return cls(values[0], values[1], values[2], plans, folds, option)

    def folder(self, checkpoint: str) -> str:
        """The model folder in nnUNet_results, checked to hold ``checkpoint`` for every fold."""
        from nnunet_ext.nnunet_glue import dataset_name
        from nnunetv2.utilities.file_path_utilities import get_output_folder
        folder = get_output_folder(dataset_name(self.dataset), self.trainer, self.plans, self.configuration)
        if not os.path.isdir(folder):
            raise UserInputError(f"{self.option}: no trained model {folder} (train it with nnUNetv2_train "
                                 f"{self.dataset} {self.configuration} FOLD -tr {self.trainer} -p {self.plans})")
        missing = [f for f in self.folds if not os.path.isfile(os.path.join(folder, f'fold_{f}', checkpoint))]
        if missing:
            raise UserInputError(f"{self.option}: {folder} has no {checkpoint} for fold(s) {', '.join(missing)}")
        return folder


def _dataset_json(folder: str) -> dict:
    with open(os.path.join(folder, 'dataset.json'), encoding='utf-8') as f:
        return json.load(f)


def list_cases(folder: str, file_ending: str, channels: int) -> Dict[str, List[str]]:
    """``{case: [channel files]}`` of an nnU-Net input folder (``CASE_XXXX<file_ending>``), every case with
    exactly the channels ``0 .. channels - 1``."""
    if not os.path.isdir(folder):
        raise UserInputError(f"-i {folder!r} is not a folder")
    pattern = re.compile(r'^(.+)_(\d{4})' + re.escape(file_ending) + '$')
    found: Dict[str, Dict[int, str]] = {}
    for name in sorted(os.listdir(folder)):
        match = pattern.match(name)
        if match:
            found.setdefault(match.group(1), {})[int(match.group(2))] = os.path.join(folder, name)
    if not found:
        raise UserInputError(f"no CASE_0000{file_ending} images in {folder} (the models were trained on "
                             f"{file_ending} files, nnU-Net naming)")
    for case, files in found.items():
        if sorted(files) != list(range(channels)):
            raise UserInputError(f"{case}: channels {sorted(files)} in {folder}; the models take {channels} "
                                 f"(_0000 .. _{channels - 1:04d})")
    return {case: [files[c] for c in range(channels)] for case, files in found.items()}


@dataclass(frozen=True)
class PredictorSettings:
    """The nnUNetv2_predict options the cascade passes on."""
    device: str = 'cuda'
    checkpoint: str = 'checkpoint_final.pth'
    step_size: float = 0.5
    disable_tta: bool = False
    npp: int = 3
    nps: int = 3
    progress: bool = True


def _predict(folder: str, folds: Sequence[str], cases: Dict[str, List[str]], output_folder: str,
             settings: PredictorSettings) -> None:
    """nnU-Net's predictor on ``cases`` into ``output_folder/<case><file_ending>`` (sequential with -npp 0 -nps 0,
    as nnUNetv2_predict)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    device = torch.device(settings.device)
    if device.type == 'cpu':
        torch.set_num_threads(multiprocessing.cpu_count())  # as nnUNetv2_predict
    predictor = nnUNetPredictor(tile_step_size=settings.step_size, use_gaussian=True,
                                use_mirroring=not settings.disable_tta,
                                perform_everything_on_device=device.type == 'cuda', device=device,
                                allow_tqdm=settings.progress)
    predictor.initialize_from_trained_model_folder(folder, [f if f == 'all' else int(f) for f in folds],
                                                   checkpoint_name=settings.checkpoint)
    names = sorted(cases)
    inputs, outputs = [cases[c] for c in names], [os.path.join(output_folder, c) for c in names]
    os.makedirs(output_folder, exist_ok=True)
    if settings.npp == 0 and settings.nps == 0:
        predictor.predict_from_files_sequential(inputs, outputs, overwrite=True)
    else:
        predictor.predict_from_files(inputs, outputs, overwrite=True, num_processes_preprocessing=settings.npp,
                                     num_processes_segmentation_export=settings.nps)


def crop_case_to_liver(case: str, image_paths: Sequence[str], mask_path: str, region_values: Sequence[int],
                       margin_mm: float, crop_paths: Sequence[str], allowed_labels: Optional[Sequence[int]] = None
                       ) -> Optional[Box]:
    """Writes every channel of a case cropped to the bounding box of the stage-1 region (+ margin) to
    ``crop_paths``; returns the box, or None (nothing written) when stage 1 found no liver.
    ``allowed_labels``: check the mask's values (user-given masks)."""
    image = read_image(case, image_paths[0])
    mask = read_image(case, mask_path)
    check_same_grid(case, image, mask, what='liver mask')
    values = sitk.GetArrayViewFromImage(mask)
    if allowed_labels is not None:
        checked_label_counts(case, values, allowed_labels, mask_path)
    box = bounding_box(np.isin(values, region_values), margin_in_voxels(margin_mm, sitk_spacing(image)))
    if box is not None:
        for c, (path, out) in enumerate(zip(image_paths, crop_paths)):
            sitk.WriteImage(crop_image(image if c == 0 else read_image(case, path), box), out, useCompression=True)
    return box


def paste_case(case: str, image_path: str, mask_path: str, region_values: Sequence[int], liver_value: int,
               box: Optional[Box], tumour_path: str, tumour_values: Dict[int, int], output_path: str) -> None:
    """Writes the fused label map of a case (:func:`fuse_stages`) with the image's geometry."""
    image = read_image(case, image_path)
    region = np.isin(sitk.GetArrayFromImage(read_image(case, mask_path)), region_values)
    tumour_crop = None if box is None else sitk.GetArrayFromImage(read_image(case, tumour_path))
    out = sitk.GetImageFromArray(fuse_stages(region, liver_value, box, tumour_crop, tumour_values))
    out.CopyInformation(image)
    sitk.WriteImage(out, output_path, useCompression=True)


# ---------------------------------------------------------------- the two stages
@dataclass
class CascadeResult:
    cases: List[str]
    without_liver: List[str]
    boxes: Dict[str, Box]


def _read_record(tumour_folder: str, option: str) -> Tuple[dict, CropLabels]:
    tumour_json = _dataset_json(tumour_folder)
    record = tumour_json.get(RECORD_KEY)
    if record is None:
        raise UserInputError(f"{option}: {tumour_folder}/dataset.json has no '{RECORD_KEY}' record: the tumour model "
                             f"must be trained on a dataset made with nnunet-ext convert ... --crop-to-label LABEL")
    labels = CropLabels.from_record(record)
    model_labels = {k: v for k, v in tumour_json['labels'].items()}
    if model_labels != labels.crop_dataset_labels:
        raise UserInputError(f"{option}: the model's labels {model_labels} differ from its crop record "
                             f"{labels.crop_dataset_labels}")
    return tumour_json, labels


def run_cascade(input_folder: str, output_folder: str, tumour: StageModel, liver: Optional[StageModel] = None,
                liver_masks: Optional[str] = None, settings: PredictorSettings = PredictorSettings(),
                margin_mm: Optional[float] = None, save_liver_masks: Optional[str] = None,
                log: Callable[[str], None] = print) -> CascadeResult:
    """Runs the cascade (module docstring) from the images in ``input_folder`` into ``output_folder``.
    Exactly one of ``liver`` (a model) and ``liver_masks`` (a folder of stage-1 label maps named
    ``<case><file_ending>``, numbered as the tumour dataset's source labels) is given."""
    if (liver is None) == (liver_masks is None):
        raise UserInputError("give either --liver DATASET CONFIG TRAINER [FOLD ...] or --liver_masks DIR")
    if save_liver_masks is not None and liver is None:
        raise UserInputError("--save_liver_masks saves the liver model's masks; with --liver_masks there are none")
    tumour_folder = tumour.folder(settings.checkpoint)
    tumour_json, labels = _read_record(tumour_folder, tumour.option)
    record = tumour_json[RECORD_KEY]
    if margin_mm is not None and not np.isclose(margin_mm, record['margin_mm'], rtol=0, atol=1e-6):
        raise UserInputError(f"--margin {margin_mm:g} mm, but the tumour model was trained on crops with a "
                             f"{record['margin_mm']:g} mm margin (nnunet-ext convert --crop-margin); they must agree")
    file_ending, channels = tumour_json['file_ending'], len(tumour_json['channel_names'])
    if liver is not None:
        liver_folder = liver.folder(settings.checkpoint)
        liver_json = _dataset_json(liver_folder)
        if labels.crop_label not in liver_json['labels']:
            raise UserInputError(f"--liver: the model's labels {liver_json['labels']} have no {labels.crop_label!r}, "
                                 f"the label the tumour model's crops were made of")
        region_values = tuple(int(liver_json['labels'][n]) for n in labels.region_labels if n in liver_json['labels'])
        if liver_json['file_ending'] != file_ending or len(liver_json['channel_names']) != channels:
            raise UserInputError(f"the liver model takes {len(liver_json['channel_names'])} channel(s) of "
                                 f"{liver_json['file_ending']} files, the tumour model {channels} of {file_ending}")
    else:
        if not os.path.isdir(liver_masks):
            raise UserInputError(f"--liver_masks {liver_masks!r} is not a folder")
        region_values = labels.region_values
    cases = list_cases(input_folder, file_ending, channels)
    if liver_masks is not None:
        missing = [c for c in cases if not os.path.isfile(os.path.join(liver_masks, c + file_ending))]
        if missing:
            raise UserInputError(f"--liver_masks: no {missing[0]}{file_ending} in {liver_masks} "
                                 f"({len(missing)} case(s) missing)")
    liver_value = labels.source[labels.crop_label]
    tumour_values = {v: k for k, v in labels.value_map.items()}  # crop value -> source value

    created = not os.path.isdir(output_folder)
    os.makedirs(output_folder, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix='.cascade-predict-', dir=output_folder)
    succeeded = False
    try:
        stage1 = liver_masks
        if liver is not None:
            stage1 = os.path.join(scratch, 'liver')
            log(f"stage 1: liver model {liver_folder} on {len(cases)} case(s)")
            _predict(liver_folder, liver.folds, cases, stage1, settings)
        crops, boxes, without_liver = {}, {}, []
        os.makedirs(os.path.join(scratch, 'crops'))
        for case in tqdm(sorted(cases), desc='cropping to the liver', unit='case', disable=not settings.progress):
            crop_paths = [os.path.join(scratch, 'crops', f'{case}_{c:04d}{file_ending}') for c in range(channels)]
            allowed = sorted(labels.source.values()) if liver_masks is not None else None
            box = crop_case_to_liver(case, cases[case], os.path.join(stage1, case + file_ending), region_values,
                                     record['margin_mm'], crop_paths, allowed)
            if box is None:
                without_liver.append(case)
                log(f"warning: {case}: no liver found by stage 1; its output is all background")
            else:
                boxes[case], crops[case] = box, crop_paths
        stage2 = os.path.join(scratch, 'tumour')
        if crops:
            log(f"stage 2: tumour model {tumour_folder} on {len(crops)} liver crop(s)")
            _predict(tumour_folder, tumour.folds, crops, stage2, settings)
        final = os.path.join(scratch, 'final')
        os.makedirs(final)
        for case in tqdm(sorted(cases), desc='pasting', unit='case', disable=not settings.progress):
            paste_case(case, cases[case][0], os.path.join(stage1, case + file_ending), region_values, liver_value,
                       boxes.get(case), os.path.join(stage2, case + file_ending), tumour_values,
                       os.path.join(final, case + file_ending))
        for case in cases:
            os.replace(os.path.join(final, case + file_ending), os.path.join(output_folder, case + file_ending))
        succeeded = True
        if save_liver_masks is not None:
            os.makedirs(save_liver_masks, exist_ok=True)
            for case in cases:
                shutil.copyfile(os.path.join(stage1, case + file_ending),
                                os.path.join(save_liver_masks, case + file_ending))
    finally:
        shutil.rmtree(scratch)
        if created and not succeeded and not os.listdir(output_folder):
            os.rmdir(output_folder)
    return CascadeResult(sorted(cases), without_liver, boxes)
