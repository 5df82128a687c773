"""Load a trained model for scoring: a bundle directory or an ensemble of bundles."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pni_ray.bundle import load_bundle
from pni_ray.models.pni import PNIDetector, build_detector

if TYPE_CHECKING:
    from pni_ray.models.ensemble import EnsembleDetector


def load_detector(path: Path | str) -> tuple["PNIDetector | EnsembleDetector", dict[str, Any]]:
    """Verified detector and its manifest; ensembles are recognised by their manifest."""
    from pni_ray.ensemble_bundle import is_ensemble, load_ensemble

    if is_ensemble(path):
        return load_ensemble(path)
    trained, manifest = load_bundle(path)
    return build_detector(trained), manifest
