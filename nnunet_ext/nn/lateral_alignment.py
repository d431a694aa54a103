"""Lateral feature alignment module (LFAM) of the GODC/LFAM paper
(``docs/methods/godc-lfam.md``, Section II, Fig. 2).

Down-sampling, padding and up-sampling shift decoder features against the encoder features they
are fused with. LFAM resamples the encoder skip with a deformable convolution (Dai et al. 2017, Eq. 2;
modulated, Zhu et al. 2019, Eq. 3) before the fusion, the sampling offsets being predicted from both
features, so that the skip is aligned with the up-sampled decoder feature.

Our reading (the paper shows only the figure): offsets (and the DCNv2 modulation mask) come from
one convolution over ``cat(skip, up)``, zero-initialised so that training starts from the regular
sampling grid with a mask of ``sigmoid(0) = 0.5`` (the DCNv2 initialisation); the skip feature is
the one resampled; the aligned skip replaces the skip in the decoder's concatenation.

Memory and compilation. LFAM sits on every skip connection, at every resolution, so what it keeps for
backward matters as much as a convolution block's. Its forward and backward are two custom operators
(``nnunet_ext::lateral_alignment`` and its backward, ``torch.library.custom_op``) that keep only ``skip``
and ``up`` (plus the parameters): the backward recomputes the offset/mask prediction (one convolution,
what ``torch.utils.checkpoint`` on the predictor would cost) and runs the deformable convolution's
kernel-position-chunked backward (``nnunet_ext.nn.deformable_conv``), which writes the offset and
mask-logit gradients straight into the predictor's output gradient; the mask's sigmoid is applied per
kernel position, so no full mask tensor exists. The alternative, autograd through
``conv -> split -> sigmoid -> deform_conv``, keeps ``cat(skip, up)``, the offsets (``n * K`` channels:
81 in 3D with a 3x3x3 kernel, against 32 skip channels), the mask and, without the chunked operator,
the whole im2col tensor: about 58x the skip in 3D. Saving skip, up, offsets and mask (no recompute)
would still be ~4.4x the skip in 3D (C = 32, K = 27); recomputing the prediction brings it to 2x
(skip + up) for one extra forward convolution of the predictor.
:meth:`LateralFeatureAlignment.compute_conv_feature_map_size` counts what is kept and the largest
temporary (:func:`alignment_memory`). Forward and backward read nothing back to the host and are one
node each under ``torch.compile(fullgraph=True)``. Under autocast the predictor convolution runs in the
autocast dtype (as an ``nn.Conv`` would); the deformable convolution samples and contracts in at least
float32.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ext.nn.deformable_conv.geometry import OffsetChannels
from nnunet_ext.nn.deformable_conv import (DeformableConv, _compute_dtype, _geometry, _Geometry, _or_unused,
                                           define_operator, deform_backward, deform_conv, deform_forward, steps_for)

IntOrTuple = Union[int, Sequence[int]]


def _conv_dim(conv_op: Type[nn.Module]) -> int:
    for ndim, op in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d)):
        if issubclass(conv_op, op):
            return ndim
    raise ValueError(f"conv_op must be nn.Conv2d or nn.Conv3d, got {conv_op}")


def _kernel(kernel_size: IntOrTuple, ndim: int) -> Tuple[int, ...]:
    kernel = (kernel_size,) * ndim if isinstance(kernel_size, int) else tuple(int(k) for k in kernel_size)
    if len(kernel) != ndim or any(k < 1 or k % 2 == 0 for k in kernel):
        raise ValueError(f"LFAM needs odd kernel sizes, one per axis ({ndim}), got {kernel_size}")
    return kernel


class SharedKernelSlice(OffsetChannels, nn.Module):
    """A deformable convolution whose kernel is a slice of a kernel bank shared by several levels.

    The paper's "Conv. shared" ablation (Table II) shares the deformable kernels of all LFAMs, as
    FPN shares its heads. FPN's levels all have 256 channels; nnU-Net's have 32, 64, ... and
    possibly different (anisotropic) kernel sizes. Our definition: one bank of shape
    ``(C_max, C_max, *k_max)`` (+ bias ``C_max``) for all levels; a level with ``C`` channels and
    kernel ``k`` uses the leading ``C x C`` channel block and the central ``k`` of the bank's kernel.
    Every level thus trains the same parameters (the narrow levels the leading block).
    """

    def __init__(self, bank: DeformableConv, channels: int, kernel_size: Sequence[int]):
        super().__init__()
        kernel = tuple(int(k) for k in kernel_size)
        if bank.groups != 1 or bank.in_channels != bank.out_channels:
            raise ValueError(f"a shared kernel bank must be a square, ungrouped DeformableConv (C -> C, groups=1), "
                             f"got {bank.in_channels} -> {bank.out_channels} channels, groups={bank.groups}")
        if channels > bank.in_channels or len(kernel) != bank.ndim or \
                any(k > b or (b - k) % 2 for k, b in zip(kernel, bank.kernel_size)):
            raise ValueError(f"a level with {channels} channels and kernel {kernel} does not fit the shared bank "
                             f"({bank.in_channels} channels, kernel {bank.kernel_size}): it needs at most the bank's "
                             f"channels and a centred sub-kernel")
        if channels % bank.offset_groups:
            raise ValueError(f"a level with {channels} channels cannot use the bank's {bank.offset_groups} "
                             f"offset groups")
        self.bank = bank
        self.in_channels = self.out_channels = channels
        self.kernel_size = kernel
        self.ndim = bank.ndim
        self.offset_groups = bank.offset_groups
        self.sampler = bank.sampler
        self.stride = (1,) * self.ndim
        self.dilation = (1,) * self.ndim
        self.padding = tuple(k // 2 for k in kernel)
        self._crop = tuple(slice((b - k) // 2, (b - k) // 2 + k) for b, k in zip(bank.kernel_size, kernel))

    def weight_and_bias(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """This level's kernel (a view of the bank: gradients flow into the bank) and bias."""
        c = self.in_channels
        weight = self.bank.weight[(slice(0, c), slice(0, c), *self._crop)]
        bias = None if self.bank.bias is None else self.bank.bias[:c]
        return weight, bias

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight, bias = self.weight_and_bias()
        return deform_conv(x, offset, weight, bias, 1, self.padding, 1, mask, sampler=self.sampler)


