"""The `pni-ray` command line: train, evaluate (plain and ablation JSON), data tools, errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pni_ray.cli import main

TINY = ["--image-size", "128", "--coreset-ratio", "0.1", "--dist-size", "64", "--epochs", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def cli_bundle(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "granite"
    result = CliRunner().invoke(
        main, ["-q", "train", str(synthetic_root), "--category", "granite", "--out", str(out),
               "--backbone", "efficientnet_lite0", *TINY]
    )
    assert result.exit_code == 0, result.output
    assert "trained granite" in result.output
    return out


def test_train_refuses_existing_without_force(cli_bundle, synthetic_root):
    result = CliRunner().invoke(main, ["-q", "train", str(synthetic_root), "-c", "granite", "--out", str(cli_bundle), *TINY])
    assert result.exit_code != 0 and "--force" in result.output


def test_evaluate_json(cli_bundle, synthetic_root, tmp_path):
    out = tmp_path / "m.json"
    result = CliRunner().invoke(main, ["-q", "evaluate", str(cli_bundle), str(synthetic_root), "--json", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
        assert 0.0 <= data[key] <= 1.0
    assert data["n_test_images"] == 4 + 2 * 2
    assert "image_auroc" in result.output


def test_evaluate_ablation_json(cli_bundle, synthetic_root, tmp_path):
    out = tmp_path / "a.json"
    result = CliRunner().invoke(
        main, ["-q", "evaluate", str(cli_bundle), str(synthetic_root), "--ablation", "--json", str(out), "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    modes = json.loads(out.read_text())["modes"]
    assert set(modes) >= {"patchcore", "neighbourhood", "position", "pni"}
    for row in modes.values():
        assert set(row) >= {"image_auroc", "pixel_auroc", "aupro", "f1_max", "images_per_s"}
    for mode in ("patchcore", "neighbourhood", "position", "pni"):
        assert mode in result.output
    # whether each prior bites: in the JSON per mode and in the printed table
    for mode, row in modes.items():
        diag = row["diagnostics"]
        assert 0.0 < diag["allowed_share"] <= 1.0
        for key in ("changed_normal", "changed_defect"):
            assert 0.0 <= diag[key] <= 1.0
        assert diag["score_change_normal"] >= -1e-4 and diag["score_change_defect"] >= -1e-4  # masks only raise
        assert ("mlp_val_top1" in diag) == (mode in ("neighbourhood", "pni"))
    assert modes["patchcore"]["diagnostics"]["allowed_share"] == 1.0
    assert modes["patchcore"]["diagnostics"]["changed_defect"] == 0.0
    assert modes["position"]["diagnostics"]["allowed_share"] < 0.5  # the position prior narrows C_emb
    assert "allowed_share" in result.output and "changed_defect" in result.output


def test_train_bad_layout_names_the_file(tmp_path):
    (tmp_path / "cat" / "train" / "good").mkdir(parents=True)
    (tmp_path / "cat" / "train" / "good" / "x.png").write_bytes(b"garbage")
    result = CliRunner().invoke(main, ["-q", "train", str(tmp_path), "-c", "cat", "--out", str(tmp_path / "o"), *TINY])
    assert result.exit_code != 0
    assert "x.png" in str(result.exception) or "x.png" in result.output


def test_make_synthetic_and_backbones(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["make-synthetic", str(tmp_path / "s"), "--size", "64", "--categories", "weave"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s" / "weave" / "train" / "good").is_dir()
    result = runner.invoke(main, ["backbones"])
    assert "efficientnet_lite0" in result.output and "wide_resnet50_2" in result.output
