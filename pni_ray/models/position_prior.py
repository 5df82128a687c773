"""p(c | x): how often each C_emb entry is the nearest one at each grid position in training.

Stored sparse (position, entry, probability) because per position only the entries seen
nearby are non-zero: a dense positions x |C_emb| float array would be ~1000x larger.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def build_position_prior(
    nearest: torch.Tensor, n_entries: int, spread: int, valid: torch.Tensor | None = None
) -> SparsePositionPrior:
    """Histogram from nearest-entry indices (N_img, h, w); each hit counts at +-spread positions.

    `valid` (N_img, h, w) bool excludes padded positions (letterbox) from the counts.
    """
    n_img, h, w = nearest.shape
    counts = torch.zeros(h * w, n_entries, dtype=torch.float32)
    pos = torch.arange(h * w).view(h, w)
    keep = torch.ones_like(nearest, dtype=torch.bool) if valid is None else valid
    for dy in range(-spread, spread + 1):
        for dx in range(-spread, spread + 1):
            ys = slice(max(0, dy), h + min(0, dy))  # target rows
            xs = slice(max(0, dx), w + min(0, dx))
            ys_src = slice(max(0, -dy), h + min(0, -dy))
            xs_src = slice(max(0, -dx), w + min(0, -dx))
            target = pos[ys, xs].reshape(-1)
            src = nearest[:, ys_src, xs_src].reshape(n_img, -1)
            mask = keep[:, ys_src, xs_src].reshape(n_img, -1)
            rows = target.expand(n_img, -1)[mask]
            counts.index_put_((rows, src[mask].long()), torch.ones(int(mask.sum())), accumulate=True)
    totals = counts.sum(1, keepdim=True)
    probs = torch.where(totals > 0, counts / totals.clamp_min(1e-12), counts)
    position, entry = probs.nonzero(as_tuple=True)
    return SparsePositionPrior(
        grid=(h, w),
        n_entries=n_entries,
        position=position.to(torch.int32),
        entry=entry.to(torch.int32),
        prob=probs[position, entry].to(torch.float32),
    )