def _predict(skip: torch.Tensor, up: torch.Tensor, pred_weight: torch.Tensor, pred_bias: Optional[torch.Tensor],
             padding: Tuple[int, ...], offset_channels: int, modulated: bool, pred_dtype: torch.dtype):
    """Offsets and mask logits (``None`` unmodulated), views of ``conv(cat(skip, up))`` in ``pred_dtype``; the
    deformable convolution applies the sigmoid per kernel position."""
    conv = F.conv2d if skip.ndim == 4 else F.conv3d
    cat = torch.cat((skip.to(pred_dtype), up.to(pred_dtype)), 1)
    pred = conv(cat, pred_weight.to(pred_dtype), None if pred_bias is None else pred_bias.to(pred_dtype), 1, padding)
    del cat
    if not modulated:
        return pred, None
    return pred[:, :offset_channels], pred[:, offset_channels:]


def _alignment_geometry(skip: torch.Tensor, weight: torch.Tensor, padding: Sequence[int], offset_groups: int,
                        modulated: bool, sampler: str) -> _Geometry:
    n = skip.ndim - 2
    B, spatial = skip.shape[0], tuple(skip.shape[2:])
    K = math.prod(weight.shape[2:])
    return _geometry(skip, (B, n * offset_groups * K, *spatial), weight, None, 1, tuple(padding), 1,
                     (B, offset_groups * K, *spatial) if modulated else None, sampler)


