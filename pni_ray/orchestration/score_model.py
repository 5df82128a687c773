"""What `pni-ray score`'s driver knows of a model without building it (no torch): its kind, canvas,
threshold, identity and geometry, with every listed file's checksum verified before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pni_ray.config import TrainConfig, float_from_json
from pni_ray.fileio import sha256_file
from pni_ray.geometry import Geometry


class ScoreError(RuntimeError):
    """A run that cannot start (bad model, OUT in use or holding another model's scores)."""


@dataclass(frozen=True)
class ModelInfo:
    path: str
    kind: str
    image_size: tuple[int, int]  # (height, width) of the canvas every image is prepared to
    threshold: float
    model_id: str
    category: str | None
    geometry: dict[str, Any] = field(default_factory=dict)  # Geometry.spec(): how decode prepares images
    backbone: str = "onnxruntime"  # where the backbone runs, as OUT records it: "torch" (bundles), "openvino-bf16", ...
    source_model_id: str | None = None  # an export's bundle (its model_id is the export's own manifest)
    trained_on: str | None = None  # "grey" / "colour": every memory-bank image was (bundle_manifest.trained_on)


def members_trained_on(path: Path, manifest: dict[str, Any]) -> str | None:
    """An ensemble's "grey" or "colour": what all its members trained on, where they agree (None otherwise)."""
    from pni_ray.bundle_manifest import member_path, read_manifest, trained_on

    found = {trained_on(read_manifest(member_path(path, m["path"]))) for m in manifest["members"]}
    return found.pop() if len(found) == 1 else None


def describe_model(path: Path | str, backbone_runtime: str = "onnxruntime", backbone_precision: str = "auto") -> ModelInfo:
    """What the driver needs to know, without torch: the manifest, and the checksum of every file a
    bundle (or each ensemble member) lists and of a --weights file (the actors verify again when they load). An
    export is loaded here with the actors' backbone runtime, so one OpenVINO cannot take fails now."""
    from pni_ray.export.openvino_backbone import OpenVINOUnavailable
    from pni_ray.export.tables import ExportError
    from pni_ray.bundle_manifest import BundleError, check_weights_file, trained_on, verify_bundle, verify_ensemble
    from pni_ray.orchestration.model_loader import ExportModel, model_kind

    path = Path(path).resolve()
    try:
        kind = model_kind(path)
    except ValueError as exc:
        raise ScoreError(str(exc)) from exc
    if kind in ("bundle", "ensemble"):
        if backbone_runtime != "onnxruntime":
            raise ScoreError(f"{path} is a {kind}, scored by torch: --backbone-runtime {backbone_runtime} applies to "
                             "export directories only (pni-ray export BUNDLE --out DIR, then score DIR)")
        if kind == "bundle":  # the loader's own checks: manifest keys, the files its mode needs, checksums, and
            try:              # a --weights file (else every worker would fail on it after Ray started)
                manifest = verify_bundle(path)
                check_weights_file(path, manifest)
            except BundleError as exc:
                raise ScoreError(str(exc)) from exc
        else:  # an ensemble: its manifest checked as its loader checks it (an edited threshold named now), its members too
            try:  # an ensemble's own manifest lists no files: its members hold them
                manifest = verify_ensemble(path)
            except BundleError as exc:
                raise ScoreError(str(exc)) from exc
        try:  # what the actors will build from it: refused here, before the run, naming the file
            if kind == "bundle":
                TrainConfig.from_manifest(manifest.get("config") or {})
        except (TypeError, ValueError) as exc:
            raise ScoreError(f"{path}/manifest.json: its config cannot be read ({exc}); retrain the bundle") from exc
        norm = manifest.get("normalisation") or {}
        threshold = norm.get("threshold", manifest.get("threshold"))
        try:
            geometry = Geometry.from_manifest(manifest)
            canvas = geometry.canvas_hw()
        except (KeyError, TypeError, ValueError) as exc:
            raise ScoreError(f"{path}/manifest.json: no usable image geometry ({exc.__class__.__name__}: {exc})") from exc
        return ModelInfo(str(path), kind, canvas, float_from_json("threshold", threshold),
                         sha256_file(path / "manifest.json"), manifest.get("category"), geometry.spec(), backbone="torch",
                         trained_on=trained_on(manifest) if kind == "bundle" else members_trained_on(path, manifest))
    try:
        model = ExportModel(path, backbone_runtime=backbone_runtime, backbone_precision=backbone_precision)
    except (OpenVINOUnavailable, ExportError) as exc:  # a tampered export is refused before the run, naming the file
        raise ScoreError(str(exc)) from exc
    return ModelInfo(str(path), kind, model.image_size, model.threshold, model.model_id, model.category,
                     model.geometry.spec(), model.runtime.backbone_label, model.runtime.source_model_id,
                     trained_on(model.manifest))
