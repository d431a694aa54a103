"""Segmentation metrics against oracles written here: hand-computed small cases, and brute force
(Python loops over voxels and voxel pairs) for surfaces and surface distances; 2D and 3D, anisotropic
spacing, empty masks, multi-class, ignore label, regions, aggregation over cases."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from nnunet_ext.evaluation import CONVENTIONS, HD95_DEFINITIONS, EvaluatedClass, aggregate, case_metrics, \
    conventions, format_table, mask_metrics, surface_distances

NAN_KEYS = ("Dice", "IoU", "precision", "recall", "HD95", "HD", "ASD", "RVD")


def brute_surface(mask: np.ndarray) -> list:
    """Voxels of the mask with a face-neighbour outside it; a neighbour outside the array is outside."""
    out = []
    for idx in itertools.product(*map(range, mask.shape)):
        if not mask[idx]:
            continue
        for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
            n = list(idx)
            n[axis] += step
            if not 0 <= n[axis] < mask.shape[axis] or not mask[tuple(n)]:
                out.append(idx)
                break
    return out


def brute_directed(a: list, b: list, spacing) -> list:
    """For each voxel of a, the smallest physical distance to a voxel of b (voxel pairs, no tricks)."""
    result = []
    for p in a:
        best = math.inf
        for q in b:
            best = min(best, math.sqrt(sum(((i - j) * s) ** 2 for i, j, s in zip(p, q, spacing))))
        result.append(best)
    return result


def percentile_linear(values: list, q: float) -> float:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default), by hand."""
    v = sorted(values)
    pos = q / 100 * (len(v) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def oracle(pred: np.ndarray, ref: np.ndarray, spacing, evaluated=None, hd95: str = 'pooled') -> dict:
    """Every metric by its definition (module docstring of nnunet_ext.evaluation.metrics), looping.
    ``hd95``: 'pooled' (percentile of both directed sets together, MedPy) or 'max' (the larger directed
    percentile, MONAI / surface-distance)."""
    pred, ref = pred.astype(bool), ref.astype(bool)
    if evaluated is not None:
        pred, ref = pred & evaluated, ref & evaluated
    keep = [a for a, n in enumerate(pred.shape) if n > 1]  # axes of length 1 are dropped
    shape = tuple(pred.shape[a] for a in keep)
    sp = [spacing[a] for a in keep]
    p2, r2 = pred.reshape(shape), ref.reshape(shape)
    tp = fp = fn = tn = 0
    for idx in itertools.product(*map(range, pred.shape)):
        if evaluated is not None and not evaluated[idx]:
            continue
        tp += pred[idx] and ref[idx]
        fp += pred[idx] and not ref[idx]
        fn += ref[idx] and not pred[idx]
        tn += not pred[idx] and not ref[idx]
    nan = float('nan')
    out = {"TP": tp, "FP": fp, "FN": fn, "TN": tn, "n_pred": tp + fp, "n_ref": tp + fn,
           "Dice": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan,
           "IoU": tp / (tp + fp + fn) if tp + fp + fn else nan,
           "precision": tp / (tp + fp) if tp + fp else nan,
           "recall": tp / (tp + fn) if tp + fn else nan,
           "RVD": ((tp + fp) - (tp + fn)) / (tp + fn) if tp + fn else nan,
           "volume_pred_mm3": (tp + fp) * float(np.prod(sp)), "volume_ref_mm3": (tp + fn) * float(np.prod(sp))}
    if tp + fp and tp + fn:
        sp_, sr = brute_surface(p2), brute_surface(r2)
        to_ref, to_pred = brute_directed(sp_, sr, sp), brute_directed(sr, sp_, sp)
        d = to_ref + to_pred
        robust = {'pooled': percentile_linear(d, 95),
                  'max': max(percentile_linear(to_ref, 95), percentile_linear(to_pred, 95))}[hd95]
        out.update(HD95=robust, HD=max(d), ASD=sum(d) / len(d))
    else:
        out.update(HD95=nan, HD=nan, ASD=nan)
    return out


def assert_metrics_equal(got: dict, expected: dict):
    assert set(expected) <= set(got)
    for key, value in expected.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(got[key]), f"{key}: expected NaN, got {got[key]}"
        else:
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), f"{key}: {got[key]} != {value}"


# ---------------------------------------------------------------- hand-computed

