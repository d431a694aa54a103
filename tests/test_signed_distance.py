"""Signed distance maps (Eq. 7) against hand-computed values, scipy's EDT called directly,
Kervadec's formula, and a brute-force minimum over boundary voxels; 2D and 3D, anisotropic spacing;
each backend (ITK's transform, the fast path; scipy's, the reference)."""
from __future__ import annotations

import itertools
import multiprocessing
import sys

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

from nnunet_ext.losses import signed_distance_map, signed_distance_maps
from nnunet_ext.losses.signed_distance import ITK_MIN_VOXELS, _resolve_backend, interface_voxels
from nnunet_ext.training.distance_transform import SignedDistanceTransform


def brute_force_sdf(mask: np.ndarray, spacing) -> np.ndarray:
    """Phi by definition: boundary voxels are voxels of the mask with a face-neighbour (inside the
    array) outside the mask; |Phi| is the smallest physical distance to one of them."""
    mask = mask.astype(bool)
    boundary = []
    for idx in itertools.product(*map(range, mask.shape)):
        if not mask[idx]:
            continue
        for axis in range(mask.ndim):
            for step in (-1, 1):
                n = list(idx)
                n[axis] += step
                if 0 <= n[axis] < mask.shape[axis] and not mask[tuple(n)]:
                    boundary.append(idx)
                    break
            else:
                continue
            break
    out = np.zeros(mask.shape)
    if not boundary:
        return out
    b = np.array(boundary, dtype=float) * np.asarray(spacing)
    for idx in itertools.product(*map(range, mask.shape)):
        d = np.sqrt(((b - np.array(idx, dtype=float) * np.asarray(spacing)) ** 2).sum(1)).min()
        out[idx] = -d if mask[idx] else d
    return out


def test_hand_computed_square():
    mask = np.zeros((5, 5), bool)
    mask[1:4, 1:4] = True
    r2 = np.sqrt(2)
    expected = np.array([[r2, 1, 1, 1, r2],
                         [1, 0, 0, 0, 1],
                         [1, 0, -1, 0, 1],
                         [1, 0, 0, 0, 1],
                         [r2, 1, 1, 1, r2]])
    np.testing.assert_allclose(signed_distance_map(mask), expected, rtol=1e-6)
    # spacing (2, 1): rows 2 mm apart
    r5 = np.sqrt(5)
    expected_aniso = np.array([[r5, 2, 2, 2, r5],
                               [1, 0, 0, 0, 1],
                               [1, 0, -1, 0, 1],
                               [1, 0, 0, 0, 1],
                               [r5, 2, 2, 2, r5]])
    np.testing.assert_allclose(signed_distance_map(mask, (2.0, 1.0)), expected_aniso, rtol=1e-6)


@pytest.mark.parametrize('shape,spacing', [((9, 11), (1.0, 1.0)), ((10, 7), (0.7, 2.5)),
                                           ((5, 6, 7), (1.0, 1.0, 1.0)), ((5, 6, 7), (3.0, 0.8, 1.1))])
