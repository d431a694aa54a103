"""A trained network made exportable with standard ONNX operators, without changing its weights or values.

Every module of our networks but one traces into standard operators as it is. The exception is LFAM
(``LateralFeatureAlignment``): its forward is a custom operator (``nnunet_ext::lateral_alignment``, one
opaque node for ``torch.compile`` and a memory-lean backward), which an ONNX runtime without our library
could not run. While exporting, each LFAM instance's ``forward`` is its standard-operator form
(``nnunet_ext.nn.deformable_conv.portable``: gathers of pixel rows and one ``MatMul`` per kernel position).
Every network exports at ONNX opset 17 (``MINIMUM_OPSET``) or later.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch

from nnunet_ext.nn.deformable_conv.portable import lateral_alignment_portable
from nnunet_ext.nn.lateral_alignment import LateralFeatureAlignment

# the default and the lowest opset exported and tested: ONNX Runtime 1.14 and TensorRT 8.6 run it
MINIMUM_OPSET = 17


@contextlib.contextmanager
def portable(network: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``network`` with every LFAM's forward in standard operators inside the block (restored after it)."""
    swapped = [m for m in network.modules() if isinstance(m, LateralFeatureAlignment)]
    for m in swapped:
        m.forward = functools.partial(lateral_alignment_portable, m)
    try:
        yield network
    finally:
        for m in swapped:
            del m.forward
