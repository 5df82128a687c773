"""One scoring interface over a torch bundle or a torch-free export directory.

`load_scoring_model(path)` looks at ``path/manifest.json``: a bundle (format "pni-ray-bundle") or
an ensemble of bundles ("pni-ray-ensemble") is loaded with torch; anything else is handed to `pni_ray.export.runtime.load_exported` (ONNX Runtime),
which is imported only then, so scoring an export never needs the bundle code path and scoring a
bundle never needs the export package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from pni_ray import bundle_manifest
from pni_ray.config import float_from_json
from pni_ray.fileio import read_json
from pni_ray.geometry import Geometry, Prepared

BUNDLE_FORMAT = bundle_manifest.FORMAT
TORCH_FORMATS = {BUNDLE_FORMAT: "bundle", "pni-ray-ensemble": "ensemble"}  # loaded by load_detector


class ScoringModel(Protocol):
    """What the scoring pipeline needs from a model."""

    kind: str  # "bundle", "ensemble" or "export"
    path: Path
    image_size: tuple[int, int]  # (height, width) of the model input
    threshold: float
    model_id: str
    category: str | None
    manifest: dict[str, Any]

    geometry: Geometry  # how images are prepared and maps restored (the bundle's)

    def canvas_maps(self, prepared: Sequence[Prepared]) -> tuple[np.ndarray, np.ndarray]:
        """Prepared images -> canvas maps (B, Hc, Wc) float32, image scores (B,) over the content."""
        ...


def image_hw(size: Any) -> tuple[int, int]:
    """An int (square) or an (h, w) pair -> (h, w)."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def _threshold(manifest: dict[str, Any]) -> float:
    norm = manifest.get("normalisation") or {}
    return float_from_json("threshold", norm.get("threshold", manifest.get("threshold")))


class BundleModel:
    """A pni-ray bundle (or ensemble of bundles) scored by its torch detector."""

    def __init__(self, path: Path | str, device: str = "cpu", kind: str = "bundle") -> None:
        import torch

        from pni_ray.inference import load_detector_and_id
        from pni_ray.predict import default_name, detector_geometry

        self.kind = kind
        self.path = Path(path)
        self.detector, self.manifest, self.model_id = load_detector_and_id(self.path)
        self.device = torch.device(device)
        self.detector.to(self.device)
        self.geometry = detector_geometry(self.detector)
        self.name = default_name(self.detector)  # its mode, "+refine" when it has a refiner
        self.image_size = self.geometry.canvas_hw()
        self.threshold = _threshold(self.manifest)
        self.category = self.manifest.get("category")

    def canvas_maps(self, prepared: Sequence[Prepared]) -> tuple[np.ndarray, np.ndarray]:
        from pni_ray.predict import score_prepared

        maps, scores, _ = score_prepared(self.detector, self.geometry, list(prepared), [self.name], len(prepared))
        return np.stack(maps[self.name]).astype(np.float32), np.asarray(scores[self.name], np.float32)


class ExportModel:
    """An export directory scored by `pni_ray.export.runtime` (ONNX Runtime, no torch)."""

    kind = "export"

    def __init__(self, path: Path | str, threads: int | None = None, **runtime_kwargs: Any) -> None:
        try:
            from pni_ray.export.runtime import load_exported
        except ModuleNotFoundError as exc:  # pragma: no cover - depends on the export package
            raise RuntimeError(f"{path} is an export directory but pni_ray.export.runtime is not available ({exc})") from exc
        self.path = Path(path)
        self.runtime = load_exported(self.path, threads=threads, **runtime_kwargs)
        self.manifest = dict(self.runtime.manifest)
        self.geometry = self.runtime.geometry
        self.image_size = image_hw(self.runtime.image_size)
        self.threshold = float(self.runtime.threshold)
        self.model_id = str(self.runtime.model_id)
        self.category = self.manifest.get("category")

    def canvas_maps(self, prepared: Sequence[Prepared]) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.runtime.canvas_maps(prepared)
        return np.asarray(maps, dtype=np.float32), np.asarray(scores, dtype=np.float32).reshape(-1)


def model_kind(path: Path | str) -> str:
    """"bundle", "ensemble" or "export", from the manifest's format; ValueError without a manifest."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        inside = sorted(str(m.parent) for pattern in ("*/manifest.json", "*/*/manifest.json")
                        for m in path.glob(pattern)) if path.is_dir() else []  # train-all's OUT or OUT/<category>
        more = f" and {len(inside) - 5} more" if len(inside) > 5 else ""
        hint = f"; models inside it: {', '.join(inside[:5])}{more}" if inside else ""
        raise ValueError(f"{path}: not a model (no manifest.json): give a bundle or an export directory{hint}")
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise ValueError(f"{manifest_path}: not a manifest (a JSON object)")
    return TORCH_FORMATS.get(manifest.get("format"), "export")


def load_scoring_model(path: Path | str, device: str = "cpu", threads: int | None = None,
                       backbone_runtime: str = "onnxruntime", backbone_precision: str = "auto") -> ScoringModel:
    """A bundle or ensemble (torch) or an export directory (ONNX Runtime, imported lazily).

    `threads` pins ONNX Runtime's intra-op threads (torch's are the caller's torch.set_num_threads);
    `device` "cuda" puts a torch model on the GPU and asks ONNX Runtime for its CUDA provider.
    `backbone_runtime` "openvino" runs an export's backbone with OpenVINO (pni_ray.export.openvino_backbone).
    """
    kind = model_kind(path)
    if kind in TORCH_FORMATS.values():
        if backbone_runtime != "onnxruntime":
            raise ValueError(f"{path} is a {kind}, scored by torch: backbone runtime {backbone_runtime!r} applies to "
                             "export directories only (pni-ray export BUNDLE --out DIR, then score DIR)")
        return BundleModel(path, device=device, kind=kind)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
    return ExportModel(path, threads=threads, providers=providers, backbone_runtime=backbone_runtime,
                       backbone_precision=backbone_precision)
