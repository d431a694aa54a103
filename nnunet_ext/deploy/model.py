"""``model.json`` of an export folder (format version 1): loading, validation, one onnxruntime session per fold.

Every problem with the folder or the file is a one-line :class:`~nnunet_ext.errors.UserInputError`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from nnunet_ext.errors import UserInputError, name_some
from nnunet_ext.deploy.segmentation import Labels

FORMAT = 'nnunet-ext-export'
FORMAT_VERSION = 1
READERS = ('SimpleITKIO', 'NaturalImage2DIO')
NORMALIZATIONS = ('ZScoreNormalization', 'CTNormalization', 'NoNormalization', 'RescaleTo01Normalization',
                  'RGBTo01Normalization')
INTENSITY_KEYS = {'CTNormalization': ('mean', 'std', 'percentile_00_5', 'percentile_99_5')}
RESAMPLING_KWARGS = {'is_seg', 'order', 'order_z', 'force_separate_z', 'separate_z_anisotropy_threshold'}


@dataclass
class ExportedModel:
    """A loaded export folder: the validated ``model.json`` (``config``) and, per selected fold, an
    onnxruntime session. ``run(i, x)`` runs fold ``i`` on a float32 batch ``x`` (N, C, *patch)."""
    folder: str
    config: Dict[str, Any]
    labels: Labels
    folds: List[str]
    sessions: List[Any] = field(default_factory=list)
    providers: List[str] = field(default_factory=list)

    # the model.json keys the pipeline uses, as attributes
    @property
    def dims(self) -> int:
        return int(self.config['configuration_dims'])

    @property
    def patch_size(self) -> List[int]:
        return [int(i) for i in self.config['patch_size']]

    @property
    def spacing(self) -> List[float]:
        return [float(i) for i in self.config['spacing']]

    @property
    def transpose_forward(self) -> List[int]:
        return [int(i) for i in self.config['transpose_forward']]

    @property
    def transpose_backward(self) -> List[int]:
        return [int(i) for i in self.config['transpose_backward']]

    @property
    def mirror_axes(self) -> Optional[List[int]]:
        axes = self.config['mirror_axes']
        return None if axes is None else [int(i) for i in axes]

    @property
    def file_ending(self) -> str:
        return self.config['file_ending']

    @property
    def reader(self) -> str:
        return self.config['image_reader_writer']

    @property
    def num_input_channels(self) -> int:
        return int(self.config['num_input_channels'])

    def runner(self, index: int) -> Callable[[np.ndarray], np.ndarray]:
        """The network of the ``index``-th selected fold as a function float32 (N, C, *patch) -> logits."""
        session = self.sessions[index]
        input_name, output_name = self.config['onnx']['input'], self.config['onnx']['output']

        def run(x: np.ndarray) -> np.ndarray:
            return session.run([output_name], {input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return run


def _fail(path: str, text: str):
    raise UserInputError(f"{path}: {text}; re-export the model with `nnunet-ext export`")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_config(config: Any, path: str = 'model.json') -> Labels:
    """Checks ``config`` against format version 1 of the schema (the keys this predictor uses and their
    consistency); returns its :class:`Labels`. Raises a one-line UserInputError naming the first problem."""
    if not isinstance(config, dict):
        _fail(path, 'is not a JSON object')
    if config.get('format') != FORMAT:
        _fail(path, f"'format' is {config.get('format')!r}, expected {FORMAT!r}")
    if config.get('format_version') != FORMAT_VERSION:
        raise UserInputError(f"{path}: format_version {config.get('format_version')!r} is not supported by this "
                             f"nnunet-ext (it reads version {FORMAT_VERSION}); use the nnunet-ext that exported it")
    required = ('folds', 'onnx', 'configuration_dims', 'image_reader_writer', 'file_ending', 'num_input_channels',
                'transpose_forward', 'transpose_backward', 'spacing', 'patch_size', 'normalization',
                'resampling_data', 'resampling_probabilities', 'tile_step_size', 'use_gaussian', 'mirror_axes',
                'labels', 'regions_class_order', 'num_segmentation_heads')
    missing = [k for k in required if k not in config]
    if missing:
        _fail(path, f"missing key(s) {', '.join(missing)}")
    dims = config['configuration_dims']
    if dims not in (2, 3):
        _fail(path, f"configuration_dims must be 2 or 3, got {dims!r}")
    if config['image_reader_writer'] not in READERS:
        raise UserInputError(f"{path}: image_reader_writer {config['image_reader_writer']!r} is not supported "
                             f"without nnU-Net (supported: {', '.join(READERS)})")
    if not isinstance(config['file_ending'], str) or not config['file_ending'].startswith('.'):
        _fail(path, f"file_ending must be a string like '.nii.gz', got {config['file_ending']!r}")
    channels = config['num_input_channels']
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        _fail(path, f"num_input_channels must be an integer >= 1, got {channels!r}")
    for key in ('transpose_forward', 'transpose_backward'):
        value = config[key]
        if not isinstance(value, list) or sorted(value) != [0, 1, 2]:
            _fail(path, f"{key} must be a permutation of [0, 1, 2], got {value!r}")
    if [config['transpose_forward'][i] for i in config['transpose_backward']] != [0, 1, 2]:
        _fail(path, 'transpose_backward is not the inverse of transpose_forward')
    for key in ('spacing', 'patch_size'):
        value = config[key]
        if not isinstance(value, list) or len(value) != dims or not all(_is_number(v) and v > 0 for v in value):
            _fail(path, f"{key} must be a list of {dims} positive numbers, got {value!r}")
    if not all(isinstance(v, int) for v in config['patch_size']):
        _fail(path, f"patch_size must hold integers, got {config['patch_size']!r}")
    norm = config['normalization']
    if not isinstance(norm, list) or len(norm) != channels:
        _fail(path, f"normalization must be a list with one entry per input channel ({channels})")
    for c, entry in enumerate(norm):
        if not isinstance(entry, dict) or entry.get('scheme') not in NORMALIZATIONS:
            scheme = entry.get('scheme') if isinstance(entry, dict) else entry
            raise UserInputError(f"{path}: normalization scheme {scheme!r} of channel {c} is not supported without "
                                 f"nnU-Net (supported: {', '.join(NORMALIZATIONS)})")
        props = entry.get('intensity_properties', {})
        if not isinstance(props, dict):
            _fail(path, f"normalization[{c}].intensity_properties must be an object")
        for k in INTENSITY_KEYS.get(entry['scheme'], ()):
            if not _is_number(props.get(k)):
                _fail(path, f"normalization[{c}].intensity_properties.{k} must be a number for {entry['scheme']}")
        if not isinstance(entry.get('use_mask_for_norm', False), bool):
            _fail(path, f"normalization[{c}].use_mask_for_norm must be true or false")
    for key in ('resampling_data', 'resampling_probabilities'):
        entry = config[key]
        if not isinstance(entry, dict) or entry.get('function') != 'resample_data_or_seg_to_shape':
            function = entry.get('function') if isinstance(entry, dict) else entry
            raise UserInputError(f"{path}: {key} function {function!r} is not supported without nnU-Net "
                                 f"(supported: resample_data_or_seg_to_shape)")
        kwargs = entry.get('kwargs', {})
        if not isinstance(kwargs, dict) or set(kwargs) - RESAMPLING_KWARGS:
            _fail(path, f"{key}.kwargs must be an object with keys among {', '.join(sorted(RESAMPLING_KWARGS))}")
        if kwargs.get('is_seg', False):
            _fail(path, f"{key}.kwargs.is_seg must be false")
        for k in ('order', 'order_z'):
            if kwargs.get(k, 0) not in (0, 1, 2, 3, 4, 5):
                _fail(path, f"{key}.kwargs.{k} must be an integer 0 to 5")
        if kwargs.get('force_separate_z') not in (None, True, False):
            _fail(path, f"{key}.kwargs.force_separate_z must be null, true or false")
    step = config['tile_step_size']
    if not _is_number(step) or not 0 < step <= 1:
        _fail(path, f"tile_step_size must be in (0, 1], got {step!r}")
    if not isinstance(config['use_gaussian'], bool):
        _fail(path, 'use_gaussian must be true or false')
    axes = config['mirror_axes']
    if axes is not None and (not isinstance(axes, list) or not all(isinstance(a, int) and 0 <= a < dims
                                                                    for a in axes)):
        _fail(path, f"mirror_axes must be null or a list of axes 0..{dims - 1}, got {axes!r}")
    try:
        labels = Labels(config['labels'], config['regions_class_order'])
    except ValueError as e:
        _fail(path, str(e))
    if 'has_regions' in config and bool(config['has_regions']) != labels.has_regions:
        _fail(path, f"has_regions is {config['has_regions']!r} but the labels say {labels.has_regions}")
    if config.get('ignore_label') is not None and config['ignore_label'] != labels.ignore_label:
        _fail(path, f"ignore_label {config['ignore_label']!r} does not match labels['ignore']")
    if config['num_segmentation_heads'] != labels.num_segmentation_heads:
        _fail(path, f"num_segmentation_heads is {config['num_segmentation_heads']!r} but the labels give "
                    f"{labels.num_segmentation_heads}")
    onnx = config['onnx']
    if not isinstance(onnx, dict) or not isinstance(onnx.get('input'), str) or not isinstance(onnx.get('output'), str):
        _fail(path, "onnx must be an object with the 'input' and 'output' tensor names")
    folds = config['folds']
    if not isinstance(folds, list) or not folds or not all(
            isinstance(f, dict) and isinstance(f.get('fold'), (str, int)) and isinstance(f.get('onnx'), str)
            for f in folds):
        _fail(path, "folds must be a non-empty list of {'fold': ..., 'onnx': FILE}")
    names = [str(f['fold']) for f in folds]
    if len(set(names)) != len(names):
        _fail(path, 'folds lists a fold twice')
    return labels


def default_providers() -> List[str]:
    """CUDA (then CPU) when onnxruntime offers it, else CPU."""
    import onnxruntime
    available = onnxruntime.get_available_providers()
    return (['CUDAExecutionProvider'] if 'CUDAExecutionProvider' in available else []) + ['CPUExecutionProvider']


def make_session(path: str, providers: Sequence[str], threads: Optional[int] = None):
    """An onnxruntime InferenceSession of ``path`` on ``providers``, ``threads`` intra-op threads (None:
    onnxruntime's default)."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return onnxruntime.InferenceSession(path, sess_options=options, providers=list(providers))
    except Exception as e:  # onnxruntime raises its own exception types for unreadable models
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserInputError(f"{path}: onnxruntime cannot load it ({first})") from None


def load_model(export_folder: str, folds: Optional[Sequence[str]] = None, providers: Optional[Sequence[str]] = None,
               threads: Optional[int] = None, create_sessions: bool = True) -> ExportedModel:
    """Loads and validates ``export_folder/model.json`` and opens one onnxruntime session per fold.

    ``folds``: fold names (as model.json's ``folds[].fold``, e.g. '0' or 'all') to use; None: all listed.
    ``providers``: onnxruntime execution providers (default: CUDA if available, then CPU). ``threads``:
    intra-op threads per session (default: onnxruntime's)."""
    if not os.path.isdir(export_folder):
        raise UserInputError(f"export folder {export_folder} does not exist (or is not a folder)")
    path = os.path.join(export_folder, 'model.json')
    if not os.path.isfile(path):
        raise UserInputError(f"{export_folder} holds no model.json; is it a folder written by `nnunet-ext export`?")
    try:
        with open(path, encoding='utf-8') as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise UserInputError(f"{path}: not valid JSON ({e})") from None
    labels = validate_config(config, path)
    listed = [str(f['fold']) for f in config['folds']]
    if folds is None:
        chosen = listed
    else:
        chosen = [str(f) for f in folds]
        unknown = [f for f in chosen if f not in listed]
        if unknown:
            raise UserInputError(f"fold(s) {', '.join(unknown)} are not in {path} (it has: {name_some(listed)})")
        if len(set(chosen)) != len(chosen):
            raise UserInputError(f"a fold is given twice: {' '.join(chosen)}")
    by_name = {str(f['fold']): f for f in config['folds']}
    files = []
    for name in chosen:
        onnx_file = os.path.join(export_folder, by_name[name]['onnx'])
        if not os.path.isfile(onnx_file):
            raise UserInputError(f"the ONNX file of fold {name}, {onnx_file}, does not exist; re-export the model")
        files.append(onnx_file)
    if providers is None:
        providers = default_providers()
    else:
        import onnxruntime
        providers = list(providers)
        available = onnxruntime.get_available_providers()
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise UserInputError(f"onnxruntime provider(s) {', '.join(unknown)} are not available here "
                                 f"(available: {', '.join(available)})")
    if threads is not None and threads < 1:
        raise UserInputError(f"threads must be >= 1, got {threads}")
    model = ExportedModel(os.path.abspath(export_folder), config, labels, chosen, providers=list(providers))
    if create_sessions:
        for onnx_file in files:
            session = make_session(onnx_file, providers, threads)
            _check_session(session, config, onnx_file)
            model.sessions.append(session)
    return model


def _check_session(session, config: Dict[str, Any], path: str) -> None:
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    name_in, name_out = config['onnx']['input'], config['onnx']['output']
    if name_in not in inputs:
        raise UserInputError(f"{path} has no input named {name_in!r} (it has: {name_some(inputs)})")
    if name_out not in outputs:
        raise UserInputError(f"{path} has no output named {name_out!r} (it has: {name_some(outputs)})")
    shape = inputs[name_in].shape
    dims = config['configuration_dims']
    if len(shape) != dims + 2:
        raise UserInputError(f"{path}: input {name_in!r} has {len(shape)} axes, a {dims}d network has {dims + 2}")
    if isinstance(shape[1], int) and shape[1] != config['num_input_channels']:
        raise UserInputError(f"{path}: input {name_in!r} has {shape[1]} channels, model.json says "
                             f"{config['num_input_channels']}")
    out_shape = outputs[name_out].shape
    if len(out_shape) >= 2 and isinstance(out_shape[1], int) and out_shape[1] != config['num_segmentation_heads']:
        raise UserInputError(f"{path}: output {name_out!r} has {out_shape[1]} channels, model.json says "
                             f"{config['num_segmentation_heads']}")
