"""The papers' training recipes (``nnunet_ext.training.recipes``): learning-rate schedules against the
papers' words written out by hand (and nnU-Net's own poly scheduler), the recipe trainers' optimiser,
epochs and batch, and their augmentation pipelines against ``torch.rot90`` and batchgeneratorsv2's
scaling convention."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.rot90 import Rot90Transform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_ext.training.loss_mixins import DiceCELossMixin
from nnunet_ext.training.recipes import (IFE_TEST_SIZE, IFE_TRAINING_SIZES, NNUNET_INTENSITY_TRANSFORMS,
                                         DiscreteChoice, EpochLRScheduler, PolyLR, RecipeAugmentation,
                                         RestartingStepLR, StepLR)
from trainer_helpers import make_trainer, tiny

RECIPE_TRAINERS = {  # name: (epochs, batch, initial lr, optimiser)
    'nnUNetTrainerGODCLFAMPaperRecipe': (1000, 2, 2e-4, torch.optim.Adam),
    'nnUNetTrainerIFECurvaturePaperRecipe': (100, 32, 1e-4, torch.optim.Adam),
    'nnUNetTrainerIFEEntropyPaperRecipe': (100, 32, 1e-4, torch.optim.Adam),
    'nnUNetTrainerMLLPaperRecipe': (20, 1, 1e-5, torch.optim.Adam),
    'nnUNetTrainerMLNPaperRecipe': (25, 1, 1e-5, torch.optim.Adam),
    'nnUNetTrainerResUNetPaperRecipe': (1000, 2, 1e-2, torch.optim.SGD),  # the paper names none: nnU-Net's
}

# the rate at some epochs (0-based, as nnU-Net counts them), worked out by hand from the papers' words
_MLL_LRS = {  # 1e-5 for epochs 0-7, halved every 2 epochs; reset to 1e-5 at epoch 12, halved every 2 from there
    0: 1e-5, 7: 1e-5, 8: 5e-6, 9: 5e-6, 10: 2.5e-6, 11: 2.5e-6, 12: 1e-5, 13: 1e-5, 14: 5e-6, 15: 5e-6,
    16: 2.5e-6, 17: 2.5e-6, 18: 1.25e-6, 19: 1.25e-6}
RECIPE_LRS = {
    'nnUNetTrainerGODCLFAMPaperRecipe': {0: 2e-4, 500: 2e-4, 999: 2e-4},  # no decay named: constant
    'nnUNetTrainerIFECurvaturePaperRecipe': {0: 1e-4, 49: 1e-4, 50: 1e-5, 99: 1e-5},  # x 1/10 every 50 epochs
    'nnUNetTrainerIFEEntropyPaperRecipe': {0: 1e-4, 49: 1e-4, 50: 1e-5, 99: 1e-5},
    'nnUNetTrainerMLLPaperRecipe': _MLL_LRS,  # 20 epochs
    'nnUNetTrainerMLNPaperRecipe': {**_MLL_LRS, 20: 6.25e-7, 21: 6.25e-7, 22: 3.125e-7, 24: 1.5625e-7},  # 25
    # nnU-Net's poly, 1e-2 * (1 - epoch / 1000) ** 0.9: 1e-2 * 0.9 ** 0.9, 1e-2 * 0.5 ** 0.9, 1e-2 * 10 ** -2.7
    'nnUNetTrainerResUNetPaperRecipe': {0: 1e-2, 100: 9.095325760829623e-3, 500: 5.358867312681466e-3,
                                        999: 1.9952623149688786e-5},
}

pytestmark = pytest.mark.usefixtures('nnunet_folders')  # nnU-Net's trainers need its folders set


def _trainer(name, configuration='2d', patch=None):
    plans, dataset_json = tiny()
    if patch is not None:
        plans['configurations'][configuration]['patch_size'] = patch
    return make_trainer(name, (plans, dataset_json), configuration=configuration)


def _lrs(schedule, epochs, initial_lr=1.0):
    return [schedule(e, initial_lr, epochs) for e in range(epochs)]


def test_mll_schedule_is_the_papers_words():
    """Section 4: "1e-5 for the first 8 epochs and decreased by the rate of 1/2 in every 2 epochs. When
    introducing the pixel-wise loss at the 12th epoch, we reassign the learning rate to 1e-5 and also
    decrease it with the rate of 1/2 every two epochs." """
    expected = [1] * 8 + [.5, .5, .25, .25] + [1, 1, .5, .5, .25, .25, .125, .125]
    assert _lrs(RestartingStepLR(hold=8, every=2, factor=0.5, restarts=(12,)), 20) == expected


