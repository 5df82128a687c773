"""Pure model code: coreset, scorer modes, neighbourhood MLP, position prior, maps."""

from __future__ import annotations

import pytest
import torch

from pni_ray.config import NeighbourhoodConfig
from pni_ray.models.anomaly_map import AnomalyMapper, gaussian_kernel1d
from pni_ray.models.coreset import greedy_kcenter_order
from pni_ray.models.neighbourhood import NeighbourhoodMLP
from pni_ray.models.position_prior import build_position_prior, window_offsets
from pni_ray.models.scorer import (
    PatchScorer, exact_sq_distances, masked_argmin, nearest_neighbours, position_candidates, squared_distances,
)


def _naive_greedy(x: torch.Tensor, n: int, start: int) -> list[int]:
    chosen = [start]
    d = ((x - x[start]) ** 2).sum(1).sqrt()
    for _ in range(n - 1):
        nxt = int(torch.argmax(d))
        chosen.append(nxt)
        d = torch.minimum(d, ((x - x[nxt]) ** 2).sum(1).sqrt())
    return chosen


def test_greedy_order_matches_naive_farthest_point():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 16, generator=g, dtype=torch.float64) + 4 * torch.randint(0, 5, (3000, 1), generator=g)
    order = greedy_kcenter_order(x, 60, projection_dim=None, chunk_size=257, seed=3, progress=False)
    assert order.tolist() == _naive_greedy(x, 60, int(order[0]))


def test_greedy_prefix_and_chunking_invariance():
    x = torch.randn(5000, 40, generator=torch.Generator().manual_seed(0))
    long = greedy_kcenter_order(x, 200, projection_dim=16, chunk_size=5000, seed=0, progress=False)
    short = greedy_kcenter_order(x, 50, projection_dim=16, chunk_size=333, seed=0, progress=False)
    assert torch.equal(long[:50], short)  # C_dist is a prefix of the C_emb order
    assert len(set(long.tolist())) == 200


def test_squared_distances_and_nearest_match_brute_force():
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(300, 24, generator=g), torch.randn(70, 24, generator=g)
    ref = torch.cdist(x, m) ** 2
    assert torch.allclose(squared_distances(x, m, (m * m).sum(1)), ref, atol=1e-4)
    d, i = nearest_neighbours(x, m, chunk=64)
    assert torch.equal(i, ref.argmin(1)) and torch.allclose(d, ref.min(1).values.sqrt(), atol=1e-4)
    d2, i2 = nearest_neighbours(x, m, chunk=64, desc="progress bar shown")
    assert torch.equal(d2, d) and torch.equal(i2, i)
    buffer = torch.full((300, 70), float("nan"))  # blocks are written into one reused buffer
    assert squared_distances(x, m, (m * m).sum(1), out=buffer) is buffer and torch.allclose(buffer, ref, atol=1e-4)
    assert torch.equal(nearest_neighbours(x, m, chunk=300)[1], i)  # one block, and 300 = 4 x 64 + 44 above


def test_masked_argmin_marks_rows_with_nothing_allowed():
    d = torch.tensor([[4.0, 1.0, 9.0], [2.0, 3.0, 1.0]])
    allowed = torch.tensor([[True, False, True], [False, False, False]])
    assert masked_argmin(d, allowed).tolist() == [0, -1]


def test_exact_distance_beats_the_gemm_expansion_near_zero():
    g = torch.Generator().manual_seed(0)
    memory = 100.0 + torch.randn(50, 64, generator=g)
    x = memory[:8] + 1e-3 * torch.randn(8, 64, generator=g)
    truth = ((x.double() - memory[:8].double()) ** 2).sum(1)
    exact = exact_sq_distances(x, memory, torch.arange(8))
    expanded = squared_distances(x, memory, (memory * memory).sum(1))[torch.arange(8), torch.arange(8)]
    assert (exact.double() - truth).abs().max() < 1e-6
    assert (expanded.double() - truth).abs().max() > 1e-3  # the expansion cancels catastrophically here