def _alignment_op(skip: torch.Tensor, up: torch.Tensor, pred_weight: torch.Tensor, pred_bias: Optional[torch.Tensor],
                  weight: torch.Tensor, bias: Optional[torch.Tensor], padding: Sequence[int], offset_groups: int,
                  modulated: bool, sampler: str, pred_dtype: torch.dtype) -> torch.Tensor:
    """``deform_conv(skip; offset, mask = split(conv(cat(skip, up))))``; backward keeps only skip, up and
    the parameters (module docstring)."""
    geo = _alignment_geometry(skip, weight, padding, offset_groups, modulated, sampler)
    offset_channels = geo.n * geo.offset_groups * geo.K
    with torch.autocast(skip.device.type, enabled=False):
        offset, mask_logits = _predict(skip, up, pred_weight, pred_bias, tuple(padding), offset_channels, modulated,
                                       pred_dtype)
        return deform_forward(skip, offset, mask_logits, weight, bias, geo, mask_logits=True).to(skip.dtype)


def _alignment_fake(skip, up, pred_weight, pred_bias, weight, bias, padding, offset_groups, modulated, sampler,
                    pred_dtype):
    return skip.new_empty((skip.shape[0], weight.shape[0], *skip.shape[2:]))


def _alignment_backward_op(grad: torch.Tensor, skip: torch.Tensor, up: torch.Tensor, pred_weight: torch.Tensor,
                           pred_bias: Optional[torch.Tensor], weight: torch.Tensor, padding: Sequence[int],
                           offset_groups: int, modulated: bool, sampler: str, pred_dtype: torch.dtype,
                           needs: Sequence[bool], bias_dtype: torch.dtype
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                      torch.Tensor]:
    """Gradients of skip, up, predictor weight and bias, kernel, bias (empty placeholders where ``needs``
    is False). Recomputes the prediction, runs the deformable convolution's backward into the
    prediction's gradient, then the predictor's convolution backward."""
    geo = _alignment_geometry(skip, weight, padding, offset_groups, modulated, sampler)
    need_skip, need_up, need_pw, need_pb, need_w, need_b = needs
    need_pred = need_skip or need_up or need_pw or need_pb
    n, C = geo.n, geo.channels
    offset_channels = n * geo.offset_groups * geo.K
    padding = tuple(padding)
    grad_skip = grad_up = grad_pw = grad_pb = None
    with torch.autocast(skip.device.type, enabled=False):
        offset, mask_logits = _predict(skip, up, pred_weight, pred_bias, padding, offset_channels, modulated,
                                       pred_dtype)
        grad_pred = None
        if need_pred:  # the deformable convolution writes d loss / d offset and d loss / d mask into it
            grad_pred = torch.empty(geo.batch, pred_weight.shape[0], *geo.out, device=skip.device,
                                    dtype=_compute_dtype(pred_dtype))
        g = deform_backward(grad, skip, offset, mask_logits, weight, geo,
                            (need_skip, need_pred, need_pred and modulated, need_w, need_b),
                            offset_grad_out=None if grad_pred is None else grad_pred[:, :offset_channels],
                            mask_grad_out=None if grad_pred is None or not modulated
                            else grad_pred[:, offset_channels:],
                            mask_logits=True)
        del offset, mask_logits
        grad_skip = g.input
        if need_pred:
            cat = torch.cat((skip.to(pred_dtype), up.to(pred_dtype)), 1)
            grad_cat, grad_pw, grad_pb = torch.ops.aten.convolution_backward(
                grad_pred.to(pred_dtype), cat, pred_weight.to(pred_dtype),
                None if pred_bias is None else [pred_bias.shape[0]], [1] * n, list(padding), [1] * n, False,
                [0] * n, 1, [need_skip or need_up, need_pw, need_pb and pred_bias is not None])
            del cat, grad_pred
            if need_skip:
                grad_skip = grad_cat[:, :C] + grad_skip.to(grad_cat.dtype)
            if need_up:
                grad_up = grad_cat[:, C:].contiguous()  # its own storage (outputs must not alias)
    return (_or_unused(grad_skip, skip.dtype), _or_unused(grad_up, up.dtype),
            _or_unused(grad_pw, pred_weight.dtype), _or_unused(grad_pb, None if pred_bias is None else pred_bias.dtype),
            _or_unused(g.weight, weight.dtype), _or_unused(g.bias, bias_dtype))


