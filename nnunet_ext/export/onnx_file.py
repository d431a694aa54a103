"""One fold's network -> one ONNX file, checked against PyTorch with ONNX Runtime.

The input is ``(batch, C, *patch_size)``: the batch axis is free (a server may batch tiles; the deploy
predictor sends one tile at a time, as nnU-Net does), the spatial axes are the plans' patch size, the only
size nnU-Net's sliding window ever feeds (smaller images are padded to it). Fixed spatial sizes let the
runtime plan its memory once and keep every reshape of our modules static. Exported with PyTorch's
TorchScript-based exporter (``dynamo=False``): it takes seconds where the ``torch.export`` path takes
tens, and supports everything our networks need from opset 17.
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from typing import Sequence

import numpy as np
import torch

from nnunet_ext.errors import UserInputError
from nnunet_ext.export.portable import portable

INPUT_NAME, OUTPUT_NAME = 'image', 'logits'
# |ONNX - PyTorch| allowed, relative to the largest |logit| of the check (float32 arithmetic in another order)
RELATIVE_TOLERANCE = 1e-4


def _operator_of(error: Exception) -> str:
    """The operator an exporter error names (``... unrecognized namespace nnunet_ext::x`` or ``operator 'aten::y'``)."""
    for pattern in (r"namespace ([\w:.]+)", r"operator '([\w:.]+)'", r"operator ([\w:.]+::[\w.]+)"):
        found = re.search(pattern, str(error))
        if found:
            return found.group(1).rstrip('.')
    return type(error).__name__


def _require(module: str) -> None:
    import importlib.util
    if importlib.util.find_spec(module) is None:
        raise UserInputError(f"export needs the Python package {module}: pip install {module}")


@contextlib.contextmanager
def _without_attention_fast_path():
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def write_onnx(network: torch.nn.Module, path: str, input_shape: Sequence[int], opset: int) -> None:
    """Exports ``network`` (eval mode, standard-operator form) for inputs ``(batch, *input_shape)``."""
    _require('onnx')
    network.eval()
    example = torch.zeros(1, *input_shape)
    try:
        # no_grad: no activations kept for a backward while tracing (memory grows with the patch); without
        # nn.MultiheadAttention's fused fast path (the MLN's point attention), which has no ONNX form
        with portable(network), torch.no_grad(), _without_attention_fast_path(), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # the exporter's deprecation and tracer notes
            torch.onnx.export(network, (example,), path, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: 'batch'}, OUTPUT_NAME: {0: 'batch'}})
    except torch.onnx.errors.OnnxExporterError as e:
        raise UserInputError(f"{type(network).__name__} cannot be exported to ONNX opset {opset}: operator "
                             f"{_operator_of(e)} has no ONNX form ({str(e).splitlines()[0]})") from None


def check_onnx(network: torch.nn.Module, path: str, input_shape: Sequence[int], seed: int = 0) -> dict:
    """Runs the ONNX file and ``network`` on the same random batch of two and compares their logits.

    Faithful means: the largest absolute difference is within :data:`RELATIVE_TOLERANCE` of the largest
    logit, or, for a network whose output jumps with rounding (IFE's entropy: a feature that moves by one
    float32 step across a histogram level changes a count, hence possibly which channels are selected), no
    larger than the difference between PyTorch's own float64 and float32 logits (plus that tolerance): ONNX
    Runtime then differs from PyTorch no more than PyTorch at another precision does. Returns the measured
    differences; a ``UserInputError`` if the export is not faithful."""
    _require('onnxruntime')
    import onnxruntime

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *input_shape, generator=generator)
    network.eval()
    with torch.no_grad():
        expected = network(x).numpy()
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    tolerance = RELATIVE_TOLERANCE * max(1.0, float(np.abs(expected).max()))
    measured = {'max_abs_difference': float(np.abs(got - expected).max())}
    if measured['max_abs_difference'] <= tolerance:
        return measured
    with torch.no_grad():
        in_float64 = network.double()(x.double()).float().numpy()
    network.float()
    measured['pytorch_float64_vs_float32'] = float(np.abs(in_float64 - expected).max())
    if measured['max_abs_difference'] <= measured['pytorch_float64_vs_float32'] + tolerance:
        return measured
    raise UserInputError(f"{os.path.basename(path)}: ONNX Runtime's logits differ from PyTorch's by "
                         f"{measured['max_abs_difference']:.3g} (largest logit {float(np.abs(expected).max()):.3g}; "
                         f"PyTorch in float64 differs by {measured['pytorch_float64_vs_float32']:.3g}): the export "
                         f"is not faithful")
