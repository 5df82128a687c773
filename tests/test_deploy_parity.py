"""Deploy exactly what was evaluated: for every geometry, `evaluate`, `score BUNDLE` and `score EXPORT`
give the same image scores and maps on every test image (synthetic washer cropped to 80 x 128)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pni_ray.export.deploy_parity import deployment_parity, within_limits
from pni_ray.export.onnx_export import ExportOptions, export_bundle
from pni_ray.export.runtime import load_exported
from pni_ray.bundle import save_bundle
from pni_ray.config import GeometryConfig
from pni_ray.data.mvtec import derive_category, load_category
from pni_ray.data.transforms import load_batch
from pni_ray.models.pni import build_detector
from pni_ray.training import train_category

from conftest import tiny_config

CROP = (24, 0, 80, 128)  # washer 128 x 128 -> 80 high x 128 wide
GEOMETRIES = {
    "resize": GeometryConfig(),
    "letterbox": GeometryConfig(policy="letterbox", pad_value=255),
    "short-side": GeometryConfig(policy="short-side"),
    "tile": GeometryConfig(tile=True, tile_size=64, tile_overlap=16),
}


@pytest.fixture(scope="module")
def crop_root(synthetic_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("crop")
    derive_category(synthetic_root, "washer", root, crop=CROP)
    return root


@pytest.fixture(scope="module")
def bundles(crop_root, tmp_path_factory):
    small = dict(neighbourhood=dataclasses.replace(tiny_config().neighbourhood, epochs=2))
    folder = tmp_path_factory.mktemp("geo-bundles")
    return {name: save_bundle(train_category(crop_root, "washer", tiny_config(geometry=g, **small), progress=False),
                              folder / name) for name, g in GEOMETRIES.items()}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_evaluate_score_and_export_agree(bundles, crop_root, name, tmp_path):
    figures = deployment_parity(bundles[name], crop_root, "washer", tmp_path, engine="local", threads=1)
    assert figures["n_images"] >= 10
    for key in ("score_bundle", "score_export"):
        f = figures[key]
        assert f["error_rows"] == 0 and f["summary_failed"] == 0, (key, f)
        assert f["ranking_identical"], (key, f)
    assert figures["score_bundle"]["max_rel_score_diff"] <= 1e-5  # the same torch code, batch for batch
    assert figures["score_bundle"]["max_map_diff_of_range"] <= 1e-5
    assert within_limits(figures), figures


def test_the_pni_rule_and_image_window_travel_with_the_export(crop_root, tmp_path):
    """A bundle trained with the paper's mean rule and a 2-patch image window: the export builds its
    masks with that rule and its runtime takes image scores over that window, like `evaluate`."""
    scoring = dataclasses.replace(tiny_config().scoring, combine="mean", image_window=2)
    cfg = tiny_config(scoring=scoring, neighbourhood=dataclasses.replace(tiny_config().neighbourhood, epochs=2))
    bundle = save_bundle(train_category(crop_root, "washer", cfg, progress=False), tmp_path / "bundle")
    figures = deployment_parity(bundle, crop_root, "washer", tmp_path / "work", engine="local", threads=1)
    assert within_limits(figures), figures
    model = load_exported(tmp_path / "work" / "export", threads=1)
    assert model.manifest["combine"] == "mean" and model.manifest["config"]["scoring"]["image_window"] == 2
    assert model.geometry.image_window == 2


def test_a_chosen_neighbourhood_cut_travels_with_the_export(crop_root, tmp_path):
    """A bundle whose p(c|N) cut was chosen above tau (min_keep lowered so the rule picks one): the
    export builds its masks at that cut, and evaluate, score BUNDLE and score EXPORT agree."""
    neighbourhood = dataclasses.replace(tiny_config().neighbourhood, epochs=2, min_keep=0.5)
    trained = train_category(crop_root, "washer", tiny_config(neighbourhood=neighbourhood), progress=False)
    assert trained.neighbourhood_cut > 1.0
    detector = build_detector(trained)
    images = load_batch([s.path for s in load_category(crop_root, "washer").test], 128)
    at_cut = detector.patch_scores(images, "pni")
    detector.scorer.tau_neighbourhood = detector.scorer.tau
    assert not torch.equal(detector.patch_scores(images, "pni"), at_cut)  # the cut decides scores: a graph at tau differs
    bundle = save_bundle(trained, tmp_path / "bundle")
    figures = deployment_parity(bundle, crop_root, "washer", tmp_path / "work", engine="local", threads=1)
    assert within_limits(figures), figures
    manifest = load_exported(tmp_path / "work" / "export", threads=1).manifest
    assert manifest["tau_neighbourhood"] == pytest.approx(trained.neighbourhood_cut * manifest["tau"], rel=1e-12)


def test_export_manifest_records_the_geometry(bundles, tmp_path):
    out = export_bundle(bundles["letterbox"], tmp_path / "lb", ExportOptions(max_batch=4)).path
    model = load_exported(out, threads=1)
    m = model.manifest
    assert m["image_size"] == [128, 128] and m["model_input"] == [128, 128] and m["scorer"]["fill_index"]
    assert set(model.stage_inputs("scorer")) >= {"features", "probabilities", "fill_index"}
    assert m["combine"] == "both" and model.geometry.image_window == m["config"]["scoring"]["image_window"] == 3
    tiled = load_exported(export_bundle(bundles["tile"], tmp_path / "t", ExportOptions(max_batch=4)).path, threads=1)
    assert tiled.manifest["model_input"] == [64, 64] and tiled.manifest["image_size"] == [80, 128]
    assert tiled.manifest["grid"] == [10, 16]
    # tiled: the backbone runs per tile, the rest as one fused graph, as the stages one by one would
    assert tiled.fused[0] == ("mlp", "softmax", "scorer")
    crop = np.random.default_rng(0).integers(0, 255, (80, 128, 3), np.uint8)
    np.testing.assert_allclose(tiled.predict_images([crop])[0][0], load_exported(
        tiled.path, threads=1, fuse=False).predict_images([crop])[0][0], rtol=1e-5, atol=1e-6)
    short = load_exported(export_bundle(bundles["short-side"], tmp_path / "s", ExportOptions(max_batch=4)).path, threads=1)
    assert short.manifest["image_size"] == [128, 208] and not short.manifest["scorer"]["fill_index"]
    # another aspect ratio is refused by name: short-side's grid, letterbox's content extent (recorded in the export)
    tall = np.full((128, 80, 3), 200, np.uint8)
    assert m["content_extent"] == [[80, 80], [128, 128]]
    # a reader of format 1 would ignore it without a word: such exports are format 2, the others stay 1
    assert m["format_version"] == 2 and short.manifest["format_version"] == tiled.manifest["format_version"] == 1
    with pytest.raises(ValueError, match=r"80x128 fills 80 x 128 px of the 128 x 128 letterbox canvas, the training "
                                         r"images 128 x 80 px"):
        model.predict_images([tall])
    maps, scores = model.predict_images([np.full((160, 256, 3), 200, np.uint8)])  # the training ratio, another size
    assert maps[0].shape == (160, 256) and np.isfinite(scores).all()
    with pytest.raises(ValueError, match="trained on a"):
        short.predict_images([tall])


def test_score_refuses_a_misfit_image_as_an_error_row(bundles, tmp_path):
    from PIL import Image

    from pni_ray.export.deploy_parity import read_scores
    from pni_ray.orchestration.score import Options, score

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.full((80, 128, 3), 120, np.uint8)).save(folder / "wide.png")
    Image.fromarray(np.full((128, 80, 3), 120, np.uint8)).save(folder / "tall.png")
    summary = score(bundles["short-side"], [str(folder)], tmp_path / "out", Options(threads=1), engine="local")
    rows = read_scores(tmp_path / "out")
    assert summary["rows"] == 2 and summary["failed"] == 1
    assert rows[str(folder / "wide.png")]["error"] is None
    assert "tall.png" in rows[str(folder / "tall.png")]["error"] and "trained on a" in rows[str(folder / "tall.png")]["error"]
    summary = score(bundles["letterbox"], [str(folder)], tmp_path / "lb", Options(threads=1), engine="local")
    rows = read_scores(tmp_path / "lb")
    assert summary["rows"] == 2 and summary["failed"] == 1 and rows[str(folder / "wide.png")]["error"] is None
    assert rows[str(folder / "tall.png")]["error"].startswith(f"{folder / 'tall.png'}: 80x128 fills 80 x 128 px of the "
                                                             "128 x 128 letterbox canvas")


@pytest.mark.ray
def test_ray_engine_scores_like_evaluate(bundles, crop_root, tmp_path):
    pytest.importorskip("ray")
    figures = deployment_parity(bundles["letterbox"], crop_root, "washer", tmp_path, engine="ray", threads=1)
    assert within_limits(figures), figures
    assert figures["score_bundle"]["max_rel_score_diff"] <= 1e-5


@pytest.mark.parametrize("name", ["letterbox", "tile"])
def test_int8_export_calibrates_on_the_bundles_geometry(bundles, crop_root, name, tmp_path):
    """--int8 backbone + mlp on a padded and on a tiled geometry: calibration images are prepared as
    scoring prepares them (canvases, or tiles stitched into whole-image features), and the INT8
    export ranks the test images as the FP32 one does."""
    from pni_ray.data.mvtec import load_category

    good = crop_root / "washer" / "train" / "good"
    fp32 = load_exported(export_bundle(bundles[name], tmp_path / "fp32", ExportOptions(max_batch=4)).path, threads=1)
    out = export_bundle(bundles[name], tmp_path / "int8", ExportOptions(max_batch=4, int8=("backbone", "mlp"),
                                                                          calibration=good, calibration_images=6)).path
    int8 = load_exported(out, threads=1)
    assert int8.manifest["int8"]["graphs"] == ["backbone", "mlp"] and len(int8.manifest["int8"]["calibration_images"]) == 6
    images = [int8.geometry.load(s.path) for s in load_category(crop_root, "washer").test]
    maps32, scores32 = fp32.predict_images(images)
    maps8, scores8 = int8.predict_images(images)
    assert [m.shape for m in maps8] == [m.shape for m in maps32] == [im.shape[:2] for im in images]
    assert np.corrcoef(np.concatenate([m.ravel() for m in maps32]), np.concatenate([m.ravel() for m in maps8]))[0, 1] > 0.9
    assert np.corrcoef(scores32, scores8)[0, 1] > 0.9
