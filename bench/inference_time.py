"""Inference time of trainers' networks with nnU-Net's own predictor, for ``bench/run_all.py``.

Per trainer, the network is built as ``nnUNetv2_predict`` builds it (the trainer's
``build_network_architecture(..., enable_deep_supervision=False)``) and loads the trainer's weights
strictly (so this also checks that the parameter set does not depend on deep supervision). An
``nnUNetPredictor`` with nnU-Net's defaults (tile step 0.5, Gaussian weighting, mirroring over the
trainer's ``inference_allowed_mirroring_axes``) runs ``predict_sliding_window_return_logits`` on the
same preprocessed cases for every trainer: the network-dependent part of prediction (preprocessing and
export are the same for every trainer and left out). A network with a ``max_level`` attribute and a
``prune_level`` property (ANU-Net, UNet++) is timed at every level ``1..max_level`` by setting
``network.prune_level``. Entries are interleaved round by round, alternating the order.
"""
from __future__ import annotations

import contextlib
import io
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np


@dataclass
class InferenceEntry:
    """One timed network: a trainer's, at one prune level (None: not a prunable network)."""
    trainer: str
    level: Optional[int]
    predictor: object
    mirror_axes: Optional[Tuple[int, ...]] = None  # the trainer's test-time mirroring (None: none)

    @property
    def mirroring(self) -> str:
        """The mirrored axes and the passes per tile they cost (``2 ** len(axes)``)."""
        axes = tuple(self.mirror_axes or ())
        return f"{', '.join(map(str, axes)) or 'none'} ({2 ** len(axes)})"

    @property
    def label(self) -> str:
        return self.trainer if self.level is None else f'{self.trainer} L{self.level}'

    def prepare(self) -> None:
        if self.level is not None:
            self.predictor.network.prune_level = self.level


def _unwrapped(network):
    return getattr(network, '_orig_mod', network)


def inference_network(trainer):
    """The trainer's network rebuilt without deep supervision, with the trainer's weights loaded strictly."""
    network = type(trainer).build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                       trainer.num_input_channels,
                                                       trainer.label_manager.num_segmentation_heads,
                                                       enable_deep_supervision=False)
    network.load_state_dict(_unwrapped(trainer.network).state_dict(), strict=True)
    return network.to(trainer.device).eval()


def is_prunable(network) -> bool:
    return hasattr(network, 'max_level') and isinstance(getattr(type(network), 'prune_level', None), property)


def inference_entries(name: str, trainer) -> List[InferenceEntry]:
    """The trainer's network in an ``nnUNetPredictor``; one entry per prune level where it has levels."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    if trainer.inference_allowed_mirroring_axes is None:
        # set when a trainer builds its data loaders (the reference's did, to give the batches): every trainer
        # must predict with the mirror axes its checkpoint would carry, or the ratios compare 1 pass with 4
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    network = inference_network(trainer)
    with contextlib.redirect_stdout(io.StringIO()):  # "perform_everything_on_device ... only for cuda"
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                    perform_everything_on_device=True, device=trainer.device, verbose=False,
                                    allow_tqdm=False)
    axes = trainer.inference_allowed_mirroring_axes
    predictor.manual_initialization(network, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, name, axes)
    if is_prunable(network):
        return [InferenceEntry(name, level, predictor, axes) for level in range(1, network.max_level + 1)]
    return [InferenceEntry(name, None, predictor, axes)]


def preprocessed_cases(trainer, count: int):
    """The first ``count`` preprocessed training cases of the trainer's dataset, as float tensors."""
    import torch
    dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder)
    identifiers = sorted(dataset.identifiers)[:count]
    return [torch.from_numpy(np.asarray(dataset.load_case(k)[0], dtype=np.float32)) for k in identifiers]


def _predict(entry: InferenceEntry, cases) -> None:
    entry.prepare()
    for case in cases:
        entry.predictor.predict_sliding_window_return_logits(case)


def time_inference(entries: List[InferenceEntry], cases, device, rounds: int, warmup: int,
                   peak_memory: Optional[Callable[[Callable[[], object]], Optional[float]]] = None,
                   progress: Optional[Callable[[], None]] = None) -> Tuple[Dict[str, float], Dict[str, float]]:
    """``(median seconds per case, peak memory of predicting the first case)`` per entry label."""
    import torch
    times = {e.label: [] for e in entries}
    for r in range(warmup + rounds):
        for entry in (entries if r % 2 == 0 else entries[::-1]):
            if device.type == 'cuda':
                torch.cuda.synchronize()
            start = time.perf_counter()
            _predict(entry, cases)
            if device.type == 'cuda':
                torch.cuda.synchronize()
            if r >= warmup:
                times[entry.label].append((time.perf_counter() - start) / len(cases))
        if progress is not None:
            progress()
    peaks = {}
    if peak_memory is not None:
        for entry in entries:
            peaks[entry.label] = peak_memory(lambda: _predict(entry, cases[:1]))
    return {label: statistics.median(t) for label, t in times.items()}, peaks
