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
that implementation). Per-cluster bookkeeping is numpy: per pick it touches a few thousand
entries, where torch's per-call and advanced-indexing overheads cost more than the arithmetic.
Per-member work is not: the rule admits ~100k members a pick on transistor and most of the data
on a texture, so finding each prefix, bounding its members and moving the ones that get closer
run as two compiled loops (numba, _admit and _drop) that read each member's bound row once, in
place, with no gathered copy. Exact distances stay torch's (row_distances), the plain rule's
expression.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numba
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
# A pick's members are bounded on the caller's threads where its visited clusters hold this many (transistor
# admits ~100k a pick, a texture most of its rows); fewer on one, where handing work to a thread costs more.
PARALLEL_MEMBERS = 32768


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

    def __init__(self, min_dist: np.ndarray, n_select: int, low_rows: np.ndarray, low_rows_sq: np.ndarray,
                 threads: int = 1) -> None:
        n_total = min_dist.size
        first = np.argsort(-min_dist, kind="stable")
        self.points = np.empty(2 * n_total, dtype=np.int64)
        # float64 for float32 and float64 inputs alike (exact: float32 values widen without rounding, and
        # every comparison with them gives what it gave in float32), so the compiled loops see one signature:
        # two processes first compiling different signatures at once can pair numba's cache index with the
        # other one's machine code (each numbers its new entry from the index it read)
        self.dist = np.empty(2 * n_total, dtype=np.float64)
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
        self.found: list[tuple[np.ndarray, np.ndarray]] = []  # per run of admit: positions found, their clusters
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="coreset") if threads > 1 else None
        _compile_loops(self)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def _buffers(self) -> tuple[np.ndarray, ...]:
        return self.points, self.dist, self.low, self.low_sq

    def admit(self, clusters: np.ndarray, half_gaps: np.ndarray, low_p: np.ndarray, low_p_sq: float,
              slack: float) -> tuple[np.ndarray, np.ndarray]:
        """Buffer positions of the members to measure exactly (grouped by cluster, ascending) and each
        one's cluster position in `clusters` (see _admit). Views of buffers the next call overwrites.
        On `threads` > 1, where the visited clusters hold PARALLEL_MEMBERS members or more (and there are at
        least `threads` of them), they are split into `threads` runs of whole clusters holding about equal
        members, one on this thread and the others on the pool's; the runs' results are concatenated in
        cluster order, so they are the one run's."""
        if not clusters.size:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        half_gaps = half_gaps.astype(np.float64, copy=False)  # exact; one compiled signature (see __init__)
        members = np.concatenate([[0], np.cumsum(self.count[clusters])])  # before each cluster, and in all
        parts = self.threads if clusters.size >= self.threads and members[-1] >= PARALLEL_MEMBERS else 1
        splits = np.searchsorted(members[1:], members[-1] * np.arange(1, parts) / parts).tolist()
        cuts = [0, *splits, clusters.size]
        runs = [(clusters[a:b], half_gaps[a:b], self._found(part, int(members[b] - members[a])))
                for part, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]
        args = (self.start, self.count, self.dist, self.low, self.low_sq)
        bound = (low_p, np.float64(low_p_sq), slack, TINY)
        futures = [self.pool.submit(_admit, *args, c, h, *bound, *out)  # type: ignore[union-attr]
                   for c, h, out in runs[1:]]
        counts = [_admit(*args, runs[0][0], runs[0][1], *bound, *runs[0][2])]
        counts += [future.result() for future in futures]
        if parts == 1:
            found, owner = runs[0][2]
            return found[: counts[0]], owner[: counts[0]]
        outs = [out for _, _, out in runs]
        return (np.concatenate([run_found[:n] for (run_found, _), n in zip(outs, counts)]),
                np.concatenate([run_owner[:n] + a for (_, run_owner), n, a in zip(outs, counts, cuts)]))

    def _found(self, part: int, capacity: int) -> tuple[np.ndarray, np.ndarray]:
        """Run `part`'s output buffers (positions, cluster positions), grown here, before any run starts, to
        hold `capacity` members."""
        while len(self.found) <= part:
            self.found.append((np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)))
        if self.found[part][0].size < capacity:
            size = max(capacity, min(2 * self.found[part][0].size, self.low_rows.shape[0]))
            self.found[part] = (np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64))
        return self.found[part]

    def remove(self, clusters: np.ndarray, positions: np.ndarray, owner: np.ndarray) -> None:
        """Drop the entries at `positions` (grouped by cluster position `owner`, ascending, inside their
        clusters' prefixes), shifting each prefix's other entries up against the rest."""
        _drop(self.start, self.count, self.points, self.dist, self.low, self.low_sq, clusters, positions, owner)

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


