"""A bundle's manifest and files, checked without torch: what `pni_ray.bundle` loads, and what the
scoring driver checks before a run, which must not import torch (one rule for both); an ensemble's
manifest likewise (`read_ensemble_manifest`, re-exported by `pni_ray.ensemble_bundle`)."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
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


# a bundle replaced while it was read (`train --force` or train-all beside a nightly run) is read again this many times
REPLACED_RETRIES = 2
REPLACED_WAIT_S = 0.05


@dataclass
class VerifiedBundle:
    """A bundle as read once: its manifest, every file it lists as the bytes whose sha256 was checked, and the model_id
    of the manifest bytes those files were checked against. Loading parses these bytes, never the files again."""

    manifest: dict[str, Any]
    files: dict[str, bytes]
    model_id: str


def read_manifest(path: Path | str, raw: bytes | None = None) -> dict[str, Any]:
    """The manifest of the bundle at `path` (or `raw`, its bytes as already read), its keys and threshold checked."""
    manifest = read_manifest_json(path, FORMAT, FORMAT_VERSION, BundleError, "bundle", required=REQUIRED_KEYS, raw=raw)
    check_threshold(Path(path) / MANIFEST, manifest, manifest.get("threshold", manifest["normalisation"].get("threshold")),
                    "retrain the bundle or restore its manifest")
    return manifest


def verify_bundle(path: Path | str) -> dict[str, Any]:
    """Check every listed file exists with its recorded sha256 (streamed, nothing kept); return the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, meta in _listed_files(path, manifest):
        _check_digest(path / name, meta, sha256_file(path / name))
    return manifest


def read_verified(path: Path | str) -> VerifiedBundle:
    """The manifest and each file it lists, read once and checked as read, so what loading parses is what was checked.
    A bundle replaced between reading its manifest and its files (saves rename a whole new directory into place) is
    read again from its new manifest, up to REPLACED_RETRIES times: the old bundle whole or the new one, never a mix.
    A bundle that is truly broken is refused after those tries (REPLACED_RETRIES x REPLACED_WAIT_S later)."""
    path = Path(path)
    for attempt in range(REPLACED_RETRIES + 1):
        file = path / MANIFEST
        raw: bytes | None = None
        files: dict[str, bytes] = {}
        try:
            try:
                raw = file.read_bytes()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):  # read_manifest names what is missing
                pass
            manifest = read_manifest(path, raw)
            for name, meta in _listed_files(path, manifest):
                try:
                    files[name] = (path / name).read_bytes()
                except FileNotFoundError:  # gone since _listed_files saw it
                    raise BundleError(f"{path / name}: missing from the bundle (listed in {MANIFEST})") from None
                _check_digest(path / name, meta, hashlib.sha256(files[name]).hexdigest())
        except BundleError:  # replaced meanwhile (no folder between a save's two renames, a file gone or changed), or
            if attempt < REPLACED_RETRIES:  # truly broken: read again from the manifest then, and say the last error
                time.sleep(REPLACED_WAIT_S)  # the save's two renames (replace_dir) are microseconds apart
                continue
            raise
        return VerifiedBundle(manifest, files, hashlib.sha256(raw or b"").hexdigest())
    raise AssertionError("unreachable")  # the last attempt returns or raises


