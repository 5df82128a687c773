"""The greedy k-center coreset as it was before issue 15: a slow reference for equality tests.

Every pick re-tests all N points against the triangle-inequality bound (O(N) per pick); the
pruned implementation in pni_ray.models.coreset must return exactly this order.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from pni_ray.models.coreset import random_projection


def greedy_kcenter_order_reference(
    features: torch.Tensor,
    n_select: int,
    projection_dim: int | None = 128,
    chunk_size: int = 65536,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """The implementation before issue 15, verbatim: the order the fast one must reproduce.

    Exact greedy k-center, accelerated with the triangle inequality: a point whose current
    centre a(x) satisfies d(new, a(x)) >= 2 d(x, a(x)) cannot get closer to the new centre,
    so only the remaining candidates are measured. Late iterations touch a few percent of
    the points instead of all of them. Candidate distances are computed in chunks of
    `chunk_size` rows, so temporaries stay bounded at a million patches.
    """
    n_total, dim = features.shape
    if n_select <= 0:
        raise ValueError("n_select must be positive")
    n_select = min(n_select, n_total)
    if projection_dim and projection_dim < dim:
        proj = random_projection(dim, projection_dim, seed).to(features.device, features.dtype)
        reduced = torch.cat([features[i : i + chunk_size] @ proj for i in range(0, n_total, chunk_size)])
    else:
        reduced = features.contiguous()
    min_dist = torch.full((n_total,), float("inf"), dtype=reduced.dtype, device=reduced.device)
    assigned = torch.zeros(n_total, dtype=torch.long, device=reduced.device)
    centres = torch.empty(n_select, reduced.shape[1], dtype=reduced.dtype, device=reduced.device)
    order = torch.empty(n_select, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    current = int(torch.randint(n_total, (1,), generator=generator))
    bar = tqdm(total=n_select, desc="coreset", unit="pt", disable=not progress, leave=False)
    for step in range(n_select):
        order[step] = current
        centre = reduced[current]
        centres[step] = centre
        if step == 0:
            candidates = None
        else:
            centre_gaps = (centres[:step] - centre).pow(2).sum(1).sqrt()
            candidates = (centre_gaps[assigned] < 2.0 * min_dist).nonzero(as_tuple=True)[0]
        n_cand = n_total if candidates is None else candidates.numel()
        for i in range(0, n_cand, chunk_size):
            idx = torch.arange(i, min(i + chunk_size, n_total)) if candidates is None else candidates[i : i + chunk_size]
            dist = (reduced[idx] - centre).pow(2).sum(1).sqrt()
            closer = dist < min_dist[idx]
            min_dist[idx[closer]] = dist[closer]
            assigned[idx[closer]] = step
        current = int(torch.argmax(min_dist))
        bar.update(1)
    bar.close()
    return order
