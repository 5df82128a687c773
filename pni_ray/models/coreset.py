"""Greedy k-center coreset (PatchCore's sampler) that returns the selection order.

The order matters to PNI: the distribution coreset C_dist is a prefix of the same greedy
sequence as the embedding coreset C_emb, so one run yields both.

Why it is organised around clusters: the plain triangle-inequality rule (a point x whose
centre a(x) has d(new, a(x)) >= 2 d(x, a(x)) cannot get closer to the new centre) still
tests every one of N points at every pick, which at 780k patches and 16k picks is the whole
cost. Here each centre keeps its members sorted by distance (see _Members), so a pick only
visits clusters whose radius lets the rule pass for some member and, in each, only the
prefix of members the rule admits; a lower bound on distances (32 principal axes of the
projected rows plus the norm of the rest) skips most clusters, and most admitted members,
without touching their 128-wide rows. The points the rule admits, the
expression that measures them and the tie rule (the lowest index among equal maxima) are
the plain rule's, and a point is only skipped when the bound proves it is not closer, so the
order is bit-for-bit the one the plain rule gives (tests/test_coreset.py checks it against
that implementation). Bookkeeping is numpy: per pick it touches a few thousand entries, where
torch's per-call and advanced-indexing overheads cost more than the arithmetic. The exception is the
members' bound products, up to ~100k rows a pick on transistor: torch, on the caller's threads.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from pni_ray.models.threads import one_thread

# Principal axes of the projected rows used for the lower bounds: few enough that scanning
# every centre per pick stays cheap, enough to prune most centres and members.
BOUND_AXES = 32
# Rows sampled (evenly spaced) to estimate those axes; they only affect speed, never the order.
BOUND_SAMPLE_ROWS = 65536
TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32: bounds below it are not trusted
# A pick's members' bound products run on the caller's threads from this many members up (transistor
# admits ~100k a pick; one-off, 100k random rows: 1.8 ms for numpy's take + einsum, 0.82 ms for torch's
# index_select + mv on two threads); fewer run on one, where a parallel region costs more than it saves.
PARALLEL_BOUND_ROWS = 32768


def random_projection(dim_in: int, dim_out: int, seed: int) -> torch.Tensor:
    """Gaussian JL projection; distances survive well enough for farthest-point selection."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(dim_in, dim_out, generator=generator) / math.sqrt(dim_out)


def project_features(
    features: torch.Tensor, projection_dim: int | None, chunk_size: int, seed: int
) -> torch.Tensor:
    """The rows the greedy search measures: `features @ projection`, chunk by chunk (bounded temporaries)."""
    n_total, dim = features.shape
    if projection_dim and projection_dim < dim:
        proj = random_projection(dim, projection_dim, seed).to(features.device, features.dtype)
        return torch.cat([features[i : i + chunk_size] @ proj for i in range(0, n_total, chunk_size)])
    return features.contiguous()


