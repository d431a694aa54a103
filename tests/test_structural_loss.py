"""Boundary loss (Eq. 6), uncertain-point loss (Eq. 10, PointRend sampling), their composition
(Eq. 11) and the schedules, against hand-computed values, naive interpolation loops and direct
computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunet_ext.losses import (BoundaryLoss, KervadecRebalanceSchedule, PaperSchedule, StructuralLoss, TermWeights,
                               UncertainPointLoss, signed_distance_maps)
from nnunet_ext.losses.uncertain_points import (nearest_point_sample, point_sample, point_uncertainty,
                                                sample_uncertain_points)


# ----------------------------------------------------------------------------------------------- boundary loss
def test_boundary_loss_hand_computed():
    # literal form (normalization=None): sigmoid, logits 0 -> p = 1/2 everywhere: loss = mean(phi) / 2
    phi = torch.tensor([[[[1.0, -2.0], [3.0, 0.0]]]])
    assert BoundaryLoss(use_sigmoid=True, normalization=None)(torch.zeros(1, 1, 2, 2), phi).item() == \
        pytest.approx(0.25)
    # softmax, 2 channels: p_fg = sigmoid(l1 - l0); only the foreground channel is weighted
    logits = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]], [[math.log(3), 0.0], [0.0, -math.log(3)]]]])
    p = torch.tensor([[0.75, 0.5], [0.5, 0.25]])
    expected = (p * phi[0, 0]).mean().item()  # 0.75*1 - 1 + 1.5 + 0 = 1.25 / 4
    assert expected == pytest.approx(0.3125)
    assert BoundaryLoss(normalization=None)(logits, phi).item() == pytest.approx(expected, rel=1e-6)
    # ignore mask: only the voxels with mask 1 count
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    assert BoundaryLoss(normalization=None)(logits, phi, mask).item() == pytest.approx((0.75 * 1 + 0.5 * 3) / 2,
                                                                                       rel=1e-6)
    # balanced forms: phi divided by mean |phi| = 6/4 (default) or max |phi| = 3
    assert BoundaryLoss(use_sigmoid=True)(torch.zeros(1, 1, 2, 2), phi).item() == pytest.approx(0.25 / 1.5)
    assert BoundaryLoss()(logits, phi).item() == pytest.approx(expected / 1.5, rel=1e-6)
    assert BoundaryLoss(normalization='max')(logits, phi, mask).item() == pytest.approx((0.75 + 1.5) / 2 / 3,
                                                                                        rel=1e-6)
    with pytest.raises(ValueError, match='normalization'):
        BoundaryLoss(normalization='sum')


def test_boundary_loss_normalises_each_sample_and_class_by_its_own_scale():
    """Per (sample, class): the mean |phi| of that map; an all-zero map (class absent) contributes 0."""
    torch.manual_seed(0)
    phi = torch.randn(2, 2, 5, 6) * torch.tensor([1.0, 40.0])[:, None, None, None]  # scales differ per sample
    phi[1, 1] = 0  # class 2 absent from sample 2
    logits = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    p = torch.softmax(logits, 1)[:, 1:]
    expected = 0.0
    for b in range(2):
        for k in range(2):
            scale = phi[b, k].abs().mean().item()
            if scale > 0:
                expected += (p[b, k] * phi[b, k].double()).mean().item() / scale
    assert BoundaryLoss()(logits, phi).item() == pytest.approx(expected / 4, rel=1e-6)
    # unit-free: the same maps in metres give the same loss
    assert BoundaryLoss()(logits, phi / 1000).item() == pytest.approx(expected / 4, rel=1e-6)


def test_boundary_loss_is_minimal_at_the_ground_truth():
    rng = np.random.default_rng(0)
    labels = np.zeros((10, 12), np.int64)
    labels[2:8, 3:9] = 1
    labels[4:6, 5:7] = 2
    phi = torch.from_numpy(signed_distance_maps(labels, [1, 2]))[None]
    loss = BoundaryLoss()

    def value(prediction):  # hard prediction -> near one-hot logits
        return loss(30.0 * F.one_hot(torch.from_numpy(prediction), 3).permute(2, 0, 1)[None].double(), phi).item()

    best = value(labels)
    for _ in range(30):
        perturbed = labels.copy()
        flips = rng.random(labels.shape) < 0.1
        perturbed[flips] = rng.integers(0, 3, flips.sum())
        assert value(perturbed) >= best - 1e-9
    assert value(np.roll(labels, 1, axis=0)) > best
    assert value(np.zeros_like(labels)) > best
    assert best < 0


def test_boundary_loss_checks_shapes():
    with pytest.raises(ValueError, match='distance maps'):
        BoundaryLoss()(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match='loss_mask'):
        BoundaryLoss()(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4))


# ----------------------------------------------------------------------------------------------- point sampling
def naive_interpolate(x: torch.Tensor, point) -> torch.Tensor:
    """Bi/trilinear value of x (C, *spatial) at normalised point (border clamp), by loops over corners."""
    pos = [u * s - 0.5 for u, s in zip(point, x.shape[1:])]
    value = torch.zeros(x.shape[0], dtype=torch.float64)
    for corner in range(2 ** len(pos)):
        weight, index = 1.0, []
        for axis, p in enumerate(pos):
            lo = math.floor(p)
            hi_bit = (corner >> axis) & 1
            i = lo + hi_bit
            weight *= (p - lo) if hi_bit else (1 - (p - lo))
            index.append(min(max(i, 0), x.shape[axis + 1] - 1))
        value += weight * x[(slice(None), *index)].double()
    return value


@pytest.mark.parametrize('spatial', [(5, 7), (3, 4, 6)])
def test_point_sample_at_pixel_centres_is_exact(spatial):
    x = torch.randn(2, 3, *spatial, dtype=torch.float64)
    idx = [torch.randint(0, s, (2, 9)) for s in spatial]
    coords = torch.stack([(i.double() + 0.5) / s for i, s in zip(idx, spatial)], -1)
    sampled = point_sample(x, coords)
    for b in range(2):
        for n in range(9):
            voxel = tuple(int(i[b, n]) for i in idx)
            torch.testing.assert_close(sampled[b, :, n], x[(b, slice(None), *voxel)], rtol=0, atol=1e-12)
            torch.testing.assert_close(nearest_point_sample(x, coords)[b, :, n], x[(b, slice(None), *voxel)])


@pytest.mark.parametrize('spatial', [(5, 7), (3, 4, 6)])
def test_point_sample_matches_naive_interpolation(spatial):
    x = torch.randn(1, 2, *spatial, dtype=torch.float64)
    coords = torch.rand(1, 20, len(spatial), dtype=torch.float64)
    sampled = point_sample(x, coords)
    for n in range(20):
        torch.testing.assert_close(sampled[0, :, n], naive_interpolate(x[0], coords[0, n].tolist()), atol=1e-10,
                                   rtol=0)
        voxel = [min(int(u * s), s - 1) for u, s in zip(coords[0, n].tolist(), spatial)]
        torch.testing.assert_close(nearest_point_sample(x, coords)[0, :, n], x[(0, slice(None), *voxel)])


def test_uncertainty_ranks_two_class_points_by_distance_to_one_half():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.1, -2.0, 3.0, -0.5]]])
    p = torch.softmax(logits, 1)[0, 1]
    u = point_uncertainty(logits)[0]
    assert torch.equal(torch.argsort(u, descending=True), torch.argsort((p - 0.5).abs()))
    assert torch.equal(point_uncertainty(torch.tensor([[[0.3, -4.0, 1.0]]]), use_sigmoid=True)[0],
                       torch.tensor([-0.3, -4.0, -1.0]))


@pytest.mark.parametrize('spatial', [(16, 20), (6, 8, 10)])
def test_kept_points_are_the_most_uncertain_candidates(spatial):
    logits = torch.randn(2, 3, *spatial)
    N, k, m = 40, 3, 0.75
    generator = torch.Generator().manual_seed(7)
    points = sample_uncertain_points(logits, N, k, m, generator=generator)
    assert points.shape == (2, N, len(spatial))
    candidates = torch.rand(2, k * N, len(spatial), generator=torch.Generator().manual_seed(7))  # same draw
    kept = int(m * N)
    unc_candidates = point_uncertainty(point_sample(logits, candidates))
    for b in range(2):
        # the first int(mN) points are candidates ...
        matches = (points[b, :kept, None, :] == candidates[b, None]).all(-1)
        assert (matches.sum(1) == 1).all()
        chosen = matches.any(0)
        # ... at least as uncertain as every rejected candidate
        assert unc_candidates[b][chosen].min() >= unc_candidates[b][~chosen].max()
        # the random share has the right size and is not drawn from the candidates
        rest = points[b, kept:]
        assert rest.shape[0] == N - kept == 10
        assert not (rest[:, None, :] == candidates[b, None]).all(-1).any()
    assert ((points >= 0) & (points <= 1)).all()


def test_gradient_reaches_the_logits_only_around_sampled_points():
    logits = torch.randn(2, 3, 12, 16, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 12, 16))
    loss_fn = UncertainPointLoss(num_points=5)
    loss_fn(logits, target).backward()
    allowed = torch.zeros(2, 12, 16, dtype=torch.bool)
    for b in range(2):
        for y, x in loss_fn.last_points[b].tolist():
            py, px = y * 12 - 0.5, x * 16 - 0.5
            for iy in (math.floor(py), math.floor(py) + 1):
                for ix in (math.floor(px), math.floor(px) + 1):
                    allowed[b, min(max(iy, 0), 11), min(max(ix, 0), 15)] = True
    touched = (logits.grad != 0).any(1)
    assert touched.any()
    assert not (touched & ~allowed).any()


@pytest.mark.parametrize('spatial', [(9, 11), (4, 6, 7)])
def test_point_loss_value_is_the_mean_cross_entropy_at_the_points(spatial):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, *spatial, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 1, *spatial))
    mask = torch.rand(2, 1, *spatial) < 0.7
    loss_fn = UncertainPointLoss(num_points=12)
    value = loss_fn(logits, target, mask)
    total, count = 0.0, 0
    for b in range(2):
        for point in loss_fn.last_points[b].tolist():
            voxel = tuple(min(int(u * s), s - 1) for u, s in zip(point, spatial))
            if not mask[(b, 0, *voxel)]:
                continue
            z = naive_interpolate(logits[b], point)
            total += -torch.log_softmax(z, 0)[target[(b, 0, *voxel)]].item()
            count += 1
    assert count > 0
    assert value.item() == pytest.approx(total / count, rel=1e-9)


def test_point_loss_regions_and_all_ignored():
    logits = torch.randn(1, 2, 6, 6, 6)
    target = (torch.rand(1, 2, 6, 6, 6) > 0.5).float()
    loss_fn = UncertainPointLoss(num_points=30, use_sigmoid=True)
    assert torch.isfinite(loss_fn(logits, target))
    assert loss_fn(logits, target, torch.zeros(1, 1, 6, 6, 6)).item() == 0
    assert UncertainPointLoss().points_for((64, 64)) == 256
    assert UncertainPointLoss(point_fraction=0.1).points_for((3, 5, 7)) == 11
    with pytest.raises(ValueError, match='target'):
        UncertainPointLoss()(logits, target)


# ----------------------------------------------------------------------------------------------- schedules
def test_paper_schedule():
    s = PaperSchedule()
    alphas = [s(e).boundary for e in range(8)]
    np.testing.assert_allclose(alphas, [0, 0.2, 0.4, 0.6, 0.8, 1, 1, 1])
    assert [s(e).point for e in (0, 11, 12, 500)] == [0, 0, 1, 1]
    assert all(s(e).region == 1 for e in range(20))
    stretched = PaperSchedule(epochs_per_step=10)
    assert stretched(9).boundary == 0 and stretched(10).boundary == pytest.approx(0.2)
    assert stretched(119).point == 0 and stretched(120).point == 1
    with pytest.raises(ValueError):
        PaperSchedule(epochs_per_step=0)
    with pytest.raises(ValueError):
        s(-1)


def test_kervadec_rebalance_schedule():
    s = KervadecRebalanceSchedule()
    assert s(0) == TermWeights(1.0, 0.0, 0.0)
    assert s(30).region == pytest.approx(0.7) and s(30).boundary == pytest.approx(0.3)
    assert s(99).region == pytest.approx(0.01) and s(1000).region == pytest.approx(0.01)
    assert s(12).point == 1 and s(11).point == 0


# ----------------------------------------------------------------------------------------------- composition
class ToyRegion(torch.nn.Module):
    """A region term that records what it receives: CE on the label channel."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, logits, labels):
        self.seen.append(labels)
        return F.cross_entropy(logits, labels[:, 0].long())