def _alignment_backward_fake(grad, skip, up, pred_weight, pred_bias, weight, padding, offset_groups, modulated,
                             sampler, pred_dtype, needs, bias_dtype):
    out = [t.new_empty(t.shape) if need and t is not None else skip.new_empty(0)
           for t, need in zip((skip, up, pred_weight, pred_bias, weight), needs[:5])]
    out.append(skip.new_empty((weight.shape[0],), dtype=bias_dtype) if needs[5] else skip.new_empty(0))
    return tuple(out)


def _alignment_setup(ctx, inputs, output):
    skip, up, pred_weight, pred_bias, weight, bias, padding, offset_groups, modulated, sampler, pred_dtype = inputs
    ctx.save_for_backward(skip, up, pred_weight, pred_bias, weight)
    ctx.args = (list(padding), offset_groups, modulated, sampler, pred_dtype)
    ctx.bias_dtype = weight.dtype if bias is None else bias.dtype


def _alignment_autograd(ctx, grad):
    skip, up, pred_weight, pred_bias, weight = ctx.saved_tensors
    needs = [bool(b) for b in ctx.needs_input_grad[:6]]
    grads = torch.ops.nnunet_ext.lateral_alignment_backward(grad, skip, up, pred_weight, pred_bias, weight, *ctx.args,
                                                            needs, ctx.bias_dtype)
    return (*[g if need else None for g, need in zip(grads, needs)], None, None, None, None, None)


define_operator('lateral_alignment_backward', _alignment_backward_op, _alignment_backward_fake)
define_operator('lateral_alignment', _alignment_op, _alignment_fake, _alignment_autograd, _alignment_setup)


