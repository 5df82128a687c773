"""One scoring interface over a torch bundle or a torch-free export directory.

`load_scoring_model(path)` looks at ``path/manifest.json``: a bundle (format "pni-ray-bundle") or
an ensemble of bundles ("pni-ray-ensemble") is loaded with torch; anything else is handed to `export.runtime.load_exported` (ONNX Runtime),
which is imported only then, so scoring an export never needs the bundle code path and scoring a
bundle never needs the export package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pni_ray.fileio import read_json

BUNDLE_FORMAT = "pni-ray-bundle"  # == pni_ray.bundle.FORMAT, repeated to keep this import torch-free
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

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, H, W) float32 in [0, 1] -> maps (B, H, W) float32, scores (B,) float32."""
        ...


def image_hw(size: Any) -> tuple[int, int]:
    """An int (square) or an (h, w) pair -> (h, w)."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def _threshold(manifest: dict[str, Any]) -> float:
    norm = manifest.get("normalisation") or {}
    value = norm.get("threshold", manifest.get("threshold"))
    return float("inf") if value is None else float(value)


class BundleModel:
    """A pni-ray bundle (or ensemble of bundles) scored by its torch detector."""

    def __init__(self, path: Path | str, device: str = "cpu", kind: str = "bundle") -> None:
        import torch

        from pni_ray.bundle import model_id
        from pni_ray.inference import load_detector

        self.kind = kind
        self.path = Path(path)
        self.detector, self.manifest = load_detector(self.path)
        self.device = torch.device(device)
        self.detector.to(self.device)
        self.image_size = image_hw(self.detector.image_size)
        self.threshold = _threshold(self.manifest)
        self.model_id = model_id(self.path)
        self.category = self.manifest.get("category")

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
        with torch.inference_mode():
            maps, scores = self.detector(x)
        return maps.float().cpu().numpy(), scores.float().cpu().numpy()


class ExportModel:
    """An export directory scored by `export.runtime` (ONNX Runtime, no torch)."""

    kind = "export"

    def __init__(self, path: Path | str, threads: int | None = None, **runtime_kwargs: Any) -> None:
        try:
            from export.runtime import load_exported
        except ModuleNotFoundError as exc:  # pragma: no cover - depends on the export package
            raise RuntimeError(f"{path} is an export directory but export.runtime is not available ({exc})") from exc
        self.path = Path(path)
        self.runtime = load_exported(self.path, threads=threads, **runtime_kwargs)
        self.manifest = dict(self.runtime.manifest)
        self.image_size = image_hw(self.runtime.image_size)
        self.threshold = float(self.runtime.threshold)
        self.model_id = str(self.runtime.model_id)
        self.category = self.manifest.get("category")

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.runtime.predict(np.ascontiguousarray(images, dtype=np.float32))
        return np.asarray(maps, dtype=np.float32), np.asarray(scores, dtype=np.float32).reshape(-1)


def model_kind(path: Path | str) -> str:
    """"bundle", "ensemble" or "export", from the manifest's format; ValueError without a manifest."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"{path}: not a model (no manifest.json): give a bundle or an export directory")
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise ValueError(f"{manifest_path}: not a manifest (a JSON object)")
    return TORCH_FORMATS.get(manifest.get("format"), "export")


def load_scoring_model(path: Path | str, device: str = "cpu", threads: int | None = None) -> ScoringModel:
    """A bundle or ensemble (torch) or an export directory (ONNX Runtime, imported lazily).

    `threads` pins ONNX Runtime's intra-op threads (torch's are the caller's torch.set_num_threads);
    `device` "cuda" puts a torch model on the GPU and asks ONNX Runtime for its CUDA provider.
    """
    kind = model_kind(path)
    if kind in TORCH_FORMATS.values():
        return BundleModel(path, device=device, kind=kind)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
    return ExportModel(path, threads=threads, providers=providers)
