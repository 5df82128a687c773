"""Ensembles on disk: several bundles of one category as one model directory (PNI paper, Sec. 4).

Format (`pni-ray ensemble BUNDLE... --out DIR`): a self-contained directory

    DIR/manifest.json        {"format": "pni-ray-ensemble", "members": [{"path", "model_id", ...}], ...}
    DIR/members/00-<backbone>/  a verbatim copy of each member bundle

written atomically (temp sibling + rename). Loading checks that each member's manifest still
hashes to the recorded model_id and that every member file matches its checksum, so a
tampered, swapped or missing member is refused with the file named.

The detector itself (pure torch) is `pni_ray.models.ensemble.EnsembleDetector`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from pni_ray.bundle import BundleError, atomic_write_json, load_bundle_and_id, model_id, verify_bundle, versions
from pni_ray.bundle_manifest import ENSEMBLE_FORMAT as FORMAT
from pni_ray.bundle_manifest import ENSEMBLE_FORMAT_VERSION as FORMAT_VERSION
from pni_ray.bundle_manifest import (MANIFEST, MEMBERS_SCORED, calibration_images, check_calibrated_as_scored,
                                     check_member_found, check_member_id, member_path, scoring_mode)
from pni_ray.bundle_manifest import read_ensemble_manifest, verify_ensemble  # noqa: F401 (re-exported)
from pni_ray.config import ScoringConfig, TrainConfig, float_from_json
from pni_ray.fileio import copy_tree_durable, inside, staged_dir
from pni_ray.models.ensemble import MEMBER_MODE, EnsembleDetector, estimated_normalisation
from pni_ray.models.pni import build_detector

log = logging.getLogger(__name__)
MEMBERS_DIR = "members"


def is_ensemble(path: Path | str) -> bool:
    """True when `path` holds an ensemble manifest (cheap: reads only manifest.json)."""
    file = Path(path) / MANIFEST
    try:
        return json.loads(file.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_ensemble(path: Path | str) -> tuple[EnsembleDetector, dict[str, Any]]:
    """Verified ensemble detector and its manifest (load_bundle checks each member's files)."""
    path = Path(path)
    manifest = read_ensemble_manifest(path)
    for entry in manifest["members"]:
        check_member_id(path, entry)
    detector, members = load_ensemble_from_entries(path, manifest["members"])
    check_calibrated_as_scored(path, manifest, members)
    detector.threshold = float_from_json("threshold", manifest["threshold"])
    return detector, manifest


def _holdout_paths(data_root: Path, category: str, manifests: list[dict[str, Any]]) -> list[Path]:
    """train/good images that every member held out of its memory bank (and, for refined members,
    of the refiner's synthetic defects: their manifests list only the images left for calibration).
    Read before any member is copied: a DATA_ROOT without the category is said as `train` says it."""
    from pni_ray.data.mvtec import missing_category_message
    from pni_ray.training import MIN_HOLDOUT_IMAGES

    no_category = missing_category_message(data_root, category)
    if no_category:
        raise ValueError(f"--calibrate: {no_category}")
    shared = set(calibration_images(manifests[0]))
    for m in manifests[1:]:
        shared &= set(calibration_images(m))
    if len(shared) < 2:
        raise ValueError(
            f"members share {len(shared)} held-out training images; calibration needs at least 2 "
            "(train the members with the same --seed, or build the ensemble without --calibrate)"
        )
    folder = Path(data_root) / category / "train" / "good"
    paths = [folder / name for name in sorted(shared)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"{folder}: held-out images not found: {missing[:5]}")
    if len(paths) < MIN_HOLDOUT_IMAGES:  # train's own warning: a threshold from so few scores is unreliable
        log.warning("%s: only %d train/good images, those every member held out, calibrate the ensemble's threshold "
                    "(fewer than %d): it will be unreliable; build without --calibrate, or from members that hold "
                    "out more images alike (the same --seed, no refiner splitting them)", category, len(paths),
                    MIN_HOLDOUT_IMAGES)
    return paths


def save_ensemble(
    bundles: Sequence[Path | str],
    out: Path | str,
    overwrite: bool = False,
    calibrate_root: Path | str | None = None,
    batch_size: int = 8,
) -> Path:
    """Copy verified member bundles into `out` with an ensemble manifest; atomic like save_bundle."""
    out = Path(out)
    sources = [Path(b) for b in bundles]
    if len(sources) < 2:
        raise ValueError("an ensemble needs at least two bundles")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (written while this one ran?); pass --force (overwrite=True) "
                              "to replace it")
    for src in sources:  # its staging folder, OUT's sibling, would lie inside the member it copies: copies of copies
        if inside(out, src):
            raise ValueError(f"{out}: the ensemble would be written inside {src}, one of its members; write it elsewhere")
    manifests, ids = [], []
    for src in sources:
        if is_ensemble(src):
            raise BundleError(f"{src}: is an ensemble; build ensembles from single-backbone bundles")
        manifests.append(verify_bundle(src))
        ids.append(model_id(src))
    if len(set(ids)) != len(ids):
        dup = [str(s) for s, i in zip(sources, ids) if ids.count(i) > 1]
        raise ValueError(f"the same model is listed twice: {dup}")
    categories = sorted({m["category"] for m in manifests})
    if len(categories) != 1:
        raise ValueError(f"ensemble members must be of one category, got {categories}")
    sizes = sorted({m["config"]["features"]["image_size"] for m in manifests})
    if len(sizes) != 1:
        raise ValueError(f"ensemble members must share one input size, got {sizes} px: retrain with one --image-size")

    w = ScoringConfig.image_window  # the ensemble's own (EnsembleDetector)
    for src, m in zip(sources, manifests):
        window = TrainConfig.from_manifest(m["config"]).scoring.image_window  # legacy bundles: their plain max
        if calibrate_root is None and window != w:
            raise ValueError(f"{src}: scores an image over a {window} x {window} window of patches, the ensemble over "
                             f"{w} x {w}, so its stored threshold does not bound the ensemble's score: build with "
                             "--calibrate DATA_ROOT (a threshold from the ensemble's own scores) or use members of "
                             f"scoring.image_window {w}")
        geometry = m["config"].get("geometry") or {}
        if geometry.get("policy", "resize") != "resize" or geometry.get("tile", False):
            raise ValueError(f"{src}: trained with geometry {geometry.get('policy')!r}"
                             f"{' + tiling' if geometry.get('tile') else ''}; ensembles support the default resize only")
        if geometry.get("white_level") is not None:  # the ensemble reads images as its default geometry does
            raise ValueError(f"{src}: reads 16-bit grey images with white level {geometry['white_level']}; ensembles "
                             "read them on the default 16-bit scale only")

    holdout = None if calibrate_root is None else _holdout_paths(Path(calibrate_root), categories[0], manifests)
    with staged_dir(out, FORMAT, "ensemble", overwrite) as tmp:
        (tmp / MEMBERS_DIR).mkdir()
        entries = []
        for k, (src, manifest, mid) in enumerate(zip(sources, manifests, ids)):
            name = f"{k:02d}-{manifest['backbone']['name']}"
            rel = f"{MEMBERS_DIR}/{name}"
            dst = tmp / MEMBERS_DIR / name
            copy_tree_durable(src, dst)
            verify_bundle(dst)
            if model_id(dst) != mid:
                raise BundleError(f"{src}: changed while it was being copied; retry")
            norm = manifest["normalisation"]
            entries.append({
                "name": name,
                "path": rel,
                "model_id": mid,
                "source": str(src.resolve()),
                "backbone": manifest["backbone"]["name"],
                "mode": scoring_mode(manifest),  # what the member scores in (its check may have dropped p(c|x))
                "normalisation": {k2: norm[k2] for k2 in ("image_mean", "image_std", "pixel_mean", "pixel_std", "threshold")},
            })
        norm_est = estimated_normalisation([m["normalisation"] for m in manifests])
        normalisation, method = norm_est, "members"
        if calibrate_root is not None:
            from pni_ray.training import calibrate

            detector, _ = load_ensemble_from_entries(tmp, entries)
            sigmas = {m["config"]["scoring"]["threshold_sigmas"] for m in manifests}
            normalisation = calibrate(detector, holdout, batch_size, max(sigmas))
            normalisation.extras["members_threshold"] = norm_est.threshold
            method = "holdout"
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "category": categories[0],
            "mode": _common_mode(manifests),
            "image_size": sizes[0],
            "members": entries,
            "combine": {
                "map": "mean over members of (map - pixel_mean) / pixel_std (each member's held-out statistics)",
                "image_score": "max of the combined map averaged over 3 x 3 patches (24 x 24 canvas pixels)",
            },
            "normalisation": asdict(normalisation),
            "threshold": normalisation.threshold,
            "threshold_method": method,
            "members_scored": MEMBERS_SCORED,  # each member's maps as deployed (a refined one's refined)
            "threshold_doc": (
                "members: mean of the members' thresholds in their normalised units; an image above it is "
                "above some member's own threshold"
                if method == "members"
                else "holdout: mean + k std of the ensemble's image scores on the train/good images every member held out"
            ),
            "versions": versions(),
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    return out


def load_ensemble_from_entries(root: Path, entries: list[dict[str, Any]]) -> tuple[EnsembleDetector, list[dict]]:
    """Detector of the listed members; each member bundle is verified by load_bundle."""
    members, norms, manifests = [], [], []
    for entry in entries:
        path = member_path(root, entry["path"])
        trained, manifest, found = load_bundle_and_id(path)
        check_member_found(path, entry, found)  # replaced since the ensemble was checked: not under its recorded id
        members.append(build_detector(trained))
        norms.append(trained.normalisation)
        manifests.append(manifest)
    return EnsembleDetector(members, norms, names=[e["name"] for e in entries]).eval(), manifests


def _common_mode(manifests: list[dict[str, Any]]) -> str:
    modes = {scoring_mode(m) for m in manifests}
    return modes.pop() if len(modes) == 1 else MEMBER_MODE
