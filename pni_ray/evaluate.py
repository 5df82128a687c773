"""Evaluation on an MVTec-layout test split: metrics at the original image resolution, per mode.

Features (and p(c|N)) are computed once per image and shared by every mode of an ablation;
each mode's images/s counts the shared work it needs plus its own scoring, so the figures
are what a deployment of that mode would see.
"""

from __future__ import annotations

import dataclasses
import math
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from pni_ray import metrics
from pni_ray.data.mvtec import Category
from pni_ray.geometry import STRIDE, Geometry, Prepared
from pni_ray.predict import NEEDS_MLP, chunks, detector_geometry, features, score_prepared

ABLATION_MODES = ("patchcore", "neighbourhood", "position", "pni")

log = logging.getLogger(__name__)


@dataclass
class ModeResult:
    maps: list[np.ndarray]  # one per test image, at the image's own size
    scores: np.ndarray
    seconds: float


ScoreBatch = Callable[[list[Prepared], float], tuple[dict[str, list[np.ndarray]], dict[str, list[float]], dict[str, float]]]


def _score_paths(geometry: Geometry, paths: list[Path], names: list[str], batch_size: int, score_batch: ScoreBatch,
                 progress: bool) -> dict[str, ModeResult]:
    """Load, prepare and check each batch of images, score it (`score_batch(prepared, seconds spent preparing)`
    -> canvas maps, image scores and seconds per name), restore the maps to each image's own size."""
    maps: dict[str, list[np.ndarray]] = {n: [] for n in names}
    scores: dict[str, list[float]] = {n: [] for n in names}
    seconds = {n: 0.0 for n in names}
    geometry.check_fits(paths)
    batches = list(chunks(len(paths), geometry, batch_size))
    for sl in tqdm(batches, desc="scoring", unit="batch", disable=not progress, leave=False):
        originals = [geometry.load(p) for p in paths[sl]]
        t0 = time.perf_counter()
        prepared = [geometry.prepare(o) for o in originals]
        for p, path in zip(prepared, paths[sl]):
            geometry.check(p, name=str(path))
        batch_maps, batch_scores, batch_seconds = score_batch(prepared, time.perf_counter() - t0)
        for n in names:
            seconds[n] += batch_seconds[n]
            scores[n].extend(batch_scores[n])
            maps[n].extend(geometry.restore(m, p) for m, p in zip(batch_maps[n], prepared))
    return {n: ModeResult(maps[n], np.asarray(scores[n], dtype=np.float32), seconds[n]) for n in names}


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
    return _score_paths(geometry, paths, names, batch_size,
                        lambda prepared, t_prep: score_prepared(detector, geometry, prepared, names, batch_size, t_prep),
                        progress)


def run_model(model: Any, paths: list[Path], name: str, batch_size: int = 8, progress: bool = True) -> dict[str, ModeResult]:
    """Maps and image scores of a scoring model (anything with `geometry` and `canvas_maps(prepared)`, such as
    an export directory loaded by pni_ray.orchestration.model_loader): the images prepared, scored and restored
    as `pni-ray score` does, so the metrics are the deployment's."""

    def score_batch(prepared: list[Prepared], t_prep: float):
        t0 = time.perf_counter()
        maps, scores = model.canvas_maps(prepared)
        return {name: list(maps)}, {name: [float(v) for v in scores]}, {name: t_prep + time.perf_counter() - t0}

    return _score_paths(model.geometry, paths, [name], batch_size, score_batch, progress)


def category_metrics(category: Category, results: dict[str, ModeResult],
                     decision: tuple[str, float] | None = None) -> dict[str, dict]:
    """Per-name metrics dict: image_auroc, pixel_auroc, aupro, f1_max, images_per_s, n_test_images; for the
    name of `decision` (the deployed mode, its threshold) also `at_threshold`."""
    labels = np.array([s.label for s in category.test])
    masks = None if category.image_only else [  # image-only: the pixel metrics are n/a, never "no defect pixel"
        category.mask(s, m.shape) for s, m in zip(category.test, next(iter(results.values())).maps)]
    out: dict[str, dict] = {}
    for name, res in results.items():
        values = metrics.compute_all(labels, res.scores, masks, None if masks is None else res.maps)
        out[name] = {
            "image_auroc": values["image_auroc"],
            "pixel_auroc": values["pixel_auroc"],
            "aupro": values["aupro"],
            "f1_max": values["f1_max"],
            "images_per_s": len(category.test) / res.seconds if res.seconds > 0 else float("nan"),
            "n_test_images": len(category.test),
        }
        if decision is not None and decision[0] == name:
            out[name]["at_threshold"] = at_threshold(labels, res.scores, decision[1])
    return out