def _listed_files(path: Path, manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The manifest's files, each there; a bundle that lists too few for its mode, or lacks a file, is refused."""
    required = {MEMORY} | ({PRIOR, MLP} if manifest["mode"] == "pni" else set())
    missing = sorted(required - set(manifest["files"]))
    if missing:
        raise BundleError(f"{path}: incomplete bundle, manifest lists no {', '.join(missing)}")
    for name in manifest["files"]:
        if not (path / name).is_file():
            raise BundleError(f"{path / name}: missing from the bundle (listed in {MANIFEST})")
    return list(manifest["files"].items())


def _check_digest(file: Path, meta: dict[str, Any], digest: str) -> None:
    if digest != meta["sha256"]:
        raise BundleError(f"{file}: checksum mismatch (expected {meta['sha256'][:12]}..., got {digest[:12]}...): "
                          "the file was modified or corrupted; retrain or restore the bundle")


def check_weights_file(path: Path | str, manifest: dict[str, Any]) -> None:
    """A bundle trained from a weights file (--weights) runs only with that file, unchanged: checked without torch,
    so the scoring driver refuses such a bundle before any worker starts, as loading it does."""
    weights = ((manifest.get("config") or {}).get("features") or {}).get("weights")
    if not weights:
        return
    recorded = (manifest.get("backbone") or {}).get("sha256")
    file = Path(weights)
    if not file.is_file():
        where = "that path" if file.is_absolute() else "that path, relative to the directory it was trained in (run from there)"
        raise BundleError(f"{path}: trained with the backbone weights file {weights} (sha256 {str(recorded)[:12]}...), "
                          f"which is not there: put the file back at {where}")
    found = sha256_file(file)
    if recorded is not None and found != recorded:
        raise BundleError(f"{path}: backbone weights differ from those the bundle was trained with ({weights}: expected "
                          f"sha256 {recorded[:12]}..., found {found[:12]}...)")


def calibration_images(manifest: dict[str, Any]) -> list[str]:
    """The train/good images (names) a bundle's normalisation and threshold came from: its held-out images, or a
    refined bundle's third split. Ensembles and INT8 exports score them again for a threshold of their own."""
    training = manifest.get("training", {})
    refiner = training.get("refiner") or {}
    return refiner.get("calibration_images") or training.get("holdout_images", [])


def scoring_mode(manifest: dict[str, Any]) -> str:
    """The mode a bundle scores in by default: its config's scoring.mode (which the position check may have set to a
    mode without p(c|x)) for a PNI bundle, patchcore for a PatchCore-only one."""
    return manifest["config"]["scoring"]["mode"] if manifest["mode"] == "pni" else "patchcore"


def position_check_outcome(manifest: dict[str, Any]) -> str | None:
    """What the training's position check decided: "kept" (p(c|x) pays on its synthetic defects), "dropped" (the
    bundle scores without it), "unchecked" (too few held-out or memory-bank images to judge it: kept), or None (not
    run: a mode without the position prior, the check turned off, or a bundle trained before it existed)."""
    check = (manifest.get("training") or {}).get("position_check")
    if not isinstance(check, dict):
        return None
    if "skipped" in check:
        return "unchecked"
    return {True: "kept", False: "dropped"}.get(check.get("kept"))


def trained_on(manifest: dict[str, Any]) -> str | None:
    """"grey" or "colour": what every memory-bank image of the bundle was (`data.images.is_grey`); None when they were
    mixed, or the bundle was trained before this was recorded. A bundle's or an export's manifest."""
    if manifest.get("trained_on") in ("grey", "colour"):  # an export's, copied from its bundle
        return manifest["trained_on"]
    facts = manifest.get("training") or {}
    grey, total = facts.get("grey_memory_images"), facts.get("n_memory_images")
    if not isinstance(grey, int) or not isinstance(total, int) or total < 1:
        return None
    return "grey" if grey == total else "colour" if grey == 0 else None


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
    check_threshold(file, manifest, manifest.get("threshold", "<absent>"), "rebuild the ensemble")
    return manifest


def check_threshold(file: Path, manifest: dict[str, Any], threshold: Any, remedy: str) -> None:
    """The threshold is held twice (top level, what evaluate reads; normalisation, what score and exports read):
    a number or null, and one value, or evaluate and score would decide with different ones (a hand edit)."""
    if threshold is not None and (not isinstance(threshold, (int, float)) or isinstance(threshold, bool)):
        raise BundleError(f"{file}: 'threshold' must be a number or null, got {threshold!r:.60}; "
                          f"the manifest was edited or truncated: {remedy}")
    stored = (manifest.get("normalisation") or {}).get("threshold", threshold)
    if stored != threshold and not (stored != stored and threshold != threshold):  # two NaNs (an old manifest) agree
        raise BundleError(f"{file}: 'threshold' ({threshold!r:.30}) and 'normalisation.threshold' ({stored!r:.30}) "
                          f"differ, and evaluate and score would read different ones; the manifest was edited: {remedy}"
                          " (to decide at another threshold, compare image_score in score's table with it)")


def member_path(root: Path, relative: str) -> Path:
    """A member's directory; refuses paths that leave the ensemble directory."""
    rel = PurePosixPath(relative)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise BundleError(f"{root / MANIFEST}: member path {relative!r} must be relative and inside the ensemble")
    return root.joinpath(*rel.parts)


def check_member_id(root: Path, entry: dict[str, Any]) -> Path:
    path = member_path(root, entry["path"])
    if not (path / MANIFEST).is_file():
        raise BundleError(f"{path}: ensemble member is missing (listed in {root / MANIFEST})")
    check_member_found(path, entry, model_id(path))
    return path


def check_member_found(path: Path, entry: dict[str, Any], found: str) -> None:
    """The member at `path` has the model_id its ensemble entry pinned (`found`: its manifest's, as read)."""
    if found != entry["model_id"]:
        raise BundleError(
            f"{path / MANIFEST}: member manifest differs from the one the ensemble was built with "
            f"(model_id expected {entry['model_id'][:12]}..., got {found[:12]}...); rebuild the ensemble"
        )


# what an ensemble's holdout threshold was measured on: each member's maps as deployed (a refined member's refined);
# ensembles calibrated before this key scored refined members without their refiner
MEMBERS_SCORED = "as deployed"


def check_calibrated_as_scored(path: Path, manifest: dict[str, Any], members: list[dict[str, Any]]) -> None:
    """Refuse an ensemble whose --calibrate threshold came from maps it no longer scores: one made before its refined
    members were scored through their refiners (`MEMBERS_SCORED`), whose threshold is of their unrefined maps."""
    refined = any(REFINER in (m.get("files") or {}) for m in members)  # as the loader decides to refine
    if manifest.get("threshold_method") == "holdout" and refined and manifest.get("members_scored") != MEMBERS_SCORED:
        raise BundleError(f"{path / MANIFEST}: this ensemble's threshold was set (--calibrate) on maps of its refined "
                          "member(s) without their refiner, which an older pni-ray scored, and no longer matches its "
                          "scores: build it again with the same command and --force (`pni-ray ensemble MEMBER... "
                          "--out OUT --calibrate DATA_ROOT --force`)")


def verify_ensemble(path: Path | str) -> dict[str, Any]:
    """Check every member's model_id, every member file's checksum and a member's --weights file; return the
    manifest. Without torch: the scoring driver refuses a damaged ensemble before any worker starts."""
    path = Path(path)
    manifest = read_ensemble_manifest(path)
    members = []
    for entry in manifest["members"]:
        member = check_member_id(path, entry)
        members.append(verify_bundle(member))
        check_weights_file(member, members[-1])
    check_calibrated_as_scored(path, manifest, members)
    return manifest
