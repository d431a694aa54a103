"""The papers' training recipes for nnU-Net's training loop: optimiser, learning-rate schedule, epochs,
batch size and the augmentation each paper names (``docs/methods/recipes.md`` compares them with
nnU-Net's defaults).

nnU-Net trains every trainer with its own recipe: SGD with Nesterov momentum 0.99, learning rate 1e-2
with a poly schedule, 1000 epochs of 250 iterations, the plans' batch, and its full augmentation
(rotation, scaling, noise, blur, brightness, contrast, low resolution, gamma, mirroring). A
:class:`PaperRecipe` states a paper's recipe; :class:`PaperRecipeMixin` puts it into nnU-Net's hooks
(``configure_optimizers``, ``configure_rotation_dummyDA_mirroring_and_inital_patch_size``,
``get_training_transforms``, the batch size), and the environment may still shorten the run
(``nnUNet_ext_num_epochs``) for a trial.

What stays nnU-Net's in every recipe, and why:

* An epoch is ``num_iterations_per_epoch`` (250) iterations, not a pass over the data: nnU-Net samples
  patches, it does not iterate over a dataset. To match a paper's epochs on your data set
  ``nnUNet_ext_num_iterations_per_epoch`` to (training images) / (batch size).
* Patches come from nnU-Net's sampler (random location, a third of them centred on foreground): that is
  the "random translation/cropping" the papers name, and nothing is added to it.
* Deep supervision, preprocessing (resampling, normalisation; CT windows are conversion options,
  ``nnunet-ext convert ... --window LOW HIGH``), validation, and prediction (sliding window; mirroring
  only when the recipe trains with it).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.rot90 import Rot90Transform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
from torch.optim.lr_scheduler import _LRScheduler

from nnunet_ext.training.schedule import TrainingLengthFromEnvMixin

# nnU-Net's intensity augmentations (nnUNetTrainer.get_training_transforms), each wrapped in a RandomTransform
NNUNET_INTENSITY_TRANSFORMS = (GaussianNoiseTransform, GaussianBlurTransform, MultiplicativeBrightnessTransform,
                               ContrastTransform, SimulateLowResolutionTransform, GammaTransform)


# ----------------------------------------------------------------------------------------- learning rate

class EpochLRScheduler(_LRScheduler):
    """Sets the learning rate to ``lr_at_epoch(epoch)`` when nnU-Net calls ``step(current_epoch)`` at the
    start of each epoch (the interface of nnU-Net's ``PolyLRScheduler``; stateless, so ``--c`` resumes on
    the right rate)."""

    def __init__(self, optimizer, lr_at_epoch: Callable[[int], float], current_step: Optional[int] = None):
        self.lr_at_epoch = lr_at_epoch
        self.ctr = 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def step(self, current_step: Optional[int] = None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = float(self.lr_at_epoch(current_step))
        for group in self.optimizer.param_groups:
            group['lr'] = lr
        self._last_lr = [group['lr'] for group in self.optimizer.param_groups]

    def get_last_lr(self):
        return self._last_lr


@dataclass(frozen=True)
class ConstantLR:
    """The initial rate throughout (a paper that names no decay)."""

    def __call__(self, epoch: int, initial_lr: float, num_epochs: int) -> float:
        return initial_lr


@dataclass(frozen=True)
class PolyLR:
    """nnU-Net's own schedule, ``initial_lr * (1 - epoch / num_epochs) ** exponent`` (a paper that names
    no optimiser keeps nnU-Net's)."""

    exponent: float = 0.9

    def __call__(self, epoch: int, initial_lr: float, num_epochs: int) -> float:
        return initial_lr * (1 - epoch / num_epochs) ** self.exponent


