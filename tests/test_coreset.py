"""The pruned greedy k-center coreset returns exactly the order of the plain triangle-inequality search."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from coreset_reference import greedy_kcenter_order_reference
from pni_ray.models.coreset import _Members, _segments, greedy_kcenter_order, project_features, row_distances


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


@pytest.mark.parametrize("threads", [2, 3])
def test_members_bounded_on_the_callers_threads_keep_the_order(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    """Picks whose visited clusters hold PARALLEL_MEMBERS members or more bound them in one run per
    thread, on this thread and the pool's, smaller ones in one run here; the order is the reference's, and
    the caller's thread count is restored."""
    import pni_ray.models.coreset as coreset

    monkeypatch.setattr(coreset, "PARALLEL_MEMBERS", 600)  # blobs below: 480-630 members a pick
    picks: list[tuple[int, int, list[int]]] = []  # per pick: clusters, their members, the threads of its runs
    admit, kernel = coreset._Members.admit, coreset._admit

    def admit_spy(self, clusters, *rest):  # type: ignore[no-untyped-def]
        picks.append((clusters.size, int(self.count[clusters].sum()), []))
        return admit(self, clusters, *rest)

    def kernel_spy(*args):  # type: ignore[no-untyped-def]
        picks[-1][2].append(threading.get_ident())
        return kernel(*args)

    monkeypatch.setattr(coreset._Members, "admit", admit_spy)
    monkeypatch.setattr(coreset, "_admit", kernel_spy)
    x = blobs(5000, 64, 8, 3)
    expected = greedy_kcenter_order_reference(x, 600, 48, chunk_size=2048, seed=13, progress=False)
    caller = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = greedy_kcenter_order(x, 600, 48, chunk_size=2048, seed=13, progress=False)
        assert torch.get_num_threads() == threads, "the caller's thread count is restored"
    finally:
        torch.set_num_threads(caller)
    assert torch.equal(got, expected)
    main = threading.get_ident()
    split = [ids for k, n, ids in picks if n >= 600 and k >= threads]
    assert len(split) > 50 and len(split) < len(picks) - 50, "picks on both sides of the threshold"
    assert all(len(ids) == threads and ids.count(main) == 1 for ids in split), "a run here, the others on the pool"
    assert all(ids == [main] for k, n, ids in picks if n < 600 or k < threads)


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
        positions, owner = _segments(members.start[clusters], (members.count[clusters] + 1) // 2)  # prefixes
        leave = rng.random(positions.size) < 0.3
        moving = members.points[positions[leave]]
        staying = [members.points[members.start[j]:members.start[j] + members.count[j]] for j in clusters]
        staying = [seg[~np.isin(seg, moving)] for seg in staying]
        new_dist = rng.random(moving.size).astype(np.float32)
        members.remove(clusters, positions[leave], owner[leave])
        for j, seg in zip(clusters, staying):  # the rest of each segment, in its order, at its end
            assert np.array_equal(members.points[members.start[j]:members.start[j] + members.count[j]], seg)
        members.append(step, moving, new_dist)
    live, _ = _segments(members.start[:60], members.count[:60])
    assert sorted(members.points[live].tolist()) == list(range(n))  # every point in exactly one cluster
    assert np.array_equal(members.low[live], low[members.points[live]])
    assert np.array_equal(members.low_sq[live], low_sq[members.points[live]])
    assert compactions, "the appends must fill the buffer once"


def test_drop_refuses_a_member_outside_its_cluster() -> None:
    """A position that is not in its cluster's segment (a wrong owner) is an error, not an endless loop."""
    rng = np.random.default_rng(1)
    members = _Members(rng.random(50).astype(np.float32), 4, rng.random((50, 3)).astype(np.float32),
                       rng.random(50).astype(np.float32))
    positions, owner = _segments(members.start[:1], np.array([3]))  # cluster 0's first three members
    moving = members.points[positions].copy()
    members.remove(np.arange(1), positions, owner)
    members.append(1, moving, np.array([0.5, 0.4, 0.3], dtype=np.float32))
    with pytest.raises(ValueError, match="outside its cluster"):
        members.remove(np.array([1]), np.array([members.start[0]]), np.array([0]))


def test_admit_finds_exactly_the_prefix_members_the_bound_cannot_rule_out() -> None:
    """_admit's one pass equals the rule written out in numpy: in each visited cluster the members farther
    than half its gap (a prefix of the sorted segment; a member exactly at half the gap is not in it), and
    of those the ones whose float64 lower bound |low x - low p|^2 is below md^2 (1 + slack) + slack
    (|low x|^2 + |low p|^2) + tiny. Members sit on the half gaps and inside the slack band, so a bisection
    that took ties in or a test without the slack would find other members."""
    rng = np.random.default_rng(5)
    n, slack = 3000, 1e-4
    low = rng.normal(size=(n, 9)).astype(np.float32)
    low_p = rng.normal(size=9).astype(np.float32)
    near_p = rng.random(n) < 0.3  # bound rows close to the pick's: small bounds
    low[near_p] = low_p + rng.normal(scale=0.01, size=(int(near_p.sum()), 9)).astype(np.float32)
    low_sq = np.einsum("ij,ij->i", low, low).astype(np.float32)
    gap = np.linalg.norm(low.astype(np.float64) - low_p, axis=1)
    dist = (rng.random(n) * 8).astype(np.float32)
    in_band = rng.random(n) < 0.3  # md just under |low x - low p|: admitted only through the slack
    dist[in_band] = (gap[in_band] * (1 - 2e-5)).astype(np.float32)
    members = _Members(dist, 8, low, low_sq)
    for step in range(1, 8):  # split the buffer into segments of unequal length, each sorted
        positions, owner = _segments(members.start[:step], members.count[:step] // 3)
        members.remove(np.arange(step), positions, owner)
        members.append(step, members.points[positions].copy(), dist[members.points[positions]])
    clusters = np.array([6, 0, 3, 5], dtype=np.int64)
    half_gaps = members.dist[members.start[clusters] + members.count[clusters] // 2]  # ties with a member
    low_p_sq = float(np.dot(low_p.astype(np.float64), low_p))
    found, owner = members.admit(clusters, half_gaps, low_p, low_p_sq, slack)
    expected, expected_owner, banded = [], [], 0
    for k, j in enumerate(clusters):
        segment = np.arange(members.start[j], members.start[j] + members.count[j])
        prefix = segment[members.dist[segment] > half_gaps[k]]
        assert np.array_equal(prefix, segment[: prefix.size]), "the rule's candidates are a prefix"
        assert members.dist[segment[prefix.size]] == half_gaps[k], "a member at exactly half the gap"
        rows = members.low[prefix].astype(np.float64)
        sq, md = members.low_sq[prefix].astype(np.float64), members.dist[prefix].astype(np.float64)
        lb = sq - 2.0 * rows @ low_p.astype(np.float64) + low_p_sq
        admitted = lb < md * md * (1 + slack) + slack * (sq + low_p_sq) + float(np.finfo(np.float32).tiny)
        banded += int((admitted & (lb >= md * md)).sum())
        expected += prefix[admitted].tolist()
        expected_owner += [k] * int(admitted.sum())
    assert banded > 0, "some members admitted only through the slack"
    assert 0 < len(expected) < sum(members.count[j] for j in clusters), "some members admitted, some ruled out"
    assert found.tolist() == expected and owner.tolist() == expected_owner


def test_loops_compile_without_a_cache_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where numba finds no directory to cache compiled code in (a read-only install without a home), it
    refuses cache=True at import; the module then compiles its loops without the cache and gives the
    same order."""
    import importlib.util

    import numba.core.caching
    import pni_ray.models.coreset as cached

    monkeypatch.setattr(numba.core.caching.CacheImpl, "_locator_classes", [])
    with pytest.raises(RuntimeError, match="no locator"):  # what numba does without a place to cache
        numba.njit(cache=True)(lambda x: x)
    spec = importlib.util.spec_from_file_location("coreset_uncached", cached.__file__)
    uncached = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(uncached)  # type: ignore[union-attr]
    assert uncached._admit._cache.__class__.__name__ == "NullCache"
    x = blobs(1500, 16, 6, 4)
    assert torch.equal(uncached.greedy_kcenter_order(x, 200, 8, progress=False),
                       cached.greedy_kcenter_order(x, 200, 8, progress=False))


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
    """The members' bound is taken as |a|^2 - 2 a.b + |b|^2 over bound rows stored in float32: where |x|^2
    falls below float32's normal range (float64 rows at 1e-21) their rounding is absolute, and the search
    must still skip only what provably stays away. (Smaller still, squared distances themselves fall
    below the normal range and the unpruned search's own float32 arithmetic stops being exact.)"""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 32, generator=g, dtype=torch.float64)
    rows = centres[torch.randint(0, 6, (1500,), generator=g)] + 0.01 * torch.randn(1500, 32, generator=g, dtype=torch.float64)
    for scale in scales:
        x = (rows * scale).to(dtype)
        got = greedy_kcenter_order(x, 200, None, 65536, 0, progress=False)
        assert torch.equal(got, greedy_kcenter_order_reference(x, 200, None, 65536, 0, progress=False)), scale


def test_loops_compile_one_signature_for_float32_and_float64_inputs() -> None:
    """numba numbers a new cache entry from the index it read, so two processes first compiling different
    signatures at once can pair one's index entry with the other's machine code. float32 and float64
    features therefore reach the compiled loops as the same types (distances widened to float64, exactly)."""
    from pni_ray.models import coreset

    for dtype in (torch.float32, torch.float64):
        order = greedy_kcenter_order(blobs(4000, 24, 5, 7).to(dtype), 120, 16, 1024, seed=0, progress=False)
        assert order.unique().numel() == 120
    for loop in (coreset._admit, coreset._drop):  # (_dot is compiled into _admit)
        assert len(loop.signatures) == 1, (loop.__name__, loop.signatures)


def test_a_process_compiles_the_loops_only_under_the_cache_lock(tmp_path) -> None:
    """Processes sharing numba's cache (one install on shared storage, nodes of different CPU types) take
    turns compiling: while another holds the lock file in the cache directory, a new process's first
    coreset waits, and it finishes once the lock is released."""
    import fcntl
    import subprocess
    import sys
    import time

    from pni_ray.models import coreset

    greedy_kcenter_order(torch.randn(300, 8), 10, None, 1024, 0, progress=False)  # the loops now in the cache
    folder = coreset._admit._cache._cache_path
    script = ("import torch; from pni_ray.models.coreset import greedy_kcenter_order; print('imported', flush=True); "
              "print(greedy_kcenter_order(torch.randn(300, 8), 10, None, 1024, 0, progress=False).numel())")
    with open(f"{folder}/{coreset.COMPILE_LOCK_FILE}", "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "imported"
            time.sleep(3)  # far more than one tiny search takes (its loops are in the cache already)
            assert proc.poll() is None, "the coreset ran while another process held the compile lock"
        finally:
            fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.strip() == "10"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the lost one, shown as it was
def test_a_stop_while_numba_compiles_is_held_not_lost():
    """numba's first compile runs Python inside LLVM's ctypes callbacks: a SIGTERM (or Ctrl-C) whose handler raised
    there was printed as "Exception ignored" and lost, and a stopped `train --force` ran on to exit 0. The compile
    holds both signals and delivers them after, to the handlers they met."""
    import ctypes
    import signal

    from pni_ray.models.coreset import _signals_held
    from pni_ray.orchestration.stopping import terminate_as_interrupt

    stop_in_callback = ctypes.CFUNCTYPE(None)(lambda: signal.raise_signal(signal.SIGTERM))
    with terminate_as_interrupt():
        stop_in_callback()  # the failure, as it was: the KeyboardInterrupt dies inside the callback
        after = []
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            with _signals_held():
                stop_in_callback()
                after.append("compiled")
    assert after == ["compiled"]  # the compile finished, then the stop arrived
