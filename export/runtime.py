"""Score images from an export directory with onnxruntime, numpy and pyarrow -- no torch.

    model = load_exported("exports/bottle")          # verifies every file's sha256
    maps, scores = model.predict(images)             # images: (B, 3, H, W) float32 in [0, 1]
    anomalous = scores > model.threshold

An edge box may have no torch at all, so this module (and export.tables, the only project
module it imports) must never import it; a test runs it in a fresh interpreter and checks
`"torch" not in sys.modules`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from export import tables

__all__ = ["ExportedModel", "load_exported"]


def _session_options(threads: int | None, optimization: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    n = threads or int(os.environ.get("PNI_RAY_THREADS", 0)) or (os.cpu_count() or 1)
    so.intra_op_num_threads = int(n)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    so.log_severity_level = 3
    return so


class ExportedModel:
    """The export's graphs chained: backbone -> (mlp) -> scorer -> (refiner)."""

    def __init__(self, path: Path | str, threads: int | None = None, providers: Sequence[str] | None = None,
                 verify: bool = True, optimization: str = "all", refine: bool = True) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.manifest: dict[str, Any] = tables.verify_export(self.path) if verify else tables.read_manifest(self.path)
        m = self.manifest
        self.image_size: tuple[int, int] = tuple(m["image_size"])  # type: ignore[assignment]
        self.model_id: str = m["model_id"]
        self.mode: str = m["mode"]
        self.max_batch: int = int(m.get("max_batch", 16))
        self.normalisation = tables.read_normalisation(self.path / m["tables"]["normalisation"])
        if not _same_float(self.normalisation["threshold"], m["threshold"]):
            raise tables.ExportError(f"{self.path}: threshold in {tables.NORMALISATION} "
                                     f"({self.normalisation['threshold']}) differs from the manifest ({m['threshold']})")
        self.threshold: float = float(self.normalisation["threshold"])
        options = _session_options(threads, optimization)
        providers = list(providers or ["CPUExecutionProvider"])
        self.sessions = {}
        for name in m["pipeline"]:
            if name == "refiner" and not refine:
                continue
            self.sessions[name] = ort.InferenceSession(str(self.path / m["graphs"][name]["file"]), options,
                                                       providers=providers)
        self.table_feeds = scorer_table_feeds(self.path, m) if m["scorer"]["coresets"] == "input" else {}

    @property
    def has_refiner(self) -> bool:
        return "refiner" in self.sessions

    def _check(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.float32:
            raise TypeError(f"images must be float32 in [0, 1], got {images.dtype}")
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != self.image_size:
            raise ValueError(f"images must be (B, 3, {self.image_size[0]}, {self.image_size[1]}), got {images.shape}")
        return np.ascontiguousarray(images)

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(maps (B, H, W) float32, image scores (B,) float32) for images (B, 3, H, W) in [0, 1]."""
        images = self._check(images)
        if len(images) == 0:
            return np.zeros((0, *self.image_size), np.float32), np.zeros(0, np.float32)
        maps, scores = [], []
        for i in range(0, len(images), self.max_batch):
            m, s = self._predict_batch(images[i : i + self.max_batch])
            maps.append(m)
            scores.append(s)
        return np.concatenate(maps), np.concatenate(scores)

    def run_stage(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sessions[name].run(None, feeds)

    def _predict_batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        (features,) = self.run_stage("backbone", {"images": images})
        feeds = {"features": features, **self.table_feeds}
        if "mlp" in self.sessions:
            (feeds["probabilities"],) = self.run_stage("mlp", {"features": features})
        _, maps, scores = self.run_stage("scorer", feeds)
        if "refiner" in self.sessions:
            maps, scores = self.run_stage("refiner", {"images": images, "maps": maps})
        return maps, scores

    def normalise(self, maps: np.ndarray) -> np.ndarray:
        """Maps on the held-out scale: (map - pixel_mean) / pixel_std."""
        n = self.normalisation
        return (maps - np.float32(n["pixel_mean"])) / np.float32(n["pixel_std"])


def scorer_table_feeds(path: Path, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """Coresets fed as scorer inputs, built from the Arrow tables exactly as the exporter builds them."""
    return tables.scorer_table_values(manifest["mode"], tables.ScoringTables.read(path), float(manifest["tau"]))


def _same_float(a: float, b: float) -> bool:
    return a == b or (np.isnan(a) and np.isnan(b)) or bool(np.isclose(a, b, rtol=1e-12, atol=0))


def load_exported(path: Path | str, threads: int | None = None, providers: Sequence[str] | None = None,
                  verify: bool = True, optimization: str = "all", refine: bool = True) -> ExportedModel:
    """Verify the export directory's checksums and open its graphs with onnxruntime."""
    return ExportedModel(path, threads=threads, providers=providers, verify=verify, optimization=optimization,
                         refine=refine)