def _scorer_setup(seed=0, m=300, k=20, d=8, h=4, w=5, combine="both"):
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(m, d, generator=g)
    emb_to_dist = torch.cat([torch.arange(k), torch.randint(0, k, (m - k,), generator=g)])
    prior = torch.rand(h * w, m, generator=g) ** 8
    prior = prior / prior.sum(1, keepdim=True)
    feats = torch.randn(2, d, h, w, generator=g)
    p_dist = torch.softmax(3 * torch.randn(2, k, h, w, generator=g), dim=1)
    scorer = PatchScorer(memory, emb_to_dist, prior, tau_scale=0.5, topk=4, combine=combine)
    return scorer, memory, emb_to_dist, prior, feats, p_dist


def _reference(memory, emb_to_dist, prior, feats, p_dist, mode, combine="both"):
    """Per-patch loops straight from the paper's definition."""
    m = memory.shape[0]
    tau = 0.5 / m
    sizes = torch.bincount(emb_to_dist).float()
    b, d, h, w = feats.shape
    out = torch.zeros(b, h, w)
    for bi in range(b):
        for y in range(h):
            for x in range(w):
                phi = feats[bi, :, y, x]
                dist = ((memory - phi) ** 2).sum(1).sqrt()
                p_n = p_dist[bi, :, y, x][emb_to_dist] / sizes[emb_to_dist]
                p_x = prior[y * w + x]
                both = (p_n > tau) & (p_x > tau) if combine == "both" else (p_n + p_x) / 2 > tau
                masks = {"patchcore": torch.ones(m, dtype=torch.bool), "neighbourhood": p_n > tau,
                         "position": p_x > tau, "pni": both}

                def mmin(mask, fallback=None):
                    if mask.any():
                        return dist[mask].min()
                    return mmin(fallback) if fallback is not None else dist.min()

                if mode == "pni_split":
                    out[bi, y, x] = (mmin(p_n > tau) + mmin(p_x > tau)) / 2
                else:  # pni: nothing allowed -> the position's entries -> everything
                    out[bi, y, x] = mmin(masks[mode], p_x > tau if mode == "pni" else None)
    return out


@pytest.mark.parametrize("combine", ["both", "mean"])
@pytest.mark.parametrize("mode", ["patchcore", "neighbourhood", "position", "pni", "pni_split"])
def test_scorer_modes_match_definition_topk_and_dense(mode, combine):
    scorer, memory, emb_to_dist, prior, feats, p_dist = _scorer_setup(combine=combine)
    ref = _reference(memory, emb_to_dist, prior, feats, p_dist, mode, combine)
    fast = scorer(feats, p_dist, mode)
    dense = scorer(feats, p_dist, mode, exact_dense=True)
    assert torch.allclose(fast, ref, atol=1e-4), (fast - ref).abs().max()
    assert torch.allclose(dense, ref, atol=1e-4)


def test_pni_with_nothing_allowed_scores_against_the_position_not_the_nearest():
    """A neighbourhood that vetoes everything the position allows must not lower the score to the
    plain nearest neighbour (the old fallback): the patch is measured against what belongs here."""
    memory = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    prior = torch.tensor([[0.0, 0.0, 1.0]])  # this position only ever saw entry 2
    scorer = PatchScorer(memory, torch.tensor([0, 1, 2]), prior, tau_scale=0.5)
    feats = torch.zeros(1, 2, 1, 1)  # sits on entry 0
    p_dist = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)  # the neighbourhood wants entry 0 only
    for dense in (False, True):
        assert scorer(feats, p_dist, "pni", exact_dense=dense).item() == pytest.approx(10.0)
        assert scorer(feats, p_dist, "patchcore", exact_dense=dense).item() == pytest.approx(0.0)


