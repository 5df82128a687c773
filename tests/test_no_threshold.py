"""A model trained without held-out images (scoring.holdout_fraction 0) has no threshold: every file
it leads to is strict JSON (null, never Infinity, which JavaScript's JSON.parse and other strict
readers refuse), and every reader takes null back as "no threshold" (nothing flagged)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from conftest import strict_json, tiny_config
from pni_ray.bundle import load_bundle, save_bundle
from pni_ray.training import train_category


def train_without_holdout(root: Path, out: Path, seed: int = 0) -> Path:
    cfg = tiny_config(seed=seed)
    cfg = cfg.replace(scoring=dataclasses.replace(cfg.scoring, holdout_fraction=0.0))
    return save_bundle(train_category(root, "washer", cfg, progress=False), out)


@pytest.fixture(scope="module")
def no_threshold_bundle(synthetic_root, tmp_path_factory) -> Path:
    return train_without_holdout(synthetic_root, tmp_path_factory.mktemp("nothreshold") / "washer")


def test_bundle_without_threshold_is_strict_json_and_loads_as_inf(no_threshold_bundle):
    manifest = strict_json(no_threshold_bundle / "manifest.json")
    assert manifest["threshold"] is None and manifest["normalisation"]["threshold"] is None
    trained, _ = load_bundle(no_threshold_bundle)
    assert trained.normalisation.threshold == math.inf


def test_export_score_and_ensemble_without_threshold(no_threshold_bundle, synthetic_root, tmp_path):
    from click.testing import CliRunner

    from pni_ray.cli import main
    from pni_ray.ensemble_bundle import load_ensemble, save_ensemble

    export = tmp_path / "export"
    result = CliRunner().invoke(main, ["export", str(no_threshold_bundle), "--out", str(export)])
    assert result.exit_code == 0, result.output
    assert strict_json(export / "manifest.json")["threshold"] is None
    from export.runtime import load_exported

    assert load_exported(export, threads=1).threshold == math.inf

    good = synthetic_root / "washer" / "test" / "good"
    for model in (no_threshold_bundle, export):
        out = tmp_path / f"scores-{model.name}"
        result = CliRunner().invoke(main, ["score", str(model), str(good), "--out", str(out), "--engine", "local"])
        assert result.exit_code == 0, result.output
        summary = strict_json(out / "_summary.json")
        assert summary["threshold"] is None and summary["anomalous"] == 0 and summary["failed"] == 0
        strict_json(out / "_dataset.json")

    second = train_without_holdout(synthetic_root, tmp_path / "washer-seed1", seed=1)
    ensemble = save_ensemble([no_threshold_bundle, second], tmp_path / "ensemble")
    assert strict_json(ensemble / "manifest.json")["threshold"] is None
    detector, _ = load_ensemble(ensemble)
    assert detector.threshold == math.inf