def test_hand_computed_rectangle_against_square():
    ref = np.zeros((5, 5), bool)
    ref[1:3, 1:3] = True                  # 2x2
    pred = np.zeros((5, 5), bool)
    pred[1:3, 1:4] = True                 # 2x3: one extra column
    m = mask_metrics(pred, ref, (2.0, 3.0))
    # TP 4, FP 2, FN 0, TN 19
    assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (4, 2, 0, 19)
    assert m["Dice"] == pytest.approx(0.8)
    assert m["IoU"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(4 / 6)
    assert m["recall"] == 1.0
    assert m["RVD"] == pytest.approx(0.5)
    assert m["volume_pred_mm3"] == pytest.approx(36.0) and m["volume_ref_mm3"] == pytest.approx(24.0)
    # every voxel is a surface voxel; the extra column is one step (3 mm) along axis 1 from the square,
    # everything else 0: union of distances = eight 0 and two 3
    assert m["HD"] == pytest.approx(3.0)
    assert m["ASD"] == pytest.approx(0.6)
    assert m["HD95"] == pytest.approx(3.0)


def test_hand_computed_distances_3d_anisotropic():
    ref = np.zeros((3, 3, 3), bool)
    ref[1, 1, 1] = True
    pred = np.zeros((3, 3, 3), bool)
    pred[0, 0, 0] = True
    pred[1, 1, 1] = True
    spacing = (3.0, 0.7, 0.5)
    m = mask_metrics(pred, ref, spacing)
    corner = math.sqrt(3.0 ** 2 + 0.7 ** 2 + 0.5 ** 2)
    # directed P->G: {corner, 0}; G->P: {0}; union: 0, 0, corner
    assert m["HD"] == pytest.approx(corner)
    assert m["ASD"] == pytest.approx(corner / 3)
    assert m["HD95"] == pytest.approx(0.9 * corner)  # pos 0.95*2 = 1.9 between 0 and corner
    assert m["RVD"] == pytest.approx(1.0)
    assert m["volume_ref_mm3"] == pytest.approx(3.0 * 0.7 * 0.5)


def test_hd95_is_union_percentile_not_max_of_directed():
    """A case where the two definitions differ: the test fails if the other one were implemented."""
    ref = np.zeros((1, 40), bool)
    ref[0, 0:20] = True
    pred = ref.copy()
    pred[0, 0:3] = False      # P misses the first 3 voxels of G: G->P has 3 non-zero distances
    spacing = (1.0, 1.0)
    to_ref, to_pred = surface_distances(pred, ref, spacing)
    union = percentile_linear(list(to_ref) + list(to_pred), 95)
    max_directed = max(percentile_linear(list(to_ref), 95), percentile_linear(list(to_pred), 95))
    assert not math.isclose(union, max_directed)  # the case discriminates
    assert mask_metrics(pred, ref, spacing)["HD95"] == pytest.approx(union)
    assert mask_metrics(pred, ref, spacing, hd95='pooled')["HD95"] == pytest.approx(union)
    assert mask_metrics(pred, ref, spacing, hd95='max')["HD95"] == pytest.approx(max_directed)


def test_hd95_max_hand_computed():
    """Reference: a row of 10 voxels (all surface: rows above and below are outside); prediction: the same
    row plus one voxel 4 mm beyond its end. P->G: 11 values, 10 at 0 and one at 4 mm (linear 95th
    percentile at rank 9.5: 2 mm); G->P: 10 zeros. Pooled: 21 values, rank 19: 0. Max: max(2, 0) = 2 mm."""
    ref = np.zeros((3, 16), bool)
    ref[1, 0:10] = True
    pred = ref.copy()
    pred[1, 12] = True
    spacing = (1.0, 4 / 3)  # voxel 12 is 3 voxels = 4 mm from voxel 9
    m_max = mask_metrics(pred, ref, spacing, hd95='max')
    m_pooled = mask_metrics(pred, ref, spacing)
    assert m_max["HD95"] == pytest.approx(2.0)
    assert m_pooled["HD95"] == pytest.approx(0.0)
    assert m_max["HD"] == m_pooled["HD"] == pytest.approx(4.0)  # only HD95 depends on the choice
    with pytest.raises(ValueError, match="hd95"):
        mask_metrics(pred, ref, spacing, hd95='mean')


def test_conventions_record_the_hd95_definition():
    assert conventions() == CONVENTIONS and conventions('pooled')['HD95'] == HD95_DEFINITIONS['pooled']
    assert 'MONAI' in conventions('max')['HD95'] and 'MedPy' in conventions('pooled')['HD95']
    assert {k: v for k, v in conventions('max').items() if k != 'HD95'} == \
        {k: v for k, v in CONVENTIONS.items() if k != 'HD95'}


# ---------------------------------------------------------------- brute force, random masks

@pytest.mark.parametrize("shape,spacing", [((7, 6), (0.7, 0.5)), ((5, 6, 7), (3.0, 0.7, 0.5)),
                                           ((4, 5, 6), (1.0, 1.0, 1.0)), ((1, 8, 9), (5.0, 0.8, 0.6))])
@pytest.mark.parametrize("hd95", ["pooled", "max"])
def test_random_masks_against_brute_force(shape, spacing, hd95):
    rng = np.random.default_rng(sum(shape))
    for trial in range(6):
        density = (0.2, 0.5, 0.8)[trial % 3]
        pred = rng.random(shape) < density
        ref = rng.random(shape) < density
        assert_metrics_equal(mask_metrics(pred, ref, spacing, hd95=hd95), oracle(pred, ref, spacing, hd95=hd95))


def test_small_blobs_in_a_large_volume_against_brute_force():
    """Masks far from the border: the bounding-box crop (with its margin) must not change anything."""
    shape, spacing = (12, 16, 14), (3.0, 0.7, 0.5)
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing='ij')
    ref = ((z - 6) * 3.0) ** 2 + ((y - 7) * 0.7) ** 2 + ((x - 6) * 0.5) ** 2 < 3.2 ** 2
    pred = ((z - 5) * 3.0) ** 2 + ((y - 8) * 0.7) ** 2 + ((x - 7) * 0.5) ** 2 < 3.6 ** 2
    pred[9, 3, 11] = True  # a stray voxel far from the reference
    assert ref.sum() > 10 and pred.sum() > 10
    assert not ref[0].any() and not ref[-1].any()
    assert_metrics_equal(mask_metrics(pred, ref, spacing), oracle(pred, ref, spacing))
    assert_metrics_equal(mask_metrics(pred, ref, spacing, hd95='max'), oracle(pred, ref, spacing, hd95='max'))


