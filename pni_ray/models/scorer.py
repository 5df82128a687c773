"""Patch scores: nearest-neighbour distance to C_emb, masked by PNI's probabilities.

Distances come from matrix products (|x|^2 - 2 x.c + |c|^2), never `cdist`, so the same
arithmetic exports to ONNX / TensorRT. The PNI score is the minimum distance over the
entries whose probability p(c | Omega) exceeds tau, the -log of the paper's maximum of
exp(-lambda ||phi - c||) up to the constant lambda.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from pni_ray.config import SCORE_MODES

INF = float("inf")


def squared_distances(x: torch.Tensor, memory: torch.Tensor, memory_sq: torch.Tensor) -> torch.Tensor:
    """(P, D) x (M, D) -> (P, M) squared Euclidean distances, clamped at 0 against rounding.

    One (P, M) buffer: |m|^2 - 2 x.m in a single GEMM, then |x|^2 and the clamp in place. The
    out-of-place expression allocated four such buffers (page faults and memory traffic made
    it 2.2x slower at P = 4096, M = 16384). Same formulation as the exported scorer graph.
    """
    x_sq = (x * x).sum(1, keepdim=True)
    return torch.addmm(memory_sq.unsqueeze(0), x, memory.T, alpha=-2.0).add_(x_sq).clamp_min_(0.0)


def nearest_neighbours(
    x: torch.Tensor, memory: torch.Tensor, chunk: int = 4096, desc: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to and index of the nearest memory row for every row of x, in bounded chunks.

    desc: show a progress bar with this label (training assigns millions of patches when tiled).
    """
    memory_sq = (memory * memory).sum(1)
    dists, idxs = [], []
    starts = range(0, x.shape[0], chunk)
    for i in tqdm(starts, desc=desc, unit="chunk", disable=desc is None, leave=False):
        d, j = squared_distances(x[i : i + chunk], memory, memory_sq).min(1)
        dists.append(d.sqrt())
        idxs.append(j)
    if not dists:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(dists), torch.cat(idxs)


