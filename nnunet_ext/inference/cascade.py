"""Two-stage prediction on nnU-Net's own predictor (``nnUNetPredictor``): a *coarse* model finds a
structure, a *fine* model segments inside its bounding box. It serves two papers:

* the ResUNet paper's **liver -> tumour** cascade (``docs/methods/resunet.md``, Sections II-E/F, Fig. 4
  and 8: a first network segments the liver, a second one the tumours "based on the region of interest
  detected by the previous network"): the fine dataset was made with ``--crop-to-label liver``, the crop
  label is background for the fine model, and its labels (tumour) are painted over the coarse label;
* the multi-level paper's **coarse-to-fine** framework for one structure (``docs/methods/multi-level-structural.md``,
  Section 2.2 and Algorithm 1): the fine dataset keeps the crop label (``--crop-to-label pancreas``), so
  the fine output *replaces* the coarse one inside the box; with ``--refine T`` the box is re-estimated
  from the fine prediction and the fine model run again until the relative Dice of two successive
  predictions (Eq. 14) reaches the tolerance, the box stops changing, or T fine rounds have run.

1. **Coarse stage**: the coarse model predicts every input case (or ``--coarse_masks`` gives the masks).
2. **Crop**: the region of a case is the coarse voxels labelled with the fine dataset's region labels
   (the crop label and the labels kept inside it, by name: for LiTS-like models, liver and tumour);
   every channel of the image is cropped to its bounding box + the margin the fine model's training
   crops used (read from its dataset.json, ``nnunet_ext_crop``; ``--margin`` must agree), with
   ``crop_to_label``'s functions, so prediction-time crops are made exactly like the training crops.
3. **Fine stage**: the fine model predicts the crops (round 1). With ``--refine T``, rounds 2 .. T
   re-crop each case to the bounding box (+ margin) of its previous fine prediction and predict again; a
   case stops when the box is unchanged (the same crop gives the same prediction), when RDSC >= tol
   (Eq. 14, on the foreground of the full-image predictions), or when its fine prediction is empty.
4. **Paste**: labels are numbered as in the dataset the fine crops came from (e.g. LiTS: liver 1,
   tumor 2) and written with the input image's geometry.
   - crop label not kept (liver -> tumour): the crop label where the coarse stage found the region,
     each fine label where the fine stage predicts it inside the box (it wins), background elsewhere;
   - crop label kept (coarse-to-fine): the fine prediction inside the (last) box, background elsewhere,
     as Algorithm 1 returns the fine prediction. In round 1 the box holds every coarse voxel, so this is
     the fine output replacing the coarse one inside the box.

   A case without any coarse region voxel gets an all-background output and a warning (listed at the end).

Outputs are written into a hidden scratch folder inside the output folder and moved into place only
after every case succeeded; on any error nothing new is left (an output folder created by this run is
removed again).

The checks that run before any work starts (options, model folders and their crop record, inputs) are in
``cascade_checks.py`` (:func:`~nnunet_ext.inference.cascade_checks.check_cascade`); this module runs the
stages. ``StageModel``, ``Refinement``, ``list_cases``, ``DEFAULT_FOLDS`` and ``PAPER_REFINEMENT`` are
defined there and importable from here as well.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunet_ext.conversion.crop_to_label import Box, bounding_box, crop_image, margin_in_voxels, paste, sitk_spacing
from nnunet_ext.conversion.geometry import check_same_grid
from nnunet_ext.conversion.readers import checked_label_counts, read_image
from nnunet_ext.parallel import signals_deferred
from nnunet_ext.inference.cascade_checks import (DEFAULT_FOLDS, PAPER_REFINEMENT, Refinement,  # noqa: F401
                                                 StageModel, check_cascade, list_cases)


# ---------------------------------------------------------------- the pure part
def fuse_stages(shape: Sequence[int], box: Optional[Box] = None, fine_crop: Optional[np.ndarray] = None,
                fine_values: Optional[Dict[int, int]] = None, coarse_region: Optional[np.ndarray] = None,
                coarse_value: int = 0) -> np.ndarray:
    """The cascade's output label map of ``shape``: ``coarse_value`` on ``coarse_region`` (bool, full image;
    None when the fine stage segments the crop label itself), then inside ``box`` every voxel where the
    fine crop ``fine_crop`` has a value ``v`` of ``fine_values`` gets ``fine_values[v]``; everything else 0."""
    top = max([coarse_value, *(fine_values or {}).values()])
    out = np.zeros(tuple(shape), np.uint8 if top < 256 else np.uint16)
    if coarse_region is not None:
        out[coarse_region] = coarse_value
    if box is None:
        return out
    expected = tuple(b.stop - b.start for b in box)
    if fine_crop is None or fine_crop.shape != expected:
        raise ValueError(f"fine-stage prediction of shape {None if fine_crop is None else fine_crop.shape} does "
                         f"not fit the box {box} (shape {expected})")
    unknown = sorted(set(np.unique(fine_crop).tolist()) - {0, *fine_values})
    if unknown:
        raise ValueError(f"fine-stage prediction has labels {unknown}; expected {sorted({0, *fine_values})}")
    window = out[box]
    for crop_value, value in fine_values.items():
        window[fine_crop == crop_value] = value
    return out


def relative_dice(previous: np.ndarray, current: np.ndarray) -> float:
    """RDSC of two successive binary predictions, the multi-level paper's Eq. 14:
    ``2 |P_t n P_t+1| / (|P_t| + |P_t+1|)``; 1 when both are empty."""
    total = int(np.count_nonzero(previous)) + int(np.count_nonzero(current))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(previous & current)) / total


# ---------------------------------------------------------------- the predictor
@dataclass(frozen=True)
class PredictorSettings:
    """The nnUNetv2_predict options the cascade passes on (to both stages)."""
    device: str = 'cuda'
    checkpoint: str = 'checkpoint_final.pth'
    step_size: float = 0.5
    disable_tta: bool = False
    npp: int = 3
    nps: int = 3
    progress: bool = True


class StagePredictor:
    """nnU-Net's predictor for one stage's model, loaded once and reused for every round."""

    def __init__(self, folder: str, folds: Sequence[str], settings: PredictorSettings):
        self.folder, self.folds, self.settings = folder, tuple(folds), settings
        self._predictor = None

    def _loaded(self):
        if self._predictor is None:
            import torch
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
            device = torch.device(self.settings.device)
            if device.type == 'cpu':
                torch.set_num_threads(multiprocessing.cpu_count())  # as nnUNetv2_predict
            predictor = nnUNetPredictor(tile_step_size=self.settings.step_size, use_gaussian=True,
                                        use_mirroring=not self.settings.disable_tta,
                                        perform_everything_on_device=device.type == 'cuda', device=device,
                                        allow_tqdm=self.settings.progress)
            predictor.initialize_from_trained_model_folder(
                self.folder, [f if f == 'all' else int(f) for f in self.folds],
                checkpoint_name=self.settings.checkpoint)
            self._predictor = predictor
        return self._predictor

    def predict(self, cases: Dict[str, List[str]], output_folder: str) -> None:
        """``cases`` into ``output_folder/<case><file_ending>`` (sequential with -npp 0 -nps 0, as
        nnUNetv2_predict)."""
        predictor = self._loaded()
        names = sorted(cases)
        inputs, outputs = [cases[c] for c in names], [os.path.join(output_folder, c) for c in names]
        os.makedirs(output_folder, exist_ok=True)
        if self.settings.npp == 0 and self.settings.nps == 0:
            predictor.predict_from_files_sequential(inputs, outputs, overwrite=True)
        else:
            predictor.predict_from_files(inputs, outputs, overwrite=True,
                                         num_processes_preprocessing=self.settings.npp,
                                         num_processes_segmentation_export=self.settings.nps)


# ---------------------------------------------------------------- one case
def read_coarse_region(case: str, image_path: str, mask_path: str, region_values: Sequence[int],
                       allowed_labels: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, Tuple[float, ...]]:
    """The coarse region of a case (bool, array order: the mask's voxels with ``region_values``) and the
    image's spacing (array order); the mask must lie on the image's grid. ``allowed_labels``: check the
    mask's values (user-given masks)."""
    image = read_image(case, image_path)
    mask = read_image(case, mask_path)
    check_same_grid(case, image, mask, what='coarse mask')
    values = sitk.GetArrayViewFromImage(mask)
    if allowed_labels is not None:
        checked_label_counts(case, values, allowed_labels, mask_path)
    return np.isin(values, region_values), sitk_spacing(image)


def crop_case(case: str, image_paths: Sequence[str], box: Box, crop_paths: Sequence[str]) -> None:
    """Writes every channel of a case cropped to ``box`` to ``crop_paths``."""
    for path, out in zip(image_paths, crop_paths):
        sitk.WriteImage(crop_image(read_image(case, path), box), out, useCompression=True)


def fine_region(case: str, shape: Sequence[int], box: Box, fine_path: str) -> np.ndarray:
    """The foreground of a fine-stage crop prediction, pasted into the full image (bool)."""
    return paste(sitk.GetArrayFromImage(read_image(case, fine_path)) > 0, box, shape)


def paste_case(case: str, image_path: str, box: Optional[Box], fine_path: Optional[str], fine_values: Dict[int, int],
               output_path: str, coarse_region: Optional[np.ndarray] = None, coarse_value: int = 0) -> None:
    """Writes the fused label map of a case (:func:`fuse_stages`) with the image's geometry."""
    image = read_image(case, image_path)
    fine_crop = None if box is None else sitk.GetArrayFromImage(read_image(case, fine_path))
    out = sitk.GetImageFromArray(fuse_stages(tuple(reversed(image.GetSize())), box, fine_crop, fine_values,
                                             coarse_region, coarse_value))
    out.CopyInformation(image)
    sitk.WriteImage(out, output_path, useCompression=True)


# ---------------------------------------------------------------- the two stages
@dataclass
class CascadeResult:
    cases: List[str]
    crop_label: str  # the label whose box the fine stage sees
    without_region: List[str] = field(default_factory=list)  # no coarse region voxel: all-background output
    boxes: Dict[str, Box] = field(default_factory=dict)  # the last box of each case with a region
    rounds: Dict[str, int] = field(default_factory=dict)  # fine rounds run per case
    rdsc: Dict[str, float] = field(default_factory=dict)  # Eq. 14 between its last two rounds (refined cases)
    stopped: Dict[str, str] = field(default_factory=dict)  # why the refinement of a case stopped


class _FineStage:
    """The fine rounds of every case (module docstring, step 3), state kept on disk in ``scratch``."""

    def __init__(self, predictor: StagePredictor, cases: Dict[str, List[str]], file_ending: str, scratch: str,
                 margin_mm: float, crop_label: str, log: Callable[[str], None]):
        self.predictor, self.cases, self.file_ending, self.scratch = predictor, cases, file_ending, scratch
        self.margin_mm, self.log = margin_mm, log
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.margins: Dict[str, Tuple[int, ...]] = {}
        self.latest: Dict[str, str] = {}  # the last fine prediction (crop) of each case
        self.result = CascadeResult(sorted(cases), crop_label)

    def _round(self, number: int, boxes: Dict[str, Box]) -> Dict[str, str]:
        """Crops ``boxes`` and predicts them; returns the crops' predictions (removing the crops)."""
        folder = os.path.join(self.scratch, f'round{number}')
        crops = {}
        os.makedirs(os.path.join(folder, 'crops'))
        for case, box in boxes.items():
            crops[case] = [os.path.join(folder, 'crops', f'{case}_{c:04d}{self.file_ending}')
                           for c in range(len(self.cases[case]))]
            crop_case(case, self.cases[case], box, crops[case])
        self.predictor.predict(crops, os.path.join(folder, 'fine'))
        shutil.rmtree(os.path.join(folder, 'crops'))
        return {case: os.path.join(folder, 'fine', case + self.file_ending) for case in crops}

    def first(self, regions: Iterable[Tuple[str, Tuple[np.ndarray, Tuple[float, ...]]]]) -> None:
        """Round 1 from the coarse regions ``(case, (region, spacing))``, read one case at a time."""
        boxes = {}
        for case, (region, spacing) in regions:
            self.shapes[case], self.margins[case] = region.shape, margin_in_voxels(self.margin_mm, spacing)
            box = bounding_box(region, self.margins[case])
            if box is None:
                self.result.without_region.append(case)
            else:
                boxes[case] = box
        if boxes:
            self.log(f"fine stage: model {self.predictor.folder} on {len(boxes)} crop(s)")
            self.latest = self._round(1, boxes)
        self.result.boxes = boxes
        self.result.rounds = {case: 1 for case in boxes}

    def refine(self, refinement: Refinement) -> None:
        """Rounds 2 .. max_rounds (Algorithm 1) for the cases not yet stopped. Each round reads a case's last
        and new fine predictions once each: the new one gives the RDSC (Eq. 14) and the next round's box."""
        if refinement.max_rounds == 1:
            return
        result = self.result
        pending = {case: bounding_box(fine_region(case, self.shapes[case], result.boxes[case], self.latest[case]),
                                      self.margins[case]) for case in sorted(result.boxes)}
        for number in range(2, refinement.max_rounds + 1):
            boxes = {}
            for case, box in pending.items():
                if box is None:
                    result.stopped[case] = 'empty fine prediction'
                    self.log(f"warning: {case}: the fine stage found nothing in round {number - 1}; its output is "
                             f"all background")
                elif box == result.boxes[case]:
                    result.stopped[case] = 'box unchanged'
                else:
                    boxes[case] = box
            if not boxes:
                return
            self.log(f"fine stage, round {number}/{refinement.max_rounds}: {len(boxes)} case(s) re-cropped to their "
                     f"last fine prediction")
            predictions, pending = self._round(number, boxes), {}
            for case, box in sorted(boxes.items()):
                previous = fine_region(case, self.shapes[case], result.boxes[case], self.latest[case])
                current = fine_region(case, self.shapes[case], box, predictions[case])
                result.rdsc[case] = relative_dice(previous, current)
                result.boxes[case], self.latest[case], result.rounds[case] = box, predictions[case], number
                if result.rdsc[case] >= refinement.tolerance:
                    result.stopped[case] = 'converged'
                else:
                    pending[case] = bounding_box(current, self.margins[case])
        for case in pending:
            result.stopped[case] = 'maximum rounds'


def run_cascade(input_folder: str, output_folder: str, fine: StageModel, coarse: Optional[StageModel] = None,
                coarse_masks: Optional[str] = None, settings: PredictorSettings = PredictorSettings(),
                margin_mm: Optional[float] = None, save_coarse_masks: Optional[str] = None,
                refinement: Refinement = Refinement(), log: Callable[[str], None] = print) -> CascadeResult:
    """Runs the cascade (module docstring) from the images in ``input_folder`` into ``output_folder``.
    Exactly one of ``coarse`` (a model) and ``coarse_masks`` (a folder of coarse label maps named
    ``<case><file_ending>``, numbered as the fine dataset's source labels) is given."""
    plan = check_cascade(input_folder, fine, coarse, coarse_masks, settings.checkpoint, margin_mm, save_coarse_masks,
                         refinement)
    fine_folder, coarse_folder, labels = plan.fine_folder, plan.coarse_folder, plan.labels
    file_ending, cases, region_values = plan.file_ending, plan.cases, plan.region_values
    allowed = sorted(labels.source.values()) if coarse_masks is not None else None
    crop_value = labels.source[labels.crop_label]
    fine_values = {v: k for k, v in labels.value_map.items()}  # crop value -> source value

    created = not os.path.isdir(output_folder)
    os.makedirs(output_folder, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix='.cascade-predict-', dir=output_folder)
    succeeded = False
    try:
        stage1 = coarse_masks
        if coarse is not None:
            stage1 = os.path.join(scratch, 'coarse')
            log(f"coarse stage: model {coarse_folder} on {len(cases)} case(s)")
            StagePredictor(coarse_folder, coarse.folds, settings).predict(cases, stage1)
        mask_path = {case: os.path.join(stage1, case + file_ending) for case in cases}
        fine_stage = _FineStage(StagePredictor(fine_folder, fine.folds, settings), cases, file_ending, scratch,
                                plan.record['margin_mm'], labels.crop_label, log)
        fine_stage.first((case, read_coarse_region(case, cases[case][0], mask_path[case], region_values, allowed))
                         for case in tqdm(sorted(cases), desc=f'reading the coarse {labels.crop_label}',
                                          unit='case', disable=not settings.progress))
        for case in fine_stage.result.without_region:
            log(f"warning: {case}: no {labels.crop_label} found by the coarse stage; its output is all background")
        fine_stage.refine(refinement)
        result = fine_stage.result
        final = os.path.join(scratch, 'final')
        os.makedirs(final)
        for case in tqdm(sorted(cases), desc='pasting', unit='case', disable=not settings.progress):
            coarse_region = None
            if not labels.keeps_crop_label:
                coarse_region = read_coarse_region(case, cases[case][0], mask_path[case], region_values)[0]
            paste_case(case, cases[case][0], result.boxes.get(case), fine_stage.latest.get(case), fine_values,
                       os.path.join(final, case + file_ending), coarse_region, crop_value)
        with signals_deferred():  # all cases or none: a signal waits until the last one is in place
            for case in cases:
                os.replace(os.path.join(final, case + file_ending), os.path.join(output_folder, case + file_ending))
        succeeded = True
        if save_coarse_masks is not None:
            os.makedirs(save_coarse_masks, exist_ok=True)
            for case in cases:
                shutil.copyfile(mask_path[case], os.path.join(save_coarse_masks, case + file_ending))
    finally:
        shutil.rmtree(scratch)
        if created and not succeeded and not os.listdir(output_folder):
            os.rmdir(output_folder)
    return result