def test_ife_schedule_is_the_papers_words():
    """"Every 50 epochs, the learning rate decayed to 1/10 of the former." (100 epochs)"""
    assert np.allclose(_lrs(StepLR(50, 0.1), 100), [1.] * 50 + [0.1] * 50)


def test_poly_is_nnunets_scheduler():
    net = torch.nn.Linear(2, 2)
    theirs = torch.optim.SGD(net.parameters(), 0.01)
    ours = torch.optim.SGD(net.parameters(), 0.01)
    their_scheduler = PolyLRScheduler(theirs, 0.01, 30)
    our_scheduler = EpochLRScheduler(ours, lambda e: PolyLR()(e, 0.01, 30))
    for epoch in (0, 1, 7, 29, 3):  # nnU-Net steps with the epoch; --c resumes mid-way
        their_scheduler.step(epoch)
        our_scheduler.step(epoch)
        assert ours.param_groups[0]['lr'] == pytest.approx(theirs.param_groups[0]['lr'], rel=1e-12)


@pytest.mark.parametrize('name', sorted(RECIPE_TRAINERS))
def test_recipe_trainers_take_the_papers_optimiser_epochs_and_batch(name, monkeypatch):
    monkeypatch.delenv('nnUNet_ext_num_epochs', raising=False)
    epochs, batch, lr, optimizer_class = RECIPE_TRAINERS[name]
    trainer = _trainer(name)
    assert (trainer.num_epochs, trainer.configuration_manager.batch_size, trainer.initial_lr) == (epochs, batch, lr)
    assert trainer.plans_manager.plans['configurations']['2d']['batch_size'] == 2  # the plans are not touched
    trainer._set_batch_size_and_oversample()
    assert trainer.batch_size == batch
    trainer.network = torch.nn.Conv2d(1, 3, 3)
    optimizer, scheduler = trainer.configure_optimizers()
    assert type(optimizer) is optimizer_class
    for epoch, expected in RECIPE_LRS[name].items():  # nnU-Net steps with the epoch; --c resumes mid-way
        scheduler.step(epoch)
        assert optimizer.param_groups[0]['lr'] == pytest.approx(expected, rel=1e-9), (name, epoch)


def test_the_environment_still_shortens_a_recipe(monkeypatch):
    monkeypatch.setenv('nnUNet_ext_num_epochs', '3')
    trainer = _trainer('nnUNetTrainerMLLPaperRecipe')
    assert trainer.num_epochs == 3 and trainer.initial_lr == 1e-5


def test_dice_alone_is_the_region_term_when_ce_weight_is_zero():
    """``dice_ce_weight_ce = 0``: the region term is nnU-Net's soft Dice loss (batch Dice, foreground
    classes), written out here: ``-mean_c (2 sum p y + s) / (sum p + sum y + s)``."""
    trainer = _trainer('nnUNetTrainerMLLPaperRecipe')
    region = DiceCELossMixin._build_output_loss(trainer)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 16, 16, generator=g)
    target = torch.randint(0, 3, (2, 1, 16, 16), generator=g).float()
    p = torch.softmax(logits, 1)
    y = torch.cat([(target == c).float() for c in range(3)], 1)
    smooth = 1e-5
    dice = [(2 * (p[:, c] * y[:, c]).sum() + smooth) / (p[:, c].sum() + y[:, c].sum() + smooth) for c in (1, 2)]
    assert float(region(logits, target)) == pytest.approx(-float(sum(dice)) / 2, abs=1e-6)
    with_ce = _trainer('nnUNetTrainerMLL')
    assert float(DiceCELossMixin._build_output_loss(with_ce)(logits, target)) > float(region(logits, target)) + 0.5


def _pipeline(trainer):
    rotation, dummy_2d, _, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    return trainer.get_training_transforms(trainer.configuration_manager.patch_size, rotation, None, mirror_axes,
                                           dummy_2d, foreground_labels=[1, 2])


def _kinds(pipeline):
    return [type(t.transform if isinstance(t, RandomTransform) else t) for t in pipeline.transforms]