@dataclass(frozen=True)
class StepLR:
    """``initial_lr * factor ** (epoch // every)`` (IFE: x0.1 every 50 epochs)."""

    every: int
    factor: float

    def __call__(self, epoch: int, initial_lr: float, num_epochs: int) -> float:
        return initial_lr * self.factor ** (epoch // self.every)


@dataclass(frozen=True)
class RestartingStepLR:
    """Held at ``initial_lr`` for ``hold`` epochs, then ``x factor`` every ``every`` epochs; reset to
    ``initial_lr`` at each epoch of ``restarts`` and decayed the same way from there, without a hold
    (the multi-level structural loss paper, Section 4: 1e-5 for 8 epochs, halved every 2; reset to 1e-5
    when the pixel-wise term starts at epoch 12, halved every 2)."""

    hold: int
    every: int
    factor: float
    restarts: Tuple[int, ...] = ()

    def __call__(self, epoch: int, initial_lr: float, num_epochs: int) -> float:
        started = [r for r in self.restarts if r <= epoch]
        if started:
            halvings = (epoch - max(started)) // self.every
        elif epoch < self.hold:
            halvings = 0
        else:
            halvings = (epoch - self.hold) // self.every + 1
        return initial_lr * self.factor ** halvings


# ----------------------------------------------------------------------------------------- augmentation

@dataclass(frozen=True)
class DiscreteChoice:
    """A random scalar for batchgeneratorsv2 drawn uniformly from ``values`` (picklable, so augmentation
    worker processes can take it)."""

    values: Tuple[float, ...]

    def __call__(self, *args, **kwargs) -> float:
        return float(self.values[np.random.randint(len(self.values))])


@dataclass(frozen=True)
class RecipeAugmentation:
    """The augmentation a paper names, on nnU-Net's sampled patches.

    scaling: ``(low, high)`` (uniform), a ``DiscreteChoice`` or ``None``; batchgeneratorsv2's convention
        (larger = smaller objects), the same factor on every axis.
    p_scaling: probability per sample.
    rotation: ``'none'``; ``'rot90'`` (0, 90, 180 or 270 degrees in the last two axes, the axial plane,
        drawn uniformly; a non-square plane only gets 0 or 180 degrees, which keep the patch's shape);
        ``'nnunet'`` (nnU-Net's continuous rotation, p 0.2).
    mirror_axes: spatial axes mirrored at random (training), and then also at prediction (nnU-Net's
        test-time mirroring uses the training's axes); ``()``: none. Negative axes count from the end.
    gaussian_noise: nnU-Net's Gaussian noise (variance 0..0.1, p 0.1).
    nnunet_intensity: all of nnU-Net's intensity augmentations.
    """

    scaling: object = None
    p_scaling: float = 1.0
    rotation: str = 'none'
    mirror_axes: Tuple[int, ...] = ()
    gaussian_noise: bool = False
    nnunet_intensity: bool = False

    def __post_init__(self):
        if self.rotation not in ('none', 'rot90', 'nnunet'):
            raise ValueError(f"rotation must be 'none', 'rot90' or 'nnunet', got {self.rotation!r}")


@dataclass(frozen=True)
class PaperRecipe:
    """A paper's training recipe. ``source``: where the paper states it. ``batch_size``: ``None`` keeps the
    plans'. ``lr_schedule(epoch, initial_lr, num_epochs)``. ``notes``: what the paper gives that this recipe cannot
    take (printed to the training log)."""

    source: str
    optimizer: str
    initial_lr: float
    lr_schedule: Callable[[int, float], float]
    num_epochs: int
    augmentation: RecipeAugmentation
    batch_size: Optional[int] = None
    weight_decay: float = 0.0
    notes: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self):
        if self.optimizer not in ('adam', 'sgd'):
            raise ValueError(f"optimizer must be 'adam' or 'sgd' (nnU-Net's), got {self.optimizer!r}")


def _axes(axes: Sequence[int], dim: int) -> Tuple[int, ...]:
    return tuple(sorted({a % dim for a in axes}))


