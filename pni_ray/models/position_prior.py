"""p(c | x): how often each C_emb entry is the nearest one at each grid position in training.

Stored sparse (position, entry, probability) because per position only the entries seen
nearby are non-zero: a dense positions x |C_emb| float array would be ~1000x larger.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pni_ray.config import spread_value


@dataclass
class SparsePositionPrior:
    """Non-zero entries of the per-position histogram, normalised per position."""

    grid: tuple[int, int]  # (h, w) of the feature grid
    n_entries: int  # |C_emb|
    position: torch.Tensor  # (nnz,) int32, row-major position index
    entry: torch.Tensor  # (nnz,) int32, C_emb index
    prob: torch.Tensor  # (nnz,) float32

    def dense(self) -> torch.Tensor:
        """(h * w, |C_emb|) float32 for scoring."""
        h, w = self.grid
        out = torch.zeros(h * w, self.n_entries, dtype=torch.float32)
        out[self.position.long(), self.entry.long()] = self.prob
        return out


def window_offsets(spread: float, grid: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """Grid offsets a hit counts at: the square within +-floor(spread); a half step (0.5, 1.5, ...)
    adds the four cells one further along the axes. So 0.5 is the 5-cell cross between the single
    cell (0) and the 3 x 3 square (1), the symmetric window between two squares: the spread rule can
    stop there when the square is more than normal data needs. With `grid` (h, w), offsets that
    reach past it are left out (a spread of 10^6 is the whole grid, not 10^12 offsets)."""
    spread = spread_value(spread)
    r = int(spread)
    half = spread != r
    if grid is not None and r >= max(grid):
        r, half = max(grid) - 1, False
    offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    if half:
        offsets += [(-r - 1, 0), (0, -r - 1), (0, r + 1), (r + 1, 0)]
    if grid is not None:
        offsets = [(dy, dx) for dy, dx in offsets if abs(dy) < grid[0] and abs(dx) < grid[1]]
    return sorted(offsets)


def position_counts(
    nearest: torch.Tensor, n_entries: int, spread: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """(h * w, |C_emb|) float32: how often each entry was the nearest within each position's window
    (`window_offsets`), from nearest-entry indices (N_img, h, w). `valid` (N_img, h, w) bool excludes
    padded positions (letterbox) from the counts."""
    n_img, h, w = nearest.shape
    counts = torch.zeros(h * w, n_entries, dtype=torch.float32)
    pos = torch.arange(h * w).view(h, w)
    keep = torch.ones_like(nearest, dtype=torch.bool) if valid is None else valid
    for dy, dx in window_offsets(spread, (h, w)):
        ys = slice(max(0, dy), h + min(0, dy))  # target rows
        xs = slice(max(0, dx), w + min(0, dx))
        ys_src = slice(max(0, -dy), h + min(0, -dy))
        xs_src = slice(max(0, -dx), w + min(0, -dx))
        target = pos[ys, xs].reshape(-1)
        src = nearest[:, ys_src, xs_src].reshape(n_img, -1)
        mask = keep[:, ys_src, xs_src].reshape(n_img, -1)
        rows = target.expand(n_img, -1)[mask]
        counts.index_put_((rows, src[mask].long()), torch.ones(int(mask.sum())), accumulate=True)
    return counts


def prior_from_counts(counts: torch.Tensor, grid: tuple[int, int], min_count: int = 1) -> SparsePositionPrior:
    """The histogram normalised per position, leaving out entries counted fewer than `min_count`
    times there (as if never seen: an entry that was the nearest once in 200 images is no evidence
    that it belongs at that place). A position is never emptied: where no entry reaches min_count,
    its most frequent ones stay (an empty position would allow every entry, the opposite of sharper)."""
    need = counts.amax(1, keepdim=True).clamp_max(min_count)  # 0 on positions nothing reached
    probs = counts.masked_fill(counts < need, 0.0)
    probs /= probs.sum(1, keepdim=True).clamp_min(1e-12)  # rows of zeros stay zeros
    position, entry = probs.nonzero(as_tuple=True)
    return SparsePositionPrior(
        grid=tuple(grid),
        n_entries=counts.shape[1],
        position=position.to(torch.int32),
        entry=entry.to(torch.int32),
        prob=probs[position, entry].to(torch.float32),
    )


def build_position_prior(
    nearest: torch.Tensor, n_entries: int, spread: float, valid: torch.Tensor | None = None, min_count: int = 1
) -> SparsePositionPrior:
    """p(c|x) from nearest-entry indices (N_img, h, w): `position_counts`, then `prior_from_counts`."""
    return prior_from_counts(position_counts(nearest, n_entries, spread, valid), tuple(nearest.shape[1:]), min_count)


def held_out_keep_rate(
    prior: SparsePositionPrior, nearest: torch.Tensor, tau: float, valid: torch.Tensor | None = None
) -> float:
    """Share of held-out patches (N, h, w) whose nearest C_emb entry the prior allows (p(c|x) > tau);
    NaN when no held-out cell is image content."""
    n_img, h, w = nearest.shape
    if (h, w) != tuple(prior.grid):
        raise ValueError(f"held-out grid {(h, w)} differs from the prior's {tuple(prior.grid)}")
    flat = torch.arange(h * w).repeat(n_img) * prior.n_entries + nearest.reshape(-1).long()
    keys = prior.position.long() * prior.n_entries + prior.entry.long()
    order = torch.argsort(keys)
    keys, probs = keys[order], prior.prob[order]
    at = torch.searchsorted(keys, flat).clamp_max(max(len(keys) - 1, 0))
    hit = (keys[at] == flat) & (probs[at] > tau) if len(keys) else torch.zeros_like(flat, dtype=torch.bool)
    keep = torch.ones_like(hit) if valid is None else valid.reshape(-1)
    return float(hit[keep].float().mean()) if bool(keep.any()) else float("nan")  # no held-out content


def choose_spread(
    nearest: torch.Tensor,
    nearest_held_out: torch.Tensor | None,
    n_entries: int,
    candidates: tuple[float, ...],
    min_keep: float,
    tau: float,
    valid: torch.Tensor | None = None,
    valid_held_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int | float, dict[int | float, float]]:
    """The sharpest prior that normal data tolerates: the first spread (sharpest first) whose mask
    keeps the nearest entry of at least `min_keep` of held-out good patches.

    Aligned objects get a sharp prior (a part in the wrong place is caught); textures and objects
    that move get a broad one. When no candidate reaches min_keep the one with the highest keep
    rate is used (a very broad spread dilutes rare entries below tau, so keep is not monotone).
    Without held-out patches the broadest candidate is used. Returns the chosen spread's counts
    (`position_counts`, for `choose_min_count` and `prior_from_counts`), the spread and every keep
    rate measured.
    """
    ordered = sorted(set(spread_value(c) for c in candidates))
    if not ordered:
        raise ValueError("no spread candidates given")
    if nearest_held_out is None or (valid_held_out is not None and not bool(valid_held_out.any())):
        return position_counts(nearest, n_entries, ordered[-1], valid), ordered[-1], {}
    grid = tuple(nearest.shape[1:])
    rates: dict[int | float, float] = {}
    for spread in ordered:  # one dense (h * w, |C_emb|) count table at a time
        counts = position_counts(nearest, n_entries, spread, valid)
        rates[spread] = held_out_keep_rate(prior_from_counts(counts, grid), nearest_held_out, tau, valid_held_out)
        if rates[spread] >= min_keep:
            return counts, spread, rates
    best = max(rates, key=lambda k: (rates[k], -k))
    return (counts if best == ordered[-1] else position_counts(nearest, n_entries, best, valid)), best, rates


def choose_min_count(
    counts: torch.Tensor,
    grid: tuple[int, int],
    nearest_held_out: torch.Tensor | None,
    candidates: tuple[int, ...],
    min_keep: float,
    tau: float,
    valid_held_out: torch.Tensor | None = None,
    measured: dict[int, float] | None = None,
) -> tuple[SparsePositionPrior, int, dict[int, float]]:
    """After the spread, how often an entry must have been seen at a place to be allowed there: the
    largest candidate under which held-out good patches still keep their nearest entry at a rate
    >= min_keep (the rule the spread follows, one step sharper). Every candidate is measured: a
    larger count shrinks each position's total, which can lift diluted entries above tau, so the
    rate need not fall with the count. The smallest candidate is the fallback when none is tolerated
    or nothing is held out. `measured` holds keep rates already known for some counts (the spread
    rule measured count 1), which are not measured again. Returns the prior, the count and every
    keep rate."""
    ordered = sorted(set(int(c) for c in candidates))
    if not ordered or ordered[0] < 1:
        raise ValueError(f"min-count candidates must be whole numbers >= 1, got {candidates}")
    if nearest_held_out is None or (valid_held_out is not None and not bool(valid_held_out.any())):
        return prior_from_counts(counts, grid, ordered[0]), ordered[0], {}
    rates = {k: v for k, v in (measured or {}).items() if k in ordered}
    chosen, prior = ordered[0], None
    for k in ordered:
        candidate = None
        if k not in rates:
            candidate = prior_from_counts(counts, grid, k)
            rates[k] = held_out_keep_rate(candidate, nearest_held_out, tau, valid_held_out)
        if rates[k] >= min_keep:
            chosen, prior = k, candidate
    if prior is None:  # the chosen count's rate was given, or none passed: built once, here
        prior = prior_from_counts(counts, grid, chosen)
    return prior, chosen, dict(sorted(rates.items()))