def test_diagnose_reports_allowed_share_and_plain_scores():
    scorer, *_, feats, p_dist = _scorer_setup()
    d = scorer.diagnose(feats, p_dist, "position")
    assert torch.allclose(d["score"], scorer(feats, p_dist, "position"))
    assert torch.allclose(d["plain"], scorer(feats, p_dist, "patchcore"))
    share = (scorer.position_prior > scorer.tau).float().mean(1).view(1, 4, 5).expand(2, 4, 5)
    assert torch.allclose(d["allowed_share"], share)


def test_pni_differs_from_patchcore_when_masks_bite():
    scorer, *_, feats, p_dist = _scorer_setup()
    assert (scorer(feats, p_dist, "pni") >= scorer(feats, p_dist, "patchcore") - 1e-6).all()
    assert (scorer(feats, p_dist, "pni") > scorer(feats, p_dist, "patchcore") + 1e-3).any()


def test_scorer_rejects_wrong_grid_and_mode():
    scorer, *_, feats, p_dist = _scorer_setup()
    with pytest.raises(ValueError, match="grid"):
        scorer(torch.randn(1, 8, 3, 3), torch.rand(1, 20, 3, 3), "pni")
    with pytest.raises(ValueError, match="unknown scoring mode"):
        scorer(feats, p_dist, "magic")
    # a transposed grid has the same number of positions: refused once the scorer knows its grid
    transposed = (feats.transpose(2, 3).contiguous(), p_dist.transpose(2, 3).contiguous())
    assert scorer(*transposed, "pni").shape == (2, 5, 4)  # without the grid, only h * w is checked
    _, memory, emb_to_dist, prior, _, _ = _scorer_setup()
    gridded = PatchScorer(memory, emb_to_dist, prior, tau_scale=0.5, topk=4, grid=(4, 5))
    assert torch.equal(gridded(feats, p_dist, "pni"), scorer(feats, p_dist, "pni"))
    with pytest.raises(ValueError, match="built on a 4x5 grid, features have 5x4"):
        gridded(*transposed, "pni")


def test_neighbourhood_mlp_never_sees_the_centre():
    cfg = NeighbourhoodConfig(window=5, bottleneck=4, hidden=16, depth=1)
    mlp = NeighbourhoodMLP(6, 10, cfg).eval()
    x = torch.randn(1, 6, 7, 7)
    y = x.clone()
    y[0, :, 3, 3] += 100.0  # change only the centre patch
    a, b = mlp(x), mlp(y)
    assert torch.allclose(a[..., 3, 3], b[..., 3, 3], atol=1e-5)
    assert not torch.allclose(a[..., 3, 4], b[..., 3, 4])  # its neighbours do see it
    z = x.clone()
    z[0, :, 3, 5] += 100.0  # inside the 5x5 window of (3, 3)
    assert not torch.allclose(mlp(z)[..., 3, 3], a[..., 3, 3])
    p = mlp.probabilities(x)
    assert torch.allclose(p.sum(1), torch.ones(1, 7, 7), atol=1e-5)


def test_neighbourhood_mlp_border_is_outside_flag():
    """Outside the image the grid holds zero features and validity 0, unlike a zero feature inside."""
    cfg = NeighbourhoodConfig(window=3, bottleneck=2, hidden=4, depth=0)
    mlp = NeighbourhoodMLP(2, 3, cfg).eval()
    with torch.no_grad():
        mlp.reduce.weight.zero_()
        mlp.reduce.bias.zero_()
        mlp.window.weight.zero_()
        mlp.window.bias.zero_()
        mlp.window.weight[0, 2] = 1.0  # hidden unit 0 counts valid neighbours
    hidden = mlp.window(torch.cat([torch.zeros(1, 2, 3, 3), torch.ones(1, 1, 3, 3)], 1))
    assert hidden[0, 0].tolist() == [[3.0, 5.0, 3.0], [5.0, 8.0, 5.0], [3.0, 5.0, 3.0]]


