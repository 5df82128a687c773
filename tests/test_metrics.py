"""Tests for pni_ray.metrics: sklearn for AUROC/F1, hand-computed and brute-force AUPRO."""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from pni_ray.metrics import (
    UndefinedMetricError,
    aupro,
    auroc,
    compute_all,
    f1_max,
    image_auroc,
    pixel_auroc,
    threshold_at_f1_max,
)


def _random_scores(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    if kind == "float":
        return rng.normal(size=n)
    if kind == "int":  # very few distinct values: ties everywhere
        return rng.integers(0, 5, size=n)
    if kind == "rounded":
        return np.round(rng.normal(size=n), 1).astype(np.float32)
    raise AssertionError(kind)


def _sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    denom = precision + recall
    f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    return float(f1.max())


def _brute_pro_curve_area(
    masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], fpr_limit: float
) -> float:
    """Straight from the definition: one threshold per distinct score, direct counts."""
    regions: List[np.ndarray] = []
    normal: List[np.ndarray] = []
    for m, s in zip(masks, maps):
        m = np.asarray(m) != 0
        lab, k = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [s[lab == r] for r in range(1, k + 1)]
        normal.append(s[~m])
    normal_all = np.concatenate(normal)
    thresholds = np.unique(np.concatenate([np.ravel(s) for s in maps]))[::-1]
    points = [(0.0, 0.0)]
    for t in thresholds:
        fpr = float(np.mean(normal_all >= t))
        pro = float(np.mean([np.mean(r >= t) for r in regions]))
        points.append((fpr, pro))
    area = 0.0
    for (f0, p0), (f1, p1) in zip(points, points[1:]):
        if f1 <= fpr_limit:
            area += (f1 - f0) * (p0 + p1) / 2
            continue
        if f0 < fpr_limit:
            p_lim = p0 + (p1 - p0) * (fpr_limit - f0) / (f1 - f0)
            area += (fpr_limit - f0) * (p0 + p_lim) / 2
        break
    return area / fpr_limit


# ------------------------------------------------------------------------- AUROC


@pytest.mark.parametrize("kind", ["float", "int", "rounded"])
@pytest.mark.parametrize("seed", range(4))
def test_auroc_matches_sklearn(kind: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 3000))
    labels = rng.random(n) < rng.uniform(0.05, 0.95)
    labels[:2] = [True, False]
    scores = _random_scores(rng, n, kind) + labels * rng.uniform(0, 1)
    if kind == "int":
        scores = scores.astype(np.int64)
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_auroc(labels.astype(int), scores) == pytest.approx(
        roc_auc_score(labels, scores), abs=1e-12
    )


def test_auroc_more_positives_than_negatives_and_exact_values() -> None:
    # Both search directions (smaller class queried in the larger one) must agree.
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 10, size=5000)
    labels = rng.random(5000) < 0.9
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert auroc(~labels, scores) == pytest.approx(roc_auc_score(~labels, scores), abs=1e-12)
    assert auroc([0, 1], [0.0, 1.0]) == 1.0
    assert auroc([1, 0], [0.0, 1.0]) == 0.0
    assert auroc([0, 1, 0, 1], [3, 3, 3, 3]) == 0.5


def test_auroc_large_input_with_ties() -> None:
    rng = np.random.default_rng(1)
    n = 1_500_000
    labels = rng.random(n) < 0.03
    scores = (rng.random(n) + 0.3 * labels).astype(np.float32)
    scores = np.round(scores, 3)  # heavy ties
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)