class PaperRecipeMixin(TrainingLengthFromEnvMixin):
    """Trains with ``paper_recipe`` (a :class:`PaperRecipe`) instead of nnU-Net's recipe.

    Sets ``num_epochs`` (as the trainer's own length: a refinement of ``TrainingLengthFromEnvMixin``, so
    ``nnUNet_ext_num_epochs`` still shortens a trial run, whatever the order of the bases), ``initial_lr``,
    ``weight_decay`` and the batch size (a copy of the configuration with the recipe's batch, so nnU-Net's
    DDP split of the global batch applies unchanged; the plans on disk are not touched).
    """

    cooperative_hooks = frozenset({'__init__', 'get_training_transforms'})
    paper_recipe: PaperRecipe = None

    def _recipe(self) -> PaperRecipe:
        recipe = self.paper_recipe
        if not isinstance(recipe, PaperRecipe):
            raise TypeError(f"{type(self).__name__}.paper_recipe must be a PaperRecipe, got {recipe!r}")
        return recipe

    def _default_training_length(self) -> dict:
        return {**super()._default_training_length(), 'num_epochs': self._recipe().num_epochs}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        recipe = self._recipe()
        self.initial_lr = recipe.initial_lr
        self.weight_decay = recipe.weight_decay
        if recipe.batch_size is not None:
            self.configuration_manager = ConfigurationManager(
                {**self.configuration_manager.configuration, 'batch_size': recipe.batch_size})
        self.print_to_log_file(f"nnunet-ext: paper recipe ({recipe.source}): {recipe.optimizer}, initial lr "
                               f"{recipe.initial_lr:g}, {self.num_epochs} epochs, batch "
                               f"{self.configuration_manager.batch_size}, augmentation {recipe.augmentation}")
        for note in recipe.notes:
            self.print_to_log_file(f"nnunet-ext: paper recipe: {note}")

    def configure_optimizers(self):
        recipe = self.paper_recipe
        if recipe.optimizer == 'adam':
            optimizer = torch.optim.Adam(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay)
        else:  # nnU-Net's own optimiser; only its schedule is replaced
            optimizer, _ = super().configure_optimizers()
        initial_lr, num_epochs = self.initial_lr, self.num_epochs
        return optimizer, EpochLRScheduler(optimizer, lambda epoch: recipe.lr_schedule(epoch, initial_lr, num_epochs))

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        augmentation = self.paper_recipe.augmentation
        dim = len(self.configuration_manager.patch_size)
        mirror_axes = _axes(augmentation.mirror_axes, dim) or None
        self.inference_allowed_mirroring_axes = mirror_axes
        if augmentation.rotation != 'nnunet':
            rotation = (0., 0.)
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None) -> BasicTransform:
        """nnU-Net's pipeline (``nnUNetTrainer.get_training_transforms``: cropping to the patch, masks,
        regions, deep-supervision targets) with its augmentations replaced by the recipe's."""
        augmentation = self.paper_recipe.augmentation
        pipeline = super().get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=use_mask_for_norm, is_cascaded=is_cascaded, foreground_labels=foreground_labels,
            regions=regions, ignore_label=ignore_label)
        transforms = []
        for transform in pipeline.transforms:
            inner = transform.transform if isinstance(transform, RandomTransform) else transform
            if isinstance(inner, SpatialTransform):
                transforms.extend(self._recipe_spatial(inner, augmentation))
            elif isinstance(inner, NNUNET_INTENSITY_TRANSFORMS):
                keep = augmentation.nnunet_intensity or (augmentation.gaussian_noise
                                                         and isinstance(inner, GaussianNoiseTransform))
                if keep:
                    transforms.append(transform)
            else:
                transforms.append(transform)
        return ComposeTransforms(transforms)

    @staticmethod
    def _recipe_spatial(nnunet_spatial: SpatialTransform, augmentation: RecipeAugmentation):
        """nnU-Net's ``SpatialTransform`` (it also crops the sampled, larger patch to the patch size) with the
        recipe's scaling and rotation; then the 90-degree rotation, if any."""
        spatial = nnunet_spatial
        spatial.p_rotation = 0.2 if augmentation.rotation == 'nnunet' else 0.
        spatial.p_scaling = augmentation.p_scaling if augmentation.scaling is not None else 0.
        if augmentation.scaling is not None:
            spatial.scaling = augmentation.scaling
        spatial.p_synchronize_scaling_across_axes = 1
        out = [spatial]
        if augmentation.rotation == 'rot90':
            plane = tuple(spatial.patch_size[-2:])
            dim = len(spatial.patch_size)
            turns = (0, 1, 2, 3) if plane[0] == plane[1] else (0, 2)
            out.append(Rot90Transform(num_axis_combinations=1, num_rot_per_combination=turns,
                                      allowed_axes={dim - 2, dim - 1}))
        return out