def test_position_prior_spreads_and_normalises():
    nearest = torch.zeros(2, 3, 3, dtype=torch.long)
    nearest[0, 1, 1] = 5
    prior = build_position_prior(nearest, n_entries=6, spread=1)
    dense = prior.dense()
    assert torch.allclose(dense.sum(1), torch.ones(9))
    # the centre hit of entry 5 reaches every position within +-1 (all of a 3x3 grid)
    assert (dense[:, 5] > 0).all()
    # corner (0,0) collects 4 windows x 2 images = 8 hits, one of them entry 5
    assert dense[0, 5].item() == pytest.approx(1 / 8)
    assert dense[4, 5].item() == pytest.approx(1 / 18)
    assert prior.prob.numel() == int((dense > 0).sum())  # stored sparse: non-zeros only
    spread0 = build_position_prior(nearest, 6, spread=0).dense()
    assert spread0[0, 5] == 0 and spread0[4, 5] == 0.5


def _window_histogram(nearest: torch.Tensor, n_entries: int, spread: float, valid: torch.Tensor) -> torch.Tensor:
    """Brute force: every valid hit counted at each grid cell of its window, then normalised per cell."""
    n_img, h, w = nearest.shape
    r = int(spread)
    counts = torch.zeros(h * w, n_entries)
    for i in range(n_img):
        for y in range(h):
            for x in range(w):
                if not valid[i, y, x]:
                    continue
                for ty in range(h):
                    for tx in range(w):
                        dy, dx = abs(ty - y), abs(tx - x)
                        inside = max(dy, dx) <= r or (spread != r and min(dy, dx) == 0 and max(dy, dx) == r + 1)
                        if inside:
                            counts[ty * w + tx, nearest[i, y, x]] += 1
    return counts / counts.sum(1, keepdim=True).clamp_min(1e-12)


@pytest.mark.parametrize("spread", [0, 0.5, 1, 1.5, 2, 8, 10**9])
def test_position_prior_windows_match_brute_force(spread):
    g = torch.Generator().manual_seed(0)
    nearest = torch.randint(0, 7, (3, 4, 5), generator=g)
    valid = torch.rand(3, 4, 5, generator=g) > 0.3  # padded cells count nowhere
    built = build_position_prior(nearest, 7, spread, valid).dense()
    assert torch.allclose(built, _window_histogram(nearest, 7, spread, valid))


def test_half_step_windows_sit_between_the_squares():
    assert window_offsets(0) == [(0, 0)]
    cross = set(window_offsets(0.5))
    assert cross == {(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)}  # no diagonal
    square = set(window_offsets(1))
    assert cross < square and len(square) == 9
    assert square < set(window_offsets(1.5)) < set(window_offsets(2))
    assert len(window_offsets(1.5)) == 13 and (2, 0) in window_offsets(1.5) and (2, 1) not in window_offsets(1.5)
    assert window_offsets(10**9, (3, 4)) == window_offsets(3, (3, 4))  # the whole grid, not 10^18 offsets
    assert max(abs(dy) for dy, _ in window_offsets(2.5, (3, 4))) == 2


def test_anomaly_mapper_shape_and_blur():
    mapper = AnomalyMapper(sigma=2.0)
    scores = torch.zeros(1, 4, 4)
    scores[0, 2, 2] = 1.0
    out = mapper(scores, (32, 32))
    assert out.shape == (1, 32, 32)
    assert out.max() < 1.0 and out.min() >= 0 and out.sum() > 0
    assert torch.isclose(gaussian_kernel1d(2.0).sum(), torch.tensor(1.0))
    assert AnomalyMapper(0.0)(scores, (4, 4)).equal(scores)