def _compiled(fastmath: set[str] | bool = False):  # type: ignore[no-untyped-def]
    """numba.njit, releasing the GIL, with numba's on-disk cache where it finds a place to write one (next
    to this file, or the user's cache directory); where it finds none (a read-only install without a home)
    numba refuses `cache=True` at import, so the loops are then compiled afresh in each process (~2 s)."""
    def wrap(fn):  # type: ignore[no-untyped-def]
        try:
            return numba.njit(cache=True, nogil=True, fastmath=fastmath)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(nogil=True, fastmath=fastmath)(fn)
    return wrap


_LOOPS_READY = threading.Event()
_LOOPS_LOCK = threading.Lock()
COMPILE_LOCK_FILE = "pni_ray_coreset.lock"


def _compile_loops(members: _Members) -> None:
    """Compile (or load from numba's cache) _admit and _drop, once per process, on empty work of the
    real calls' types, holding an exclusive lock on a file in numba's cache directory.

    numba numbers a new cache entry from the index it read, and its key holds the CPU: two processes
    on different CPU types compiling into one cache at the same moment (one install on shared storage)
    could otherwise pair one's index entry with the other's machine code. Under the lock the second
    reads the index the first wrote. Where there is no cache, or its directory takes no lock file,
    there is nothing shared to guard and the loops compile unlocked."""
    if _LOOPS_READY.is_set():
        return
    with _LOOPS_LOCK, _cache_lock(getattr(getattr(_admit, "_cache", None), "_cache_path", None)), _signals_held():
        if _LOOPS_READY.is_set():
            return
        none, width = np.empty(0, dtype=np.int64), members.low.shape[1]
        found, owner = members._found(0, 0)
        _admit(members.start, members.count, members.dist, members.low, members.low_sq, none,
               np.empty(0, dtype=np.float64), np.zeros(width, dtype=members.low.dtype), np.float64(0.0), 1e-4,
               TINY, found, owner)
        _drop(members.start, members.count, members.points, members.dist, members.low, members.low_sq, none, none,
              none)
        _LOOPS_READY.set()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM held while numba compiles, then delivered to the handlers they met. A handler that raises
    (Ctrl-C's KeyboardInterrupt, the CLI's for SIGTERM) may run inside one of LLVM's ctypes callbacks, where the
    exception is printed as "Exception ignored" and lost: a `train --force` stopped then ran on to exit 0 and
    replaced the old bundle. Main thread only, where Python runs signal handlers; an ignored signal stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    stops = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) not in (signal.SIG_IGN, None)]
    before = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in stops}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(held):  # each once, in the order received
            signal.raise_signal(s)


@contextlib.contextmanager
def _cache_lock(folder: str | None) -> Iterator[None]:
    """An exclusive flock on COMPILE_LOCK_FILE in `folder` (the kernel releases it if the process dies);
    none where the folder takes no file or the file system no lock."""
    fh = None
    if folder:
        try:
            os.makedirs(folder, exist_ok=True)
            fh = open(os.path.join(folder, COMPILE_LOCK_FILE), "a")
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except OSError:
            pass
    try:
        yield
    finally:
        if fh is not None:
            fh.close()  # closing releases the lock


@_compiled(fastmath={"reassoc", "contract"})
def _dot(low, i, low_p):  # pragma: no cover - compiled
    """low[i] . low_p in float64, summed in any order (so it vectorises): its rounding, at most ~33 float64
    roundings of sum |low x_a low p_a| (~4e-15 of it), is far inside the bound test's slack (1e-4)."""
    dot = 0.0
    for a in range(low_p.size):
        dot += np.float64(low[i, a]) * np.float64(low_p[a])
    return dot