def test_auroc_errors() -> None:
    with pytest.raises(ValueError, match="one class"):
        auroc(np.zeros(5), np.arange(5.0))
    with pytest.raises(ValueError, match="one class"):
        auroc(np.ones(5, bool), np.arange(5.0))
    with pytest.raises(UndefinedMetricError):
        auroc(np.ones(5, bool), np.arange(5.0))
    with pytest.raises(ValueError, match="same shape"):
        auroc(np.array([0, 1, 1]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="NaN"):
        auroc(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="binary"):
        auroc(np.array([0, 1, 2]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="1-D"):
        image_auroc(np.zeros((2, 2)), np.zeros((2, 2)))


# ---------------------------------------------------------------------------- F1


@pytest.mark.parametrize("kind", ["float", "int", "rounded"])
@pytest.mark.parametrize("seed", range(4))
def test_f1_max_matches_sklearn(kind: str, seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 2000))
    labels = rng.random(n) < rng.uniform(0.05, 0.95)
    labels[:2] = [True, False]
    scores = _random_scores(rng, n, kind) + labels * rng.uniform(0, 1)
    if kind == "int":
        scores = scores.astype(np.int64)
    expected = _sklearn_f1_max(labels, scores)
    assert f1_max(labels, scores) == pytest.approx(expected, abs=1e-12)

    thr = threshold_at_f1_max(labels, scores)
    assert thr in set(scores.tolist())

    def f1_at(t: float) -> float:
        pred = scores >= t
        tp = np.sum(pred & labels)
        return 2 * tp / (pred.sum() + labels.sum())

    assert f1_at(thr) == pytest.approx(expected, abs=1e-12)
    higher = np.unique(scores[scores > thr])
    assert all(f1_at(t) < expected - 1e-15 for t in higher)  # the highest optimal threshold


def test_f1_max_known_values() -> None:
    assert f1_max([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert threshold_at_f1_max([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 0.8
    # All tied: predicting everything positive gives P = 1/2, R = 1.
    assert f1_max([0, 1], [5, 5]) == pytest.approx(2 / 3)
    # Two thresholds tie at F1 = 2/3 (tp=1, fp=0 and tp=2, fp=2): the higher one is returned.
    assert f1_max([1, 0, 0, 1], [5, 4, 3, 2]) == pytest.approx(2 / 3)
    assert threshold_at_f1_max([1, 0, 0, 1], [5, 4, 3, 2]) == 5.0
    # Only positives: still defined.
    assert f1_max([1, 1], [0.3, 0.7]) == 1.0
    with pytest.raises(ValueError, match="positive"):
        f1_max([0, 0], [0.3, 0.7])


# ------------------------------------------------------------------------- AUPRO


def _two_region_case() -> tuple:
    """Region A (2 px) outscores everything; region B (3 px) trickles in later.

    10 normal pixels scored 0.9, 0.8, ..., 0.0, so FPR moves in steps of 0.1.
    """
    mask = np.zeros((3, 5), bool)
    mask[0, 0:2] = True  # A
    mask[2, 2:5] = True  # B, not touching A
    amap = np.zeros((3, 5))
    amap[mask == 0] = np.arange(9, -1, -1) / 10
    amap[0, 0:2] = 1.0
    amap[2, 2:5] = [0.85, 0.75, 0.05]
    return mask, amap


def test_aupro_two_regions_by_hand() -> None:
    mask, amap = _two_region_case()
    # Curve: (0,0)->(0,1/2)->(.1,1/2)->(.1,2/3)->(.2,2/3)->(.2,5/6)->(.3,5/6)
    expected = (0.1 * 0.5 + 0.1 * (2 / 3) + 0.1 * (5 / 6)) / 0.3
    assert expected == pytest.approx(2 / 3)
    assert aupro(mask[None], amap[None]) == pytest.approx(expected, abs=1e-9)


def test_aupro_interpolates_inside_a_diagonal_tie_segment() -> None:
    mask, amap = _two_region_case()
    amap[2, 3] = 0.8  # ties with the normal pixel at 0.8: a diagonal segment
    # (.1, 2/3) -> (.2, 5/6); at FPR .15 the interpolated PRO is 3/4.
    expected = (0.1 * 0.5 + 0.05 * (2 / 3 + 3 / 4) / 2) / 0.15
    assert aupro(mask[None], amap[None], fpr_limit=0.15) == pytest.approx(expected, abs=1e-9)
    # Full range, by hand: the curve continues flat at 5/6 until B's last pixel at 0.05.
    full = 0.1 * 0.5 + 0.1 * (2 / 3 + 5 / 6) / 2 + 0.7 * (5 / 6) + 0.1 * 1.0
    assert aupro(mask[None], amap[None], fpr_limit=1.0) == pytest.approx(full, abs=1e-9)


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_perfect_worst_and_constant(fpr_limit: float) -> None:
    rng = np.random.default_rng(3)
    masks = rng.random((3, 12, 10)) < 0.2
    perfect = masks.astype(np.float32)
    assert aupro(masks, perfect, fpr_limit) == 1.0
    assert aupro(masks, 1.0 - perfect, fpr_limit) == 0.0
    # One tie group: straight line from (0, 0) to (1, 1).
    constant = np.full(masks.shape, 0.5)
    assert aupro(masks, constant, fpr_limit) == pytest.approx(fpr_limit / 2, abs=1e-12)


def test_aupro_uses_eight_connectivity() -> None:
    mask = np.zeros((6, 6), bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one region with 8-connectivity
    mask[4, 4] = True  # a second, separate region
    amap = np.full(mask.shape, 0.5)
    amap[0, 0] = 1.0
    amap[1, 1] = 0.0
    amap[4, 4] = 0.0
    # 8-conn: PRO = mean(1/2, 0) = 1/4 while FPR runs 0 -> 1; 4-conn would give 1/3.
    assert aupro(mask[None], amap[None]) == pytest.approx(0.25, abs=1e-12)
    assert _brute_pro_curve_area([mask], [amap], 0.3) == pytest.approx(0.25, abs=1e-12)


@pytest.mark.parametrize("kind", ["float", "int", "rounded"])
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fpr_limit", [0.3, 0.1, 0.5, 1.0])
def test_aupro_matches_brute_force(kind: str, seed: int, fpr_limit: float) -> None:
    rng = np.random.default_rng(1000 + seed)
    shapes = [(7, 9), (5, 5), (8, 6), (4, 11)]
    masks = [ndimage.binary_opening(rng.random(s) < 0.45) | (rng.random(s) < 0.05) for s in shapes]
    masks[1][:] = False  # an image without defects
    maps = [
        _random_scores(rng, int(np.prod(s)), kind).reshape(s) + 1.5 * m
        for s, m in zip(shapes, masks)
    ]
    expected = _brute_pro_curve_area(masks, maps, fpr_limit)
    assert aupro(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_aupro_limit_on_an_exact_curve_point() -> None:
    # 20 normal pixels: FPR 0.3 is exactly 6 pixels, with ties around that rank.
    rng = np.random.default_rng(5)
    mask = np.zeros((4, 8), bool)
    mask[0, :4] = True
    mask[3, 5:] = True
    mask[2, 0] = True
    amap = rng.integers(0, 4, size=mask.shape).astype(float) + mask
    for limit in (0.3, 0.25, 0.35, 0.2):
        assert aupro(mask[None], amap[None], limit) == pytest.approx(
            _brute_pro_curve_area([mask], [amap], limit), abs=1e-9
        )


def test_aupro_lists_of_different_sizes() -> None:
    rng = np.random.default_rng(11)
    shapes = [(16, 16), (9, 13), (20, 7)]
    masks = [rng.random(s) < 0.15 for s in shapes]
    maps = [rng.random(s).astype(np.float32) + 0.3 * m for s, m in zip(shapes, masks)]
    assert aupro(masks, maps) == pytest.approx(_brute_pro_curve_area(masks, maps, 0.3), abs=1e-9)
    # 0/255 uint8 masks (as stored by MVTec) mean the same thing.
    assert aupro([m.astype(np.uint8) * 255 for m in masks], maps) == aupro(masks, maps)
    # Same-size images: list and stacked array agree.
    same = [(rng.random((10, 12)) < 0.2) for _ in range(3)]
    same_maps = [rng.random((10, 12)) for _ in range(3)]
    assert aupro(same, same_maps) == aupro(np.stack(same), np.stack(same_maps))


def test_aupro_errors() -> None:
    masks = np.zeros((2, 4, 4), bool)
    maps = np.random.default_rng(0).random((2, 4, 4))
    with pytest.raises(ValueError, match="no anomalous region"):
        aupro(masks, maps)
    masks[0, 1, 1] = True
    with pytest.raises(ValueError, match="shape"):
        aupro(masks, maps[:, :3])
    with pytest.raises(ValueError, match="shape"):
        aupro([masks[0], masks[1]], [maps[0], maps[1, :3]])
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        aupro(masks[0], maps[0])
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=1.5)
    with pytest.raises(ValueError, match="masks but"):
        aupro(masks, maps[:1])
    with pytest.raises(ValueError, match="no normal pixel"):
        aupro(np.ones((1, 3, 3), bool), maps[:1, :3, :3])


# ------------------------------------------------------------------ pixel / all


def test_pixel_auroc_stack_and_list() -> None:
    rng = np.random.default_rng(21)
    masks = rng.random((4, 16, 16)) < 0.1
    maps = rng.random((4, 16, 16)) + 0.2 * masks
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    shapes = [(16, 16), (8, 30), (5, 5)]
    lmasks = [rng.random(s) < 0.1 for s in shapes]
    lmaps = [rng.integers(0, 6, size=s) + m for s, m in zip(shapes, lmasks)]
    expected = roc_auc_score(
        np.concatenate([m.ravel() for m in lmasks]), np.concatenate([m.ravel() for m in lmaps])
    )
    assert pixel_auroc(lmasks, lmaps) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="one class"):
        pixel_auroc(np.zeros((2, 3, 3)), np.zeros((2, 3, 3)))


def test_compute_all_matches_individual_metrics() -> None:
    rng = np.random.default_rng(31)
    masks = rng.random((6, 20, 20)) < 0.08
    masks[:2] = False
    labels = masks.any(axis=(1, 2)).astype(int)
    maps = (rng.random((6, 20, 20)) + 0.4 * masks).astype(np.float32)
    scores = maps.reshape(6, -1).max(axis=1)
    out = compute_all(labels, scores, masks, maps)
    assert list(out) == ["image_auroc", "pixel_auroc", "aupro", "f1_max", "pixel_f1_max"]
    assert out["image_auroc"] == image_auroc(labels, scores)
    assert out["pixel_auroc"] == pixel_auroc(masks, maps)
    assert out["aupro"] == aupro(masks, maps)
    assert out["f1_max"] == f1_max(labels, scores)
    assert out["pixel_f1_max"] == pytest.approx(
        _sklearn_f1_max(masks.ravel(), maps.ravel()), abs=1e-12
    )
    for value in out.values():
        assert type(value) is float and 0.0 <= value <= 1.0


def test_compute_all_without_anomalies_returns_none() -> None:
    rng = np.random.default_rng(41)
    maps = rng.random((3, 8, 8))
    out = compute_all(np.zeros(3), maps.max(axis=(1, 2)), np.zeros((3, 8, 8), bool), maps)
    assert out == {
        "image_auroc": None,
        "pixel_auroc": None,
        "aupro": None,
        "f1_max": None,
        "pixel_f1_max": None,
    }
    out = compute_all([0, 1, 1], [0.1, 0.5, 0.9], None, None)
    assert out["image_auroc"] == 1.0 and out["f1_max"] == 1.0 and out["aupro"] is None
    # defect images only: F1 = 1 by construction, so n/a, as the image AUROC (evaluate warns of both)
    out = compute_all([1, 1], [0.1, 0.5], np.ones((2, 8, 8), bool) & (rng.random((2, 8, 8)) > 0.5), maps[:2])
    assert out["image_auroc"] is None and out["f1_max"] is None and out["pixel_auroc"] is not None
    # every pixel a defect: pixel F1 = 1 by construction, n/a as well (it said 1.0)
    out = compute_all([1, 1], [0.1, 0.5], np.ones((2, 8, 8), bool), maps[:2])
    assert out["pixel_f1_max"] is None and out["pixel_auroc"] is None
    with pytest.raises(ValueError, match="image labels"):
        compute_all([0, 1], [0.1, 0.5], np.zeros((3, 8, 8), bool), maps)
    with pytest.raises(ValueError, match="both"):
        compute_all([0, 1], [0.1, 0.5], None, maps)