def test_matches_brute_force_on_random_masks(shape, spacing):
    rng = np.random.default_rng(sum(shape))
    for _ in range(3):
        mask = rng.random(shape) < 0.4
        np.testing.assert_allclose(signed_distance_map(mask, spacing), brute_force_sdf(mask, spacing),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('spacing', [(1.0, 1.0, 1.0), (2.5, 0.6, 0.9)])
def test_outside_is_scipy_edt_of_the_background(spacing):
    rng = np.random.default_rng(3)
    mask = np.zeros((8, 9, 10), bool)
    mask[2:6, 3:7, 1:8] = True
    mask &= rng.random(mask.shape) < 0.9
    phi = signed_distance_map(mask, spacing)
    outside = distance_transform_edt(~mask, sampling=spacing)
    np.testing.assert_allclose(phi[~mask], outside[~mask], rtol=1e-6)
    assert (phi[mask] <= 0).all() and (phi[~mask] > 0).all()


def test_equals_kervadec_one_hot2dist_on_boxes_at_unit_spacing():
    """Kervadec's formula ``edt(~m) * ~m - (edt(m) - 1) * m`` (boundary loss reference code)."""
    for shape, box in [((12, 14), np.s_[2:9, 3:12]), ((7, 9, 8), np.s_[1:6, 2:8, 3:7])]:
        mask = np.zeros(shape, bool)
        mask[box] = True
        kervadec = distance_transform_edt(~mask) * ~mask - (distance_transform_edt(mask) - 1) * mask
        np.testing.assert_allclose(signed_distance_map(mask), kervadec, atol=1e-6)


def test_empty_and_full_classes_give_zeros():
    assert not signed_distance_map(np.zeros((4, 5), bool)).any()
    assert not signed_distance_map(np.ones((3, 4, 5), bool)).any()


def test_per_class_maps_and_regions():
    labels = np.zeros((6, 8), np.int16)
    labels[1:5, 1:4] = 1
    labels[2:4, 5:7] = 2
    labels[0, 7] = 3  # e.g. an ignore label: outside every class
    maps = signed_distance_maps(labels, [1, 2, 4, (1, 2)], spacing=(1.5, 1.0))
    assert maps.shape == (4, 6, 8)
    np.testing.assert_allclose(maps[0], brute_force_sdf(labels == 1, (1.5, 1.0)), rtol=1e-6)
    np.testing.assert_allclose(maps[1], brute_force_sdf(labels == 2, (1.5, 1.0)), rtol=1e-6)
    assert not maps[2].any()  # class 4 absent
    np.testing.assert_allclose(maps[3], brute_force_sdf(np.isin(labels, [1, 2]), (1.5, 1.0)), rtol=1e-6)


@pytest.mark.parametrize('spacing', [(1.0,), (1.0, 0.0), (1.0, float('nan')), (-1.0, 1.0)])
def test_bad_spacing_is_refused(spacing):
    with pytest.raises(ValueError, match='spacing'):
        signed_distance_map(np.ones((3, 3), bool), spacing)


def test_transform_packs_each_deep_supervision_scale_with_its_spacing():
    """Full resolution at the configuration spacing; a 2x down-sampled target at twice the spacing:
    a square of side 4 at 1 mm is a square of side 2 at 2 mm, so Phi doubles on the coarse grid."""
    full = torch.zeros((1, 8, 8), dtype=torch.int16)
    full[0, 2:6, 2:6] = 1
    full[0, 0, 0] = 2
    half = full[:, ::2, ::2].clone()
    out = SignedDistanceTransform((1.0, 1.0), foreground_labels=(1, 2))(segmentation=[full, half])['segmentation']
    assert [tuple(t.shape) for t in out] == [(3, 8, 8), (3, 4, 4)]
    assert all(t.dtype == torch.float32 for t in out)
    assert torch.equal(out[0][0], full[0].float()) and torch.equal(out[1][0], half[0].float())
    np.testing.assert_allclose(out[0][1].numpy(), brute_force_sdf(full[0].numpy() == 1, (1, 1)), rtol=1e-6)
    np.testing.assert_allclose(out[1][1].numpy(), brute_force_sdf(half[0].numpy() == 1, (2, 2)), rtol=1e-6)
    np.testing.assert_allclose(out[1][1].numpy(), 2 * brute_force_sdf(half[0].numpy() == 1, (1, 1)), rtol=1e-6)
    np.testing.assert_allclose(out[0][2].numpy(), brute_force_sdf(full[0].numpy() == 2, (1, 1)), rtol=1e-6)


def test_transform_for_regions_skips_the_ignore_channel():
    seg = torch.zeros((3, 5, 6, 7), dtype=torch.int16)  # two regions + ignore channel
    seg[0, 1:4, 2:5, 2:6] = 1
    seg[1, 2:3, 3:4, 3:5] = 1
    seg[2, 0] = 1
    out = SignedDistanceTransform((2.0, 1.0, 1.0), num_regions=2)(segmentation=seg)['segmentation']
    assert out.shape == (5, 5, 6, 7)
    assert torch.equal(out[:3], seg.float())
    for r in range(2):
        np.testing.assert_allclose(out[3 + r].numpy(), brute_force_sdf(seg[r].numpy() == 1, (2, 1, 1)), rtol=1e-6)


def test_transform_arguments_are_checked():
    with pytest.raises(ValueError, match='exactly one'):
        SignedDistanceTransform((1, 1))
    with pytest.raises(ValueError, match='dimension'):
        SignedDistanceTransform((1, 1), foreground_labels=(1,))(segmentation=torch.zeros((1, 3, 3, 3)))


# --- the fast path (ITK's exact transform) against the oracles -------------------------------------------------
@pytest.mark.parametrize('backend', ['itk', 'scipy'])
@pytest.mark.parametrize('shape,spacing', [((9, 11), (0.7, 2.5)), ((12, 5), (0.8, 0.8)), ((1, 9), (2.0, 0.5)),
                                           ((5, 6, 7), (3.0, 0.8, 1.1)), ((6, 1, 8), (1.0, 2.0, 0.6)),
                                           ((4, 7, 6), (0.001, 0.0008, 0.0025))])
def test_each_backend_matches_brute_force(backend, shape, spacing):
    """Random masks of every density (thin, touching the border, isolated voxels), anisotropic spacing."""
    rng = np.random.default_rng(len(shape) * 100 + shape[0])
    for density in (0.05, 0.4, 0.85):
        mask = rng.random(shape) < density
        expected = brute_force_sdf(mask, spacing)
        np.testing.assert_allclose(signed_distance_map(mask, spacing, backend=backend), expected,
                                   rtol=1e-5, atol=1e-6 * max(spacing))


@pytest.mark.parametrize('spacing', [(1.0, 1.0, 1.0), (2.5, 0.7, 0.9)])
def test_itk_equals_scipy_on_a_larger_organ_patch(spacing):
    """A 3D patch above the size where 'auto' picks ITK: the same map as scipy's EDT, float32 rounding aside."""
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip((48, 56, 52), spacing)], indexing='ij')
    mask = sum(((g - 0.5 * g.max()) / (0.3 * g.max() + 1)) ** 2 for g in grid) < 1
    mask[:3] = True  # touching the border
    mask &= np.random.default_rng(0).random(mask.shape) < 0.97  # holes
    assert mask.size >= ITK_MIN_VOXELS
    fast = signed_distance_map(mask, spacing)  # auto -> itk
    reference = signed_distance_map(mask, spacing, backend='scipy')
    np.testing.assert_allclose(fast, reference, rtol=1e-6, atol=1e-5)
    assert fast.dtype == np.float32 and not np.signbit(fast[fast == 0]).any()  # no -0.0
    outside = distance_transform_edt(~mask, sampling=spacing)  # Kervadec's edt(~D), directly
    np.testing.assert_allclose(fast[~mask], outside[~mask], rtol=1e-5)  # float32 squares, then sqrt
    out = np.full(mask.shape, np.nan)  # float64 output buffer
    assert signed_distance_map(mask, spacing, out=out, backend='itk') is out
    np.testing.assert_allclose(out, reference, rtol=1e-6, atol=1e-5)


