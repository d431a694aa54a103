"""Architecture mixins for the pre-activation residual U-Net (Zhang et al.; ``architectures/resunet.py``):
each overrides nnU-Net's ``build_network_architecture`` hook and nothing else.

The network is built from the plans' ``PlainConvUNet`` keywords (nnU-Net's default planner: any number
of stages, 2D/3D, anisotropic kernels and strides), the same at training and at inference (the
parameter set does not depend on deep supervision).
"""
from __future__ import annotations

from nnunet_ext.training.architecture_mixins import PLAIN_UNET, PlansUNetVariantMixin


class ResUNetArchitectureMixin(PlansUNetVariantMixin):
    """The plans' topology as Zhang et al.'s pre-activation residual U-Net (``PreActResUNet``)."""

    variant_networks = {PLAIN_UNET: 'nnunet_ext.architectures.resunet.PreActResUNet'}
    variant_name = 'the pre-activation residual U-Net'

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        arch = configuration_manager.network_arch_class_name
        if arch != PLAIN_UNET:
            raise ValueError(f"{cls.__name__} builds {cls.variant_name} from nnU-Net's PlainConvUNet plans "
                             f"(nnUNetPlans of the default planner); these plans name {arch}. Train on plans "
                             f"of nnUNetv2_plan_and_preprocess's default planner (-p nnUNetPlans).")
        return super().build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                  num_output_channels, enable_deep_supervision)


class ResUNetLFAMArchitectureMixin(ResUNetArchitectureMixin):
    """The pre-activation residual U-Net with LFAM (deformable alignment, GODC/LFAM paper Fig. 2) on every
    skip. Class attributes: ``lfam_offset_groups`` (1), ``lfam_modulated`` (True: DCNv2)."""

    variant_networks = {PLAIN_UNET: 'nnunet_ext.architectures.resunet.LFAMPreActResUNet'}
    variant_name = 'the pre-activation residual U-Net with LFAM'
    lfam_offset_groups: int = 1
    lfam_modulated: bool = True

    @classmethod
    def variant_kwargs(cls) -> dict:
        return dict(lfam_offset_groups=cls.lfam_offset_groups, lfam_modulated=cls.lfam_modulated)
