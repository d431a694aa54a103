"""Balanced loss terms (issue 16): at initialisation every weighted term of the multi-level structural loss
(MLL, Eq. 11) and of the MLN loss (Eq. 13) is within 10x of nnU-Net's region term (Dice + CE) on realistic
patches (2D 256^2 at 0.8 mm, 3D 128^3 at 1 mm), on an empty patch and on a patch one class fills; the
distances are unit-free (the same loss for a spacing in mm and in m); the literal forms, kept as options,
are the unbalanced ones.

"At initialisation": logits N(0, 1) per voxel, the output scale of a He-initialised 1x1 head on
instance-normalised LeakyReLU features (nnU-Net's networks), which gives a softmax near uniform; the
MLN's distance head likewise. ``bench/loss_balance.py`` measures the same terms on freshly built networks.
Targets come from nnU-Net's own deep-supervision down-sampling and our SignedDistanceTransform."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_ext.architectures.mln_unet import MLNOutput
from nnunet_ext.losses import BoundaryLoss, StructuralLoss, TermWeights
from nnunet_ext.losses.mln import MLNLoss, MLNTermWeights, SignedDistanceRegressionLoss
from nnunet_ext.nn.point_attention import num_pixel_points
from nnunet_ext.training.deep_supervision import nnunet_deep_supervision_weights
from nnunet_ext.training.distance_transform import SignedDistanceTransform

PATCHES = {  # name: (shape, spacing in mm, deep-supervision scales as nnU-Net plans them for such a patch)
    '2d-256-0.8mm': ((256, 256), (0.8, 0.8), 6),
    '3d-128-1mm': ((128, 128, 128), (1.0, 1.0, 1.0), 5),
}
CONTENTS = ('organ', 'empty', 'filled')


def organ_patch(shape, spacing, content):
    """(1, *shape) labels: an organ (1) cut by the patch border with a lesion (2) in it; empty; or class 1
    everywhere."""
    if content == 'empty':
        return torch.zeros((1, *shape), dtype=torch.int16)
    if content == 'filled':
        return torch.ones((1, *shape), dtype=torch.int16)
    grid = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing='ij')
    extent = np.array([n * s for n, s in zip(shape, spacing)])
    organ = sum(((g - 0.55 * e) / (0.38 * e)) ** 2 for g, e in zip(grid, extent)) < 1
    lesion = sum(((g - 0.65 * e) / (0.1 * e)) ** 2 for g, e in zip(grid, extent)) < 1
    labels = np.where(lesion, 2, np.where(organ, 1, 0)).astype(np.int16)
    return torch.from_numpy(labels)[None]


def packed_targets(labels, spacing, num_scales):
    """What the trainers' data pipeline delivers for one sample, batched: ``cat([labels, Phi])`` per scale."""
    scales = [[1 / 2 ** i] * (labels.ndim - 1) for i in range(num_scales)]
    segs = DownsampleSegForDSTransform(scales)(segmentation=labels)['segmentation']
    out = SignedDistanceTransform(spacing, foreground_labels=(1, 2))(segmentation=segs)['segmentation']
    return [t[None] for t in out]


def nnunet_region_loss():
    """nnU-Net's per-output Dice + CE, as DiceCELossMixin builds it (labels, no ignore label)."""
    return DC_and_CE_loss({'batch_dice': False, 'smooth': 1e-5, 'do_bg': False, 'ddp': False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)


def init_logits(targets, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, channels, *t.shape[2:], generator=g) for t in targets]


def mll_terms(targets, normalization='mean'):
    """Weighted terms at full weights (alpha = beta = 1, the paper schedule's plateau)."""
    weights = nnunet_deep_supervision_weights(len(targets))
    loss = StructuralLoss(nnunet_region_loss(), deep_supervision_weights=weights,
                          boundary_loss=BoundaryLoss(normalization=normalization))
    loss.weights = TermWeights(1.0, 1.0, 1.0)
    torch.manual_seed(0)
    with torch.no_grad():
        loss(init_logits(targets), targets)
    return loss.pop_term_means()


