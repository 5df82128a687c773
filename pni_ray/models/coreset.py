"""Greedy k-center coreset (PatchCore's sampler) that returns the selection order.

The order matters to PNI: the distribution coreset C_dist is a prefix of the same greedy
sequence as the embedding coreset C_emb, so one run yields both.

Why it is organised around clusters: the plain triangle-inequality rule (a point x whose
centre a(x) has d(new, a(x)) >= 2 d(x, a(x)) cannot get closer to the new centre) still
tests every one of N points at every pick, which at 780k patches and 16k picks is the whole
cost. Here each centre keeps its member list and radius (the largest member distance), so a
pick only visits clusters whose radius lets the rule pass for some member, and a lower bound
on distances from a few principal axes of the projected rows skips most clusters, and most
of their members, without touching their 128-wide rows. The points the rule admits, the
expression that measures them and the tie rule (the lowest index among equal maxima) are
the plain rule's, and a point is only skipped when the bound proves it is not closer, so the
order is bit-for-bit the one the plain rule gives (tests/test_coreset.py checks it against
that implementation). Bookkeeping is numpy: per pick it touches a few thousand entries, where
torch's per-call and advanced-indexing overheads cost more than the arithmetic.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

# Principal axes of the projected rows used for the lower bounds: few enough that scanning
# every centre per pick stays cheap, enough to prune most centres and members.
BOUND_AXES = 16
# Rows sampled (evenly spaced) to estimate those axes; they only affect speed, never the order.
BOUND_SAMPLE_ROWS = 65536


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
    """Per-centre member lists in one append-only buffer, rebuilt when stale entries fill it.

    A point that moves to a new centre is appended to that centre's fresh segment and left in
    its old segment as a stale entry (recognised through `assigned`), so a pick costs the
    size of the clusters it visits, never N.
    """

    def __init__(self, n_total: int, n_select: int) -> None:
        self.buffer = np.empty(2 * n_total, dtype=np.int64)
        self.buffer[:n_total] = np.arange(n_total)
        self.used = n_total
        self.start = np.zeros(n_select, dtype=np.int64)
        self.count = np.zeros(n_select, dtype=np.int64)
        self.count[0] = n_total

    def gather(self, clusters: np.ndarray, assigned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Live members of `clusters`, grouped cluster by cluster, and each one's position in `clusters`."""
        counts = self.count[clusters]
        owner = np.repeat(np.arange(clusters.size), counts)
        offsets = np.cumsum(counts) - counts
        positions = np.arange(owner.size) + np.repeat(self.start[clusters] - offsets, counts)
        points = self.buffer[positions]
        live = assigned[points] == clusters[owner]
        return points[live], owner[live]

    def append(self, cluster: int, points: np.ndarray, assigned: np.ndarray) -> None:
        if self.used + points.size > self.buffer.size:
            self._compact(assigned, cluster)
        self.buffer[self.used : self.used + points.size] = points
        self.start[cluster] = self.used
        self.count[cluster] = points.size
        self.used += points.size

    def _compact(self, assigned: np.ndarray, new_cluster: int) -> None:
        """Rewrite the buffer as live segments in centre order (the new centre's members excluded)."""
        keep = np.flatnonzero(assigned != new_cluster)
        owners = assigned[keep]
        self.buffer[: keep.size] = keep[np.argsort(owners, kind="stable")]
        self.count[:new_cluster] = np.bincount(owners, minlength=new_cluster)[:new_cluster]
        self.start[:new_cluster] = np.cumsum(self.count[:new_cluster]) - self.count[:new_cluster]
        self.used = keep.size


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
        _search(reduced, min_dist, order, chunk_size, progress)
    return torch.from_numpy(order)


