"""IFE scores and selection (Eqs. 1-3, Algorithm 1) against hand-computed curvatures and a
straightforward NumPy implementation of Algorithm 1 written here; batch independence, gradients,
channel counts."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from nnunet_ext.nn.feature_enhancement import (CurvatureScore, EntropyScore, InstructiveFeatureEnhancement,
                                               curvature_kernel)


def checkerboard(shape):
    return (np.indices(shape).sum(0) % 2).astype(np.float64)


# ----------------------------------------------------------------------------------------------- curvature
def test_curvature_hand_computed_2d():
    H, W = 7, 9
    channels = np.stack([np.full((H, W), 3.0),                                # constant
                         checkerboard((H, W)),                                # |+-1.25| everywhere
                         np.tile(np.arange(W, dtype=float), (H, 1)),          # ramp: 0
                         np.tile(np.arange(W, dtype=float) ** 2, (H, 1))])    # x^2: sum_j w_j j^2 = 6/16
    scores = CurvatureScore()(torch.from_numpy(channels)[None])[0].numpy()
    valid = (H - 2) * (W - 2)
    np.testing.assert_allclose(scores, [0.0, 1.25 * valid, 0.0, 0.375 * valid], atol=1e-9)


def test_curvature_3d_kernel_and_hand_computed_values():
    k3 = curvature_kernel(3, torch.float64)
    assert k3.sum().item() == pytest.approx(0)
    assert k3[1, 1, 1] == -3 and k3[0, 1, 1] == pytest.approx(10 / 16) and k3[0, 0, 1] == pytest.approx(-1 / 16)
    assert k3[0, 0, 0] == 0
    D, H, W = 5, 6, 7
    channels = np.stack([np.full((D, H, W), -2.0), checkerboard((D, H, W)),
                         np.broadcast_to(np.arange(W, dtype=float), (D, H, W))])
    scores = CurvatureScore()(torch.from_numpy(channels)[None])[0].numpy()
    # checkerboard: centre 1 -> -3 - 12/16; centre 0 -> 6 * 10/16: |3.75| at every valid voxel
    np.testing.assert_allclose(scores, [0.0, 3.75 * (D - 2) * (H - 2) * (W - 2), 0.0], atol=1e-9)


# ----------------------------------------------------------------------------------------------- entropy
def numpy_algorithm_1(sample: np.ndarray) -> np.ndarray:
    """Algorithm 1 for one sample (C, *spatial), by loops: zero-padded 3^d windows, centre and mean
    of the others, 256 levels over the sample's [min, max] of all centres and means, joint counts,
    P = count / prod(size + 2), E = -sum P log2 P."""
    C, spatial = sample.shape[0], sample.shape[1:]
    padded = np.pad(sample, [(0, 0)] + [(1, 1)] * len(spatial))
    pairs = np.zeros((C, *spatial, 2))
    for c in range(C):
        for idx in itertools.product(*map(range, spatial)):
            window = padded[(c, *[slice(i, i + 3) for i in idx])]
            centre = sample[(c, *idx)]
            pairs[(c, *idx)] = centre, (window.sum() - centre) / (window.size - 1)
    lo, hi = pairs.min(), pairs.max()
    levels = np.zeros(pairs.shape, int) if hi == lo else np.minimum(
        np.floor((pairs - lo) / (hi - lo) * 256), 255).astype(int)
    normaliser = math.prod(s + 2 for s in spatial)
    entropies = []
    for c in range(C):
        counts = {}
        for pair in levels[c].reshape(-1, 2):
            counts[tuple(pair)] = counts.get(tuple(pair), 0) + 1
        p = np.array(list(counts.values())) / normaliser
        entropies.append(-(p * np.log2(p)).sum())
    return np.array(entropies)


@pytest.mark.parametrize('spatial', [(6, 7), (4, 5, 6)])
def test_entropy_matches_numpy_algorithm_1(spatial):
    rng = np.random.default_rng(0)
    ramp = np.broadcast_to(np.arange(spatial[-1], dtype=float), spatial)
    x = np.stack([np.stack([np.full(spatial, 0.5), checkerboard(spatial) * 2 - 1, ramp / 3,
                            rng.normal(size=spatial)]) for _ in range(2)])
    x[1] *= 3.0  # second sample: another range
    x[1, 3] = rng.normal(size=spatial)
    scores = EntropyScore()(torch.from_numpy(x)).numpy()
    for b in range(2):
        np.testing.assert_allclose(scores[b], numpy_algorithm_1(x[b]), rtol=1e-5, atol=1e-6)
    assert scores[0, 3] > scores[0, 2] > scores[0, 0]  # noise > ramp > constant


@pytest.mark.parametrize('spatial', [(1, 1), (1, 2), (3, 1), (2, 1, 1), (1, 1, 3)])
def test_entropy_of_tiny_features_matches_numpy_algorithm_1(spatial):
    """Runs of equal keys at the first and last positions, single-value channels."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, *spatial, dtype=torch.float64)
    scores = EntropyScore()(x).numpy()
    for b in range(2):
        np.testing.assert_allclose(scores[b], numpy_algorithm_1(x[b].numpy()), rtol=1e-6, atol=1e-7)


