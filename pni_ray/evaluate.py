"""Evaluation on an MVTec-layout test split: metrics at the original image resolution, per mode.

Features (and p(c|N)) are computed once per image and shared by every mode of an ablation;
each mode's images/s counts the shared work it needs plus its own scoring, so the figures
are what a deployment of that mode would see.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pni_ray import metrics
from pni_ray.data.images import DEFAULT_MAX_PIXELS, load_rgb
from pni_ray.data.mvtec import Category
from pni_ray.data.transforms import resize_rgb, to_tensor
from pni_ray.models.anomaly_map import image_scores
from pni_ray.models.pni import PNIDetector

ABLATION_MODES = ("patchcore", "neighbourhood", "position", "pni")
NEEDS_MLP = ("neighbourhood", "pni", "pni_split")


@dataclass
class ModeResult:
    maps: list[np.ndarray]  # one per test image, at the image's own size
    scores: np.ndarray
    seconds: float


def upsample_to(map_: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
    if tuple(map_.shape[-2:]) == tuple(hw):
        return map_.numpy()
    return F.interpolate(map_[None, None], size=hw, mode="bilinear", align_corners=False)[0, 0].numpy()


@torch.no_grad()
def run_modes(
    detector: PNIDetector,
    paths: list[Path],
    modes: tuple[str, ...],
    batch_size: int = 8,
    refine_modes: tuple[str, ...] = (),
    progress: bool = True,
) -> dict[str, ModeResult]:
    """Maps and image scores of every mode; `refine_modes` are modes also run through the refiner."""
    geometry = getattr(detector, "geometry", None)  # the bundle's image geometry (pni_ray.data.geometry)
    if geometry is not None and not geometry.is_default:
        from pni_ray.data.geometry import run_modes_geometry

        return run_modes_geometry(detector, paths, modes, batch_size, refine_modes, progress)
    max_pixels = geometry.max_pixels if geometry is not None else DEFAULT_MAX_PIXELS
    names = list(modes) + [f"{m}+refine" for m in refine_modes]
    maps: dict[str, list[np.ndarray]] = {n: [] for n in names}
    scores: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    seconds = {n: 0.0 for n in names}
    for i in tqdm(range(0, len(paths), batch_size), desc="scoring", unit="batch", disable=not progress, leave=False):
        originals = [load_rgb(p, max_pixels) for p in paths[i : i + batch_size]]
        t0 = time.perf_counter()
        images = to_tensor([resize_rgb(o, detector.image_size) for o in originals])
        if getattr(detector, "extractor", None) is None:  # an ensemble: each mode runs the whole model
            t_prep = time.perf_counter() - t0
            for name in names:
                t2 = time.perf_counter()
                batch_maps, batch_scores = detector(images, name.removesuffix("+refine"), name.endswith("+refine"))
                seconds[name] += t_prep + time.perf_counter() - t2
                scores[name].append(batch_scores)
                maps[name].extend(upsample_to(m, o.shape[:2]) for m, o in zip(batch_maps, originals))
            continue
        features = detector.extractor(images)
        t_feat = time.perf_counter() - t0
        p_dist, t_mlp = None, 0.0
        if detector.mlp is not None and any(m in NEEDS_MLP for m in modes + refine_modes):
            t1 = time.perf_counter()
            p_dist = detector.mlp.probabilities(features)
            t_mlp = time.perf_counter() - t1
        for name in names:
            mode = name.removesuffix("+refine")
            t2 = time.perf_counter()
            batch_maps = detector.mapper(detector.scorer(features, p_dist, mode), images.shape[-2:])
            if name.endswith("+refine"):
                batch_maps = detector.refiner(images, batch_maps)
            batch_scores = image_scores(batch_maps)
            seconds[name] += t_feat + (t_mlp if mode in NEEDS_MLP else 0.0) + time.perf_counter() - t2
            scores[name].append(batch_scores)
            maps[name].extend(upsample_to(m, o.shape[:2]) for m, o in zip(batch_maps, originals))
    return {n: ModeResult(maps[n], torch.cat(scores[n]).numpy(), seconds[n]) for n in names}


def evaluate_category(
    detector: PNIDetector,
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
