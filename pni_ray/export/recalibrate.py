"""An INT8 export's threshold, taken from its own graphs' scores of the bundle's held-out images.

The bundle's threshold (mean + k std of its held-out good images' scores) bounds FP32 scores. INT8 graphs move
every image score (bottle, INT8 backbone and MLP: the held-out mean +0.35 on a threshold of 38.7, single images by
up to 1.3), so the FP32 threshold would decide INT8 scores on another scale. The export therefore scores the very
images the bundle was calibrated on through its INT8 graphs and applies the bundle's rule to those scores. The maps'
pixel statistics stay the bundle's: a refiner takes maps in those units. When the held-out images cannot be found,
or are not the ones the bundle held out, the export gets no threshold (is_anomalous null), as an export in another
mode does, and a warning says what to pass.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pni_ray.bundle_manifest import calibration_images
from pni_ray.export import tables
from pni_ray.models.pni import image_statistics
from pni_ray.predict import content_maps

log = logging.getLogger(__name__)

# the torch scores of the images found must give the bundle's recorded held-out mean and std back to within this
# share of the std (plus 1e-4 of the mean, for a single held-out image's floored std): thread counts move them by
# ~1e-6 of it, a GPU's TF32 backbone by ~3e-4, features 0.3% off by 3e-3; other images (memory-bank ones, another
# category's under the same names) by whole stds
SAME_IMAGES_TOLERANCE = 0.05


def recalibrate_int8(export_dir: Path, manifest: dict[str, Any], bundle: Path, bmanifest: dict[str, Any],
                     detector: Any, geometry: Any, folder: Path, threads: int) -> dict[str, Any]:
    """Give the staged INT8 export at `export_dir` (its manifest written) a threshold of its own, or none; returns
    its new manifest. The record under int8.threshold says which, and from what."""
    cfg = detector.config
    paths, why_not = held_out_images(bundle, bmanifest, Path(folder), detector, geometry, cfg.batch_size)
    fp32 = float(bmanifest["threshold"])
    if why_not:
        log.warning("%s: INT8 graphs move image scores, so the bundle's threshold (%.4f, from FP32 scores) does not "
                    "hold for them, and %s: the export has no threshold (is_anomalous null; scores and maps as "
                    "usual). For one, export with --calibration the category's train/good folder.", bundle, fp32, why_not)
        return rewrite_normalisation(export_dir, manifest, None,
                                     {"recalibrated": False, "reason": why_not, "fp32_threshold": fp32})
    normalisation = int8_normalisation(export_dir, paths, manifest, cfg.scoring.threshold_sigmas, threads)
    log.info("INT8 threshold %.4f (the bundle's FP32 threshold %.4f): mean + %g std of the INT8 graphs' scores of "
             "the %d held-out images", normalisation["threshold"], fp32, cfg.scoring.threshold_sigmas, len(paths))
    return rewrite_normalisation(export_dir, manifest, normalisation,
                                 {"recalibrated": True, "held_out_images": len(paths), "fp32_threshold": fp32,
                                  "runtime": "onnxruntime, CPU"})


def held_out_images(bundle: Path, manifest: dict[str, Any], folder: Path, detector: Any, geometry: Any,
                    batch_size: int) -> tuple[list[Path], str | None]:
    """The bundle's held-out images in `folder`, checked to be those it held out: (paths, None), or ([], why not)."""
    names = calibration_images(manifest)
    norm = manifest["normalisation"]
    if not names:  # a bundle written before manifests named them
        return [], f"{bundle} does not record which images it held out"
    paths = [folder / name for name in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        return [], (f"{len(missing)} of the {len(names)} held-out images it was calibrated on are not in "
                    f"--calibration {folder} (e.g. {', '.join(missing[:3])})")
    _, scores = content_maps(detector, geometry, paths, batch_size)
    found = _statistics(scores)
    tolerance = SAME_IMAGES_TOLERANCE * float(norm["image_std"]) + 1e-4 * abs(float(norm["image_mean"]))
    off = {k: found[k] - float(norm[k]) for k in ("image_mean", "image_std")}
    if any(abs(v) > tolerance for v in off.values()):
        return [], (f"the images named like its held-out ones in --calibration {folder} are not those it held out: "
                    f"their mean score is {found['image_mean']:.4f} against the bundle's {float(norm['image_mean']):.4f}")
    return paths, None


def int8_normalisation(export_dir: Path, paths: Sequence[Path], manifest: dict[str, Any],
                       threshold_sigmas: float, threads: int) -> dict[str, Any]:
    """The export's normalisation with image statistics and threshold from its INT8 graphs' scores of `paths`."""
    from pni_ray.export.runtime import load_exported

    model = load_exported(export_dir, threads=threads, verify=False)  # its files were hashed a moment ago
    scores = np.concatenate([model.predict_images([model.geometry.load(p) for p in paths[i : i + model.max_batch]])[1]
                             for i in range(0, len(paths), model.max_batch)])  # a batch of images in memory at a time
    found = _statistics(scores)
    fp32 = manifest["normalisation"]
    extras = {**(fp32.get("extras") or {}), "holdout_max_image_score": float(np.max(scores))}
    return {**fp32, **found, "threshold": found["image_mean"] + threshold_sigmas * found["image_std"], "extras": extras}


def rewrite_normalisation(export_dir: Path, manifest: dict[str, Any], normalisation: dict[str, Any] | None,
                          record: dict[str, Any]) -> dict[str, Any]:
    """Write `normalisation` (None: the export has no threshold) into the export's table and manifest, with
    `record` (how its threshold came about) under int8.threshold; returns the new manifest."""
    if normalisation is None:
        normalisation = {**manifest["normalisation"], "threshold": None}
    name = manifest["tables"]["normalisation"]
    tables.write_arrow(export_dir / name, tables.normalisation_table(normalisation))
    manifest = {**manifest, "normalisation": normalisation, "threshold": normalisation["threshold"],
                "int8": {**manifest["int8"], "threshold": record},
                "files": {**manifest["files"], name: tables.file_record(export_dir / name)}}  # the one file rewritten
    tables.write_json(export_dir / tables.MANIFEST, manifest)
    return manifest


def _statistics(scores: np.ndarray) -> dict[str, float]:
    mean, std = image_statistics(torch.from_numpy(np.asarray(scores, np.float64)))
    return {"image_mean": mean, "image_std": std}