def test_entropy_of_many_values_is_accurate():
    """Large counts: (N log2 Z - sum n log2 n) / Z with 4096 values per channel against float64
    counts from NumPy (one 64x64 channel of 4 distinct values, one of noise)."""
    torch.manual_seed(0)
    x = torch.stack([(torch.arange(64 * 64) % 4).view(64, 64) / 3, torch.randn(64, 64)])[None].double()
    scores = EntropyScore()(x)[0].numpy()
    np.testing.assert_allclose(scores, numpy_algorithm_1(x[0].numpy()), rtol=1e-6)


def test_entropy_of_a_sample_with_one_value_everywhere():
    x = torch.zeros(1, 2, 5, 5)
    np.testing.assert_allclose(EntropyScore()(x)[0].numpy(), numpy_algorithm_1(x[0].numpy()), rtol=1e-6)


# ----------------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize('score', [CurvatureScore(), EntropyScore()], ids=['curvature', 'entropy'])
@pytest.mark.parametrize('spatial', [(12, 10), (5, 6, 7)])
def test_selection_of_a_sample_ignores_the_rest_of_the_batch(score, spatial):
    torch.manual_seed(0)
    x = torch.randn(4, 16, *spatial) * torch.linspace(0.1, 3, 16).view(1, 16, *([1] * len(spatial)))
    ife = InstructiveFeatureEnhancement(score, 0.5, channels=16)
    reference = ife.selection(x)
    permuted = ife.selection(x[[2, 0, 3, 1]])
    assert torch.equal(permuted[1], reference[0]) and torch.equal(permuted[0], reference[2])
    replaced = x.clone()
    replaced[1:] = torch.randn(3, 16, *spatial) * 100
    assert torch.equal(ife.selection(replaced)[0], reference[0])
    alone = ife.selection(x[:1])
    assert torch.equal(alone[0], reference[0])


def test_output_is_raw_then_selected_channels_with_gradients_to_values_only():
    torch.manual_seed(1)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    ife = InstructiveFeatureEnhancement(CurvatureScore(), 0.5, channels=8)
    out = ife(x)
    assert out.shape == (2, 12, 9, 9) and ife.out_channels == 12
    index = ife.selection(x)
    scores = CurvatureScore()(x)
    assert not scores.requires_grad
    for b in range(2):
        assert torch.equal(out[b, :8], x[b])
        assert torch.equal(out[b, 8:], x[b, index[b]])
        assert (scores[b, index[b]].min() >= scores[b].sort(descending=True).values[3]).item()
    out.sum().backward()
    expected = torch.ones_like(x)
    for b in range(2):
        expected[b, index[b]] += 1
    assert torch.equal(x.grad, expected)


class _GivenScores(torch.nn.Module):
    """Scores fixed by the test (the features are ignored)."""

    def __init__(self, scores):
        super().__init__()
        self.scores = scores

    def forward(self, x):
        return self.scores


def test_selection_orders_by_decreasing_score_and_ties_by_channel_index():
    scores = torch.tensor([[1., 2., 2., 0., 2., 3.], [0., 0., 0., 0., 0., 0.], [5., 4., 3., 2., 1., 0.]])
    ife = InstructiveFeatureEnhancement(_GivenScores(scores), 0.5)
    # by hand: the highest first, equal scores in channel order (what ONNX's TopK does, and a stable sort)
    assert ife.selection(torch.zeros(3, 6, 4, 4)).tolist() == [[5, 1, 2], [0, 1, 2], [0, 1, 2]]


def test_channel_counts():
    ife = InstructiveFeatureEnhancement(EntropyScore(), 0.5, channels=128)
    assert ife.out_channels == 192
    assert ife(torch.randn(1, 128, 6, 6)).shape[1] == 192
    assert InstructiveFeatureEnhancement(CurvatureScore(), 0.75, channels=32).out_channels == 56
    with pytest.raises(ValueError, match='ratio'):
        InstructiveFeatureEnhancement(CurvatureScore(), 1.5)



def test_thin_axes_are_replicate_padded_for_curvature():
    """One slice: K3 on the slice repeated = 2D curvature + 3/16 of the second differences along y, x."""
    torch.manual_seed(0)
    plane = torch.randn(1, 1, 6, 7, dtype=torch.float64)
    k2 = curvature_kernel(2, torch.float64)
    expected = torch.zeros(4, 5, dtype=torch.float64)  # y and x are long enough: valid positions only
    for y in range(4):
        for x in range(5):
            w = plane[0, 0, y:y + 3, x:x + 3]
            d2y = w[0, 1] - 2 * w[1, 1] + w[2, 1]
            d2x = w[1, 0] - 2 * w[1, 1] + w[1, 2]
            expected[y, x] = (k2 * w).sum() + 3 / 16 * (d2y + d2x)
    score = CurvatureScore()(plane[:, :, None])  # (1, 1, 1, 6, 7): depth 1
    assert score.item() == pytest.approx(expected.abs().sum().item(), rel=1e-9)
    # entropy handles thin axes with zero padding as any other border
    x = torch.randn(1, 2, 2, 5, 6, dtype=torch.float64)
    np.testing.assert_allclose(EntropyScore()(x)[0].numpy(), numpy_algorithm_1(x[0].numpy()), rtol=1e-6)