def _search(reduced: torch.Tensor, min_dist: np.ndarray, order: np.ndarray, chunk_size: int, progress: bool) -> None:
    """Picks 1 .. len(order) - 1, given pick 0 and every row's distance to it (both in place)."""
    rows = reduced.numpy()
    n_total, width = rows.shape
    n_select = order.size
    dtype = rows.dtype
    buffer = np.empty((min(chunk_size, n_total), width), dtype=dtype)
    assigned = np.zeros(n_total, dtype=np.int64)
    members = _Members(n_total, n_select)
    radius = np.full(n_select, -np.inf, dtype=dtype)
    farthest = np.full(n_select, n_total, dtype=np.int64)  # lowest index at the radius
    radius[0] = min_dist.max()
    farthest[0] = int(np.argmax(min_dist))
    centres = np.empty((n_select, width), dtype=dtype)
    centres[0] = rows[order[0]]

    # Lower bounds from a few principal axes and the norm of the rest (low(x), see
    # _bound_coordinates; |low(x) - low(y)| <= |x - y|). Both tests below add `slack`, far above float32 rounding of either side,
    # so they only ever drop what the exact rule would drop or what cannot get closer.
    # Clusters: keep j while |low c_j - low p|^2 < 4 r_j^2 (1 + slack) + slack (|low c_j|^2 + |low p|^2),
    # i.e. key_j - 2 low(c_j).low(p) < -(1 - slack) |low p|^2 with
    # key_j = (1 - slack) |low c_j|^2 - 4 r_j^2 (1 + slack): one matrix-vector product per pick.
    axes = min(BOUND_AXES, width)
    mean, basis = _bound_basis(reduced, axes)
    slack = 1e-4
    low_rows = np.concatenate([_bound_coordinates(rows[i : i + chunk_size], mean, basis)
                               for i in range(0, n_total, chunk_size)])
    low_rows_sq = np.einsum("ij,ij->i", low_rows, low_rows, dtype=np.float64).astype(np.float32)
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
        bound = key[:step] - 2.0 * (low[:step] @ low_p)
        maybe = np.flatnonzero(bound < -(1 - slack) * low_p_sq)
        gaps = _distances(centres, maybe, centre, buffer)
        visit = gaps < 2.0 * radius[maybe]
        near, gaps = maybe[visit], gaps[visit]
        points, owner = members.gather(near, assigned)
        md = min_dist[points]
        admitted = gaps[owner] < 2.0 * md  # the plain rule's candidates, exactly
        points, owner, md = points[admitted], owner[admitted], md[admitted]
        # Members: skip x when |low x - low p|^2 >= md^2 (1 + slack) + slack (|low x|^2 + |low p|^2):
        # then the computed distance is >= md, so x is provably not closer.
        diff = np.take(low_rows, points, axis=0) - low_p
        lb_sq = np.einsum("ij,ij->i", diff, diff)
        md64 = md.astype(np.float64)
        maybe_closer = lb_sq < md64 * md64 * (1 + slack) + slack * (low_rows_sq[points] + low_p_sq)
        points, owner, md = points[maybe_closer], owner[maybe_closer], md[maybe_closer]
        dist = _distances(rows, points, centre, buffer)
        closer = dist < md
        moved, moved_dist = points[closer], dist[closer]
        min_dist[moved] = moved_dist
        assigned[moved] = step
        members.append(step, moved, assigned)
        if moved.size:
            radius[step] = moved_dist.max()
            farthest[step] = moved[moved_dist == radius[step]].min()
            _shrink(near[np.unique(owner[closer])], members, assigned, min_dist, radius, farthest)
        set_keys(near)
        set_keys(slice(step, step + 1))
        bar.update(1)
    bar.close()


def _shrink(
    changed: np.ndarray,
    members: _Members,
    assigned: np.ndarray,
    min_dist: np.ndarray,
    radius: np.ndarray,
    farthest: np.ndarray,
) -> None:
    """New radius and farthest point (lowest index at the radius) of clusters that lost members.

    Each keeps its centre (distance 0 cannot be beaten), so no segment is empty.
    """
    points, owner = members.gather(changed, assigned)
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    dist = min_dist[points]
    new_radius = np.maximum.reduceat(dist, starts)
    at_radius = dist == np.repeat(new_radius, np.diff(np.r_[starts, dist.size]))
    radius[changed] = new_radius
    farthest[changed] = np.minimum.reduceat(np.where(at_radius, points, len(min_dist)), starts)
