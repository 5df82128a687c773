"""Load a trained model for scoring: a bundle directory or an ensemble of bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pni_ray.bundle import load_bundle
from pni_ray.models.pni import PNIDetector, build_detector


def load_detector(path: Path | str) -> tuple[PNIDetector, dict[str, Any]]:
    """Verified detector and its manifest; ensembles are recognised by their manifest."""
    trained, manifest = load_bundle(path)
    return build_detector(trained), manifest
