"""Backbone ensembles: several bundles of one category scored as one model (PNI paper, Sec. 4).

Scoring (pure torch, `EnsembleDetector`): every member's anomaly map is put on a common
scale with that member's own held-out training statistics, ``(map - pixel_mean) /
pixel_std``, the normalised maps are averaged, and the image score is the maximum of the
averaged map.

Threshold: the ensemble stores ``threshold = mean_k (threshold_k - pixel_mean_k) /
pixel_std_k``, each member's own held-out threshold (mean + 3 std of its held-out image
scores) expressed in that member's normalised units, averaged. Because the maximum of an
average is at most the average of the maxima, an image whose ensemble score exceeds this
threshold is flagged by at least one member on its own: the ensemble never raises an alarm
that no member would raise, so on good images its false-alarm rate is at most the members'
combined rate (in practice lower, since averaging cancels member-specific noise). This needs
no data. ``--calibrate DATA_ROOT`` instead scores the train/good images that every member
held out of its memory bank and sets mean + k std of the ensemble's own image scores, exactly
like a single bundle's threshold (`pni_ray.ensemble_bundle.save_ensemble`); the manifest records which
method was used.

The on-disk format (a directory of member bundles) is `pni_ray.ensemble_bundle`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from pni_ray.config import ScoringConfig
from pni_ray.models.anomaly_map import image_scores
from pni_ray.models.features import FEATURE_STRIDE
from pni_ray.models.pni import Normalisation, PNIDetector

MEMBER_MODE = "member"  # score every member in its own bundle's mode


def _as_normalisation(value: Normalisation | dict[str, Any]) -> Normalisation:
    return value if isinstance(value, Normalisation) else Normalisation.from_record(value)


class EnsembleDetector(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> averaged normalised maps (B, H, W) and image scores (B,).

    Same call signature as `PNIDetector`; `mode=None` (or "member") scores every member in
    its bundle's own mode, any other mode is passed to every member.
    """

    def __init__(
        self,
        members: Sequence[PNIDetector],
        normalisations: Sequence[Normalisation | dict[str, Any]],
        threshold: float = float("inf"),
        names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if len(members) < 1:
            raise ValueError("an ensemble needs at least one member")
        if len(members) != len(normalisations):
            raise ValueError(f"{len(members)} members but {len(normalisations)} normalisations")
        sizes = sorted({int(m.image_size) for m in members})
        if len(sizes) != 1:
            raise ValueError(f"ensemble members must share one input size, got {sizes} px")
        configs = [getattr(m, "config", None) for m in members]
        if any(c is not None and (c.geometry.policy != "resize" or c.geometry.tile or c.geometry.white_level is not None)
               for c in configs):
            raise ValueError("ensembles support members with the default geometry (resize, no tiling, the 16-bit "
                             "scale) only")
        norms = [_as_normalisation(n) for n in normalisations]
        for i, n in enumerate(norms):
            if not (math.isfinite(n.pixel_mean) and math.isfinite(n.pixel_std) and n.pixel_std > 0):
                raise ValueError(f"member {i}: unusable map statistics (pixel_mean={n.pixel_mean}, pixel_std={n.pixel_std})")
        self.members = nn.ModuleList(members)
        self.names = list(names) if names is not None else [f"member{i}" for i in range(len(members))]
        self.register_buffer("pixel_mean", torch.tensor([n.pixel_mean for n in norms], dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor([n.pixel_std for n in norms], dtype=torch.float32), persistent=False)
        self.image_size = sizes[0]
        modes = {m.mode for m in members}
        self.mode = modes.pop() if len(modes) == 1 else MEMBER_MODE
        self.refiner = None  # members apply their own refiners (their default); no ensemble-level refiner
        # one image window for the ensemble's own score (forward) and its geometry (plain resize, as the
        # members'): pni_ray.predict.detector_geometry and an ensemble manifest's Geometry both read the default
        self.image_window = ScoringConfig.image_window
        self.threshold = float(threshold)

    def _member_mode(self, mode: str | None) -> str | None:
        return None if mode in (None, MEMBER_MODE) else mode

    @torch.no_grad()
    def member_maps(self, images: torch.Tensor, mode: str | None = None, refine: bool | None = None) -> torch.Tensor:
        """(K, B, H, W): every member's map, normalised with that member's statistics."""
        mode = self._member_mode(mode)
        maps = []
        for k, member in enumerate(self.members):
            m, _ = member(images, mode, refine)
            maps.append((m.float() - self.pixel_mean[k]) / self.pixel_std[k])
        return torch.stack(maps)

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, mode: str | None = None, refine: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.member_maps(images, mode, refine).mean(0)
        return maps, image_scores(maps, self.image_window * FEATURE_STRIDE)


# ----------------------------------------------------------------------------------- threshold


def estimated_normalisation(normalisations: Sequence[Normalisation | dict[str, Any]]) -> Normalisation:
    """Ensemble statistics from the members' held-out statistics, in normalised map units.

    threshold = mean of the members' thresholds, each as (threshold - pixel_mean) / pixel_std
    (see the module docstring for why an image above it is flagged by some member).
    image_mean / image_std are the analogous averages (an upper estimate of the ensemble's
    held-out image-score mean and spread); the ensemble map is already normalised, so its
    pixel_mean / pixel_std are 0 / 1.
    """
    norms = [_as_normalisation(n) for n in normalisations]
    z = lambda value, n: (value - n.pixel_mean) / n.pixel_std  # noqa: E731
    thresholds = [z(n.threshold, n) for n in norms]
    return Normalisation(
        image_mean=float(sum(z(n.image_mean, n) for n in norms) / len(norms)),
        image_std=float(sum(n.image_std / n.pixel_std for n in norms) / len(norms)),
        pixel_mean=0.0,
        pixel_std=1.0,
        threshold=float(sum(thresholds) / len(thresholds)),
        extras={f"member{k}_threshold_normalised": float(t) for k, t in enumerate(thresholds)},
    )
