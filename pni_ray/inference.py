"""Load a trained model for scoring: a bundle directory or an ensemble of bundles."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pni_ray.bundle import load_bundle_and_id, model_id
from pni_ray.models.pni import PNIDetector, build_detector

if TYPE_CHECKING:
    from pni_ray.models.ensemble import EnsembleDetector


def load_detector(path: Path | str) -> tuple["PNIDetector | EnsembleDetector", dict[str, Any]]:
    """Verified detector and its manifest; ensembles are recognised by their manifest."""
    detector, manifest, _ = load_detector_and_id(path)
    return detector, manifest


def load_detector_and_id(path: Path | str) -> tuple["PNIDetector | EnsembleDetector", dict[str, Any], str]:
    """`load_detector` and the model_id of what it loaded: a bundle's from the manifest bytes its files were checked
    against (`load_bundle_and_id`); an ensemble's from its manifest, which pins each member's id (checked at load)."""
    from pni_ray.ensemble_bundle import is_ensemble, load_ensemble

    if is_ensemble(path):
        detector, manifest = load_ensemble(path)
        return detector, manifest, model_id(path)
    trained, manifest, found = load_bundle_and_id(path)
    return build_detector(trained), manifest, found