def test_2d_image_stored_as_3d_equals_2d():
    """nnU-Net's readers give a 2D image as (1, H, W) with a huge first spacing: same as 2D."""
    rng = np.random.default_rng(3)
    pred, ref = rng.random((9, 8)) < 0.4, rng.random((9, 8)) < 0.4
    flat = mask_metrics(pred, ref, (0.8, 0.6))
    stacked = mask_metrics(pred[None], ref[None], (999.0, 0.8, 0.6))
    assert_metrics_equal(stacked, flat)
    assert_metrics_equal(flat, oracle(pred, ref, (0.8, 0.6)))


# ---------------------------------------------------------------- empty masks

def test_empty_prediction():
    ref = np.zeros((4, 4), bool)
    ref[1:3, 1:3] = True
    m = mask_metrics(np.zeros_like(ref), ref, (1.0, 1.0))
    assert m["Dice"] == 0 and m["IoU"] == 0 and m["recall"] == 0 and m["RVD"] == -1
    for key in ("precision", "HD95", "HD", "ASD"):
        assert math.isnan(m[key]), key
    assert m["n_pred"] == 0 and m["volume_pred_mm3"] == 0


def test_empty_reference():
    pred = np.zeros((4, 4), bool)
    pred[0, 0] = True
    m = mask_metrics(pred, np.zeros_like(pred), (1.0, 1.0))
    assert m["Dice"] == 0 and m["IoU"] == 0 and m["precision"] == 0
    for key in ("recall", "RVD", "HD95", "HD", "ASD"):
        assert math.isnan(m[key]), key


def test_both_empty():
    empty = np.zeros((3, 4, 5), bool)
    m = mask_metrics(empty, empty, (3.0, 0.7, 0.5))
    for key in NAN_KEYS:
        assert math.isnan(m[key]), key
    assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (0, 0, 0, 60)
    assert "NaN when prediction and reference are both empty" in CONVENTIONS["Dice"]


def test_perfect_prediction():
    rng = np.random.default_rng(0)
    ref = rng.random((5, 6, 7)) < 0.5
    m = mask_metrics(ref, ref, (3.0, 0.7, 0.5))
    assert m["Dice"] == m["IoU"] == m["precision"] == m["recall"] == 1
    assert m["HD95"] == m["HD"] == m["ASD"] == m["RVD"] == 0


# ---------------------------------------------------------------- classes, ignore label, regions

def test_multi_class_label_maps():
    rng = np.random.default_rng(7)
    spacing = (3.0, 0.7, 0.5)
    ref = rng.integers(0, 4, (4, 6, 5))
    pred = rng.integers(0, 4, (4, 6, 5))
    classes = [EvaluatedClass(f"c{v}", (v,)) for v in (1, 2, 3)]
    got = case_metrics(pred, ref, classes, spacing)
    assert list(got) == ["c1", "c2", "c3"]
    for v in (1, 2, 3):
        assert_metrics_equal(got[f"c{v}"], oracle(pred == v, ref == v, spacing))