# ----------------------------------------------------------------------------------------- the papers

GODC_LFAM_RECIPE = PaperRecipe(
    source='GODC/LFAM paper, Section III.C', optimizer='adam', initial_lr=2e-4, lr_schedule=ConstantLR(),
    num_epochs=1000, batch_size=2,
    augmentation=RecipeAugmentation(scaling=(0.7, 1.3), p_scaling=1.0, rotation='rot90'),
    notes=("random translation [0.8, 1.2]: nnU-Net's random patch placement is the translation",
           "five-fold cross-validation: train nnU-Net's folds 0-4",
           "no learning-rate decay is named: constant"))

# IFE trains on images resized to one of these sizes and tests at 224 (the paper says seven sizes and
# lists six; we take the six listed): relative to the test resolution, a magnification of S / 224, i.e.
# batchgeneratorsv2's scale 224 / S (larger numbers = smaller objects).
IFE_TRAINING_SIZES = (224, 256, 288, 320, 352, 384)
IFE_TEST_SIZE = 224
IFE_RECIPE = PaperRecipe(
    source='IFE paper, Implementation Details', optimizer='adam', initial_lr=1e-4, lr_schedule=StepLR(50, 0.1),
    num_epochs=100, batch_size=32,
    augmentation=RecipeAugmentation(scaling=DiscreteChoice(tuple(IFE_TEST_SIZE / s for s in IFE_TRAINING_SIZES)),
                                    p_scaling=1.0),
    notes=("images resized to one of 224..384 for training, 224 for testing: patches at the plans' spacing "
           "magnified by S/224 (scale 224/S), prediction at the plans' spacing",
           "batch 32 is the paper's U-Net batch, on the plans' patch"))

MLL_RECIPE = PaperRecipe(
    source='multi-level structural loss paper, Section 4 (NIH pancreas)', optimizer='adam', initial_lr=1e-5,
    lr_schedule=RestartingStepLR(hold=8, every=2, factor=0.5, restarts=(12,)), num_epochs=20, batch_size=1,
    augmentation=RecipeAugmentation(),
    notes=("no augmentation is named: none",
           "intensities clipped to [-100, 240]: convert with --window -100 240",
           "ResNet-18/ASPP backbone, 3-slice input, coarse-to-fine model and early stopping are not part of "
           "this recipe (the plans' U-Net, one slice, one stage, all epochs)"))

MLN_RECIPE = dataclasses.replace(  # the same training, 25 epochs for the network
    MLL_RECIPE, source='multi-level structural loss paper, Section 4 (NIH pancreas, the network)', num_epochs=25)

RESUNET_RECIPE = PaperRecipe(
    source='ResUNet paper, Section III (pre-processing, augmentation, Dice loss)', optimizer='sgd',
    initial_lr=1e-2, weight_decay=3e-5, lr_schedule=PolyLR(), num_epochs=1000,
    augmentation=RecipeAugmentation(rotation='nnunet', mirror_axes=(-1,), gaussian_noise=True),
    notes=("no optimiser, learning rate, epochs or batch are given: nnU-Net's",
           "random rotation, cropping, flipping along the y-axis, noise and translation: nnU-Net's rotation, "
           "patch sampling, left-right mirroring and Gaussian noise (the paper gives no ranges)",
           "HU window [-100, 400] and histogram equalisation: convert with --window -100 400 --hist-eq"))
