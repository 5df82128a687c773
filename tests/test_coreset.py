"""The pruned greedy k-center coreset returns exactly the order of the plain triangle-inequality search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coreset_reference import greedy_kcenter_order_reference
from pni_ray.models.coreset import _Members, greedy_kcenter_order, project_features, row_distances


def blobs(n: int, dim: int, centres: int, seed: int) -> torch.Tensor:
    """Clustered rows, like patch features: dense clusters at several scales."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(centres, dim, generator=g) * 4
    scales = torch.rand(centres, 1, generator=g) * 1.5 + 0.1
    pick = torch.randint(centres, (n,), generator=g)
    return means[pick] + torch.randn(n, dim, generator=g) * scales[pick]


def ties(n: int, dim: int, seed: int) -> torch.Tensor:
    """Integer points on a small grid: many equal distances and duplicate rows."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (n, dim), generator=g).float()


def has_tied_pick(features: torch.Tensor, order: torch.Tensor) -> bool:
    """Whether some pick had another point at exactly the same (farthest) distance."""
    min_dist = torch.full((features.shape[0],), float("inf"))
    for step, current in enumerate(order.tolist()):
        if step and int((min_dist == min_dist[current]).sum()) > 1:
            return True
        min_dist = torch.minimum(min_dist, row_distances(features, features[current]))
    return False


@pytest.mark.parametrize(
    "n, dim, n_select, projection_dim, seed",
    [
        (3000, 40, 300, 16, 0),  # projected, as in training
        (2500, 24, 600, 128, 1),  # projection wider than the input: the rows themselves
        (4000, 64, 800, 32, 2),  # many picks relative to N: the member buffer is compacted
        (50, 8, 50, 8, 3),  # every row picked
    ],
)
def test_order_identical_to_reference_on_blobs(n: int, dim: int, n_select: int, projection_dim: int, seed: int) -> None:
    x = blobs(n, dim, 12, seed)
    expected = greedy_kcenter_order_reference(x, n_select, projection_dim, chunk_size=1024, seed=seed, progress=False)
    got = greedy_kcenter_order(x, n_select, projection_dim, chunk_size=1024, seed=seed, progress=False)
    assert torch.equal(got, expected)


def test_order_identical_with_ties_and_duplicates() -> None:
    x = ties(1500, 6, 4)  # 729 distinct rows: the later picks are all at distance 0
    expected = greedy_kcenter_order_reference(x, 900, None, chunk_size=512, seed=5, progress=False)
    got = greedy_kcenter_order(x, 900, None, chunk_size=512, seed=5, progress=False)
    assert has_tied_pick(x, expected), "the data must exercise the tie rule"
    assert len(set(expected.tolist())) < 900, "the data must exercise repeated zero-distance picks"
    assert torch.equal(got, expected)


def test_tie_rule_is_lowest_index() -> None:
    """The seeded start is the centre of four corners, all at one distance: the lowest index wins."""
    start = int(torch.randint(5, (1,), generator=torch.Generator().manual_seed(0)))
    corners = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    x = torch.cat([corners[:start], torch.zeros(1, 2), corners[start:]])
    order = greedy_kcenter_order(x, 3, None, seed=0, progress=False)
    assert order.tolist()[:2] == [start, 0 if start else 1]
    assert torch.equal(order, greedy_kcenter_order_reference(x, 3, None, seed=0, progress=False))


def test_order_identical_on_patch_like_features() -> None:
    """Heavy-tailed, correlated, non-negative rows (post-ReLU CNN features), float32 defaults."""
    g = torch.Generator().manual_seed(7)
    base = torch.relu(torch.randn(6000, 96, generator=g) @ torch.randn(96, 96, generator=g) * 0.3)
    x = base * torch.rand(6000, 1, generator=g).pow(3) * 5
    expected = greedy_kcenter_order_reference(x, 700, 32, chunk_size=2048, seed=11, progress=False)
    assert torch.equal(greedy_kcenter_order(x, 700, 32, chunk_size=2048, seed=11, progress=False), expected)


def test_order_identical_on_unstructured_rows() -> None:
    """Isotropic rows, like a texture's features: no clusters, so the triangle rule admits most members
    every pick and the members' lower bound does the pruning."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(5000, 64, generator=g)
    expected = greedy_kcenter_order_reference(x, 600, 48, chunk_size=2048, seed=13, progress=False)
    assert torch.equal(greedy_kcenter_order(x, 600, 48, chunk_size=2048, seed=13, progress=False), expected)


