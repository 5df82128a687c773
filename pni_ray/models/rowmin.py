"""Row minimum and its first index, exactly as `torch.min(dim=-1)` / `argmin`, several times faster.

Why: on CPU, torch's `argmin` over long rows runs at ~0.75 G elements/s on 2 threads while `amin`
runs ~7x faster (vectorised). Assigning every training patch to its nearest memory entry (a
(4096, 16384) distance block at a time: 1.2M patches on a 761-image category) spent as long in
`argmin` as in the GEMM that made the block. So: `amin` over groups of columns, the first group
that holds the row's minimum, and `argmin` inside that one group only. First occurrence over
groups, then first occurrence inside the group, is the first occurrence in the row: ties give
the same index as torch. A block holding NaN (where torch's answer is the NaN's index) takes
torch's own path.
"""

from __future__ import annotations

import torch

GROUP = 128  # columns per group: amin over (rows, M / GROUP, GROUP), then argmin over GROUP columns


def row_min(values: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, M) -> (minimum, index of its first occurrence) of every row, as `values.min(1)`.

    Columns are taken `group` at a time; the last M % group columns form one shorter group.
    """
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    if (values.dim() != 2 or values.shape[0] == 0 or values.shape[1] < 2 * group or values.stride(1) != 1
            or values.dtype == torch.bool or values.is_complex()):
        return _torch_min(values)
    rows, m = values.shape
    n_full = m // group
    groups = values[:, : n_full * group].view(rows, n_full, group)
    tail = values[:, n_full * group :]
    group_min = groups.amin(2)  # (R, G)
    if tail.shape[1]:
        group_min = torch.cat([group_min, tail.amin(1, keepdim=True)], 1)  # the tail is group G
    best = group_min.amin(1)
    if torch.isnan(best).any():  # torch returns the NaN and its index: its own path decides
        return _torch_min(values)
    g = (group_min == best.unsqueeze(1)).to(torch.uint8).argmax(1)  # first group holding the minimum
    in_full = g < n_full
    inside = groups[torch.arange(rows, device=values.device), g.clamp(max=n_full - 1)].argmin(1)
    index = g * group + inside
    if tail.shape[1] and not bool(in_full.all()):
        index = torch.where(in_full, index, n_full * group + tail.argmin(1))
    return values.gather(1, index.unsqueeze(1)).squeeze(1), index  # the value there: -0.0 stays -0.0


def _torch_min(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's own row minimum, as the same plain (values, indices) tuple the fast path returns."""
    out = values.min(1)
    return out.values, out.indices


def first_argmin(values: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """(R, M) -> index of every row's first minimum, as `values.argmin(1)`."""
    return row_min(values, group)[1]
