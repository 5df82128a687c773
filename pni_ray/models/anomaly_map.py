"""Patch-score grids -> pixel anomaly maps (upsample + Gaussian blur) and image scores."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(4.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


class AnomalyMapper(nn.Module):
    """(B, h, w) patch scores -> (B, H, W) maps: bilinear upsampling, separable Gaussian blur.

    Written with Conv/Resize/Pad only, so it exports as part of the scoring graph.
    """

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        self.sigma = sigma
        kernel = gaussian_kernel1d(sigma) if sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, patch_scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        maps = F.interpolate(patch_scores.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
        if self.sigma > 0:
            r = self.kernel.numel() // 2
            kx = self.kernel.view(1, 1, 1, -1)
            ky = self.kernel.view(1, 1, -1, 1)
            maps = F.conv2d(F.pad(maps, (r, r, 0, 0), mode="replicate"), kx)
            maps = F.conv2d(F.pad(maps, (0, 0, r, r), mode="replicate"), ky)
        return maps.squeeze(1)


def image_scores(maps: torch.Tensor, window: int = 0) -> torch.Tensor:
    """Image score = maximum of the (B, H, W) maps averaged over window x window pixels (0 or 1:
    the plain maximum); the torch twin of `pni_ray.geometry.box_max` for unpadded canvases."""
    ky, kx = min(window, maps.shape[-2]), min(window, maps.shape[-1])
    if ky > 1 or kx > 1:
        maps = F.avg_pool2d(maps.unsqueeze(1), (max(ky, 1), max(kx, 1)), stride=1).squeeze(1)
    return maps.flatten(1).max(1).values
