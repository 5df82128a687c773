"""torch's intra-op thread count, pinned for a block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch at one thread inside the block, the caller's count restored after. For work whose
    floats must not follow the caller's thread count (torch's conv kernels block by it: the INT8
    export's calibration features) or whose many small ops each become a parallel region that, on
    a loaded machine, waits for a core (the coreset's picks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
