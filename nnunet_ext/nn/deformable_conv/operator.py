"""The custom operators ``torch.ops.nnunet_ext.deform_conv`` and ``torch.ops.nnunet_ext.deform_conv_backward``
(``torch.library.custom_op``, autograd through ``register_autograd``) around the kernels of
:mod:`.sampling`, and :func:`deform_conv`, the functional entry point that checks its arguments and calls
the operator.

Why custom operators rather than an ``autograd.Function``: ``torch.compile(fullgraph=True)`` sees one
opaque node per call instead of the unrolled K-position loop (with 27 positions and both samplers'
bookkeeping, tracing that loop took minutes), so compiling stays fast with aot_eager as with inductor,
and the graph stays whole (nnU-Net's DDP without ``find_unused_parameters`` needs one graph). Inside,
nothing reads a value back to the host (no ``.item()``, ``bool(tensor)``, ``nonzero``, data-dependent
shapes or ``torch.tensor(list, device=...)``): positions come from ``arange`` on the device and Python
numbers. Positions are formed in at least float32 whatever the input dtype (half or bfloat16 grid
coordinates would be off by up to ``size/1000`` pixels); sampling and the contraction run in at least
float32 with autocast disabled inside the operator; the output has the input's dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from nnunet_ext.nn.deformable_conv.geometry import IntOrTuple, _geometry, deform_conv_output_size
from nnunet_ext.nn.deformable_conv.sampling import deform_backward, deform_forward


# ------------------------------------------------------------------------------------------------
# custom operators: one opaque node each for torch.compile (the kernel-position loop is not unrolled
# into the graph: compiling stays fast, with aot_eager as with inductor), autograd through
# register_autograd (what is saved is what setup_context saves)
# ------------------------------------------------------------------------------------------------
def _unused() -> torch.Tensor:
    """Placeholder for a gradient that was not asked for (custom operators return tensors only)."""
    return torch.empty(0)


def _or_unused(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> torch.Tensor:
    return _unused() if t is None else t.to(dtype)


def define_operator(name: str, implementation, fake, backward=None, setup_context=None) -> None:
    """Registers ``implementation`` as the custom operator ``torch.ops.nnunet_ext.<name>`` (schema from its
    annotations) with its fake (shape) function and, if given, its autograd formula; does nothing if the
    operator exists already (this module imported a second time, e.g. under another name)."""
    try:
        getattr(torch.ops.nnunet_ext, name)
        return
    except (AttributeError, RuntimeError):
        pass
    op = torch.library.custom_op(f'nnunet_ext::{name}', implementation, mutates_args=())
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)


def _deform_conv_op(x: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor], weight: torch.Tensor,
                    bias: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                    dilation: Sequence[int], sampler: str) -> torch.Tensor:
    geo = _geometry(x, offset.shape, weight, bias, stride, padding, dilation, None if mask is None else mask.shape,
                    sampler)
    with torch.autocast(x.device.type, enabled=False):
        return deform_forward(x, offset, mask, weight, bias, geo).to(x.dtype)


def _deform_conv_fake(x, offset, mask, weight, bias, stride, padding, dilation, sampler):
    out = deform_conv_output_size(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    return x.new_empty((x.shape[0], weight.shape[0], *out))


def _deform_conv_backward_op(grad: torch.Tensor, x: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor],
                             weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                             dilation: Sequence[int], sampler: str, needs: Sequence[bool],
                             bias_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                               torch.Tensor]:
    """Gradients of input, offset, mask, weight, bias (an empty placeholder where ``needs`` is False)."""
    geo = _geometry(x, offset.shape, weight, None, stride, padding, dilation, None if mask is None else mask.shape,
                    sampler)
    with torch.autocast(x.device.type, enabled=False):
        g = deform_backward(grad, x, offset, mask, weight, geo, tuple(needs))
    return (_or_unused(g.input, x.dtype), _or_unused(g.offset, offset.dtype),
            _or_unused(g.mask, None if mask is None else mask.dtype), _or_unused(g.weight, weight.dtype),
            _or_unused(g.bias, bias_dtype))


def _deform_conv_backward_fake(grad, x, offset, mask, weight, stride, padding, dilation, sampler, needs, bias_dtype):
    shapes = (x, offset, mask, weight)
    out = [t.new_empty(t.shape) if need and t is not None else x.new_empty(0) for t, need in zip(shapes, needs[:4])]
    out.append(x.new_empty((weight.shape[0],), dtype=bias_dtype) if needs[4] else x.new_empty(0))
    return tuple(out)


def _deform_conv_setup(ctx, inputs, output):
    x, offset, mask, weight, bias, stride, padding, dilation, sampler = inputs
    ctx.save_for_backward(x, offset, mask, weight)
    ctx.args = (list(stride), list(padding), list(dilation), sampler)
    ctx.bias_dtype = weight.dtype if bias is None else bias.dtype


def _deform_conv_autograd(ctx, grad):
    x, offset, mask, weight = ctx.saved_tensors
    needs = [bool(b) for b in ctx.needs_input_grad[:5]]
    grads = torch.ops.nnunet_ext.deform_conv_backward(grad, x, offset, mask, weight, *ctx.args, needs, ctx.bias_dtype)
    return (*[g if need else None for g, need in zip(grads, needs)], None, None, None, None)


define_operator('deform_conv_backward', _deform_conv_backward_op, _deform_conv_backward_fake)
define_operator('deform_conv', _deform_conv_op, _deform_conv_fake, _deform_conv_autograd, _deform_conv_setup)


def deform_conv(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                stride: IntOrTuple = 1, padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
                mask: Optional[torch.Tensor] = None, *, sampler: str = 'auto') -> torch.Tensor:
    """Deformable convolution, 2D or 3D (``n = weight.ndim - 2``), DCNv1 (``mask=None``, Dai et al. Eq. 2)
    or modulated DCNv2 (``mask`` given, Zhu et al. Eq. 3). Drop-in for ``torchvision.ops.deform_conv2d`` in
    2D (same arguments, offset layout and sampling rules), extended to 3D.

    Args:
        input: ``(B, C, H, W)`` or ``(B, C, D, H, W)``.
        offset: ``(B, n * G * K, *out)`` with ``K = prod(kernel_size)``, ``G`` the number of offset
            groups (inferred from the channel count; input channel ``c`` uses offset group
            ``c // (C / G)``) and ``out`` the conv output size (:func:`deform_conv_output_size`).
            Channel ``n * (g * K + k) + i`` is the offset along axis ``i`` of kernel position ``k``
            (row-major over the kernel: ``k = ky * kw + kx`` in 2D, ``(kz * kh + ky) * kw + kx`` in 3D)
            of offset group ``g``; the axes in order: 2D ``(dy, dx)`` = (row, column) exactly as
            torchvision, 3D ``(dz, dy, dx)``. Offsets are in pixels of the input.
        weight: ``(O, C / groups, *kernel_size)``; ``groups = C // weight.shape[1]`` as in torchvision.
        bias: ``(O,)`` or ``None``.
        stride, padding, dilation: int or tuple of ``n`` ints, as for ``nn.ConvNd``. Padding is zero
            padding, i.e. sampling positions are shifted by ``-padding`` and outside is zero.
        mask: ``(B, G * K, *out)`` modulation scalars, channel ``g * K + k``; ``None`` means 1.
        sampler: ``'auto'`` (``'gather'`` on CPU, ``'grid_sample'`` elsewhere), ``'gather'`` or
            ``'grid_sample'`` (:mod:`nnunet_ext.nn.deformable_conv.sampling`); both give the same result.

    Returns:
        ``(B, O, *out)`` in the input's dtype.

    Sampling rules (torchvision's): the input is read at ``p0 * stride - padding + p_k * dilation +
    offset``, bilinearly (2D) or trilinearly (3D) interpolated; every neighbouring pixel outside the
    input counts as zero, so a point at ``-1`` or ``size`` (or beyond) along an axis reads zero. The
    value is not differentiable with respect to the offset where a coordinate is an integer (kink of
    the interpolation); the backward then returns the one-sided derivative from above, like torchvision.
    Positions are formed, and sampling and the contraction run, in at least float32 (half and bfloat16
    inputs are up-cast inside, also under autocast); offsets and mask may have another floating dtype
    than the input. Memory: what is kept for backward is the arguments themselves; the largest
    temporary is one kernel position's samples ``(B, C, *out)`` (:mod:`nnunet_ext.nn.deformable_conv.sampling`).
    """
    if not offset.is_floating_point():
        raise ValueError(f"offset must be a floating-point tensor, got {offset.dtype}")
    if mask is not None and not mask.is_floating_point():
        raise ValueError(f"mask must be a floating-point tensor, got {mask.dtype}")
    geo = _geometry(input, offset.shape, weight, bias, stride, padding, dilation,
                    None if mask is None else mask.shape, sampler)
    return torch.ops.nnunet_ext.deform_conv(input, offset, mask, weight, bias, list(geo.stride),
                                            list(geo.padding), list(geo.dilation), geo.sampler)

