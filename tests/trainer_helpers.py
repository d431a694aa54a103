"""Trainers built by hand in tests (no training): one way to construct them, :func:`make_trainer`, on either
of two plan sources, each a ``(plans, dataset_json)`` pair:

* the tiny *planned phantom*: a 2D phantom planned by nnU-Net's default planner (:func:`plan_phantom`; the
  ``planned`` fixture of conftest.py yields its pair, with nnU-Net's folders set for the module);
* the *tiny hand-written plans*: :func:`tiny` (:func:`tiny_plans` with :data:`DATASET_JSON`), a 4-stage
  PlainConvUNet (4/8/16/32 features) for ``2d`` and ``3d_fullres``, no files needed (the
  ``nnunet_folders`` fixture sets nnU-Net's folders).

Batches for them: :func:`batch` (deep-supervision outputs and targets for comparing losses) and
:func:`make_batch` (data and target in a trainer's own target format, for training steps).

The GPU-readiness part (``test_gpu_readiness.py`` and its two-process DDP worker
``ddp_gpu_readiness_worker.py``): our trainers' networks and losses built exactly as nnU-Net builds them on
CUDA (compile on, DDP on), on the tiny hand-written plans (:func:`build`). What nnU-Net 2.8.1 does on CUDA
(``nnUNetTrainer.initialize``, ``_build_loss``, ``train_step``): ``torch.compile(network)``;
``loss.dc = torch.compile(loss.dc)``; the lowest deep-supervision weight is 0 when it compiles; under
``-num_gpus N`` ``DDP(network)`` without ``find_unused_parameters``; fp16 autocast. The CPU stand-ins:
``torch.compile(backend='aot_eager', fullgraph=True)`` (one graph: DDP survives the zero-weight head only
then), DDP over gloo, ``torch.autocast('cpu', ...)``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import os
import sys
from typing import Tuple, Union

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_ext.demo.phantom import write_phantom_dataset

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench')


# ------------------------------------------------------------------------------------ plan source: phantom

DATASET_ID = 203


def plan_phantom(root: str, planner: str = 'ExperimentPlanner'):
    """Plans (does not preprocess) a 2D phantom dataset under ``root`` with ``planner``; returns
    ``(environ, plans, dataset_json)``, ``environ`` nnU-Net's three folders (set in ``os.environ`` only while
    planning)."""
    environ = {k: os.path.join(root, k) for k in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')}
    saved = {k: os.environ.get(k) for k in environ}
    for k, v in environ.items():
        os.environ[k] = v
        os.makedirs(v)
    try:
        from nnunet_ext.planning import plan_and_preprocess
        write_phantom_dataset(environ['nnUNet_raw'], DATASET_ID, 'LossPhantom', num_train=3, num_test=0,
                              shape=(32, 32), progress=False)
        plans_id = plan_and_preprocess(DATASET_ID, planner, ['2d'], fingerprint_processes=1,
                                       preprocess=False, progress=False)
        folder = os.path.join(environ['nnUNet_preprocessed'], f'Dataset{DATASET_ID:03d}_LossPhantom')
        return (environ, load_json(os.path.join(folder, plans_id + '.json')),
                load_json(os.path.join(environ['nnUNet_raw'], f'Dataset{DATASET_ID:03d}_LossPhantom', 'dataset.json')))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------- plan source: hand-written

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
                                'n_conv_per_stage': [2, 2, 2, 2], 'n_conv_per_stage_decoder': [2, 2, 2],
                                'conv_bias': True,
                                'norm_op': a['norm_op'], 'norm_op_kwargs': {'eps': 1e-05, 'affine': True},
                                'dropout_op': None, 'dropout_op_kwargs': None, 'nonlin': 'torch.nn.LeakyReLU',
                                'nonlin_kwargs': {'inplace': True}},
                '_kw_requires_import': ['conv_op', 'norm_op', 'dropout_op', 'nonlin']},
            'batch_dice': a['batch_dice'],
        }
    return {'dataset_name': 'Dataset999_Tiny', 'plans_name': 'nnUNetPlans',
            'original_median_spacing_after_transp': [1, 1, 1],
            'original_median_shape_after_transp': [8, 32, 32], 'image_reader_writer': 'SimpleITKIO',
            'transpose_forward': [0, 1, 2], 'transpose_backward': [0, 1, 2], 'configurations': configurations,
            'experiment_planner_used': 'ExperimentPlanner', 'label_manager': 'LabelManager',
            'foreground_intensity_properties_per_channel': {'0': {'max': 1.0, 'mean': 0.0, 'median': 0.0, 'min': -1.0,
                                                                  'percentile_00_5': -1.0, 'percentile_99_5': 1.0,
                                                                  'std': 1.0}},
            'continue_training': False}


def tiny() -> Tuple[dict, dict]:
    """The hand-written plan source as ``(plans, dataset_json)``, like the ``planned`` fixture's pair."""
    return tiny_plans(), dict(DATASET_JSON)


# ------------------------------------------------------------------------------------------ the trainer