def _spy_bound_products(monkeypatch: pytest.MonkeyPatch, threshold: int) -> tuple[list, list]:
    """Record each bound product (size, result checked against float64) and each torch mv (rows, threads)."""
    import pni_ray.models.coreset as coreset

    monkeypatch.setattr(coreset, "PARALLEL_BOUND_ROWS", threshold)
    products, mv, calls, mvs = coreset._BoundProducts.__call__, torch.mv, [], []

    def spy(self: coreset._BoundProducts, low: np.ndarray, positions: np.ndarray, low_p: np.ndarray) -> np.ndarray:
        out = products(self, low, positions, low_p)
        rows = np.take(low, positions, axis=0).astype(np.float64)
        exact = rows @ low_p.astype(np.float64)
        # IEEE float32 in any summation order: within 40 roundings of sum |x_i p_i| (the bound's slack is far wider)
        assert np.all(np.abs(out - exact) <= 40 * np.finfo(np.float32).eps * (np.abs(rows) @ np.abs(low_p)) + 1e-30)
        assert np.shares_memory(out, self.out.numpy()), "the result must be the reused buffer"
        calls.append(positions.size)
        return out

    def mv_spy(*args: object, **kwargs: object) -> torch.Tensor:
        mvs.append((args[0].shape[0], torch.get_num_threads()))  # type: ignore[union-attr]
        return mv(*args, **kwargs)

    monkeypatch.setattr(coreset._BoundProducts, "__call__", spy)
    monkeypatch.setattr(torch, "mv", mv_spy)
    return calls, mvs


def _order_at_two_threads(x: torch.Tensor) -> torch.Tensor:
    caller = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        order = greedy_kcenter_order(x, 600, 48, chunk_size=2048, seed=13, progress=False)
        assert torch.get_num_threads() == 2, "the caller's thread count is restored"
    finally:
        torch.set_num_threads(caller)
    return order


def test_bound_products_on_the_callers_threads_keep_the_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """The members' bound products run on the caller's two threads from PARALLEL_BOUND_ROWS members up and
    on one below, into one reused buffer, and give the reference order; the search's other ops stay on one."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(5000, 64, generator=g)  # unstructured: most members admitted every pick
    expected = greedy_kcenter_order_reference(x, 600, 48, chunk_size=2048, seed=13, progress=False)
    calls, mvs = _spy_bound_products(monkeypatch, threshold=4600)
    assert torch.equal(_order_at_two_threads(x), expected)
    assert len(mvs) == len(calls) and sum(calls) > 100_000, "every product ran, with members to bound"
    assert any(n >= 4600 for n in calls) and any(n < 4600 for n in calls), "both sides of the threshold"
    assert all(threads == (2 if n >= 4600 else 1) for n, threads in mvs)


def test_bound_products_leave_lowered_matmul_precision_to_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """With torch's float32 products lowered (bf16 on CPUs that have it: rounding ~9x the bound's slack)
    torch mv is not used, and the order stays the reference's."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4000, 24, generator=g) @ torch.randn(24, 256, generator=g)  # rank 24 in 256 dimensions
    calls, mvs = _spy_bound_products(monkeypatch, threshold=1)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # the projection too: the reference runs under it as well
    try:
        expected = greedy_kcenter_order_reference(x, 600, 48, chunk_size=2048, seed=13, progress=False)
        got = _order_at_two_threads(x)
    finally:
        torch.set_float32_matmul_precision(precision)
    assert calls and not mvs
    assert torch.equal(got, expected)


