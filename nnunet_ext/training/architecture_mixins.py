"""Architecture mixins: each overrides nnU-Net's ``build_network_architecture`` hook and nothing else.

They build the network from the plans' own topology (any plans, no special planner needed) and
the same network at training and at inference (nnU-Net's predictor calls the same hook with
``enable_deep_supervision=False`` and loads the state dict strictly: the parameter set does not
depend on the flag). Written as classmethods so that subclasses can set options as class
attributes; nnU-Net calls them exactly like its staticmethod.
"""
from __future__ import annotations

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

PLAIN_UNET = 'dynamic_network_architectures.architectures.unet.PlainConvUNet'
RESENC_UNET = 'dynamic_network_architectures.architectures.unet.ResidualEncoderUNet'
LFAM_NETWORKS = {PLAIN_UNET: 'nnunet_ext.architectures.lfam_unet.LFAMPlainConvUNet',
                 RESENC_UNET: 'nnunet_ext.architectures.lfam_unet.LFAMResidualEncoderUNet'}
# blocks per encoder stage of nnU-Net's residual-encoder presets (ResEncUNetPlanner.UNet_blocks_per_stage_encoder)
RESENC_BLOCKS_PER_STAGE = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)


def residual_encoder_kwargs(plain_kwargs: dict) -> dict:
    """``PlainConvUNet`` plans keywords -> ``ResidualEncoderUNet`` keywords: same stages, features,
    kernels, strides, norm and nonlinearity; encoder blocks as nnU-Net's ResEnc presets."""
    kwargs = {k: v for k, v in plain_kwargs.items() if k not in ('n_conv_per_stage', 'nonlin_first')}
    kwargs['n_blocks_per_stage'] = RESENC_BLOCKS_PER_STAGE[:plain_kwargs['n_stages']]
    return kwargs


class LFAMArchitectureMixin:
    """The plans' U-Net (``PlainConvUNet`` or ``ResidualEncoderUNet``) with LFAM on every skip.

    Class attributes: ``lfam_offset_groups`` (1), ``lfam_modulated`` (True: DCNv2), ``lfam_shared``
    (False: independent kernels per level; True: one shared kernel bank, the paper's ablation),
    ``lfam_residual_encoder`` (False; True builds the residual-encoder U-Net from plain plans).
    """

    lfam_offset_groups: int = 1
    lfam_modulated: bool = True
    lfam_shared: bool = False
    lfam_residual_encoder: bool = False

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        arch = configuration_manager.network_arch_class_name
        kwargs = dict(configuration_manager.network_arch_init_kwargs)
        if cls.lfam_residual_encoder and arch == PLAIN_UNET:
            arch, kwargs = RESENC_UNET, residual_encoder_kwargs(kwargs)
        if arch not in LFAM_NETWORKS:
            raise ValueError(f"{cls.__name__} adds LFAM to nnU-Net's PlainConvUNet or ResidualEncoderUNet; these "
                             f"plans name {arch}. Plan with nnU-Net's default or ResEnc planners.")
        kwargs.update(lfam_offset_groups=cls.lfam_offset_groups, lfam_modulated=cls.lfam_modulated,
                      lfam_shared=cls.lfam_shared)
        return get_network_from_plans(LFAM_NETWORKS[arch], kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=enable_deep_supervision)