def row_distances(rows: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of each row to `centre`: the one expression every compared distance uses.

    It is row-independent, so a subset of rows gets bit-identical values to the full pass,
    which is what lets the pruned search reproduce the unpruned one's order exactly.
    """
    return (rows - centre).pow(2).sum(1).sqrt()


def _distances(rows: np.ndarray, index: np.ndarray, centre: torch.Tensor, buffer: np.ndarray) -> np.ndarray:
    """row_distances(rows[index], centre) through a reused buffer (same kernels, so the same bits)."""
    out = np.empty(index.size, dtype=rows.dtype)
    block = buffer.shape[0]
    for i in range(0, index.size, block):
        part = buffer[: min(block, index.size - i)]
        np.take(rows, index[i : i + block], axis=0, out=part, mode="clip")
        t = torch.from_numpy(part)
        out[i : i + part.shape[0]] = t.sub_(centre).pow_(2).sum(1).sqrt_().numpy()
    return out


def _bound_basis(reduced: torch.Tensor, axes: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and the top `axes` principal directions (float64, orthonormal) of a row sample."""
    step = max(1, reduced.shape[0] // BOUND_SAMPLE_ROWS)
    sample = reduced[::step].double()
    mean = sample.mean(0)
    centred = sample - mean
    _, vectors = torch.linalg.eigh(centred.T @ centred)
    return mean.numpy(), vectors[:, -axes:].flip(1).contiguous().numpy()


def _bound_coordinates(rows: np.ndarray, mean: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """(n, axes + 1) float32: coordinates on the principal axes, then the norm of the rest.

    For two rows, the distance between these vectors is at most their true distance (the
    rest's norms differ by at most the rest's distance), and it is much closer to it than
    the axes alone.
    """
    centred = rows - mean
    on_axes = centred @ basis
    rest_sq = np.einsum("ij,ij->i", centred, centred) - np.einsum("ij,ij->i", on_axes, on_axes)
    return np.concatenate([on_axes, np.sqrt(np.maximum(rest_sq, 0.0))[:, None]], axis=1).astype(np.float32)


class _Members:
    """Each centre's members as one segment of a flat buffer, sorted by distance, farthest first,
    each with its bound row (see _search) beside it.

    A point's distance to its centre only changes when it moves to a new centre, so sorted
    segments stay sorted: the rule's candidates in a cluster (distance > gap / 2) are a
    prefix found by bisection, a cluster's radius and farthest point are its first entry
    (ties by lowest index), and members that move away all come from that prefix, so the
    prefix's remaining entries are shifted up against the untouched rest. New centres'
    segments are appended; the buffer is compacted when the holes fill it.
    """

    def __init__(self, min_dist: np.ndarray, n_select: int, low_rows: np.ndarray, low_rows_sq: np.ndarray) -> None:
        n_total = min_dist.size
        first = np.argsort(-min_dist, kind="stable")
        self.points = np.empty(2 * n_total, dtype=np.int64)
        self.dist = np.empty(2 * n_total, dtype=min_dist.dtype)
        self.points[:n_total] = first
        self.dist[:n_total] = min_dist[first]
        # each member's bound coordinates and their squared norm (rows of low_rows, low_rows_sq), stored
        # beside it: a pick reads its clusters' prefixes as runs of consecutive rows, not a random row each
        self.low_rows, self.low_rows_sq = low_rows, low_rows_sq
        self.low = np.empty((2 * n_total, low_rows.shape[1]), dtype=low_rows.dtype)
        self.low_sq = np.empty(2 * n_total, dtype=low_rows_sq.dtype)
        self.low[:n_total], self.low_sq[:n_total] = low_rows[first], low_rows_sq[first]
        self.used = n_total
        self.start = np.zeros(n_select, dtype=np.int64)
        self.count = np.zeros(n_select, dtype=np.int64)
        self.count[0] = n_total

    def _buffers(self) -> tuple[np.ndarray, ...]:
        return self.points, self.dist, self.low, self.low_sq

    def prefix_ends(self, clusters: np.ndarray, half_gaps: np.ndarray) -> np.ndarray:
        """Per cluster, the end of its entries with distance > half_gap (vectorised bisection)."""
        lo = self.start[clusters]
        hi = lo + self.count[clusters]
        active = np.flatnonzero(lo < hi)
        while active.size:
            a_lo, a_hi = lo[active], hi[active]
            mid = (a_lo + a_hi) >> 1
            beyond = self.dist[mid] > half_gaps[active]
            lo[active] = np.where(beyond, mid + 1, a_lo)
            hi[active] = np.where(beyond, a_hi, mid)
            active = active[lo[active] < hi[active]]
        return lo

    def prefixes(self, clusters: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Buffer positions of each cluster's prefix (start .. end), grouped, and each one's cluster position."""
        return _segments(self.start[clusters], ends - self.start[clusters])

    def remove(self, clusters: np.ndarray, ends: np.ndarray, positions: np.ndarray, owner: np.ndarray,
               keep: np.ndarray) -> None:
        """Drop the prefix entries not in `keep`, shifting the kept ones up against the rest."""
        kept_owner = owner[keep]
        kept = np.bincount(kept_owner, minlength=clusters.size)
        lengths = ends - self.start[clusters]
        new_start = self.start[clusters] + lengths - kept
        target = np.arange(kept_owner.size) + np.repeat(new_start - (np.cumsum(kept) - kept), kept)
        source = positions[keep]
        moved = target != source  # entries after a prefix's last removed one are in place already
        target, source = target[moved], source[moved]
        for buffer in self._buffers():
            buffer[target] = buffer[source]
        self.count[clusters] -= lengths - kept
        self.start[clusters] = new_start

    def append(self, cluster: int, points: np.ndarray, dist: np.ndarray) -> None:
        """New segment, sorted farthest first, ties by lowest index."""
        if self.used + points.size > self.points.size:
            self._compact(cluster)
        order = np.lexsort((points, -dist))
        points = points[order]
        end = self.used + points.size
        self.points[self.used : end] = points
        self.dist[self.used : end] = dist[order]
        self.low[self.used : end] = self.low_rows[points]
        self.low_sq[self.used : end] = self.low_rows_sq[points]
        self.start[cluster] = self.used
        self.count[cluster] = points.size
        self.used = end

    def _compact(self, n_clusters: int) -> None:
        positions, _ = _segments(self.start[:n_clusters], self.count[:n_clusters])
        for buffer in self._buffers():
            buffer[: positions.size] = buffer[positions]
        self.start[:n_clusters] = np.cumsum(self.count[:n_clusters]) - self.count[:n_clusters]
        self.used = positions.size


def _segments(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ranges start .. start + length, and for each position the index of its range."""
    owner = np.repeat(np.arange(starts.size), lengths)
    offsets = np.cumsum(lengths) - lengths
    return np.arange(owner.size) + np.repeat(starts - offsets, lengths), owner


def greedy_kcenter_order(
    features: torch.Tensor,
    n_select: int,
    projection_dim: int | None = 128,
    chunk_size: int = 65536,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Indices of `n_select` rows of `features` (N, D) in greedy farthest-point order.

    Exact greedy k-center on the seeded projection of the rows: start at a seeded random
    row, then repeatedly pick the row farthest from all picked ones (the lowest index among
    equal distances). Runs on the CPU in float32 (float64 inputs stay float64); only
    clusters that can change are visited (see the module docstring).
    """
    n_total = features.shape[0]
    if n_select <= 0:
        raise ValueError("n_select must be positive")
    n_select = min(n_select, n_total)
    reduced = project_features(features, projection_dim, chunk_size, seed)
    if reduced.dtype not in (torch.float32, torch.float64):
        reduced = reduced.float()
    reduced = reduced.cpu().contiguous()
    if not bool(torch.isfinite(reduced).all()):
        raise ValueError("coreset features contain NaN or infinite values")
    generator = torch.Generator().manual_seed(seed)
    current = int(torch.randint(n_total, (1,), generator=generator))
    min_dist = torch.cat([row_distances(reduced[i : i + chunk_size], reduced[current])
                          for i in range(0, n_total, chunk_size)]).numpy()
    order = np.empty(n_select, dtype=np.int64)
    order[0] = current
    if n_select > 1:
        threads = torch.get_num_threads()
        # the picks' small ops on one thread (row distances do not follow the thread count, so the order is
        # unchanged); the members' bound products alone may use the caller's `threads` (_BoundProducts)
        with one_thread():
            _search(reduced, min_dist, order, chunk_size, progress, threads)
    return torch.from_numpy(order)


def ieee_float32_matmul() -> bool:
    """Whether torch's float32 matrix products are plain IEEE float32 here. A caller may have lowered
    them (`torch.set_float32_matmul_precision("medium")`, or the mkldnn fp32_precision "bf16"/"tf32"),
    which on CPUs with bf16 makes their rounding far larger than a bound's slack allows."""
    mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    precision = getattr(mkldnn, "fp32_precision", "none")
    if precision not in ("none", "ieee"):
        return False
    try:
        return precision == "ieee" or torch.get_float32_matmul_precision() == "highest"
    except RuntimeError:  # torch refuses to read one precision API after the other was set
        return False


class _BoundProducts:
    """low[positions] @ low_p in float32 through buffers reused from pick to pick (a fresh torch tensor a
    pick raised transistor's fit's peak RSS from 2.30 to 2.79 GB under pni_ray.allocator's policy of
    keeping freed memory). torch `mv` on the caller's threads where there are PARALLEL_BOUND_ROWS
    positions or more (inside the search's one-thread block; the count is restored after) and its float32
    products are IEEE; else numpy's on one thread. Only lower bounds are made of it, so IEEE rounding,
    whatever the summation order, moves no pick (see _search's slack). The result is a view of the
    buffer, valid until the next call."""

    def __init__(self, n_rows: int, width: int, threads: int) -> None:
        self.n_rows = n_rows  # no pick admits more members than there are rows
        self.threads = threads
        self.ieee = ieee_float32_matmul()  # read once: the search does not change it
        self.rows = torch.empty(0, width, dtype=torch.float32)
        self.out = torch.empty(0, dtype=torch.float32)

    def __call__(self, low: np.ndarray, positions: np.ndarray, low_p: np.ndarray) -> np.ndarray:
        n = positions.size
        if n > self.out.shape[0]:
            size = max(n, min(2 * self.out.shape[0], self.n_rows))
            self.rows = torch.empty(size, self.rows.shape[1], dtype=torch.float32)
            self.out = torch.empty(size, dtype=torch.float32)
        rows, out = self.rows[:n], self.out[:n]
        if not self.ieee:
            np.take(low, positions, axis=0, out=rows.numpy())
            return np.einsum("ij,j->i", rows.numpy(), low_p, out=out.numpy())
        before = torch.get_num_threads()
        try:
            if self.threads > 1 and n >= PARALLEL_BOUND_ROWS:
                torch.set_num_threads(self.threads)
            torch.index_select(torch.from_numpy(low), 0, torch.from_numpy(positions), out=rows)
            torch.mv(rows, torch.from_numpy(low_p), out=out)
        finally:
            torch.set_num_threads(before)
        return out.numpy()


def _search(reduced: torch.Tensor, min_dist: np.ndarray, order: np.ndarray, chunk_size: int, progress: bool,
            threads: int = 1) -> None:
    """Picks 1 .. len(order) - 1, given pick 0 and every row's distance to it (order filled in place);
    `threads`: what the members' bound products may use."""
    rows = reduced.numpy()
    n_total, width = rows.shape
    n_select = order.size
    dtype = rows.dtype
    buffer = np.empty((min(chunk_size, n_total), width), dtype=dtype)
    radius = np.full(n_select, -np.inf, dtype=dtype)
    farthest = np.full(n_select, n_total, dtype=np.int64)  # lowest index at the radius
    centres = np.empty((n_select, width), dtype=dtype)
    centres[0] = rows[order[0]]

    # Lower bounds from a few principal axes and the norm of the rest (low(x), see
    # _bound_coordinates; |low(x) - low(y)| <= |x - y|). Both tests below add `slack`, far
    # above float32 rounding of either side, so they only drop what the exact rule would
    # drop or what provably cannot get closer.
    # Clusters: keep j while |low c_j - low p|^2 < 4 r_j^2 (1 + slack) + slack (|low c_j|^2 + |low p|^2),
    # i.e. key_j - 2 low(c_j).low(p) < -(1 - slack) |low p|^2 with
    # key_j = (1 - slack) |low c_j|^2 - 4 r_j^2 (1 + slack): one matrix-vector product per pick.
    axes = min(BOUND_AXES, width)
    mean, basis = _bound_basis(reduced, axes)
    slack = 1e-4
    low_rows = np.concatenate([_bound_coordinates(rows[i : i + chunk_size], mean, basis)
                               for i in range(0, n_total, chunk_size)])
    low_rows_sq = np.einsum("ij,ij->i", low_rows, low_rows, dtype=np.float64).astype(np.float32)
    members = _Members(min_dist, n_select, low_rows, low_rows_sq)
    bound_products = _BoundProducts(n_total, low_rows.shape[1], threads)
    radius[0], farthest[0] = members.dist[0], members.points[0]
    low = np.empty((n_select, axes + 1), dtype=np.float32)
    low_sq = np.empty(n_select, dtype=np.float32)
    key = np.empty(n_select, dtype=np.float32)

    def set_keys(js: np.ndarray | slice) -> None:
        r = np.maximum(radius[js].astype(np.float64), 0.0)
        key[js] = (1 - slack) * low_sq[js].astype(np.float64) - 4.0 * r * r * (1 + slack)

    low[0], low_sq[0] = low_rows[order[0]], low_rows_sq[order[0]]
    set_keys(slice(0, 1))
    bar = tqdm(total=n_select, desc="coreset", unit="pt", disable=not progress, leave=False)
    bar.update(1)
    for step in range(1, n_select):
        top = radius[:step].max()
        current = int(farthest[:step][radius[:step] == top].min())
        order[step] = current
        centres[step] = rows[current]
        centre = torch.from_numpy(centres[step])
        low_p, low_p_sq = low_rows[current], float(low_rows_sq[current])
        low[step], low_sq[step] = low_p, low_p_sq
        bound = key[:step] - 2.0 * np.einsum("ij,j->i", low[:step], low_p)  # no BLAS threads
        maybe = np.flatnonzero(bound < -(1 - slack) * low_p_sq)
        gaps = _distances(centres, maybe, centre, buffer)
        visit = gaps < 2.0 * radius[maybe]
        near = maybe[visit]
        # The plain rule's candidates in cluster j: distance d > gap_j / 2 (i.e. gap_j < 2 d), exactly.
        ends = members.prefix_ends(near, gaps[visit] / 2)
        positions, owner = members.prefixes(near, ends)
        points, md = members.points[positions], members.dist[positions]
        # Skip x when |low x - low p|^2 >= md^2 (1 + slack) + slack (|low x|^2 + |low p|^2):
        # then its computed distance is >= md, so it provably does not get closer. The left side
        # as |low x|^2 - 2 low x . low p + |low p|^2: one gather and one product per member
        # instead of a difference and its squares (3x faster where the rule admits ~100k members
        # a pick, as on transistor); its float32 rounding, a few 1e-7 of |low x|^2 + |low p|^2,
        # is what the slack term (1e-4 of the same) absorbs: at most ~40 float32 roundings of it,
        # 2.4e-6. Below float32's normal range rounding is absolute, not relative, so the test
        # also never skips on a bound smaller than the smallest normal float32 (TINY).
        sq_points = members.low_sq[positions]  # = low_rows_sq[points], read in runs
        lb_sq = sq_points - 2.0 * bound_products(members.low, positions, low_p) + low_p_sq
        md64 = md.astype(np.float64)
        measure = np.flatnonzero(lb_sq < md64 * md64 * (1 + slack) + slack * (sq_points + low_p_sq) + TINY)
        dist = _distances(rows, points[measure], centre, buffer)
        closer = dist < md[measure]
        if closer.any():
            keep = np.ones(points.size, dtype=bool)
            keep[measure[closer]] = False
            members.remove(near, ends, positions, owner, keep)
            first = members.start[near]
            radius[near], farthest[near] = members.dist[first], members.points[first]
            set_keys(near)
            members.append(step, points[measure[closer]], dist[closer])
            radius[step], farthest[step] = members.dist[members.start[step]], members.points[members.start[step]]
        set_keys(slice(step, step + 1))
        bar.update(1)
    bar.close()


def candidate_rows(valid: torch.Tensor | None, n_rows: int, max_candidates: int | None, seed: int) -> torch.Tensor | None:
    """Row indices the coreset may choose from: valid positions, seeded-subsampled to the cap.

    None means "every row" (no padding, no cap): the caller keeps its original, copy-free path.
    """
    idx = None
    if valid is not None and not bool(valid.all()):
        idx = valid.reshape(-1).nonzero(as_tuple=True)[0]
    n = n_rows if idx is None else idx.numel()
    if max_candidates and n > max_candidates:
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 2))[:max_candidates].sort().values
        idx = pick if idx is None else idx[pick]
    return idx