def test_members_keep_their_bounds_through_moves_and_compaction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each member's stored bound rows are its own table rows after removals, appends and compaction
    (a stale row would be a wrong bound: a point skipped that should be measured)."""
    compactions = []
    compact = _Members._compact
    monkeypatch.setattr(_Members, "_compact", lambda self, n: (compactions.append(n), compact(self, n)))
    rng = np.random.default_rng(0)
    n = 400
    dist = rng.random(n).astype(np.float32)
    low, low_sq = rng.random((n, 5)).astype(np.float32), rng.random(n).astype(np.float32)
    members = _Members(dist, 60, low, low_sq)
    for step in range(1, 60):  # move a random share of some clusters' prefixes to a new centre
        clusters = np.flatnonzero(members.count[:step] > 0)
        clusters = rng.choice(clusters, size=min(3, clusters.size), replace=False)
        ends = members.start[clusters] + (members.count[clusters] + 1) // 2
        positions, owner = members.prefixes(clusters, ends)
        keep = rng.random(positions.size) > 0.3
        moving = members.points[positions[~keep]]
        new_dist = rng.random(moving.size).astype(np.float32)
        members.remove(clusters, ends, positions, owner, keep)
        members.append(step, moving, new_dist)
    live, _ = members.prefixes(np.arange(60), members.start[:60] + members.count[:60])
    assert sorted(members.points[live].tolist()) == list(range(n))  # every point in exactly one cluster
    assert np.array_equal(members.low[live], low[members.points[live]])
    assert np.array_equal(members.low_sq[live], low_sq[members.points[live]])
    assert compactions, "the appends must fill the buffer once"


def test_reference_comparison_can_fail() -> None:
    """A different seed gives a different order: equality above is not vacuous."""
    x = blobs(2000, 16, 8, 9)
    a = greedy_kcenter_order(x, 100, 8, seed=0, progress=False)
    b = greedy_kcenter_order_reference(x, 100, 8, seed=1, progress=False)
    assert not torch.equal(a, b)


def test_projection_matches_reference_rows() -> None:
    x = blobs(3000, 20, 4, 10)
    reduced = project_features(x, 8, 1000, 3)
    assert reduced.shape == (3000, 8)
    assert torch.equal(project_features(x, 64, 1000, 3), x)


def test_rejects_non_finite_and_empty_selection() -> None:
    x = blobs(100, 4, 2, 0)
    x[5, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        greedy_kcenter_order(x, 10, None, progress=False)
    with pytest.raises(ValueError, match="positive"):
        greedy_kcenter_order(x, 0, None, progress=False)


@pytest.mark.parametrize(("dtype", "scales"), [(torch.float32, (1e-19, 1e-3, 1e3, 1e18)),
                                               (torch.float64, (1e-21, 1e-19, 1e-3, 1e3, 1e18))])
def test_order_identical_at_tiny_and_large_feature_scales(dtype: torch.dtype, scales: tuple[float, ...]) -> None:
    """The members' bound is taken in float32 as |a|^2 - 2 a.b + |b|^2: where |x|^2 falls below
    float32's normal range (float64 rows at 1e-21) its rounding is absolute, and the search must
    still skip only what provably stays away. (Smaller still, squared distances themselves fall
    below the normal range and the unpruned search's own float32 arithmetic stops being exact.)"""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 32, generator=g, dtype=torch.float64)
    rows = centres[torch.randint(0, 6, (1500,), generator=g)] + 0.01 * torch.randn(1500, 32, generator=g, dtype=torch.float64)
    for scale in scales:
        x = (rows * scale).to(dtype)
        got = greedy_kcenter_order(x, 200, None, 65536, 0, progress=False)
        assert torch.equal(got, greedy_kcenter_order_reference(x, 200, None, 65536, 0, progress=False)), scale
