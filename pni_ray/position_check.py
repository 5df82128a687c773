"""Does the position prior pay on this category? Measured at training on synthetic defects drawn on held-out good
images, so that a prior which only costs is left out of the scoring mode.

Why: p(c|x)'s spread and count rules (`pni_ray.models.position_prior`) choose how sharp the prior may be from what it
costs normal patches; they cannot see what it buys. Where parts lie anywhere and at any angle, even the broadest
prior the ladder has costs: on a copy of transistor whose parts are shrunk, moved and turned (`python
benchmarks/bench_ablation.py --categories transistor --shrink 0.5 --shift 0.25 --rotate 180`) pni scored 0.046
image AUROC, 0.004 pixel AUROC and 0.015 AUPRO under PatchCore mode, where the neighbourhood alone cost nothing.
Two defect kinds, each drawn `per_image` times on every held-out image, put a number on what the prior buys there:
a part moved unchanged (`misplace`: content that is normal, only elsewhere, which only position can find) and a
CutPaste (a jittered part elsewhere). On aligned bottle and transistor position mode scores them higher than
PatchCore mode on pixel AUROC and AUPRO at every draw measured; on that moved copy, lower on both (docs/results.md,
"Parts that lie anywhere"). Image AUROC is recorded, not used: with ~20 held-out images it moves by one pair.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pni_ray.config import TrainConfig
from pni_ray.data.defects import cutpaste, misplace
from pni_ray.geometry import Geometry
from pni_ray.metrics import compute_all
from pni_ray.predict import detector_geometry, predict_modes

log = logging.getLogger(__name__)

# the scoring mode without p(c|x): what a bundle deploys when the prior does not pay
WITHOUT_POSITION = {"pni": "neighbourhood", "position": "patchcore"}
DEFECT_KINDS = (misplace, cutpaste)
COMPARED = ("patchcore", "position")
DECIDING = ("pixel_auroc", "aupro")
_SALT = 0x706F73  # the defects' generator: apart from every other use of the training seed
# fewer held-out images than this and the check is not run (the prior kept): on 8 held-out images of a tiny
# pillbox (8 memory-bank images, 128 px) it dropped the prior that category's logical defects need
MIN_IMAGES = 10


@dataclass
class PositionCheck:
    """Position mode against PatchCore mode on `defects` synthetic defects and the held-out images they were drawn on."""

    defects: int
    metrics: dict[str, dict[str, float | None]]  # mode -> image_auroc, pixel_auroc, aupro
    kept: bool
    requested_mode: str = "pni"  # the configured scoring mode (train-all compares configs as they were asked for)

    def gains(self) -> dict[str, float | None]:
        """position - patchcore per metric (None where a metric is undefined)."""
        pos, base = self.metrics["position"], self.metrics["patchcore"]
        return {k: None if pos[k] is None or base[k] is None else pos[k] - base[k] for k in pos}

    def record(self) -> dict[str, Any]:
        """What the manifest keeps (training.position_check)."""
        return {"defects": self.defects, "kept": self.kept, "requested_mode": self.requested_mode,
                **{mode: {k: None if v is None else round(v, 6) for k, v in m.items()} for mode, m in self.metrics.items()}}


def synthetic_defects(images: Sequence[np.ndarray], per_image: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, mask) pairs: each defect kind drawn `per_image` times on every image, from one seeded generator."""
    rng = np.random.default_rng([seed, _SALT])
    return [kind(image, rng) for image in images for _ in range(per_image) for kind in DEFECT_KINDS]


def position_pays(metrics: dict[str, dict[str, float | None]]) -> bool:
    """False only when position mode is below PatchCore mode on every deciding metric (pixel AUROC and AUPRO)."""
    gains = [None if metrics["position"][k] is None or metrics["patchcore"][k] is None
             else metrics["position"][k] - metrics["patchcore"][k] for k in DECIDING]
    return not all(g is not None and g < 0 for g in gains)


def _mask_at(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """A defect mask at a map's resolution: the cells at least half covered."""
    if mask.shape == hw:
        return mask
    return (F.interpolate(torch.from_numpy(mask[None, None].astype(np.float32)), size=hw, mode="area")[0, 0] >= 0.5).numpy()


@torch.no_grad()
def check_position(detector: Any, images: Sequence[np.ndarray], per_image: int, seed: int,
                   batch_size: int = 8) -> PositionCheck:
    """Score the held-out `images` and their synthetic defects in PatchCore and position mode (maps over the image
    content at the model's resolution) and compare."""
    geometry = detector_geometry(detector)
    defects = synthetic_defects(images, per_image, seed)
    good = predict_modes(detector, images, COMPARED, batch_size, geometry, content=True)
    bad = predict_modes(detector, [image for image, _ in defects], COMPARED, batch_size, geometry, content=True)
    labels = np.r_[np.zeros(len(images)), np.ones(len(defects))]
    metrics: dict[str, dict[str, float | None]] = {}
    for mode in COMPARED:
        maps = list(good[mode][0]) + list(bad[mode][0])
        masks = [np.zeros(m.shape, bool) for m in good[mode][0]] + [
            _mask_at(mask, m.shape) for (_, mask), m in zip(defects, bad[mode][0])]
        found = compute_all(labels, np.r_[good[mode][1], bad[mode][1]], masks, maps)
        metrics[mode] = {k: found[k] for k in ("image_auroc", "pixel_auroc", "aupro")}
    return PositionCheck(len(defects), metrics, position_pays(metrics))


def checked_scoring_mode(detector: Any, geometry: Geometry, holdout_paths: Sequence[Path], cfg: TrainConfig,
                         category: str) -> tuple[str, dict[str, Any] | None]:
    """The scoring mode a PNI bundle deploys (cfg.scoring.mode, or that mode without p(c|x) where the check finds the
    prior costs) and the check's record for the manifest (None where the mode uses no position prior or the config
    turns the check off)."""
    mode = cfg.scoring.mode
    if mode not in WITHOUT_POSITION or not cfg.position.check_defects:
        return mode, None
    if len(holdout_paths) < MIN_IMAGES:
        log.info("%s: %d held-out images, fewer than the %d the position check needs: the position prior is kept "
                 "unchecked", category, len(holdout_paths), MIN_IMAGES)
        return mode, {"skipped": f"{len(holdout_paths)} held-out images, fewer than {MIN_IMAGES}"}
    check = check_position(detector, [geometry.load(p) for p in holdout_paths], cfg.position.check_defects, cfg.seed,
                           cfg.batch_size)
    check.requested_mode = mode
    gains = ", ".join(f"{k} {v:+.4f}" for k, v in check.gains().items() if v is not None)
    if check.kept:
        log.info("%s: the position prior pays on %d synthetic defects of held-out images (position - patchcore: %s): "
                 "scoring mode %s", category, check.defects, gains, mode)
        return mode, check.record()
    log.warning("%s: the position prior costs on %d synthetic defects of held-out images (position - patchcore: %s): "
                "scoring mode %s instead of %s (parts that move and turn?); `pni-ray evaluate --ablation` compares "
                "every mode", category, check.defects, gains, WITHOUT_POSITION[mode], mode)
    return WITHOUT_POSITION[mode], check.record()