def mln_output(targets, seed=1):
    g = torch.Generator().manual_seed(seed)
    spatial = targets[0].shape[2:]
    n = num_pixel_points(spatial)
    return MLNOutput(region=init_logits(targets, seed=seed), distance=torch.randn(1, 2, *spatial, generator=g),
                     point_logits=torch.randn(1, 3, n, generator=g),
                     point_indices=torch.randperm(math.prod(spatial), generator=g)[:n][None],
                     fused=torch.randn(1, 3, *spatial, generator=g))


def mln_terms(targets, normalization='mean'):
    """Weighted terms at full weights (alpha = beta = gamma = 1, Section 4.1.1 after epoch 12)."""
    loss = MLNLoss(nnunet_region_loss(), deep_supervision_weights=nnunet_deep_supervision_weights(len(targets)),
                   distance_loss=SignedDistanceRegressionLoss(normalization))
    loss.weights = MLNTermWeights(1.0, 1.0, 1.0, 1.0)
    with torch.no_grad():
        loss(mln_output(targets), targets)
    return loss.pop_term_means()


@pytest.fixture(scope='module')
def targets():
    cache = {}

    def get(patch, content, unit=1.0):
        key = (patch, content, unit)
        if key not in cache:
            shape, spacing, num_scales = PATCHES[patch]
            cache[key] = packed_targets(organ_patch(shape, spacing, content), [s * unit for s in spacing], num_scales)
        return cache[key]
    return get


@pytest.mark.parametrize('content', CONTENTS)
@pytest.mark.parametrize('patch', sorted(PATCHES))
@pytest.mark.parametrize('method', ['MLL', 'MLN'])
def test_every_weighted_term_is_within_10x_of_the_region_term_at_initialisation(targets, patch, content, method):
    terms = (mll_terms if method == 'MLL' else mln_terms)(targets(patch, content))
    region = terms.pop('region')
    assert 0.5 < region < 2.5, region  # nnU-Net's Dice + CE at initialisation
    for name, value in terms.items():
        assert abs(value) <= 10 * region, (name, value, region)
        undefined = content != 'organ' and name in ('boundary', 'distance_l2')
        if undefined:  # no class has a signed distance map here (absent, or filling the patch)
            assert value == 0, (name, value)
        else:
            assert abs(value) >= region / 10, (name, value, region)


@pytest.mark.parametrize('patch', sorted(PATCHES))
def test_the_literal_forms_are_the_unbalanced_ones(targets, patch):
    """Kept as options (normalization=None): in millimetres they swamp the region term (issue 16)."""
    mll = mll_terms(targets(patch, 'organ'), normalization=None)
    mln = mln_terms(targets(patch, 'organ'), normalization=None)
    assert mll['boundary'] > 5 * mll['region']  # ~10x here, ~30x on the real data of issue 16
    assert mln['distance_l2'] > 1000 * mln['region']


@pytest.mark.parametrize('method', ['MLL', 'MLN'])
@pytest.mark.parametrize('normalization', ['mean', 'max'])
def test_the_balanced_losses_do_not_depend_on_the_unit_of_the_spacing(targets, method, normalization):
    """Spacing in mm and in m: the same distance maps up to the factor 1000, the same loss."""
    patch = '2d-256-0.8mm'
    mm, m = targets(patch, 'organ'), targets(patch, 'organ', unit=1e-3)
    ratio = mm[0][:, 1:].abs().amax() / m[0][:, 1:].abs().amax()
    assert ratio.item() == pytest.approx(1000, rel=1e-5)
    terms = mll_terms if method == 'MLL' else mln_terms
    in_mm, in_m = terms(mm, normalization), terms(m, normalization)
    for name in in_mm:
        assert in_m[name] == pytest.approx(in_mm[name], rel=1e-5, abs=1e-7), name
    literal_mm, literal_m = terms(mm, None), terms(m, None)
    key = 'boundary'
    assert literal_mm[key] == pytest.approx(1000 * literal_m[key], rel=1e-4)  # the literal form is in mm
