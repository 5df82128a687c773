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

from pni_ray.config import COMBINE_RULES, SCORE_MODES
from pni_ray.models.rowmin import first_argmin, row_min

INF = float("inf")


def squared_distances(
    x: torch.Tensor, memory: torch.Tensor, memory_sq: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(P, D) x (M, D) -> (P, M) squared Euclidean distances, clamped at 0 against rounding.

    One (P, M) buffer: |m|^2 - 2 x.m in a single GEMM, then |x|^2 and the clamp in place. The
    out-of-place expression allocated four such buffers (page faults and memory traffic made
    it 2.2x slower at P = 4096, M = 16384). Same formulation as the exported scorer graph.
    out: a (P, M) buffer to write into (block loops reuse one instead of faulting in a new one).
    """
    partial, x_sq = partial_squared_distances(x, memory, memory_sq, out)
    return partial.add_(x_sq.unsqueeze(1)).clamp_min_(0.0)


def partial_squared_distances(
    x: torch.Tensor, memory: torch.Tensor, memory_sq: torch.Tensor, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """|m|^2 - 2 x.m (P, M) and |x|^2 (P,): squared distances are (partial + |x|^2) clamped at 0,
    which `row_min(partial, shift=|x|^2)` takes the minimum of without a pass over the block."""
    return torch.addmm(memory_sq.unsqueeze(0), x, memory.T, alpha=-2.0, out=out), (x * x).sum(1)


def _distance_blocks(x: torch.Tensor, memory: torch.Tensor, chunk: int, desc: str | None):
    """(|m|^2 - 2 x.m, |x|^2) of x's rows against memory, (chunk, M) block by block (bounded
    memory; `partial_squared_distances`).

    Every block is a view of one reused buffer, valid until the next is yielded: a fresh
    (4096, 16384) block per chunk cost a third of the GEMM's time in page faults (training
    assigns 1.2M patches on a 761-image category). desc: show a progress bar with this label.
    """
    memory_sq = (memory * memory).sum(1)
    buffer = torch.empty(min(chunk, x.shape[0]), memory.shape[0], dtype=memory.dtype, device=memory.device)
    for i in tqdm(range(0, x.shape[0], chunk), desc=desc, unit="chunk", disable=desc is None, leave=False):
        rows = x[i : i + chunk]
        yield partial_squared_distances(rows, memory, memory_sq, out=buffer[: rows.shape[0]])


def nearest_neighbours(
    x: torch.Tensor, memory: torch.Tensor, chunk: int = 4096, desc: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to and index of the nearest memory row for every row of x, in bounded chunks."""
    dists, idxs = [], []
    for partial, x_sq in _distance_blocks(x, memory, chunk, desc):
        d, j = row_min(partial, shift=x_sq)
        dists.append(d.sqrt())
        idxs.append(j)
    if not dists:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(dists), torch.cat(idxs)


