"""Our trainers' networks and losses built exactly as nnU-Net builds them on CUDA (compile on, DDP on),
on tiny hand-written plans, with batches in each trainer's own target format. Used by
``test_gpu_readiness.py`` and its two-process DDP worker ``ddp_gpu_readiness_worker.py``.

What nnU-Net 2.8.1 does on CUDA (``nnUNetTrainer.initialize``, ``_build_loss``, ``train_step``):
``torch.compile(network)``; ``loss.dc = torch.compile(loss.dc)``; the lowest deep-supervision weight
is 0 when it compiles; under ``-num_gpus N`` ``DDP(network)`` without ``find_unused_parameters``;
fp16 autocast. The CPU stand-ins: ``torch.compile(backend='aot_eager', fullgraph=True)`` (one graph:
DDP survives the zero-weight head only then), DDP over gloo, ``torch.autocast('cpu', ...)``.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench'))
from step_time import with_distance_maps, with_trainer_targets  # noqa: E402  (the trainers' own target formats)

# one trainer per network class and per loss of ours
TRAINERS = (
    'nnUNetTrainerGODC',            # PlainConvUNet, GODC + CE
    'nnUNetTrainerGODCOnly',        # GODC alone
    'nnUNetTrainerGODCLFAM',        # LFAM on PlainConvUNet, GODC + CE
    'nnUNetTrainerLFAMResEnc',      # LFAM on the residual-encoder U-Net
    'nnUNetTrainerLFAMShared',      # LFAM with one shared kernel bank
    'nnUNetTrainerMLL',             # multi-level structural loss (distance maps in the targets)
    'nnUNetTrainerIFECurvature',    # IFE, curvature score
    'nnUNetTrainerGODCIFEEntropy',  # IFE, entropy score, GODC + CE
    'nnUNetTrainerANUNet',          # ANU-Net, hybrid loss
    'nnUNetTrainerUNetPlusPlus',    # UNet++ (no gates), hybrid loss
    'nnUNetTrainerResUNet',         # pre-activation residual U-Net
    'nnUNetTrainerResUNetGODCLFAM',  # residual U-Net with LFAM
    'nnUNetTrainerMLN',             # multi-level structural network
    'nnUNetTrainerANUNetPaper',     # the ANU-Net paper's network (BatchNorm, max-pooling; 2D only)
    'nnUNetTrainerResUNetPaper',    # Zhang et al.'s network (BatchNorm, fixed topology; 2D only)
)
TWO_D_ONLY = ('nnUNetTrainerANUNetPaper', 'nnUNetTrainerResUNetPaper')  # the papers' 2D networks refuse 3D plans


# trainers whose network is another listed trainer's (nnUNetTrainerGODC's PlainConvUNet): compiling it again
# tests nothing new (the losses differ, and are checked by the other tests)
SAME_NETWORK_AS_GODC = ('nnUNetTrainerGODCOnly', 'nnUNetTrainerMLL')


# trainers whose 3D network is, up to a switch checked in 2D, another listed trainer's 3D network: UNet++ is
# ANU-Net without gates, LFAMShared is GODCLFAM's deformable convolution with one kernel bank, the plain
# residual U-Net is inside ResUNetGODCLFAM's; 2D only in the per-trainer readiness checks
SAME_3D_NETWORK = ('nnUNetTrainerUNetPlusPlus', 'nnUNetTrainerLFAMShared', 'nnUNetTrainerResUNet')


def cases(configurations, trainers=TRAINERS):
    """``(trainer, configuration)`` pairs for ``pytest.mark.parametrize``; 2D-only trainers and those of
    ``SAME_3D_NETWORK`` in ``2d`` only."""
    return [(n, c) for n in trainers for c in configurations
            if c == '2d' or (n not in TWO_D_ONLY and n not in SAME_3D_NETWORK)]

DATASET_JSON = {'channel_names': {'0': 'CT'}, 'labels': {'background': 0, 'liver': 1, 'tumour': 2},
                'numTraining': 4, 'file_ending': '.nii.gz'}

_ARCH = {
    '2d': dict(conv_op='torch.nn.modules.conv.Conv2d', norm_op='torch.nn.modules.instancenorm.InstanceNorm2d',
               kernel_sizes=[[3, 3]] * 4, strides=[[1, 1], [2, 2], [2, 2], [2, 2]], patch_size=[32, 32],
               spacing=[0.8, 0.8], batch_dice=True),
    '3d_fullres': dict(conv_op='torch.nn.modules.conv.Conv3d', norm_op='torch.nn.modules.instancenorm.InstanceNorm3d',
                       kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                       strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
                       patch_size=[16, 32, 32], spacing=[2.5, 0.8, 0.8], batch_dice=False),
}


def tiny_plans() -> dict:
    """nnU-Net plans with a 4-stage PlainConvUNet (4/8/16/32 features) for ``2d`` and ``3d_fullres``
    (anisotropic first stage), shaped like the default planner's output."""
    configurations = {}
    for name, a in _ARCH.items():
        configurations[name] = {
            'data_identifier': f'nnUNetPlans_{name}', 'preprocessor_name': 'DefaultPreprocessor', 'batch_size': 2,
            'patch_size': a['patch_size'], 'median_image_size_in_voxels': a['patch_size'], 'spacing': a['spacing'],
            'normalization_schemes': ['CTNormalization'], 'use_mask_for_norm': [False],
            'resampling_fn_data': 'resample_data_or_seg_to_shape', 'resampling_fn_seg': 'resample_data_or_seg_to_shape',
            'resampling_fn_data_kwargs': {'is_seg': False, 'order': 3, 'order_z': 0, 'force_separate_z': None},
            'resampling_fn_seg_kwargs': {'is_seg': True, 'order': 1, 'order_z': 0, 'force_separate_z': None},
            'resampling_fn_probabilities': 'resample_data_or_seg_to_shape',
            'resampling_fn_probabilities_kwargs': {'is_seg': False, 'order': 1, 'order_z': 0, 'force_separate_z': None},
            'architecture': {
                'network_class_name': 'dynamic_network_architectures.architectures.unet.PlainConvUNet',
                'arch_kwargs': {'n_stages': 4, 'features_per_stage': [4, 8, 16, 32], 'conv_op': a['conv_op'],
                                'kernel_sizes': a['kernel_sizes'], 'strides': a['strides'],
                                'n_conv_per_stage': [2, 2, 2, 2], 'n_conv_per_stage_decoder': [2, 2, 2], 'conv_bias': True,
                                'norm_op': a['norm_op'], 'norm_op_kwargs': {'eps': 1e-05, 'affine': True},
                                'dropout_op': None, 'dropout_op_kwargs': None, 'nonlin': 'torch.nn.LeakyReLU',
                                'nonlin_kwargs': {'inplace': True}},
                '_kw_requires_import': ['conv_op', 'norm_op', 'dropout_op', 'nonlin']},
            'batch_dice': a['batch_dice'],
        }
    return {'dataset_name': 'Dataset999_Tiny', 'plans_name': 'nnUNetPlans', 'original_median_spacing_after_transp': [1, 1, 1],
            'original_median_shape_after_transp': [8, 32, 32], 'image_reader_writer': 'SimpleITKIO',
            'transpose_forward': [0, 1, 2], 'transpose_backward': [0, 1, 2], 'configurations': configurations,
            'experiment_planner_used': 'ExperimentPlanner', 'label_manager': 'LabelManager',
            'foreground_intensity_properties_per_channel': {'0': {'max': 1.0, 'mean': 0.0, 'median': 0.0, 'min': -1.0,
                                                                  'percentile_00_5': -1.0, 'percentile_99_5': 1.0,
                                                                  'std': 1.0}},
            'continue_training': False}