def at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any] | None:
    """What the model's own decision (`score`'s is_anomalous: image score > threshold) does on labelled images,
    where F1-max picks the best threshold after the fact; None for a model without a threshold."""
    if not math.isfinite(threshold):
        return None
    # in float64, as `score` compares (a float32 comparison can decide a score within float32 rounding otherwise)
    labels, flagged = np.asarray(labels, bool), np.asarray(scores, np.float64) > float(threshold)
    return {"threshold": float(threshold), "good_flagged": int((flagged & ~labels).sum()), "n_good": int((~labels).sum()),
            "defects_missed": int((~flagged & labels).sum()), "n_defect": int(labels.sum())}


def threshold_line(name: str, row: dict[str, Any]) -> str | None:
    """One line on how the deployed threshold decides the test images (evaluate's output)."""
    t = row.get("at_threshold")
    if not t:
        return None
    return (f"at the model's threshold {t['threshold']:.4g} ({name}, as `score` decides is_anomalous): "
            f"{t['good_flagged']} of {t['n_good']} good images flagged, {t['defects_missed']} of {t['n_defect']} "
            "defect images missed")


def _test_paths(category: Category) -> list[Path]:
    if not category.test:
        raise ValueError(f"{category.root}: no test images to evaluate on (test/<type>/ is empty)")
    if not category.has_test:
        has = "defect" if category.test[0].label else "good"
        log.warning("%s: the test split has %s images only (%d): the image AUROC and F1%s are undefined (n/a); "
                    "put good images in test/good/ and defect images in test/<type>/", category.root, has,
                    len(category.test), " and the pixel metrics" if has == "good" else "")
    return [s.path for s in category.test]


def evaluate_category(
    detector: Any,
    category: Category,
    modes: tuple[str, ...] | None = None,
    refine_modes: tuple[str, ...] = (),
    batch_size: int = 8,
    progress: bool = True,
    decision: tuple[str, float] | None = None,
) -> dict[str, dict]:
    """Per-mode metrics dict (`category_metrics`)."""
    paths = _test_paths(category)
    modes = modes or (detector.mode,)
    return category_metrics(category, run_modes(detector, paths, modes, batch_size, refine_modes, progress), decision)


def evaluate_model(model: Any, category: Category, name: str, batch_size: int = 8, progress: bool = True) -> dict[str, dict]:
    """`{name: metrics}` of a scoring model (an export directory as `pni-ray score` runs it) on the test split,
    with its own threshold's decisions."""
    return category_metrics(category, run_model(model, _test_paths(category), name, batch_size, progress),
                            (name, float(model.threshold)))


def defect_cells(geometry: Geometry, mask: np.ndarray) -> np.ndarray:
    """(gh, gw) bool: feature cells at least half covered by the defect mask, prepared like the image
    (padding counts as no defect, cells of a partial last row / column as in the feature grid)."""
    rgb = np.repeat((np.asarray(mask, bool) * 255).astype(np.uint8)[..., None], 3, axis=2)
    unpadded = Geometry(dataclasses.replace(geometry.cfg, pad_value=0), geometry.image_size, geometry.grid,
                        geometry.image_window)
    prepared = unpadded.prepare(rgb)
    gh, gw = prepared.grid
    canvas = np.zeros((gh * STRIDE, gw * STRIDE), np.float32)
    hc, wc = prepared.canvas_hw
    canvas[:hc, :wc] = prepared.canvas[..., 0] / np.float32(255.0)
    cover = canvas.reshape(gh, STRIDE, gw, STRIDE).mean((1, 3))
    return cover >= 0.5