def _packed(labels: np.ndarray, classes, spacing=(1.0, 1.0)) -> torch.Tensor:
    phi = np.stack([signed_distance_maps(l[0], classes, spacing) for l in labels])
    return torch.cat((torch.from_numpy(labels).float(), torch.from_numpy(phi)), 1)


def test_structural_loss_is_the_weighted_sum_of_its_terms_with_deep_supervision():
    rng = np.random.default_rng(1)
    labels_full = rng.integers(0, 3, (2, 1, 16, 16))
    labels_half = labels_full[:, :, ::2, ::2]
    targets = [_packed(labels_full, [1, 2]), _packed(labels_half, [1, 2], (2.0, 2.0))]
    outputs = [torch.randn(2, 3, 16, 16, requires_grad=True), torch.randn(2, 3, 8, 8, requires_grad=True)]
    region = ToyRegion()
    loss = StructuralLoss(region, deep_supervision_weights=[2 / 3, 1 / 3])
    loss.weights = TermWeights(0.5, 0.3, 2.0)
    torch.manual_seed(5)
    total = loss(outputs, targets)
    assert all(seen.shape[1] == 1 for seen in region.seen)  # the region term never sees distance maps
    torch.manual_seed(5)
    points = UncertainPointLoss()(outputs[0], targets[0][:, :1])
    boundary = BoundaryLoss()
    expected = (0.5 * (2 / 3 * F.cross_entropy(outputs[0], torch.from_numpy(labels_full[:, 0]))
                       + 1 / 3 * F.cross_entropy(outputs[1], torch.from_numpy(labels_half[:, 0])))
                + 0.3 * (2 / 3 * boundary(outputs[0], targets[0][:, 1:])
                         + 1 / 3 * boundary(outputs[1], targets[1][:, 1:]))
                + 2.0 * points)
    torch.testing.assert_close(total, expected)
    means = loss.pop_term_means()
    assert set(means) == {'region', 'boundary', 'point'} and means['point'] == pytest.approx(points.item(), rel=1e-5)
    assert np.isnan(loss.pop_term_means()['region'])


