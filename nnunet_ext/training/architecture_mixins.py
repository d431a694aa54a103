"""Architecture mixins: each overrides nnU-Net's ``build_network_architecture`` hook and nothing else.

They build the network from the plans' own topology (any plans, no special planner needed) and
the same network at training and at inference (nnU-Net's predictor calls the same hook with
``enable_deep_supervision=False`` and loads the state dict strictly: the parameter set does not
depend on the flag). Written as classmethods so that subclasses can set options as class
attributes; nnU-Net calls them exactly like its staticmethod.
"""
from __future__ import annotations

from typing import Dict

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunet_ext.training.composition import TrainerMixin

PLAIN_UNET = 'dynamic_network_architectures.architectures.unet.PlainConvUNet'
RESENC_UNET = 'dynamic_network_architectures.architectures.unet.ResidualEncoderUNet'
# blocks per encoder stage of nnU-Net's residual-encoder presets (ResEncUNetPlanner.UNet_blocks_per_stage_encoder)
RESENC_BLOCKS_PER_STAGE = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)


def residual_encoder_kwargs(plain_kwargs: dict) -> dict:
    """``PlainConvUNet`` plans keywords -> ``ResidualEncoderUNet`` keywords: same stages, features,
    kernels, strides, norm and nonlinearity; encoder blocks as nnU-Net's ResEnc presets."""
    kwargs = {k: v for k, v in plain_kwargs.items() if k not in ('n_conv_per_stage', 'nonlin_first')}
    kwargs['n_blocks_per_stage'] = RESENC_BLOCKS_PER_STAGE[:plain_kwargs['n_stages']]
    return kwargs


class PlansUNetVariantMixin(TrainerMixin):
    """Builds a variant of the plans' U-Net (``PlainConvUNet`` or ``ResidualEncoderUNet``): the class
    in ``variant_networks`` for the plans' class, with the plans' keywords plus ``variant_kwargs()``.

    ``use_residual_encoder`` (False; True builds the residual-encoder variant from plain plans).
    """

    variant_networks: Dict[str, str] = {}
    variant_name: str = 'this variant'
    use_residual_encoder: bool = False

    @classmethod
    def variant_kwargs(cls) -> dict:
        return {}

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        arch = configuration_manager.network_arch_class_name
        kwargs = dict(configuration_manager.network_arch_init_kwargs)
        if cls.use_residual_encoder and arch == PLAIN_UNET:
            arch, kwargs = RESENC_UNET, residual_encoder_kwargs(kwargs)
        if arch not in cls.variant_networks:
            raise ValueError(f"{cls.__name__} adds {cls.variant_name} to nnU-Net's PlainConvUNet or "
                             f"ResidualEncoderUNet; these plans name {arch}. Plan with nnU-Net's default or "
                             f"ResEnc planners.")
        kwargs.update(cls.variant_kwargs())
        return get_network_from_plans(cls.variant_networks[arch], kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=enable_deep_supervision)


class LFAMArchitectureMixin(PlansUNetVariantMixin):
    """The plans' U-Net with LFAM on every skip.

    Class attributes: ``lfam_offset_groups`` (1), ``lfam_modulated`` (True: DCNv2), ``lfam_shared``
    (False: independent kernels per level; True: one shared kernel bank, the paper's ablation),
    ``use_residual_encoder`` (False; True builds the residual-encoder U-Net from plain plans).
    """

    variant_networks = {PLAIN_UNET: 'nnunet_ext.architectures.lfam_unet.LFAMPlainConvUNet',
                        RESENC_UNET: 'nnunet_ext.architectures.lfam_unet.LFAMResidualEncoderUNet'}
    variant_name = 'LFAM'
    lfam_offset_groups: int = 1
    lfam_modulated: bool = True
    lfam_shared: bool = False

    @classmethod
    def variant_kwargs(cls) -> dict:
        return dict(lfam_offset_groups=cls.lfam_offset_groups, lfam_modulated=cls.lfam_modulated,
                    lfam_shared=cls.lfam_shared)


class IFEArchitectureMixin(PlansUNetVariantMixin):
    """The plans' U-Net with instructive feature enhancement on the skips of ``ife_stages``.

    Class attributes: ``ife_score`` ('curvature' or 'entropy'), ``ife_stages`` (encoder stages,
    0 = full resolution; (1, 2) as the authors' U-Net), ``ife_ratios`` (r per stage).
    """

    variant_networks = {PLAIN_UNET: 'nnunet_ext.architectures.ife_unet.IFEPlainConvUNet',
                        RESENC_UNET: 'nnunet_ext.architectures.ife_unet.IFEResidualEncoderUNet'}
    variant_name = 'IFE'
    ife_score: str = 'entropy'
    ife_stages = (1, 2)
    ife_ratios = (0.5, 0.5)

    @classmethod
    def variant_kwargs(cls) -> dict:
        return dict(ife_score=cls.ife_score, ife_stages=tuple(cls.ife_stages), ife_ratios=tuple(cls.ife_ratios))