def test_interface_voxels_are_the_erosion_boundary():
    rng = np.random.default_rng(5)
    face = generate_binary_structure(3, 1)
    for shape in [(6, 7, 8), (1, 5, 5), (9, 1, 3)]:
        mask = rng.random(shape) < 0.6
        expected = mask & ~binary_erosion(mask, structure=face, border_value=1)
        assert np.array_equal(interface_voxels(mask), expected)


def test_backend_choice_and_arguments():
    assert _resolve_backend('auto', 3, ITK_MIN_VOXELS) == 'itk' and _resolve_backend('auto', 2, 100) == 'scipy'
    assert _resolve_backend('auto', 4, 10 ** 7) == 'scipy'
    with pytest.raises(ValueError, match='backend'):
        signed_distance_map(np.ones((3, 3), bool), backend='cuda')
    with pytest.raises(ValueError, match="'itk' backend"):
        signed_distance_map(np.ones((2, 2, 2, 2), bool), backend='itk')
    with pytest.raises(ValueError, match='out'):
        signed_distance_map(np.ones((3, 3), bool), out=np.zeros((3, 4)))
    with pytest.raises(ValueError, match='backend'):
        SignedDistanceTransform((1, 1), foreground_labels=(1,), backend='gpu')


def test_transform_backends_agree_on_every_deep_supervision_scale():
    """nnU-Net's own deep-supervision down-sampling of a 3D patch, anisotropic spacing, two labels."""
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
    grid = np.meshgrid(*[np.arange(n) for n in (32, 80, 80)], indexing='ij')
    seg = np.zeros((32, 80, 80), np.int16)
    seg[((grid[0] - 15) / 12.0) ** 2 + ((grid[1] - 40) / 30.0) ** 2 + ((grid[2] - 35) / 33.0) ** 2 < 1] = 1
    seg[((grid[0] - 12) / 4.0) ** 2 + ((grid[1] - 45) / 7.0) ** 2 + ((grid[2] - 30) / 6.0) ** 2 < 1] = 2
    segs = DownsampleSegForDSTransform([[1, 1, 1], [1, 0.5, 0.5], [0.5, 0.25, 0.25]])(
        segmentation=torch.from_numpy(seg)[None])['segmentation']
    spacing = (3.0, 0.8, 0.8)
    fast = SignedDistanceTransform(spacing, foreground_labels=(1, 2))(segmentation=segs)['segmentation']
    reference = SignedDistanceTransform(spacing, foreground_labels=(1, 2), backend='scipy')(
        segmentation=segs)['segmentation']
    for a, b, s in zip(fast, reference, segs):
        assert a.dtype == torch.float32 and torch.equal(a[:1], s.float())
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    full_spacing = [s * f / n for s, f, n in zip(spacing, segs[0].shape[1:], segs[2].shape[1:])]
    np.testing.assert_allclose(fast[2][1].numpy(), brute_force_sdf(segs[2][0].numpy() == 1, full_spacing),
                               rtol=1e-5, atol=1e-5)


def _itk_map_sum(seed: int) -> float:
    mask = np.random.default_rng(seed).random((40, 40, 90)) < 0.5
    return float(signed_distance_map(mask, (1.0, 0.7, 2.0), backend='itk').sum())


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='fork start method')
def test_itk_backend_works_in_forked_augmentation_workers():
    """nnU-Net's augmentation workers are forked processes; the parent may have run ITK's thread pool."""
    import SimpleITK as sitk
    sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(np.random.rand(32, 32, 32).astype(np.float32)), 2.0)
    expected = [_itk_map_sum(s) for s in range(4)]
    with multiprocessing.get_context('fork').Pool(2) as pool:
        assert pool.map_async(_itk_map_sum, range(4)).get(timeout=120) == expected