def masked_min(dist_sq: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Row-wise min over allowed entries; rows with nothing allowed fall back to the plain min."""
    masked = torch.where(allowed, dist_sq, torch.full_like(dist_sq, INF)).min(1).values
    return torch.where(torch.isinf(masked), dist_sq.min(1).values, masked)


class PatchScorer(nn.Module):
    """Features (B, D, h, w) [+ p(C_dist | N) (B, K, h, w)] -> patch scores (B, h, w).

    Modes: `patchcore` (plain nearest neighbour), `neighbourhood` (mask from p(c|N) alone),
    `position` (mask from p(c|x) alone), `pni` (mask from (p(c|N) + p(c|x)) / 2, the paper),
    `pni_split` (the authors' released code: each prior masks on its own, scores averaged).

    p(c|N) over C_emb spreads each C_dist entry's probability evenly over the C_emb entries
    nearest to it, so both priors are distributions over C_emb and tau = tau_scale / |C_emb|
    compares like with like.
    """

    def __init__(
        self,
        memory: torch.Tensor,
        emb_to_dist: torch.Tensor | None = None,
        position_prior: torch.Tensor | None = None,
        tau_scale: float = 0.5,
        chunk_patches: int = 4096,
        topk: int = 32,
    ) -> None:
        super().__init__()
        memory = memory.float().contiguous()
        self.register_buffer("memory", memory)
        self.register_buffer("memory_sq", (memory * memory).sum(1))
        self.tau = tau_scale / memory.shape[0]
        self.chunk_patches = chunk_patches
        self.topk = topk
        if emb_to_dist is not None:
            emb_to_dist = emb_to_dist.long()
            sizes = torch.bincount(emb_to_dist, minlength=int(emb_to_dist.max()) + 1).float()
            self.register_buffer("emb_to_dist", emb_to_dist)
            self.register_buffer("inv_cluster", 1.0 / sizes[emb_to_dist])
        else:
            self.emb_to_dist = None
            self.inv_cluster = None
        self.register_buffer("position_prior", position_prior.float() if position_prior is not None else None)

    @property
    def n_memory(self) -> int:
        return int(self.memory.shape[0])

    def forward(
        self, features: torch.Tensor, p_dist: torch.Tensor | None = None, mode: str = "pni", exact_dense: bool = False
    ) -> torch.Tensor:
        if mode not in SCORE_MODES:
            raise ValueError(f"unknown scoring mode {mode!r}; choose from {SCORE_MODES}")
        b, d, h, w = features.shape
        rows = features.permute(0, 2, 3, 1).reshape(-1, d)
        probs = None
        if mode != "patchcore":
            if self.emb_to_dist is None or (mode != "neighbourhood" and self.position_prior is None):
                raise ValueError(f"mode {mode!r} needs a PNI bundle (trained without --mode patchcore)")
            if mode != "position":
                if p_dist is None:
                    raise ValueError(f"mode {mode!r} needs neighbourhood probabilities")
                probs = p_dist.permute(0, 2, 3, 1).reshape(b * h * w, -1)
            if self.position_prior is not None and self.position_prior.shape[0] != h * w:
                raise ValueError(
                    f"position prior was built on a {self.position_prior.shape[0]}-position grid, "
                    f"features have {h}x{w}; score at the training geometry"
                )
        positions = torch.arange(h * w, device=features.device).repeat(b)
        out = []
        for i in range(0, rows.shape[0], self.chunk_patches):
            sl = slice(i, i + self.chunk_patches)
            dist_sq = squared_distances(rows[sl], self.memory, self.memory_sq)
            chunk_probs = probs[sl] if probs is not None else None
            if mode == "patchcore":
                best = dist_sq.min(1).values
            elif exact_dense:
                best = self._dense(dist_sq, chunk_probs, positions[sl], mode)
            else:
                best = self._topk(dist_sq, chunk_probs, positions[sl], mode)
            out.append(best.sqrt())
        return torch.cat(out).view(b, h, w)

    def allowed(
        self, probs: torch.Tensor | None, positions: torch.Tensor, idx: torch.Tensor | None, mode: str
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Which entries pass tau, for all entries (idx None) or the (P, k) entries in idx."""
        p_n = p_x = None
        if mode in ("neighbourhood", "pni", "pni_split"):
            assert probs is not None
            if idx is None:
                p_n = probs[:, self.emb_to_dist] * self.inv_cluster
            else:
                p_n = probs.gather(1, self.emb_to_dist[idx]) * self.inv_cluster[idx]
        if mode in ("position", "pni", "pni_split"):
            if idx is None:
                p_x = self.position_prior[positions]
            else:  # only the (P, k) entries: never materialise P full rows of the dense prior
                p_x = self.position_prior[positions.unsqueeze(1), idx]
        if mode == "neighbourhood":
            return p_n > self.tau
        if mode == "position":
            return p_x > self.tau
        if mode == "pni":
            return (p_n + p_x) * 0.5 > self.tau
        return p_n > self.tau, p_x > self.tau

    def _dense(self, dist_sq: torch.Tensor, probs: torch.Tensor | None, positions: torch.Tensor, mode: str) -> torch.Tensor:
        allowed = self.allowed(probs, positions, None, mode)
        if mode == "pni_split":
            a_n, a_x = allowed
            return 0.25 * (masked_min(dist_sq, a_n).sqrt() + masked_min(dist_sq, a_x).sqrt()) ** 2
        return masked_min(dist_sq, allowed)

    def _topk(self, dist_sq: torch.Tensor, probs: torch.Tensor | None, positions: torch.Tensor, mode: str) -> torch.Tensor:
        """Exact masked minimum via the k nearest entries; rows with none allowed go dense."""
        k = min(self.topk, dist_sq.shape[1])
        vals, idx = torch.topk(dist_sq, k, dim=1, largest=False, sorted=False)  # only their minimum is used
        allowed = self.allowed(probs, positions, idx, mode)
        masks = allowed if isinstance(allowed, tuple) else (allowed,)
        results = []
        for j, mask in enumerate(masks):
            best = torch.where(mask, vals, torch.full_like(vals, INF)).min(1).values
            missing = torch.isinf(best).nonzero(as_tuple=True)[0]
            if missing.numel():
                sub = self.allowed(
                    probs[missing] if probs is not None else None, positions[missing], None, mode
                )
                sub_mask = sub[j] if isinstance(sub, tuple) else sub
                best[missing] = masked_min(dist_sq[missing], sub_mask)
            results.append(best)
        if mode == "pni_split":
            return 0.25 * (results[0].sqrt() + results[1].sqrt()) ** 2
        return results[0]
