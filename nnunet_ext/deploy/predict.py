"""Predicting a folder, as ``nnUNetv2_predict -i IN -o OUT`` (nnU-Net 2.8.1, ``nnUNetPredictor.predict_from_files``
with default options) does: per case read -> preprocess -> sliding window per fold -> mean over folds ->
label map (and probabilities) in the input's geometry -> write ``OUT/CASE<file_ending>`` (and ``CASE.npz`` with
key ``probabilities`` plus ``CASE.pkl`` with the properties, as nnU-Net's ``--save_probabilities``).
"""
from __future__ import annotations

import os
import pickle
import sys
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from nnunet_ext.errors import UserInputError
from nnunet_ext.deploy.images import channels_in_file, find_cases, read_images, temporary_name, write_segmentation
from nnunet_ext.deploy.model import ExportedModel, load_model
from nnunet_ext.deploy.preprocessing import preprocess
from nnunet_ext.deploy.segmentation import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunet_ext.deploy.sliding_window import predict_sliding_window_return_logits


def predict_logits(model: ExportedModel, data: np.ndarray, use_mirroring: bool = True,
                   tile_step_size: Optional[float] = None, half_precision: bool = True,
                   progress: bool = False) -> np.ndarray:
    """nnUNetPredictor.predict_logits_from_preprocessed_data: the sliding-window logits of every selected fold,
    summed and divided by the number of folds (in float16 like nnU-Net, unless ``half_precision`` is False)."""
    if not model.sessions:
        raise RuntimeError('the model was loaded without onnxruntime sessions')
    step = model.config['tile_step_size'] if tile_step_size is None else tile_step_size
    mirror_axes = model.mirror_axes if use_mirroring else None
    prediction = None
    for index in range(len(model.sessions)):
        logits = predict_sliding_window_return_logits(
            model.runner(index), data, model.patch_size, model.labels.num_segmentation_heads, step,
            model.config['use_gaussian'], mirror_axes, half_precision, progress)
        if prediction is None:
            prediction = logits
        else:
            prediction += logits
    if len(model.sessions) > 1:
        prediction /= len(model.sessions)
    return prediction


def predict_case(model: ExportedModel, files: Sequence[str], use_mirroring: bool = True,
                 tile_step_size: Optional[float] = None, return_probabilities: bool = False,
                 half_precision: bool = True, progress: bool = False):
    """One case (its channel files): (label map in the image's axes, properties) or, with
    ``return_probabilities``, (label map, probabilities (C, image axes) float32, properties)."""
    data, properties = read_images(files, model.reader)
    if data.shape[0] != model.num_input_channels:
        raise UserInputError(f"{os.path.basename(files[0])}: the case has {data.shape[0]} input channel(s), the "
                             f"model needs {model.num_input_channels}")
    try:
        data, properties = preprocess(data, properties, model.transpose_forward, model.spacing,
                                      model.config['normalization'], model.config['resampling_data']['kwargs'])
    except ValueError as e:
        raise UserInputError(f"{os.path.basename(files[0])}: {e}") from None
    logits = predict_logits(model, data, use_mirroring, tile_step_size, half_precision, progress)
    del data
    result = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, model.labels, properties, model.spacing, model.transpose_forward, model.transpose_backward,
        model.config['resampling_probabilities']['kwargs'], return_probabilities)
    if return_probabilities:
        return result[0], result[1], properties
    return result, properties


def _write_atomically(path: str, write: Callable) -> None:
    temporary = temporary_name(path)
    try:
        with open(temporary, 'wb') as f:
            write(f)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def check_input_folder(model: ExportedModel, input_folder: str) -> List[Tuple[str, List[str]]]:
    """The cases of ``input_folder``, each checked (from the file headers) to give the model's channel count."""
    cases = find_cases(input_folder, model.file_ending)
    for case, files in cases:
        channels = sum(channels_in_file(f, model.reader) for f in files)
        if channels != model.num_input_channels:
            raise UserInputError(f"case {case} in {input_folder} has {channels} input channel(s) "
                                 f"({', '.join(os.path.basename(f) for f in files)}), the model needs "
                                 f"{model.num_input_channels} (files {case}_0000{model.file_ending} to "
                                 f"{case}_{model.num_input_channels - 1:04d}{model.file_ending})")
    return cases


def predict_folder(model: Union[ExportedModel, str], input_folder: str, output_folder: str,
                   save_probabilities: bool = False, use_mirroring: bool = True,
                   tile_step_size: Optional[float] = None, folds: Optional[Sequence[str]] = None,
                   threads: Optional[int] = None, providers: Optional[Sequence[str]] = None,
                   half_precision: bool = True, progress: bool = True, verbose: bool = True) -> List[str]:
    """Predicts every case of ``input_folder`` (``CASE_0000<file_ending>`` ...) into ``output_folder``
    (created if missing) as ``CASE<file_ending>``, and with ``save_probabilities`` ``CASE.npz`` (key
    ``probabilities``, float32 (C, image axes)) and ``CASE.pkl`` (nnU-Net's properties). Every file is written
    atomically. ``model``: an ExportedModel or an export folder (then ``folds``, ``threads`` and ``providers``
    go to :func:`load_model`). Returns the label-map paths written."""
    if tile_step_size is not None and not 0 < tile_step_size <= 1:
        raise UserInputError(f"the step size must be in (0, 1], got {tile_step_size}")
    if isinstance(model, str):
        model = load_model(model, folds=folds, providers=providers, threads=threads)
    if os.path.exists(output_folder) and not os.path.isdir(output_folder):
        raise UserInputError(f"output folder {output_folder} is a file; name a folder")
    cases = check_input_folder(model, input_folder)
    if os.path.abspath(input_folder) == os.path.abspath(output_folder):
        raise UserInputError('the output folder must not be the input folder')
    try:
        os.makedirs(output_folder, exist_ok=True)
    except OSError as e:
        raise UserInputError(f"cannot create output folder {output_folder} ({e.strerror})") from None
    bar = _bar(len(cases)) if progress and len(cases) > 1 else None
    written = []
    try:
        for case, files in cases:
            if verbose:
                print(f"predicting {case}", file=sys.stderr, flush=True)
            result = predict_case(model, files, use_mirroring, tile_step_size, save_probabilities, half_precision,
                                  progress and bar is None)
            if save_probabilities:
                segmentation, probabilities, properties = result
                _write_atomically(os.path.join(output_folder, case + '.npz'),
                                  lambda f: np.savez_compressed(f, probabilities=probabilities))
                _write_atomically(os.path.join(output_folder, case + '.pkl'), lambda f: pickle.dump(properties, f))
                del probabilities
            else:
                segmentation, properties = result
            path = os.path.join(output_folder, case + model.file_ending)
            write_segmentation(segmentation, path, properties, model.reader)
            written.append(path)
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return written


def _bar(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc='cases')
