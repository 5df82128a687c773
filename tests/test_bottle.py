"""Real MVTec AD data (read in place from ../shared; skipped when absent): the baseline holds."""

from __future__ import annotations

import dataclasses

import pytest

from pni_ray.config import TrainConfig
from pni_ray.data.mvtec import load_category
from pni_ray.evaluate import evaluate_category
from pni_ray.models.pni import build_detector
from pni_ray.training import train_category
from conftest import both_cores


@pytest.mark.slow
def test_patchcore_baseline_on_bottle(bottle_root):
    """PatchCore mode, offline default backbone, a 1% coreset to keep CI short (defaults use 5%)."""
    cfg = TrainConfig(mode="patchcore")
    cfg = cfg.replace(coreset=dataclasses.replace(cfg.coreset, ratio=0.01))
    with both_cores():
        trained = train_category(bottle_root, "bottle", cfg, progress=False)
        results = evaluate_category(build_detector(trained), load_category(bottle_root, "bottle"), progress=False)
    row = results["patchcore"]
    assert row["n_test_images"] == 83
    assert row["image_auroc"] >= 0.99
    assert row["pixel_auroc"] >= 0.97
    assert row["aupro"] >= 0.85