def test_ignore_label_hand_computed():
    ignore = 9
    ref = np.array([[0, 1, 1, 9, 9, 0, 0, 0]])
    pred = np.array([[0, 1, 1, 1, 1, 1, 0, 0]])
    m = case_metrics(pred, ref, [EvaluatedClass("a", (1,))], (1.0, 2.0), ignore_label=ignore)["a"]
    # evaluated voxels: 6 (two are ignored); pred's voxels under the ignore label are not FP
    assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (2, 1, 0, 3)
    assert m["n_pred"] == 3 and m["volume_pred_mm3"] == pytest.approx(6.0)
    # surfaces (1D along axis 1, 2 mm): P = {1, 2, 5} (5 is isolated), G = {1, 2}; P->G: 0, 0, 3 steps
    assert m["HD"] == pytest.approx(6.0)
    assert m["ASD"] == pytest.approx(6.0 / 5)
    # without the ignore label the two ignored voxels count
    plain = case_metrics(pred, ref, [EvaluatedClass("a", (1,))], (1.0, 2.0))["a"]
    # P = 1..5 has surface {1, 5}, G = {1, 2}: P->G 0, 6 mm; G->P 0, 2 mm
    assert plain["FP"] == 3 and plain["volume_pred_mm3"] == pytest.approx(10.0)
    assert plain["HD"] == pytest.approx(6.0) and plain["ASD"] == pytest.approx(2.0)


def test_ignore_band_around_reference_gives_distance_zero():
    """A prediction ending anywhere inside an ignored band around the object is perfect."""
    ref = np.zeros((9, 9), int)
    ref[1:8, 1:8] = 9
    ref[3:6, 3:6] = 1
    pred = np.zeros((9, 9), int)
    pred[2:8, 3:7] = 1
    m = case_metrics(pred, ref, [EvaluatedClass("a", (1,))], (0.7, 0.5), ignore_label=9)["a"]
    assert m["Dice"] == 1 and m["HD"] == 0 and m["ASD"] == 0


def test_ignore_label_random_against_brute_force():
    rng = np.random.default_rng(11)
    spacing = (3.0, 0.7, 0.5)
    ref = rng.integers(0, 4, (4, 5, 6))  # 3 is the ignore label
    pred = rng.integers(0, 3, (4, 5, 6))
    got = case_metrics(pred, ref, [EvaluatedClass("1", (1,)), EvaluatedClass("2", (2,))], spacing, ignore_label=3)
    for v in (1, 2):
        assert_metrics_equal(got[str(v)], oracle(pred == v, ref == v, spacing, evaluated=ref != 3))


def test_regions_are_unions_of_labels():
    rng = np.random.default_rng(5)
    spacing = (3.0, 0.7, 0.5)
    ref = rng.integers(0, 4, (4, 5, 6))
    pred = rng.integers(0, 4, (4, 5, 6))
    classes = [EvaluatedClass("whole", (1, 2, 3)), EvaluatedClass("core", (2, 3)), EvaluatedClass("enh", (3,))]
    got = case_metrics(pred, ref, classes, spacing)
    for c in classes:
        p = np.zeros(pred.shape, bool)
        r = np.zeros(ref.shape, bool)
        for label in c.labels:  # union by loop, not np.isin
            p |= pred == label
            r |= ref == label
        assert_metrics_equal(got[c.name], oracle(p, r, spacing))
    assert classes[0].is_region and not classes[2].is_region


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        mask_metrics(np.zeros((3, 3)), np.zeros((3, 4)), (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        mask_metrics(np.zeros((3, 3)), np.zeros((3, 3)), (1.0,))
    with pytest.raises(ValueError, match="spacing"):
        mask_metrics(np.zeros((3, 3)), np.zeros((3, 3)), (1.0, 0.0))


# ---------------------------------------------------------------- aggregation

def test_aggregate_ignores_nan_and_counts_it():
    nan = float('nan')

    def row(dice, hd95, n_pred, n_ref):
        base = {k: 0.0 for k in mask_metrics(np.ones((2, 2)), np.ones((2, 2)), (1.0, 1.0))}
        base.update(Dice=dice, HD95=hd95, n_pred=n_pred, n_ref=n_ref)
        return {"a": base}

    cases = [row(0.5, 2.0, 4, 4), row(1.0, nan, 0, 3), row(nan, nan, 0, 0), row(0.9, 5.0, 2, 2)]
    stats = aggregate(cases, ["a"])["a"]
    assert stats["Dice"]["mean"] == pytest.approx(0.8)
    assert stats["Dice"]["std"] == pytest.approx(math.sqrt(((0.5 - 0.8) ** 2 + 0.2 ** 2 + 0.1 ** 2) / 3))
    assert stats["Dice"]["median"] == pytest.approx(0.9)
    assert (stats["Dice"]["n"], stats["Dice"]["n_nan"]) == (4, 1)
    assert stats["HD95"]["mean"] == pytest.approx(3.5) and stats["HD95"]["n_nan"] == 2
    assert stats["counts"] == {"cases": 4, "reference_empty": 1, "prediction_empty": 2, "both_empty": 1}
    table = format_table({"a": stats})
    assert "| a | 4 | 0.8000 ± " in table and "(1 NaN)" in table and "3.50 ± 1.50 (2 NaN)" in table
