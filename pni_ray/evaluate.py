"""Evaluation on an MVTec-layout test split: metrics at the original image resolution, per mode.

Features (and p(c|N)) are computed once per image and shared by every mode of an ablation;
each mode's images/s counts the shared work it needs plus its own scoring, so the figures
are what a deployment of that mode would see.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pni_ray import metrics
from pni_ray.data.mvtec import Category
from pni_ray.models.predict import chunks, detector_geometry, score_prepared

ABLATION_MODES = ("patchcore", "neighbourhood", "position", "pni")


@dataclass
class ModeResult:
    maps: list[np.ndarray]  # one per test image, at the image's own size
    scores: np.ndarray
    seconds: float


@torch.no_grad()
def run_modes(
    detector: Any,
    paths: list[Path],
    modes: tuple[str, ...],
    batch_size: int = 8,
    refine_modes: tuple[str, ...] = (),
    progress: bool = True,
) -> dict[str, ModeResult]:
    """Maps and image scores of every mode; `refine_modes` are modes also run through the refiner.

    Images are prepared with the detector's geometry, features (and p(c|N)) are shared by the modes,
    maps are restored to each image's own size by `pni_ray.geometry.resize_map` (the resize the
    scoring output uses) and image scores are maxima over the image content.
    """
    geometry = detector_geometry(detector)
    names = list(modes) + [f"{m}+refine" for m in refine_modes]
    maps: dict[str, list[np.ndarray]] = {n: [] for n in names}
    scores: dict[str, list[float]] = {n: [] for n in names}
    seconds = {n: 0.0 for n in names}
    batches = list(chunks(len(paths), geometry, batch_size))
    for sl in tqdm(batches, desc="scoring", unit="batch", disable=not progress, leave=False):
        originals = [geometry.load(p) for p in paths[sl]]
        t0 = time.perf_counter()
        prepared = [geometry.prepare(o) for o in originals]
        for p, path in zip(prepared, paths[sl]):
            geometry.check(p, name=str(path))
        batch_maps, batch_scores, batch_seconds = score_prepared(
            detector, geometry, prepared, names, batch_size, time.perf_counter() - t0
        )
        for n in names:
            seconds[n] += batch_seconds[n]
            scores[n].extend(batch_scores[n])
            maps[n].extend(geometry.restore(m, p) for m, p in zip(batch_maps[n], prepared))
    return {n: ModeResult(maps[n], np.asarray(scores[n], dtype=np.float32), seconds[n]) for n in names}


def evaluate_category(
    detector: Any,
    category: Category,
    modes: tuple[str, ...] | None = None,
    refine_modes: tuple[str, ...] = (),
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, dict]:
    """Per-mode metrics dict: image_auroc, pixel_auroc, aupro, f1_max, images_per_s, n_test_images."""
    if not category.test:
        raise ValueError(f"{category.root}: no test images to evaluate on (test/<type>/ is empty)")
    modes = modes or (detector.mode,)
    paths = [s.path for s in category.test]
    labels = np.array([s.label for s in category.test])
    results = run_modes(detector, paths, modes, batch_size, refine_modes, progress)
    masks = [category.mask(s, m.shape) for s, m in zip(category.test, next(iter(results.values())).maps)]
    out: dict[str, dict] = {}
    for name, res in results.items():
        values = metrics.compute_all(labels, res.scores, masks, res.maps)
        out[name] = {
            "image_auroc": values["image_auroc"],
            "pixel_auroc": values["pixel_auroc"],
            "aupro": values["aupro"],
            "f1_max": values["f1_max"],
            "images_per_s": len(paths) / res.seconds if res.seconds > 0 else float("nan"),
            "n_test_images": len(paths),
        }
    return out