@_compiled()
def _admit(start, count, dist, low, low_sq, clusters, half_gaps, low_p, low_p_sq, slack, tiny,
           found, found_owner):  # pragma: no cover - compiled
    """Per cluster, bisect the end of its prefix (distance > half gap: the plain rule's candidates), then
    keep the prefix's members whose lower bound does not prove them no closer to the pick:
    |low x - low p|^2 < md^2 (1 + slack) + slack (|low x|^2 + |low p|^2) + tiny, in float64 (see _search).
    One pass over each prefix's bound rows, in place: no gathered copy of them."""
    n = 0
    for k in range(clusters.size):
        j = clusters[k]
        lo = start[j]
        hi = lo + count[j]
        half = half_gaps[k]
        while lo < hi:
            mid = (lo + hi) >> 1
            if dist[mid] > half:
                lo = mid + 1
            else:
                hi = mid
        for i in range(start[j], lo):
            dot = _dot(low, i, low_p)
            sq = np.float64(low_sq[i])
            md = np.float64(dist[i])
            if sq - 2.0 * dot + low_p_sq < md * md * (1.0 + slack) + slack * (sq + low_p_sq) + tiny:
                found[n] = i
                found_owner[n] = k
                n += 1
    return n


@_compiled()
def _drop(start, count, points, dist, low, low_sq, clusters, positions, owner):  # pragma: no cover - compiled
    """Remove the entries at `positions` (grouped by cluster position `owner`, ascending) from their
    clusters' prefixes: the other entries before the last removed one keep their order and move up against
    the entries after it, which stay in place."""
    r = positions.size - 1
    while r >= 0:
        k = owner[r]
        j = clusters[k]
        first = start[j]
        if positions[r] < first or positions[r] >= first + count[j]:  # would loop for ever below
            raise ValueError("coreset: a member to drop lies outside its cluster's segment")
        write = positions[r] + 1
        i = positions[r]
        while i >= first:
            if r >= 0 and owner[r] == k and positions[r] == i:
                r -= 1
            else:
                write -= 1
                if write != i:
                    points[write] = points[i]
                    dist[write] = dist[i]
                    low[write] = low[i]
                    low_sq[write] = low_sq[i]
            i -= 1
        count[j] -= write - first
        start[j] = write


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
        # the picks' small torch ops on one thread (row distances do not follow the thread count, so the
        # order is unchanged); the members' bounds may use the caller's `threads` (_Members.admit)
        with one_thread():
            _search(reduced, min_dist, order, chunk_size, progress, threads)
    return torch.from_numpy(order)


def _search(reduced: torch.Tensor, min_dist: np.ndarray, order: np.ndarray, chunk_size: int, progress: bool,
            threads: int = 1) -> None:
    """Picks 1 .. len(order) - 1, given pick 0 and every row's distance to it (order filled in place);
    `threads`: what the members' bounds may use."""
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
    members = _Members(min_dist, n_select, low_rows, low_rows_sq, threads)
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
    try:
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
            # Skip x when |low x - low p|^2 >= md^2 (1 + slack) + slack (|low x|^2 + |low p|^2):
            # then its computed distance is >= md, so it provably does not get closer. The left side
            # as |low x|^2 - 2 low x . low p + |low p|^2, in float64 over the float32 bound rows: the rows'
            # rounding, a few 1e-7 of |low x|^2 + |low p|^2, and the sum's are far inside the slack term
            # (1e-4 of the same). Below float32's normal range the rows' rounding is absolute, not relative,
            # so the test also never skips on a bound smaller than the smallest normal float32 (TINY).
            positions, owner = members.admit(near, gaps[visit] / 2, low_p, low_p_sq, slack)
            points, md = members.points[positions], members.dist[positions]
            dist = _distances(rows, points, centre, buffer)
            closer = dist < md
            if closer.any():
                members.remove(near, positions[closer], owner[closer])
                first = members.start[near]
                radius[near], farthest[near] = members.dist[first], members.points[first]
                set_keys(near)
                members.append(step, points[closer], dist[closer])
                radius[step], farthest[step] = members.dist[members.start[step]], members.points[members.start[step]]
            set_keys(slice(step, step + 1))
            bar.update(1)
    finally:
        members.close()
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