class LateralFeatureAlignment(nn.Module):
    """Aligns ``skip`` to ``up`` (same spatial size): ``DCN(skip; offsets, mask = f(cat(skip, up)))``.

    Args:
        skip_channels: channels of the encoder feature (kept by the module).
        guide_channels: channels of the up-sampled decoder feature the skip is aligned to.
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d``.
        kernel_size: of the offset predictor and of the deformable convolution (odd; per axis for
            anisotropic nnU-Net stages, e.g. ``(1, 3, 3)``).
        offset_groups: channel groups of the skip that get their own offsets.
        modulated: DCNv2 (learned mask) if True, DCNv1 otherwise.
        deformable_conv: a ``DeformableConv`` or ``SharedKernelSlice`` of matching width and kernel,
            used instead of a new one (sharing across levels).

    Forward and backward are custom operators that keep only ``skip`` and ``up`` (module docstring);
    numerically it is ``deformable_conv(skip, offset, sigmoid(mask_logits))`` with
    ``offset, mask_logits = offset_predictor(cat(skip, up))``.
    """

    def __init__(self, skip_channels: int, guide_channels: int, conv_op: Type[nn.Module],
                 kernel_size: IntOrTuple = 3, offset_groups: int = 1, modulated: bool = True,
                 deformable_conv: Optional[nn.Module] = None):
        super().__init__()
        ndim = _conv_dim(conv_op)
        kernel = _kernel(kernel_size, ndim)
        padding = tuple(k // 2 for k in kernel)
        self.modulated = modulated
        self.deform = deformable_conv if deformable_conv is not None else DeformableConv(
            skip_channels, skip_channels, kernel, padding=padding, offset_groups=offset_groups, ndim=ndim)
        if not hasattr(self.deform, 'weight_and_bias'):
            raise ValueError(f"deformable_conv must be a DeformableConv or SharedKernelSlice, got "
                             f"{type(self.deform).__name__}")
        if self.deform.in_channels != skip_channels or self.deform.out_channels != skip_channels \
                or tuple(self.deform.kernel_size) != kernel:
            raise ValueError(f"deformable_conv maps {self.deform.in_channels}->{self.deform.out_channels} channels "
                             f"with kernel {tuple(self.deform.kernel_size)}; the skip has {skip_channels}, "
                             f"kernel {kernel}")
        if tuple(self.deform.stride) != (1,) * ndim or tuple(self.deform.dilation) != (1,) * ndim \
                or tuple(self.deform.padding) != padding:
            raise ValueError(f"deformable_conv must keep the skip's size (stride 1, dilation 1, padding {padding}), "
                             f"got stride {self.deform.stride}, dilation {self.deform.dilation}, "
                             f"padding {self.deform.padding}")
        self.guide_channels = guide_channels
        predicted = self.deform.offset_channels + (self.deform.mask_channels if modulated else 0)
        self.offset_predictor = conv_op(skip_channels + guide_channels, predicted, kernel, 1, padding, bias=True)
        self.reset_offset_predictor()

    def reset_offset_predictor(self) -> None:
        """Zero offsets and mask logits: the regular grid, mask 0.5 (DCNv2's initialisation)."""
        nn.init.zeros_(self.offset_predictor.weight)
        nn.init.zeros_(self.offset_predictor.bias)

    def forward(self, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if skip.shape[2:] != up.shape[2:]:
            raise ValueError(f"skip {tuple(skip.shape)} and up-sampled feature {tuple(up.shape)} differ in size")
        if skip.ndim != self.deform.ndim + 2 or skip.shape[1] != self.deform.in_channels \
                or up.shape[1] != self.guide_channels:
            raise ValueError(f"LFAM ({self.deform.ndim}D) expects skip (B, {self.deform.in_channels}, ...) and up "
                             f"(B, {self.guide_channels}, ...), got {tuple(skip.shape)} and {tuple(up.shape)}")
        weight, bias = self.deform.weight_and_bias()
        geo = _alignment_geometry(skip, weight, self.deform.padding, self.deform.offset_groups, self.modulated,
                                  self.deform.sampler)
        device = skip.device.type
        if torch.is_autocast_enabled(device):
            pred_dtype = torch.get_autocast_dtype(device)
        else:
            pred_dtype = torch.promote_types(torch.promote_types(skip.dtype, up.dtype),
                                             self.offset_predictor.weight.dtype)
        predictor = self.offset_predictor
        return torch.ops.nnunet_ext.lateral_alignment(skip, up, predictor.weight, predictor.bias, weight, bias,
                                                      list(self.deform.padding), self.deform.offset_groups,
                                                      self.modulated, geo.sampler, pred_dtype)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Elements (batch 1, nnU-Net's convention for ``compute_conv_feature_map_size``) of what the module
        keeps for backward plus the largest temporary of its forward or backward, for a skip of spatial
        size ``input_size``; see :func:`alignment_memory` for the terms."""
        return alignment_memory(self, input_size)['total']


def alignment_memory(module: LateralFeatureAlignment, input_size: Sequence[int], batch: int = 1) -> dict:
    """Element counts of LFAM's memory for ``batch`` samples of a skip of spatial size ``input_size``, from
    what the implementation holds (float32 and int32 count one element, int64 two; the convolutions' own
    scratch buffers are not counted, as nnU-Net's estimates do not count them for any convolution).

    Per voxel (``V`` voxels, ``V'`` of the skip zero-padded by one voxel per side): ``C`` skip (= output)
    channels, ``C_up`` guide channels, ``P`` predicted channels (``(n + 1) * G * K`` modulated, ``n * G * K``
    not), ``G`` offset groups, ``c = 2^n`` interpolation corners; ``W`` the deformable kernel's and
    ``W_p`` the predictor's number of weights; ``s`` kernel positions per step of the 'gather' sampler
    (1 but on small maps, ``nnunet_ext.nn.deformable_conv.positions_per_step``): the terms of "one
    position" below count ``s`` times, plus a regrouping copy ``C V`` per position when ``s > 1`` or
    ``G > 1``. The 'grid_sample' sampler (GPU) holds less (no padded copies, no corner lists): the
    estimate is an upper bound for it.

    * ``kept`` (saved for backward): ``skip`` and ``up``, ``(C + C_up) V`` (``skip`` is the encoder's
      feature, which the encoder keeps anyway; it is counted because the module keeps it too);
    * ``forward``: the larger of the predictor step, ``cat(skip, up)`` and the prediction
      ``(C + C_up + P) V``, and the kernel-position loop: the prediction, the output accumulator and one
      position's samples ``(P + 2C) V``, the padded channels-last skip ``C V'``, the corners' rows,
      weights and per-axis weights with the mask and the bag's bookkeeping ``G (3c + 2n + 5) V`` (plus a
      regrouping copy), the kernel split by position ``W`` and the base positions ``n V / batch``;
    * ``backward``: the largest of three moments. Throughout the loop: the recomputed prediction and its
      gradient ``2P V``, the output gradient ``C V``, the kernel and its gradient ``2W`` and the base
      positions. (a) The weight gradient of one position: the padded skip copy and the input-gradient
      accumulator ``2C V'``, the sample gradient, the samples, the modulated samples (and a regrouping
      copy) ``3C V``, the corners ``G (2c + 3n + 1) V``. (b) Its input gradient: three padded maps (the
      skip copy, the accumulator, this position's part) ``3C V'``, the sample gradient ``C V``, corners,
      sort and bag bookkeeping ``G (10c + 3n + 1) V + 2G V'``. (c) The predictor's backward
      ``(P + 3C + 2 C_up) V + W_p + 2W`` (the prediction's gradient, ``cat``, its gradient, the input
      gradient, the weight gradients);
    * ``total = kept + max(forward, backward)``.
    """
    n = len(input_size)
    deform = module.deform
    if n != deform.ndim:
        raise ValueError(f"input_size {tuple(input_size)} has {n} axes; this LFAM is {deform.ndim}D")
    L = int(np.prod(input_size, dtype=np.int64))
    V = batch * L
    Vp = batch * int(np.prod([s + 2 for s in input_size], dtype=np.int64))
    C = deform.in_channels
    Cu = module.guide_channels
    G = deform.offset_groups
    P = module.offset_predictor.out_channels
    q = 2 ** n
    groups = getattr(deform, 'groups', 1)
    step = steps_for(V, C, deform.kernel_numel, groups)  # kernel positions per step (the 'gather' sampler)
    regroup = C if G > 1 or step > 1 else 0
    W = deform.kernel_numel * C * deform.out_channels // groups
    Wp = module.offset_predictor.weight.numel()
    kept = (C + Cu) * V
    forward = max((C + Cu + P) * V,
                  (P + C + step * (C + regroup + G * (3 * q + 2 * n + 5))) * V + C * Vp + W + n * L)
    loop = (2 * P + C) * V + 2 * W + n * L  # prediction and its gradient, output gradient, kernel and gradient
    backward = max(loop + 2 * C * Vp + step * (3 * C + regroup + G * (2 * q + 3 * n + 1)) * V,  # weight gradient
                   loop + (3 * C + 2 * G) * Vp + step * (C + G * (10 * q + 3 * n + 1)) * V,  # input gradient
                   (P + 3 * C + 2 * Cu) * V + Wp + 2 * W)  # predictor's backward
    return {'kept': np.int64(kept), 'forward': np.int64(forward), 'backward': np.int64(backward),
            'total': np.int64(kept + max(forward, backward))}
