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
    from pni_ray.ensemble_bundle import load_ensemble

    export = tmp_path / "export"
    result = CliRunner().invoke(main, ["export", str(no_threshold_bundle), "--out", str(export)])
    assert result.exit_code == 0, result.output
    assert strict_json(export / "manifest.json")["threshold"] is None
    from pni_ray.export.runtime import load_exported

    assert load_exported(export, threads=1).threshold == math.inf

    test = synthetic_root / "washer" / "test"  # defects too: they were all "normal" (is_anomalous False)
    for model in (no_threshold_bundle, export):
        out = tmp_path / f"scores-{model.name}"
        result = CliRunner().invoke(main, ["score", str(model), str(test), "--out", str(out), "--engine", "local"])
        assert result.exit_code == 0, result.output
        assert "none decided anomalous or normal: the model has no threshold" in result.output
        summary = strict_json(out / "_summary.json")
        assert summary["threshold"] is None and summary["failed"] == 0 and summary["scored"] == 10
        assert summary["anomalous"] is None and summary["anomaly_rate"] is None
        assert {row["is_anomalous"] for row in summary["top"]} == {None}
        import pyarrow.parquet as pq

        assert set(pq.read_table(out, columns=["is_anomalous"]).column(0).to_pylist()) == {None}
        for part in out.glob("part-*.parquet"):  # rows written before they were null said False: resumed, not trusted
            table = pq.read_table(part)
            flags = table.column("is_anomalous").fill_null(False)
            pq.write_table(table.set_column(table.schema.get_field_index("is_anomalous"), "is_anomalous", flags), part)
        resumed = CliRunner().invoke(main, ["score", str(model), str(test), "--out", str(out), "--engine", "local"])
        assert resumed.exit_code == 0 and "none decided" in resumed.output and " ok " not in resumed.output, resumed.output
        assert {row["is_anomalous"] for row in strict_json(out / "_summary.json")["top"]} == {None}
        strict_json(out / "_dataset.json")
        report = CliRunner().invoke(main, ["report", str(out), "--html", str(tmp_path / f"{model.name}.html")])
        assert report.exit_code == 0, report.output
        html = (tmp_path / f"{model.name}.html").read_text()
        assert "n/a: no threshold" in html and ">undecided<" in html and ">normal<" not in html

    second = train_without_holdout(synthetic_root, tmp_path / "washer-seed1", seed=1)
    ensemble = tmp_path / "ensemble"
    result = CliRunner().invoke(main, ["ensemble", str(no_threshold_bundle), str(second), "--out", str(ensemble)])
    assert result.exit_code == 0, result.output
    assert "threshold none (a member has no held-out images)" in result.output
    assert strict_json(ensemble / "manifest.json")["threshold"] is None
    detector, _ = load_ensemble(ensemble)
    assert detector.threshold == math.inf


def test_null_reads_back_as_what_json_could_not_hold():
    from pni_ray.models.pni import Normalisation

    norm = Normalisation.from_record({"image_mean": 1.0, "image_std": 2.0, "pixel_mean": 0.0, "pixel_std": 1.0,
                                      "threshold": None, "extras": {"parent_threshold": None, "n_holdout": None,
                                                                    "members_threshold": 3.5}})
    assert norm.threshold == math.inf and norm.extras["parent_threshold"] == math.inf
    assert math.isnan(norm.extras["n_holdout"]) and norm.extras["members_threshold"] == 3.5


@pytest.mark.parametrize("section, key, value", [("neighbourhood", "cut", math.inf),
                                                 ("neighbourhood", "cut_candidates", [1.0, math.inf]),
                                                 ("scoring", "blur_sigma", math.nan),
                                                 ("refiner", "defect_weights", {"perlin": math.inf})])
def test_a_setting_json_cannot_hold_is_refused(section, key, value):
    """An infinite neighbourhood.cut was accepted, then written as null (= chosen) and read back as
    another config; refused when the config is read, from a file or from code."""
    from pni_ray.config import TrainConfig

    with pytest.raises(ValueError, match=rf"{section}\.{key}(\.perlin)? must be a finite number"):
        TrainConfig.from_dict({section: {key: value}})
    with pytest.raises(ValueError, match="must be a finite number"):
        cfg = TrainConfig()
        cfg.replace(**{section: dataclasses.replace(getattr(cfg, section), **{key: tuple(value) if isinstance(value, list) else value})})