def trainer_class(name: str):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    if name == 'nnUNetTrainer':
        return nnUNetTrainer
    import importlib
    import nnunet_ext.trainers as package
    import pkgutil
    for module in pkgutil.iter_modules(package.__path__):
        cls = getattr(importlib.import_module(f'nnunet_ext.trainers.{module.name}'), name, None)
        if cls is not None:
            return cls
    raise KeyError(name)


_ORIGINAL_COMPILE = torch.compile


def aot_eager_compile(module, **kwargs):
    """``torch.compile`` as nnU-Net calls it, on the CPU backend that traces forward and backward."""
    return _ORIGINAL_COMPILE(module, **{**kwargs, 'backend': 'aot_eager'})


@contextlib.contextmanager
def cuda_defaults():
    """``torch.compile`` calls made by nnU-Net inside run with the ``aot_eager`` backend (the default,
    inductor, compiles C++ on a CPU)."""
    torch.compile = aot_eager_compile
    try:
        yield
    finally:
        torch.compile = _ORIGINAL_COMPILE


def build(name: str, configuration: str, compile_network: bool = True):
    """``(trainer, network, loss)`` as ``nnUNetTrainer.initialize`` makes them on CUDA: ``_do_i_compile()``
    true, DDP when a process group is up (``trainer.is_ddp``); the network compiled with
    ``fullgraph=True`` (one graph) when ``compile_network``. Everything on the CPU."""
    cls = trainer_class(name)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = cls(copy.deepcopy(tiny_plans()), configuration, 0, dict(DATASET_JSON), torch.device('cpu'))
    trainer.device = torch.device('cpu')  # nnU-Net sets cuda:RANK under DDP
    trainer._do_i_compile = lambda: True
    trainer.num_input_channels = 1
    network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                                 trainer.label_manager.num_segmentation_heads, True)
    with cuda_defaults():
        trainer.loss = loss = trainer._build_loss()
    if compile_network:
        network = aot_eager_compile(network, fullgraph=True)
    return trainer, network, loss


def make_batch(trainer, batch_size: int = 2, seed: int = 0) -> dict:
    """A batch in the trainer's own target format (deep-supervision scales, distance maps for the
    multi-level trainers): random image, a label map of a disc (liver) holding a smaller disc (tumour)."""
    g = torch.Generator().manual_seed(seed)
    patch = list(trainer.configuration_manager.patch_size)
    data = torch.randn(batch_size, 1, *patch, generator=g)
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in patch], indexing='ij')
    target = torch.zeros(batch_size, 1, *patch)
    for b in range(batch_size):
        centre = [s / 2 + float(torch.randint(-2, 3, (1,), generator=g)) for s in patch]
        r2 = sum(((x - c) / (s / 2)) ** 2 for x, c, s in zip(grids, centre, patch))
        target[b, 0][r2 < 0.5] = 1
        target[b, 0][r2 < 0.12] = 2
    batch = with_trainer_targets(trainer, [{'data': data, 'target': target}])
    return with_distance_maps(trainer, batch)[0][0]


def split_batch(batch: dict, rank: int, world_size: int) -> dict:
    def part(t):
        n = t.shape[0] // world_size
        return t[rank * n:(rank + 1) * n]
    target = batch['target']
    return {'data': part(batch['data']),
            'target': [part(t) for t in target] if isinstance(target, list) else part(target)}


def forward_loss(network, loss, batch):
    output = network(batch['data'])
    return loss(output, batch['target'])


def parameters_without_gradient(network) -> list:
    return [n for n, p in network.named_parameters() if p.requires_grad and p.grad is None]