@pytest.mark.parametrize("combine", ["both", "mean"])
def test_scorer_fallbacks_match_definition_when_masks_are_empty(combine):
    """Sparse position priors and peaked p(c|N): many patches have nothing allowed, and the k
    nearest rarely hold an allowed entry, so the dense path and both fallbacks are exercised."""
    g = torch.Generator().manual_seed(1)
    m, k, d, h, w = 200, 20, 8, 4, 5
    memory = torch.randn(m, d, generator=g)
    emb_to_dist = torch.cat([torch.arange(k), torch.randint(0, k, (m - k,), generator=g)])
    prior = torch.rand(h * w, m, generator=g) ** 60
    prior[3] = 0.0  # a position that never saw anything (padding)
    prior = prior / prior.sum(1, keepdim=True).clamp_min(1e-12)
    feats = torch.randn(2, d, h, w, generator=g)
    p_dist = torch.softmax(30 * torch.randn(2, k, h, w, generator=g), dim=1)
    scorer = PatchScorer(memory, emb_to_dist, prior, tau_scale=0.5, topk=2, combine=combine)
    rows = p_dist.permute(0, 2, 3, 1).reshape(-1, k)
    allowed = scorer.allowed(rows, torch.arange(h * w).repeat(2), None, "pni")
    top2 = squared_distances(feats.permute(0, 2, 3, 1).reshape(-1, d), memory, (memory * memory).sum(1)).topk(2, largest=False).indices
    assert (~allowed.gather(1, top2).any(1)).sum() >= 10  # the dense path is reached
    if combine == "both":
        assert (~allowed.any(1)).sum() >= 3  # and the fallback to the position's entries
    for mode in ("neighbourhood", "position", "pni", "pni_split"):
        ref = _reference(memory, emb_to_dist, prior, feats, p_dist, mode, combine)
        assert torch.allclose(scorer(feats, p_dist, mode), ref, atol=1e-4), mode
        assert torch.allclose(scorer(feats, p_dist, mode, exact_dense=True), ref, atol=1e-4), mode


def _sparse_setup(combine="both", empty_position=True):
    """A prior that allows a few entries per position (aligned objects), one position none (padding)."""
    scorer, memory, emb_to_dist, prior, feats, p_dist = _scorer_setup(combine=combine)
    keep = prior >= prior.topk(6, dim=1).values[:, -1:]
    sparse = torch.where(keep, prior, torch.zeros(()))
    if empty_position:
        sparse[7] = 0.0
    sparse = sparse / sparse.sum(1, keepdim=True).clamp_min(1e-12)
    scorer = PatchScorer(memory, emb_to_dist, sparse, tau_scale=0.5, topk=4, combine=combine)
    return scorer, memory, emb_to_dist, sparse, feats, p_dist


@pytest.mark.parametrize("mode", ["position", "pni"])
def test_candidate_path_matches_definition(mode):
    scorer, memory, emb_to_dist, prior, feats, p_dist = _sparse_setup()
    assert scorer.uses_candidates(mode) and scorer.candidates.shape[1] <= 6
    assert scorer.empty_positions.tolist() == [7]
    ref = _reference(memory, emb_to_dist, prior, feats, p_dist, mode)
    fast = scorer(feats, p_dist, mode)
    assert torch.allclose(fast, ref, atol=1e-4), (fast - ref).abs().max()
    assert torch.allclose(fast, scorer(feats, p_dist, mode, exact_dense=True), atol=1e-5)
    # a chunk of one position at a time gives the same scores
    scorer.chunk_patches = 1
    assert torch.allclose(scorer(feats, p_dist, mode), fast)