def test_zero_weight_terms_add_no_gradient_and_the_ignore_label_is_excluded():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, (2, 1, 12, 12))
    labels[:, :, :4] = 7  # ignore label
    target = _packed(labels, [1, 2])
    logits = torch.randn(2, 3, 12, 12, requires_grad=True)
    region = ToyRegion()
    loss = StructuralLoss(lambda o, t: (o * 0).sum(), ignore_label=7)
    loss.weights = TermWeights(1.0, 0.0, 0.0)
    loss(logits, target).backward()
    assert not logits.grad.any()
    # with all weights on, ignored voxels get no gradient from boundary and point terms
    loss.weights = TermWeights(1.0, 1.0, 1.0)
    logits.grad = None
    loss(logits, target).backward()
    # (row 3 may get gradient: points in row 4 interpolate between rows 3 and 4)
    assert not logits.grad[:, :, :3].any() and logits.grad[:, :, 4:].any()
    del region


def test_missing_distance_maps_are_reported():
    loss = StructuralLoss(ToyRegion())
    with pytest.raises(ValueError, match='SignedDistanceTransform'):
        loss(torch.randn(1, 3, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match='deep supervision'):
        StructuralLoss(ToyRegion(), deep_supervision_weights=[1, 0])([torch.randn(1, 3, 8, 8)],
                                                                     [torch.zeros(1, 3, 8, 8)])