def nearest_in_prefix_and_all(
    x: torch.Tensor, memory: torch.Tensor, prefix: int, chunk: int = 4096, desc: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest row among memory[:prefix] and among all of memory, for every row of x.

    C_dist is a prefix of C_emb, so one distance pass gives both training assignments (MLP targets
    and position-prior hits) instead of a second pass over the first `prefix` columns.
    """
    near_prefix, near_all = [], []
    for partial, x_sq in _distance_blocks(x, memory, chunk, desc):
        near_prefix.append(first_argmin(partial[:, :prefix], shift=x_sq))
        near_all.append(first_argmin(partial, shift=x_sq))
    empty = torch.empty(0, dtype=torch.long)
    return (torch.cat(near_prefix), torch.cat(near_all)) if near_all else (empty, empty)


def masked_argmin(dist_sq: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Row-wise index of the nearest allowed entry; -1 where nothing is allowed."""
    masked = torch.where(allowed, dist_sq, torch.full_like(dist_sq, INF))
    best, idx = row_min(masked)
    return torch.where(torch.isinf(best), torch.full_like(idx, -1), idx)


def position_candidates(allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hw, M) bool -> the allowed entries of each position, ascending, as an (hw, k) table padded
    with the row's first entry (a repeat changes neither the minimum nor the first-index argmin),
    and the (hw,) positions that allow nothing (their rows are filled with entry 0)."""
    pos, ent = allowed.nonzero(as_tuple=True)
    counts = torch.bincount(pos, minlength=allowed.shape[0])
    k = max(int(counts.max()) if counts.numel() else 0, 1)
    starts = torch.cumsum(counts, 0) - counts
    first = torch.zeros(allowed.shape[0], dtype=torch.long, device=allowed.device)
    first[counts > 0] = ent[starts[counts > 0]]
    table = first.unsqueeze(1).repeat(1, k)
    table[pos, torch.arange(pos.numel(), device=allowed.device) - starts[pos]] = ent
    return table, counts == 0


def exact_sq_distances(x: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """|x_i - memory[idx_i]|^2 computed as a difference, not from the GEMM expansion.

    The expansion |x|^2 - 2 x.m + |m|^2 loses precision near zero distance and depends on the
    summation order, so torch and an exported graph would disagree there; the chosen entry's
    distance is recomputed exactly (P x D work, negligible next to the P x M search).
    """
    return (x - memory[idx]).pow(2).sum(1)


class PatchScorer(nn.Module):
    """Features (B, D, h, w) [+ p(C_dist | N) (B, K, h, w)] -> patch scores (B, h, w).

    Modes: `patchcore` (plain nearest neighbour), `neighbourhood` (mask p(c|N) > tau), `position`
    (mask p(c|x) > tau), `pni` (both priors, combined per `combine`), `pni_split` (the authors'
    released code: each prior masks on its own, the two scores averaged).

    combine "both" (default): an entry must be plausible under each prior, min(p(c|N), p(c|x)) >
    tau. "mean": the paper's (p(c|N) + p(c|x)) / 2 > tau, under which a flat p(c|N) (above tau
    for two thirds of C_emb on real data) re-admits entries the position never saw.

    Nothing allowed: a `pni` patch whose neighbourhood vetoes every entry its position allows is
    scored against the position's entries alone (what belongs here, far from a wrong patch), and
    only where the position allows nothing either (padding) against all of C_emb.

    p(c|N) over C_emb spreads each C_dist entry's probability evenly over the C_emb entries
    nearest to it, so both priors are distributions over C_emb and tau = tau_scale / |C_emb|
    compares like with like. The chosen entry's distance is recomputed exactly
    (`exact_sq_distances`).
    """

    def __init__(
        self,
        memory: torch.Tensor,
        emb_to_dist: torch.Tensor | None = None,
        position_prior: torch.Tensor | None = None,
        tau_scale: float = 0.5,
        chunk_patches: int = 4096,
        topk: int = 32,
        combine: str = "both",
        candidate_share: float = 0.25,
        neighbourhood_cut: float = 1.0,
        grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        # the (h, w) grid the position prior was built on: a transposed grid has the same h * w
        self.grid = (int(grid[0]), int(grid[1])) if grid is not None else None
        if combine not in COMBINE_RULES:
            raise ValueError(f"unknown prior combination {combine!r}; choose from {COMBINE_RULES}")
        memory = memory.float().contiguous()
        self.register_buffer("memory", memory)
        self.register_buffer("memory_sq", (memory * memory).sum(1))
        self.tau = tau_scale / memory.shape[0]
        # p(c|N)'s own cut where it masks alone or beside p(c|x) ("both", pni_split): the bundle's
        # neighbourhood_cut x tau (chosen from held-out images at training, `choose_cut`)
        self.tau_neighbourhood = neighbourhood_cut * self.tau
        self.chunk_patches = chunk_patches
        self.topk = topk
        self.combine = combine
        if emb_to_dist is not None:
            emb_to_dist = emb_to_dist.long()
            sizes = torch.bincount(emb_to_dist, minlength=int(emb_to_dist.max()) + 1).float()
            self.register_buffer("emb_to_dist", emb_to_dist)
            self.register_buffer("inv_cluster", 1.0 / sizes[emb_to_dist])
        else:
            self.emb_to_dist = None
            self.inv_cluster = None
        self.register_buffer("position_prior", position_prior.float() if position_prior is not None else None)
        # mode position / pni ("both") can only choose entries their position allows: when those
        # lists are short, distances to them replace the search over all of C_emb (_candidate_scores)
        self.register_buffer("candidates", None, persistent=False)
        self.register_buffer("empty_positions", None, persistent=False)
        if position_prior is not None:
            table, empty = position_candidates(self.position_prior > self.tau)
            if table.shape[1] <= candidate_share * memory.shape[0]:
                self.candidates = table
                self.empty_positions = empty.nonzero(as_tuple=True)[0]

    @property
    def n_memory(self) -> int:
        return int(self.memory.shape[0])

    def _check(self, features: torch.Tensor, p_dist: torch.Tensor | None, mode: str) -> None:
        """Refuse a mode the bundle cannot score, missing probabilities and a foreign grid."""
        if mode not in SCORE_MODES:
            raise ValueError(f"unknown scoring mode {mode!r}; choose from {SCORE_MODES}")
        if mode == "patchcore":
            return
        if self.emb_to_dist is None or (mode != "neighbourhood" and self.position_prior is None):
            raise ValueError(f"mode {mode!r} needs a PNI bundle (trained without --mode patchcore)")
        if mode != "position" and p_dist is None:
            raise ValueError(f"mode {mode!r} needs neighbourhood probabilities")
        h, w = features.shape[-2:]
        prior = self.position_prior
        if prior is not None and (prior.shape[0] != h * w or self.grid not in (None, (h, w))):
            built = "x".join(map(str, self.grid)) if self.grid else f"{prior.shape[0]}-position"
            raise ValueError(f"position prior was built on a {built} grid, features have {h}x{w}; score at the "
                             "training geometry")

    def _rows(
        self, features: torch.Tensor, p_dist: torch.Tensor | None, mode: str
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """One row per patch: features (P, D), probabilities (P, K) or None, grid positions (P,)."""
        self._check(features, p_dist, mode)
        b, d, h, w = features.shape
        rows = features.permute(0, 2, 3, 1).reshape(-1, d)
        probs = None
        if mode not in ("patchcore", "position"):
            probs = p_dist.permute(0, 2, 3, 1).reshape(b * h * w, -1)
        return rows, probs, torch.arange(h * w, device=features.device).repeat(b)

    def uses_candidates(self, mode: str) -> bool:
        """Whether `mode` is scored against each position's allowed entries only (see forward)."""
        return self.candidates is not None and (mode == "position" or (mode == "pni" and self.combine == "both"))

    def forward(
        self, features: torch.Tensor, p_dist: torch.Tensor | None = None, mode: str = "pni", exact_dense: bool = False
    ) -> torch.Tensor:
        """Patch scores (B, h, w). exact_dense: the definition over all of C_emb (tests, diagnostics);
        otherwise the same choices from a shortcut: the position's candidate entries, or the top k."""
        b, _, h, w = features.shape
        if not exact_dense and self.uses_candidates(mode):
            self._check(features, p_dist, mode)
            return self._candidate_scores(features, p_dist if mode == "pni" else None).view(b, h, w)
        rows, probs, positions = self._rows(features, p_dist, mode)
        out = []
        for i in range(0, rows.shape[0], self.chunk_patches):
            sl = slice(i, i + self.chunk_patches)
            dist_sq = squared_distances(rows[sl], self.memory, self.memory_sq)
            out.append(self._chunk_scores(rows[sl], dist_sq, probs[sl] if probs is not None else None,
                                          positions[sl], mode, exact_dense))
        return torch.cat(out).view(b, h, w)

    def _candidate_scores(self, features: torch.Tensor, p_dist: torch.Tensor | None) -> torch.Tensor:
        """(B * hw,) scores of mode position (p_dist None) or pni with combine "both".

        Both can only choose an entry their position allows (pni's fallback is the position's
        entries), so distances to each position's k candidates, (hw, B, k), decide what the
        (B * hw, M) search would: ~M / k less work (k ~ 1% of C_emb on aligned objects). A position
        that allows nothing (padding) keeps the plain nearest entry over all of C_emb.
        """
        b, d, h, w = features.shape
        hw, k = h * w, self.candidates.shape[1]
        x = features.reshape(b, d, hw).permute(2, 0, 1)  # (hw, B, D)
        p = p_dist.reshape(b, p_dist.shape[1], hw).permute(2, 0, 1) if p_dist is not None else None  # (hw, B, K)
        step = max(1, min(self.chunk_patches // max(b, 1), 4 * self.chunk_patches // k))
        choice = torch.empty(hw, b, dtype=torch.long, device=features.device)
        for start in range(0, hw, step):
            sl = slice(start, start + step)
            cand, xs = self.candidates[sl], x[sl]  # (c, k), (c, B, D)
            dist = torch.baddbmm(self.memory_sq[cand].unsqueeze(1), xs, self.memory[cand].transpose(1, 2), alpha=-2.0)
            dist.add_((xs * xs).sum(2, keepdim=True)).clamp_min_(0.0)  # (c, B, k)
            local = dist.argmin(2)
            if p is not None:  # both priors; nothing allowed -> the position's nearest (local)
                p_n = p[sl].gather(2, self.emb_to_dist[cand].unsqueeze(1).expand(-1, b, -1))
                allowed = p_n * self.inv_cluster[cand].unsqueeze(1) > self.tau_neighbourhood
                j = masked_argmin(dist.reshape(-1, k), allowed.reshape(-1, k)).view_as(local)
                local = torch.where(j < 0, local, j)
            choice[sl] = cand.gather(1, local)
        empty = self.empty_positions
        if empty.numel():  # in bounded chunks: letterbox / tiled grids can have many such positions
            choice[empty] = nearest_neighbours(x[empty].reshape(-1, d), self.memory, self.chunk_patches)[1].view(-1, b)
        rows = x.transpose(0, 1).reshape(-1, d)  # (B * hw, D), image-major like the output
        return exact_sq_distances(rows, self.memory, choice.t().reshape(-1)).sqrt()

    def _chunk_scores(
        self, x: torch.Tensor, dist_sq: torch.Tensor, probs: torch.Tensor | None, positions: torch.Tensor,
        mode: str, exact_dense: bool,
    ) -> torch.Tensor:
        """Scores of one chunk of patches: the chosen entries' exact distances (pni_split: their mean)."""
        if mode == "patchcore":
            choices = [first_argmin(dist_sq)]
        elif exact_dense:
            choices = self._dense(dist_sq, probs, positions, mode)
        else:
            choices = self._topk(dist_sq, probs, positions, mode)
        best = [exact_sq_distances(x, self.memory, j).sqrt() for j in choices]
        return best[0] if len(best) == 1 else 0.5 * (best[0] + best[1])

    @torch.no_grad()
    def diagnose(self, features: torch.Tensor, p_dist: torch.Tensor | None, mode: str) -> dict[str, torch.Tensor]:
        """Per patch (B, h, w): the mode's score, the plain nearest-neighbour score, the share of C_emb allowed."""
        b, _, h, w = features.shape
        rows, probs, positions = self._rows(features, p_dist, mode)
        scores, plain, share = [], [], []
        for i in range(0, rows.shape[0], self.chunk_patches):
            sl = slice(i, i + self.chunk_patches)
            chunk_probs = probs[sl] if probs is not None else None
            dist_sq = squared_distances(rows[sl], self.memory, self.memory_sq)
            if mode == "patchcore":
                share.append(torch.ones(dist_sq.shape[0], device=dist_sq.device))
            else:
                allowed = self.allowed(chunk_probs, positions[sl], None, mode)
                allowed = allowed[0] & allowed[1] if isinstance(allowed, tuple) else allowed
                share.append(allowed.float().mean(1))
            plain.append(self._chunk_scores(rows[sl], dist_sq, None, positions[sl], "patchcore", True))
            scores.append(self._chunk_scores(rows[sl], dist_sq, chunk_probs, positions[sl], mode, True))
        view = lambda t: torch.cat(t).view(b, h, w)  # noqa: E731
        return {"score": view(scores), "plain": view(plain), "allowed_share": view(share)}

    def allowed(
        self, probs: torch.Tensor | None, positions: torch.Tensor, idx: torch.Tensor | None, mode: str
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Which entries pass tau, for all entries (idx None) or the (P, k) entries in idx."""
        p_n = p_x = None
        if mode in ("neighbourhood", "pni", "pni_split"):
            p_n = self.neighbourhood_mask_probs(probs, idx)
        if mode in ("position", "pni", "pni_split"):
            p_x = self.position_mask_probs(positions, idx)
        if mode == "neighbourhood":
            return p_n > self.tau_neighbourhood
        if mode == "position":
            return p_x > self.tau
        if mode == "pni":
            if self.combine == "mean":
                return (p_n + p_x) * 0.5 > self.tau
            return (p_n > self.tau_neighbourhood) & (p_x > self.tau)
        return p_n > self.tau_neighbourhood, p_x > self.tau

    def neighbourhood_mask_probs(self, probs: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """p(c|N) over C_emb (each C_dist entry's probability shared by its C_emb entries) of all
        entries (idx None) or only the (P, k) entries in idx, from the (P, |C_dist|) probabilities."""
        assert probs is not None
        if idx is None:
            return probs[:, self.emb_to_dist] * self.inv_cluster
        return probs.gather(1, self.emb_to_dist[idx]) * self.inv_cluster[idx]

    def position_mask_probs(self, positions: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """p(c|x) of all entries (idx None) or only the (P, k) entries in idx (never P dense rows)."""
        if idx is None:
            return self.position_prior[positions]
        return self.position_prior[positions.unsqueeze(1), idx]

    def _fallback(self, dist_sq: torch.Tensor, positions: torch.Tensor, mode: str) -> torch.Tensor:
        """Nearest entry for rows with nothing allowed: the position's entries (pni), else all."""
        if mode == "pni":
            j = masked_argmin(dist_sq, self.position_mask_probs(positions, None) > self.tau)
            return torch.where(j < 0, first_argmin(dist_sq), j)
        return first_argmin(dist_sq)

    def _dense(
        self, dist_sq: torch.Tensor, probs: torch.Tensor | None, positions: torch.Tensor, mode: str
    ) -> list[torch.Tensor]:
        """Chosen entry per row for each mask (two for pni_split), by the definition over all of C_emb."""
        allowed = self.allowed(probs, positions, None, mode)
        out = []
        for mask, sub_mode in zip(*self._masks(allowed, mode)):
            j = masked_argmin(dist_sq, mask)
            missing = (j < 0).nonzero(as_tuple=True)[0]
            if missing.numel():
                j[missing] = self._fallback(dist_sq[missing], positions[missing], sub_mode)
            out.append(j)
        return out

    def _topk(
        self, dist_sq: torch.Tensor, probs: torch.Tensor | None, positions: torch.Tensor, mode: str
    ) -> list[torch.Tensor]:
        """The same choices as `_dense`, checking the mask on the k nearest entries only; rows
        where none of them is allowed go dense."""
        k = min(self.topk, dist_sq.shape[1])
        vals, idx = torch.topk(dist_sq, k, dim=1, largest=False, sorted=False)
        allowed = self.allowed(probs, positions, idx, mode)
        out = []
        for j, mask in enumerate(self._masks(allowed, mode)[0]):
            local = masked_argmin(vals, mask)
            choice = idx.gather(1, local.clamp_min(0).unsqueeze(1)).squeeze(1)
            missing = (local < 0).nonzero(as_tuple=True)[0]
            if missing.numel():  # the definition over all of C_emb, for these rows only
                sub_probs = probs[missing] if probs is not None else None
                choice[missing] = self._dense(dist_sq[missing], sub_probs, positions[missing], mode)[j]
            out.append(choice)
        return out

    @staticmethod
    def _masks(allowed: torch.Tensor | tuple[torch.Tensor, torch.Tensor], mode: str) -> tuple[tuple, tuple]:
        """(masks, the mode each mask falls back like): pni_split's two masks score as their own modes."""
        if isinstance(allowed, tuple):
            return allowed, ("neighbourhood", "position")
        return (allowed,), (mode,)
