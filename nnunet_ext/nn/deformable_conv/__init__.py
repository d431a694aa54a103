"""Deformable convolution (DCNv1 and modulated DCNv2) in 2D and 3D, in pure PyTorch.

This is the operator behind LFAM, the lateral feature alignment module of "Towards Accurate Medical
Image Segmentation With Gradient-Optimized Dice Loss" (``docs/methods/godc-lfam.md``,
Fig. 2): a deformable convolution on each skip connection resamples the skip feature at learned
offsets before it is fused with the up-sampled decoder feature. The paper uses the deformable
convolution of Dai et al., "Deformable Convolutional Networks", ICCV 2017 (its ref. [24], DCNv1, Eq. 2);
the optional modulation mask is that of Zhu et al., "Deformable ConvNets v2: More Deformable, Better
Results", CVPR 2019 (DCNv2, Eq. 3).

Submodules, one per layer (the Python names in parentheses are also importable from this package):

* :mod:`.geometry`: argument checks and the static geometry of a call (``deform_conv_output_size``,
  ``resolve_sampler``, ``SAMPLERS``, ``_Geometry`` / ``_geometry``);
* :mod:`.sampling`: the sampling kernels, bilinear / trilinear sampling and the kernel-position-chunked
  forward and backward arithmetic (``deform_forward``, ``deform_backward``, ``STEP_ELEMENTS``,
  ``positions_per_step``, ``steps_for``); its docstring has the formula and the implementation notes;
* :mod:`.operator`: the custom operators ``nnunet_ext::deform_conv`` and ``nnunet_ext::deform_conv_backward``
  and their registration with the autograd formula (``define_operator``), and the functional
  ``deform_conv``;
* :mod:`.module`: the layer ``DeformableConv``.
"""
from __future__ import annotations

from nnunet_ext.nn.deformable_conv.geometry import SAMPLERS, deform_conv_output_size
from nnunet_ext.nn.deformable_conv.module import DeformableConv
from nnunet_ext.nn.deformable_conv.operator import deform_conv

# also offered here, as by the single module this package replaced (lateral_alignment.py and the tests import them)
from nnunet_ext.nn.deformable_conv.geometry import IntOrTuple, _geometry, _Geometry, resolve_sampler  # noqa: F401
from nnunet_ext.nn.deformable_conv.operator import _or_unused, define_operator  # noqa: F401
from nnunet_ext.nn.deformable_conv.sampling import (DeformGrads, _compute_dtype, deform_backward,  # noqa: F401
                                                    deform_forward, positions_per_step, steps_for)

__all__ = ['deform_conv', 'DeformableConv', 'deform_conv_output_size', 'SAMPLERS']