def test_godc_lfam_recipe_augments_as_section_3c_says():
    trainer = _trainer('nnUNetTrainerGODCLFAMPaperRecipe')
    pipeline = _pipeline(trainer)
    kinds = _kinds(pipeline)
    assert not set(kinds) & set(NNUNET_INTENSITY_TRANSFORMS) and MirrorTransform not in kinds
    spatial = pipeline.transforms[kinds.index(SpatialTransform)]
    assert (spatial.scaling, spatial.p_scaling, spatial.p_rotation) == ((0.7, 1.3), 1.0, 0.)
    rot90 = pipeline.transforms[kinds.index(Rot90Transform)]
    assert rot90.allowed_axes == {0, 1} and tuple(rot90.num_rot_per_combination) == (0, 1, 2, 3)
    assert trainer.inference_allowed_mirroring_axes is None  # trained without mirroring: no test-time mirroring


def test_resunet_recipe_keeps_rotation_noise_and_left_right_flips_only():
    trainer = _trainer('nnUNetTrainerResUNetPaperRecipe')
    pipeline = _pipeline(trainer)
    kinds = _kinds(pipeline)
    assert [k for k in kinds if k in NNUNET_INTENSITY_TRANSFORMS] == [GaussianNoiseTransform]
    assert pipeline.transforms[kinds.index(SpatialTransform)].p_rotation == 0.2
    assert pipeline.transforms[kinds.index(SpatialTransform)].p_scaling == 0
    assert pipeline.transforms[kinds.index(MirrorTransform)].allowed_axes == (1,)
    assert trainer.inference_allowed_mirroring_axes == (1,)


def _apply(pipeline, image, seg):
    out = pipeline(image=image.clone(), segmentation=seg.clone())
    return out['image'], out['segmentation']


@pytest.mark.parametrize('patch, turns', [([32, 32], {0, 1, 2, 3}), ([32, 48], {0, 2})])
def test_rot90_turns_image_and_labels_together_and_keeps_non_square_patches(patch, turns, monkeypatch):
    trainer = _trainer('nnUNetTrainerGODCLFAMPaperRecipe', patch=patch)
    rot90_only = dataclasses.replace(trainer.paper_recipe, augmentation=RecipeAugmentation(rotation='rot90'))
    monkeypatch.setattr(trainer, 'paper_recipe', rot90_only)
    pipeline = _pipeline(trainer)
    image = torch.arange(np.prod(patch), dtype=torch.float32).reshape(1, *patch)
    seg = (image % 3).round()
    seen = set()
    np.random.seed(0)
    torch.manual_seed(0)
    for _ in range(40):
        out_image, out_seg = _apply(pipeline, image, seg)
        matches = [k for k in range(4) if out_image.shape == torch.rot90(image, k, (1, 2)).shape
                   and torch.equal(out_image, torch.rot90(image, k, (1, 2)))]
        assert len(matches) == 1, 'the output is not a 90-degree turn of the input'
        assert torch.equal(out_seg, torch.rot90(seg, matches[0], (1, 2)))
        seen.add(matches[0])
    assert seen == turns


def test_ife_scaling_magnifies_as_training_at_larger_sizes_does():
    """Training at size S and testing at 224 shows objects S/224 times larger in training: the recipe's
    scale 224/S (batchgeneratorsv2: larger numbers = smaller objects) must magnify a disc by S/224."""
    assert DiscreteChoice((1.0,))() == 1.0
    draws = {round(DiscreteChoice(tuple(IFE_TEST_SIZE / s for s in IFE_TRAINING_SIZES))(), 6) for _ in range(300)}
    assert draws == {round(IFE_TEST_SIZE / s, 6) for s in IFE_TRAINING_SIZES}
    spatial = SpatialTransform([64, 64], 0, False, p_scaling=1, scaling=DiscreteChoice((IFE_TEST_SIZE / 384,)),
                               p_synchronize_scaling_across_axes=1)
    yy, xx = np.mgrid[:64, :64]
    disc = torch.from_numpy(((yy - 31.5) ** 2 + (xx - 31.5) ** 2 < 10 ** 2).astype(np.float32))[None]
    out = spatial(image=disc.clone(), segmentation=disc.clone())['segmentation']
    assert float(out.sum()) / float(disc.sum()) == pytest.approx((384 / 224) ** 2, rel=0.08)