@torch.no_grad()
def prior_diagnostics(
    detector: Any, category: Category, modes: tuple[str, ...], batch_size: int = 8, progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Whether a prior bites, per mode: the mean share of C_emb allowed per patch, and on content
    cells of good test images ("normal") and on defect cells ("defect") the share of patches whose
    masked minimum differs from the plain nearest neighbour and the mean score change.

    Test labels are read here only to report; nothing chosen at training time depends on them.
    """
    if getattr(detector, "scorer", None) is None:
        return {}
    geometry = detector_geometry(detector)
    eps = 1e-6
    acc = {m: {"allowed": [], "chg_n": [], "chg_d": [], "d_n": [], "d_d": []} for m in modes}
    samples = category.test
    for sl in tqdm(list(chunks(len(samples), geometry, batch_size)), desc="diagnostics", unit="batch",
                   disable=not progress, leave=False):
        batch = samples[sl]
        prepared = [geometry.prepare(geometry.load(s.path)) for s in batch]
        feats = features(detector.extractor, geometry, prepared, tile_batch=batch_size)
        p_dist = detector.mlp.probabilities(feats) if detector.mlp is not None and any(m in NEEDS_MLP for m in modes) else None
        valid = torch.from_numpy(np.stack([p.valid_grid() for p in prepared]))
        normal = valid & torch.tensor([s.label == 0 for s in batch]).view(-1, 1, 1)
        defect = valid & torch.from_numpy(np.stack([
            defect_cells(geometry, category.mask(s, p.original_hw)) if s.label else np.zeros(p.grid, bool)
            for s, p in zip(batch, prepared)
        ]))
        for mode in modes:
            if mode in NEEDS_MLP and p_dist is None:
                continue
            d = detector.scorer.diagnose(feats, p_dist, mode)
            change = (d["score"] - d["plain"]).cpu()
            a = acc[mode]
            a["allowed"].append(d["allowed_share"].cpu()[valid])
            a["chg_n"].append((change > eps)[normal].float())
            a["chg_d"].append((change > eps)[defect].float())
            a["d_n"].append(change[normal])
            a["d_d"].append(change[defect])
    out: dict[str, dict[str, float]] = {}
    for mode, a in acc.items():
        if not a["allowed"]:
            continue
        mean = lambda parts: float(torch.cat(parts).double().mean()) if sum(len(p) for p in parts) else float("nan")  # noqa: E731
        out[mode] = {
            "allowed_share": mean(a["allowed"]),
            "changed_normal": mean(a["chg_n"]),
            "changed_defect": mean(a["chg_d"]),
            "score_change_normal": mean(a["d_n"]),
            "score_change_defect": mean(a["d_d"]),
        }
    return out


DIAGNOSTIC_KEYS = ("allowed_share", "changed_normal", "changed_defect", "score_change_normal",
                   "score_change_defect", "mlp_val_top1", "mlp_val_top5")


def attach_diagnostics(results: dict[str, dict], diagnostics: dict[str, dict], manifest: dict[str, Any]) -> None:
    """Put each mode's diagnostics (and, from training, the MLP's held-out top-1 / top-5 and p(c|N)'s
    cut) under results[mode]["diagnostics"] and, flat, beside the metrics for the table."""
    mlp = ((manifest.get("training") or {}).get("mlp") or {}).get("best") or {}
    for name, row in results.items():
        mode = name.removesuffix("+refine")
        diag = dict(diagnostics.get(mode, {}))
        if mode in NEEDS_MLP and mlp:
            diag["mlp_val_top1"] = mlp.get("val_top1")
            diag["mlp_val_top5"] = mlp.get("val_top5")
        if mode in NEEDS_MLP and "members" not in manifest:  # an ensemble's members each have their own
            diag["neighbourhood_cut"] = float(manifest.get("neighbourhood_cut", 1.0))  # p(c|N) > cut x tau
        if diag and not name.endswith("+refine"):
            row["diagnostics"] = diag
            row.update({k: v for k, v in diag.items() if k in DIAGNOSTIC_KEYS})