def test_stricter_neighbourhood_cut_is_one_rule_on_every_path():
    """tau_neighbourhood (the bundle's chosen cut x tau) tightens p(c|N) alone: candidate and dense paths agree, and
    the position's cut, hence its candidate table and mode position, are unchanged."""
    scorer, *_, feats, p_dist = _sparse_setup()
    base, table = scorer(feats, p_dist, "pni"), scorer.candidates.clone()
    scorer.tau_neighbourhood = 40 * scorer.tau
    strict = scorer(feats, p_dist, "pni")
    assert torch.equal(scorer.candidates, table) and not torch.allclose(strict, base)
    assert torch.allclose(strict, scorer(feats, p_dist, "pni", exact_dense=True), atol=1e-5)
    assert torch.equal(scorer(feats, p_dist, "position"), scorer(feats, None, "position"))
    for combine in ("both", "mean"):  # the top-k path of a broad prior, and the paper's mean (one tau)
        broad, *_, feats, p_dist = _scorer_setup(combine=combine)
        before = {m: broad(feats, p_dist, m) for m in ("neighbourhood", "pni", "pni_split")}
        broad.tau_neighbourhood = 40 * broad.tau
        for mode, base in before.items():
            now = broad(feats, p_dist, mode)
            assert torch.allclose(now, broad(feats, p_dist, mode, exact_dense=True), atol=1e-4), (combine, mode)
            assert torch.equal(now, base) == (combine == "mean" and mode == "pni"), (combine, mode)


def test_candidate_path_only_where_it_is_the_same_rule():
    scorer, *_ = _sparse_setup(combine="mean")
    assert scorer.uses_candidates("position") and not scorer.uses_candidates("pni")  # mean admits more
    assert not scorer.uses_candidates("neighbourhood") and not scorer.uses_candidates("pni_split")
    broad, *_ = _scorer_setup()  # ~30% of C_emb allowed per position: the dense search is cheaper
    assert broad.candidates is None and not broad.uses_candidates("pni")


def test_position_candidates_table():
    allowed = torch.tensor([[False, True, False, True], [False, False, False, False], [True, False, False, False]])
    table, empty = position_candidates(allowed)
    assert table.tolist() == [[1, 3], [0, 0], [0, 0]]
    assert empty.tolist() == [False, True, False]


def test_nearest_in_prefix_and_all_is_two_searches_in_one():
    from pni_ray.models.scorer import nearest_in_prefix_and_all

    g = torch.Generator().manual_seed(0)
    memory, x = torch.randn(300, 16, generator=g), torch.randn(1000, 16, generator=g)
    near_prefix, near_all = nearest_in_prefix_and_all(x, memory, 40, chunk=128)
    assert torch.equal(near_prefix, nearest_neighbours(x, memory[:40], 128)[1])
    assert torch.equal(near_all, nearest_neighbours(x, memory, 128)[1])
    assert (near_prefix < 40).all() and (near_all >= 40).any()


def test_extractor_runs_channels_last_and_returns_contiguous_nchw():
    """The backbone's convolutions run on NHWC (oneDNN's fast CPU layout); callers still get NCHW."""
    from pni_ray.config import FeatureConfig
    from pni_ray.models.features import build_extractor

    extractor = build_extractor(FeatureConfig(backbone="efficientnet_lite0", pretrained=False, image_size=64))
    stem = next(m for m in extractor.body.modules() if isinstance(m, torch.nn.Conv2d))
    assert stem.weight.is_contiguous(memory_format=torch.channels_last) and not stem.weight.is_contiguous()
    with torch.no_grad():
        out = extractor(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, extractor.dim, 8, 8) and out.is_contiguous()


def test_training_seconds_split_the_pni_stage(trained_tiny):
    seconds = trained_tiny.report["seconds"]
    parts = seconds["assignment"] + seconds["position_prior"] + seconds["mlp"]
    assert parts == pytest.approx(seconds["pni"], rel=1e-9) and min(seconds.values()) >= 0.0


