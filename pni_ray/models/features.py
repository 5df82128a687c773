"""Locally aware patch features (PatchCore / PNI): stride-8 and stride-16 stages, p x p averaging.

The module takes images in [0, 1] and normalises inside, so exported graphs and every caller
share one preprocessing definition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pni_ray.config import FeatureConfig
from pni_ray.models.backbones import create_classifier, get_spec

FEATURE_STRIDE = 8


def stage_indices(model: nn.Module) -> list[int]:
    """The deepest stage at stride 8 and the deepest at stride 16, from timm's feature_info."""
    info = list(model.feature_info)  # type: ignore[attr-defined]
    picked = []
    for stride in (8, 16):
        matches = [i for i, f in enumerate(info) if f["reduction"] == stride]
        if not matches:
            raise ValueError(f"{type(model).__name__} has no stage at stride {stride}")
        picked.append(matches[-1])
    return picked


class PatchFeatureExtractor(nn.Module):
    """Image batch (B, 3, H, W) in [0, 1] -> patch features (B, D, H/8, W/8)."""

    def __init__(self, cfg: FeatureConfig) -> None:
        super().__init__()
        spec = get_spec(cfg.backbone)
        body = create_classifier(cfg.backbone, weights=cfg.weights, pretrained=cfg.pretrained)
        self.indices = stage_indices(body)
        self.stage_channels = [body.feature_info[i]["num_chs"] for i in self.indices]  # type: ignore[index]
        body.prune_intermediate_layers(self.indices, prune_head=True)  # type: ignore[operator]
        # channels-last: oneDNN's CPU convolutions (depthwise ones above all) run ~1.7x faster on
        # NHWC than on NCHW (efficientnet_lite2, 320 px, 2 threads: 28 vs 50 ms per image)
        self.body = body.eval().to(memory_format=torch.channels_last)
        for p in self.body.parameters():
            p.requires_grad_(False)
        self.patch_size = cfg.patch_size
        self.pool_padding = cfg.pool_padding
        self.projection_dim = cfg.projection_dim
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        return self.projection_dim or sum(self.stage_channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        stages = self.body.forward_intermediates(x, indices=self.indices, intermediates_only=True)  # type: ignore[operator]
        p = self.patch_size
        if self.pool_padding == "zeros":
            # zeros padded explicitly, then an unpadded mean: the same numbers as a padded pool that counts
            # the padding, but OpenVINO's CPU plugin ran the INT8 export's padded-and-counted AveragePool
            # wrongly (bottle's features off by up to 90% of their range, image AUROC 0.65), not this form
            pooled = [F.avg_pool2d(F.pad(s, (p // 2,) * 4), p, stride=1) for s in stages]
        else:  # "inside" (FeatureConfig refuses any other rule)
            pooled = [F.avg_pool2d(s, p, stride=1, padding=p // 2, count_include_pad=False) for s in stages]
        size = pooled[0].shape[-2:]
        pooled = [pooled[0]] + [F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in pooled[1:]]
        features = torch.cat(pooled, dim=1)
        if self.projection_dim:
            b, d, h, w = features.shape
            flat = features.permute(0, 2, 3, 1).reshape(b * h * w, 1, d)
            flat = F.adaptive_avg_pool1d(flat, self.projection_dim)
            features = flat.reshape(b, h, w, self.projection_dim).permute(0, 3, 1, 2)
        return features.contiguous()


def build_extractor(cfg: FeatureConfig) -> PatchFeatureExtractor:
    """Random-weight backbones (pretrained=False, tests only) are seeded for reproducibility."""
    if not cfg.pretrained and cfg.weights is None:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return PatchFeatureExtractor(cfg).eval()
    return PatchFeatureExtractor(cfg).eval()