DATASET_JSON_VARIANTS = {
    'labels': {},
    'ignore_label': {'labels': {'background': 0, 'liver': 1, 'tumour': 2, 'ignore': 3}},
    'regions': {'labels': {'background': 0, 'liver_and_tumour': [1, 2], 'tumour': 2}, 'regions_class_order': [1, 2]},
    'regions_ignore': {'labels': {'background': 0, 'liver_and_tumour': [1, 2], 'tumour': 2, 'ignore': 3},
                       'regions_class_order': [1, 2]},
}


@functools.lru_cache(maxsize=None)
def _trainer_classes() -> dict:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_ext.registry import trainer_classes
    return {'nnUNetTrainer': nnUNetTrainer, **trainer_classes()}


def trainer_class(name: str) -> type:
    """Our trainer class ``name`` (``nnunet_ext.registry.trainer_classes()``) or nnU-Net's ``nnUNetTrainer``."""
    return _trainer_classes()[name]


def make_trainer(trainer: Union[str, type], planned: Tuple[dict, dict], variant: Union[str, dict] = 'labels',
                 configuration: str = '2d', device: torch.device = torch.device('cpu')):
    """A trainer instance (as nnU-Net constructs it, not initialised) of ``trainer`` (a class, or a name for
    :func:`trainer_class`) on a plan source ``planned = (plans, dataset_json)`` (the ``planned`` fixture's, or
    :func:`tiny`'s); ``variant``: a name of :data:`DATASET_JSON_VARIANTS` or a dict, either one merged into
    (a copy of) the dataset.json. The plans are copied; nnU-Net's start-up banner is not printed."""
    cls = trainer_class(trainer) if isinstance(trainer, str) else trainer
    plans, dataset_json = planned
    plans = copy.deepcopy(plans)
    plans['continue_training'] = False  # nnU-Net 2.8.1 pops this key
    overrides = DATASET_JSON_VARIANTS[variant] if isinstance(variant, str) else variant
    dataset_json = {**copy.deepcopy(dataset_json), **copy.deepcopy(overrides)}
    with contextlib.redirect_stdout(io.StringIO()):
        return cls(plans, configuration, 0, dataset_json, device)


# --------------------------------------------------------------------------------------------- batches

def batch(trainer, batch_size, seed=0):
    """Deep-supervision outputs and targets shaped as nnU-Net's data pipeline makes them."""
    g = torch.Generator().manual_seed(seed)
    lm = trainer.label_manager
    patch = trainer.configuration_manager.patch_size
    outputs, targets = [], []
    for scale in trainer._get_deep_supervision_scales():
        shape = [max(1, int(round(p * s))) for p, s in zip(patch, scale)]
        outputs.append(torch.randn(batch_size, lm.num_segmentation_heads, *shape, generator=g, dtype=torch.float64,
                                   requires_grad=True))
        labels = torch.randint(0, 3, (batch_size, 1, *shape), generator=g)
        if lm.ignore_label is not None:
            labels[torch.rand(labels.shape, generator=g) < 0.2] = lm.ignore_label
        if lm.has_regions:
            regions = [((labels == 1) | (labels == 2)), labels == 2]
            if lm.ignore_label is not None:
                regions.append(labels == lm.ignore_label)
            targets.append(torch.cat(regions, 1).double())
        else:
            targets.append(labels.double())
    return outputs, targets


def _step_time():
    """``bench/step_time.py``: the trainers' own target formats (deep-supervision targets, distance maps)."""
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    import step_time
    return step_time


def make_batch(trainer, batch_size: int = 2, seed: int = 0) -> dict:
    """A batch in the trainer's own target format (deep-supervision scales, distance maps for the
    multi-level trainers): random image, a label map of a disc (liver) holding a smaller disc (tumour)."""
    step_time = _step_time()
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
    batch = step_time.with_trainer_targets(trainer, [{'data': data, 'target': target}])
    return step_time.with_distance_maps(trainer, batch)[0][0]


def split_batch(batch: dict, rank: int, world_size: int) -> dict:
    def part(t):
        n = t.shape[0] // world_size
        return t[rank * n:(rank + 1) * n]
    target = batch['target']
    return {'data': part(batch['data']),
            'target': [part(t) for t in target] if isinstance(target, list) else part(target)}


# --------------------------------------------------------------------------------------- memory oracle

def kept_for_backward(network, x) -> int:
    """Elements autograd keeps for backward when ``network(x)`` runs (``saved_tensors_hooks``; unique
    storages, parameters excluded): the oracle for "the estimate counts what the network keeps"."""
    parameters = {p.untyped_storage().data_ptr() for p in network.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        network(x)
    return sum(kept.values())


# ------------------------------------------------------------------------------------------ GPU readiness

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
    'nnUNetTrainerANUNetPaper',     # the ANU-Net paper's network (max-pooling, fixed topology; 2D only)
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
    """``(trainer, network, loss)`` as ``nnUNetTrainer.initialize`` makes them on CUDA, on the tiny
    hand-written plans: ``_do_i_compile()`` true, DDP when a process group is up (``trainer.is_ddp``); the
    network compiled with ``fullgraph=True`` (one graph) when ``compile_network``. Everything on the CPU."""
    trainer = make_trainer(name, tiny(), configuration=configuration)
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


def forward_loss(network, loss, batch):
    output = network(batch['data'])
    return loss(output, batch['target'])


def parameters_without_gradient(network) -> list:
    return [n for n, p in network.named_parameters() if p.requires_grad and p.grad is None]