@pytest.mark.parametrize("columns", [70, 129, 256, 257, 300, 2048, 3008])
def test_row_min_is_torch_min_with_ties_infinities_and_views(columns):
    """The grouped row minimum gives torch's values and first indices: ties (few distinct values),
    +inf rows (masked_argmin's "nothing allowed"), a NaN, and a prefix view of a wider block."""
    from pni_ray.models.rowmin import first_argmin, row_min

    g = torch.Generator().manual_seed(columns)
    tied = torch.randint(0, 4, (257, columns), generator=g).float()
    tied[3] = float("inf")
    tied[5, -1] = -1.0  # the minimum in the last (short) group
    tied[6, :] = 2.0  # one value throughout: index 0
    smooth = torch.randn(64, 3 * columns, generator=g)
    zeros = torch.zeros(9, columns)
    zeros[::2, columns // 2] = -0.0  # a signed zero after an unsigned one: torch keeps the first
    for values in (tied, smooth, smooth[:, :columns], -tied, tied.double(), tied.bfloat16(), tied.clamp(max=5).long(),
                   zeros, -zeros):
        expected = values.min(1)
        got = row_min(values, group=64)
        assert torch.equal(got[0], expected.values) and torch.equal(got[1], expected.indices)
        assert torch.equal(got[0].signbit(), expected.values.signbit()) if values.is_floating_point() else True
        assert torch.equal(first_argmin(values, group=64), values.argmin(1))
    with_nan = smooth.clone()
    with_nan[7, 11] = float("nan")
    assert torch.equal(first_argmin(with_nan, group=64), with_nan.argmin(1))
    assert torch.equal(row_min(torch.zeros(0, columns))[1], torch.zeros(0, dtype=torch.long))


def test_nearest_assignment_uses_the_grouped_minimum_at_real_bank_sizes():
    """Banks of 3,008 and 16,384 entries (not and exactly a multiple of the group): the training
    assignment equals a plain argmin over the same distance blocks."""
    from pni_ray.models.scorer import nearest_in_prefix_and_all

    g = torch.Generator().manual_seed(1)
    x = torch.randn(700, 8, generator=g)
    for entries in (3008, 16384):
        memory = torch.randn(entries, 8, generator=g)
        memory[17] = memory[5]  # a duplicated entry: its first copy wins, as with torch
        x[:3] = memory[5]  # ... for these rows, whose nearest entries are the two copies
        near_prefix, near_all = nearest_in_prefix_and_all(x, memory, 2048, chunk=256)
        dist = squared_distances(x, memory, (memory * memory).sum(1))
        assert torch.equal(near_all, dist.argmin(1)) and torch.equal(near_prefix, dist[:, :2048].argmin(1))
        d, i = nearest_neighbours(x, memory, chunk=256)
        assert torch.equal(i, near_all) and torch.equal(d, dist.min(1).values.sqrt())
        assert (near_all[:3] == 5).all()


@pytest.mark.parametrize("columns", [70, 257, 3008])
def test_row_min_with_a_shift_is_the_minimum_of_the_clamped_distances(columns):
    """row_min(|m|^2 - 2 x.m, shift=|x|^2) gives what the full (partial + |x|^2).clamp(0) pass
    gives, bit for bit: entries clamped to 0 (several per row: the first wins, not the most
    negative raw value), ordinary rows, and NaN."""
    from pni_ray.models.rowmin import first_argmin, row_min

    g = torch.Generator().manual_seed(columns)
    partial = torch.rand(200, columns, generator=g) * 3 - 0.5  # -0.5: a few entries clamp below |x|^2 = 0.3 .. 2
    shift = torch.rand(200, generator=g) * 1.7 + 0.3
    partial[:20] = partial[:20].abs() + 1.0
    partial[:20, 5::7] = -50.0 - torch.arange(len(range(5, columns, 7)))  # all clamp to 0; the raw minimum is the last
    partial[20, -1] = -shift[20] - 1.0  # the only clamped entry, in the last column
    full = (partial + shift.unsqueeze(1)).clamp_min(0.0)
    expected = full.min(1)
    got = row_min(partial, group=64, shift=shift)
    assert torch.equal(got[0], expected.values) and torch.equal(got[1], expected.indices)
    assert torch.equal(first_argmin(partial, group=64, shift=shift), full.argmin(1))
    assert (got[1][:20] == 5).all() and got[1][20] == columns - 1
    partial[30, 9] = float("nan")
    full = (partial + shift.unsqueeze(1)).clamp_min(0.0)
    assert torch.equal(first_argmin(partial, group=64, shift=shift), full.argmin(1))
