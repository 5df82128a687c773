"""The assembled detector: features -> p(c | N) -> masked-minimum patch scores -> map (-> refiner)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pni_ray.config import FeatureConfig, ScoringConfig, TrainConfig, float_from_json
from pni_ray.models.anomaly_map import AnomalyMapper, image_scores
from pni_ray.models.features import FEATURE_STRIDE, PatchFeatureExtractor, build_extractor
from pni_ray.models.neighbourhood import NeighbourhoodMLP
from pni_ray.models.position_prior import SparsePositionPrior
from pni_ray.models.scorer import PatchScorer


@dataclass(frozen=True)
class Normalisation:
    """Held-out training statistics: what "normal" looks like for this model's scores.

    Maps are normalised as (map - pixel_mean) / pixel_std, which puts models of different
    backbones on one scale for ensembles; the threshold applies to raw image scores.
    """

    image_mean: float = 0.0
    image_std: float = 1.0
    pixel_mean: float = 0.0
    pixel_std: float = 1.0
    threshold: float = float("inf")
    extras: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Normalisation:
        """From a manifest's record, where a model without a threshold has null (strict JSON has no
        Infinity; manifests written before that hold Infinity, which Python reads as inf too)."""
        values = dict(record)
        values["threshold"] = float_from_json("threshold", values.get("threshold"))
        values["extras"] = {k: float_from_json(k, v) for k, v in (values.get("extras") or {}).items()}
        return cls(**values)


def image_statistics(scores: torch.Tensor) -> tuple[float, float]:
    """Mean and std of held-out image scores as the threshold (mean + k std) takes them: the unbiased std in
    float64, floored at 1e-6 of the mean's size (one image, or equal scores, would give 0). Training calibrates
    with it, and an INT8 export recalibrates with it on its own graphs' scores (pni_ray.export.recalibrate)."""
    s = scores.double()
    std = float(s.std()) if len(s) > 1 else 0.0
    return float(s.mean()), max(std, 1e-6 * max(1.0, abs(float(s.mean()))))


class PNIDetector(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> anomaly maps (B, H, W) and image scores (B,)."""

    def __init__(
        self,
        extractor: PatchFeatureExtractor,
        scorer: PatchScorer,
        mapper: AnomalyMapper,
        mlp: NeighbourhoodMLP | None = None,
        refiner: nn.Module | None = None,
        mode: str = "pni",
        image_size: int = FeatureConfig.image_size,
        image_window: int = ScoringConfig.image_window,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.extractor = extractor
        self.scorer = scorer
        self.mapper = mapper
        self.mlp = mlp
        self.refiner = refiner
        self.mode = mode if mlp is not None or mode == "patchcore" else "patchcore"
        self.image_window = image_window  # patches; the score `pni_ray.geometry.Geometry.image_score` gives
        self.config: TrainConfig | None = None  # the bundle's config and feature grid (build_detector): its geometry
        self.grid: tuple[int, int] | None = None
        self.content_extent: tuple[tuple[int, int], tuple[int, int]] | None = None

    def patch_scores(self, images: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        mode = mode or self.mode
        features = self.extractor(images)
        p_dist = None
        if mode in ("neighbourhood", "pni", "pni_split"):
            if self.mlp is None:
                raise ValueError(f"mode {mode!r} needs the neighbourhood model; this bundle is PatchCore-only")
            p_dist = self.mlp.probabilities(features)
        return self.scorer(features, p_dist, mode)

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, mode: str | None = None, refine: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mode = mode or self.mode
        maps = self.mapper(self.patch_scores(images, mode), images.shape[-2:])
        if (refine if refine is not None else self.refiner is not None) and self.refiner is not None:
            maps = self.refiner(images, maps)
        return maps, image_scores(maps, self.image_window * FEATURE_STRIDE)


@dataclass
class TrainedModel:
    """Everything a bundle stores, in memory."""

    category: str
    config: TrainConfig
    memory: torch.Tensor  # (M, D) in greedy order; C_dist = memory[:dist_size]
    dist_size: int
    emb_to_dist: torch.Tensor | None
    position_prior: SparsePositionPrior | None
    mlp: NeighbourhoodMLP | None
    normalisation: Normalisation
    grid: tuple[int, int]
    feature_dim: int
    refiner: torch.nn.Module | None = None
    report: dict = field(default_factory=dict)
    neighbourhood_cut: float = 1.0  # p(c|N) masks above this multiple of tau (chosen at training)
    # letterbox: ((min, max) content height, (min, max) width) the training images filled on the canvas
    content_extent: tuple[tuple[int, int], tuple[int, int]] | None = None


def build_detector(trained: TrainedModel, extractor: PatchFeatureExtractor | None = None) -> PNIDetector:
    cfg = trained.config
    prior = trained.position_prior.dense() if trained.position_prior is not None else None
    scorer = PatchScorer(
        trained.memory,
        trained.emb_to_dist,
        prior,
        tau_scale=cfg.scoring.tau_scale,
        chunk_patches=cfg.scoring.chunk_patches,
        combine=cfg.scoring.combine,
        candidate_share=cfg.scoring.candidate_share,
        neighbourhood_cut=trained.neighbourhood_cut,
        grid=tuple(trained.grid),  # type: ignore[arg-type]
    )
    detector = PNIDetector(
        extractor or build_extractor(cfg.features),
        scorer,
        AnomalyMapper(cfg.scoring.blur_sigma),
        mlp=trained.mlp,
        refiner=trained.refiner,
        mode=cfg.scoring.mode if cfg.mode == "pni" else "patchcore",
        image_size=cfg.features.image_size,
        image_window=cfg.scoring.image_window,
    )
    # what pni_ray.predict.detector_geometry rebuilds the bundle's geometry from (how images are
    # prepared and maps restored); plain data, so this layer never handles images
    detector.config, detector.grid = cfg, tuple(trained.grid)
    detector.content_extent = trained.content_extent
    return detector.eval()
