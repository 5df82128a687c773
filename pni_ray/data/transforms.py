"""Images on disk -> model input tensors, one definition shared by training, scoring and export."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pni_ray.data.images import DEFAULT_MAX_PIXELS, load_rgb, resize_rgb, to_float  # noqa: F401 (resize_rgb re-exported)


def to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """Stack (H, W, 3) uint8 arrays into (B, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(to_float(np.stack(images)))


def load_batch(paths: Sequence[Path], size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    return to_tensor([resize_rgb(load_rgb(p, max_pixels), size) for p in paths])
