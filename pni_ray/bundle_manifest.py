"""A bundle's manifest and files, checked without torch: what `pni_ray.bundle` loads, and what the
scoring driver checks before a run, which must not import torch (one rule for both); an ensemble's
manifest likewise (`read_ensemble_manifest`, re-exported by `pni_ray.ensemble_bundle`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pni_ray.fileio import read_manifest_json, sha256_file

FORMAT = "pni-ray-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MEMORY = "memory.arrow"
PRIOR = "position_prior.arrow"
MLP = "neighbourhood.safetensors"
REFINER = "refiner.safetensors"
ENSEMBLE_FORMAT = "pni-ray-ensemble"
ENSEMBLE_FORMAT_VERSION = 1


class BundleError(ValueError):
    """A bundle that cannot be trusted; the message says which file and why."""


# what loading reads from a bundle's manifest (checked when it is read: a KeyError names nothing)
REQUIRED_KEYS: dict[str, type] = {"category": str, "mode": str, "config": dict, "files": dict, "backbone": dict,
                                  "normalisation": dict, "grid": list}


def read_manifest(path: Path | str) -> dict[str, Any]:
    return read_manifest_json(path, FORMAT, FORMAT_VERSION, BundleError, "bundle", required=REQUIRED_KEYS)


def verify_bundle(path: Path | str) -> dict[str, Any]:
    """Check every listed file exists with its recorded sha256; return the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    required = {MEMORY} | ({PRIOR, MLP} if manifest["mode"] == "pni" else set())
    missing = sorted(required - set(manifest["files"]))
    if missing:
        raise BundleError(f"{path}: incomplete bundle, manifest lists no {', '.join(missing)}")
    for name, meta in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"{file}: missing from the bundle (listed in {MANIFEST})")
        digest = sha256_file(file)
        if digest != meta["sha256"]:
            raise BundleError(f"{file}: checksum mismatch (expected {meta['sha256'][:12]}..., got {digest[:12]}...): "
                              "the file was modified or corrupted; retrain or restore the bundle")
    return manifest


def calibration_images(manifest: dict[str, Any]) -> list[str]:
    """The train/good images (names) a bundle's normalisation and threshold came from: its held-out images, or a
    refined bundle's third split. Ensembles and INT8 exports score them again for a threshold of their own."""
    training = manifest.get("training", {})
    refiner = training.get("refiner") or {}
    return refiner.get("calibration_images") or training.get("holdout_images", [])


def model_id(path: Path | str) -> str:
    """Identity of a bundle: the sha256 of its manifest (which pins every file's sha256)."""
    return sha256_file(Path(path) / MANIFEST)


def read_ensemble_manifest(path: Path | str) -> dict[str, Any]:
    """The manifest, its members' entries and threshold checked: an edited one fails here naming the key."""
    manifest = read_manifest_json(path, ENSEMBLE_FORMAT, ENSEMBLE_FORMAT_VERSION, BundleError, "ensemble",
                                  required={"members": list})
    file = Path(path) / MANIFEST
    if not manifest["members"]:
        raise BundleError(f"{file}: the ensemble lists no members")
    for i, entry in enumerate(manifest["members"]):
        missing = [k for k in ("path", "name", "model_id") if not isinstance(entry, dict) or not isinstance(entry.get(k), str)]
        if missing:
            raise BundleError(f"{file}: members[{i}] has no {', '.join(missing)} (a string each); the manifest was "
                              "edited or truncated: rebuild the ensemble")
    threshold = manifest.get("threshold", "<absent>")
    if threshold is not None and (not isinstance(threshold, (int, float)) or isinstance(threshold, bool)):
        raise BundleError(f"{file}: 'threshold' must be a number or null, got {threshold!r:.60}; "
                          "the manifest was edited or truncated: rebuild the ensemble")
    stored = (manifest.get("normalisation") or {}).get("threshold", threshold)  # what `score` reads
    if stored != threshold:
        raise BundleError(f"{file}: 'threshold' ({threshold!r:.30}) and 'normalisation.threshold' ({stored!r:.30}) "
                          "differ, and evaluate and score would read different ones; the manifest was edited: "
                          "rebuild the ensemble")
    return manifest
