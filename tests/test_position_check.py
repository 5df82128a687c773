"""The position check: synthetic defects on held-out good images decide whether a bundle's scoring mode keeps p(c|x)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import tiny_config
from pni_ray.data.defects import misplace
from pni_ray.position_check import (DROP_BELOW, MIN_IMAGES, MIN_MEMORY_IMAGES, WITHOUT_POSITION, check_position,
                                    defect_generator, position_pays, synthetic_defects)


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([120 + 80 * np.sin(9 * yy), 60 + 150 * xx, 200 - 120 * yy * xx], axis=-1)
    return np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)


def test_misplace_copies_a_part_unchanged_to_where_it_does_not_overlap_itself():
    image = _photo(100, 120, 0)
    for seed in range(12):
        out, mask = misplace(image, np.random.default_rng(seed))
        np.testing.assert_array_equal(mask, np.any(out != image, axis=-1))  # the mask is the changed pixels
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        assert (y1 - y0) * (x1 - x0) <= 0.065 * mask.size  # 1-6% of the image
        pasted = out[y0:y1, x0:x1]
        sources = [(sy, sx) for sy in range(image.shape[0] - (y1 - y0) + 1) for sx in range(image.shape[1] - (x1 - x0) + 1)
                   if np.array_equal(image[sy:sy + y1 - y0, sx:sx + x1 - x0], pasted)]
        assert sources, "the pasted rectangle is a copy of the image's own content"
        sy, sx = sources[0]
        assert abs(sy - y0) >= y1 - y0 or abs(sx - x0) >= x1 - x0  # from elsewhere, not a smear of itself
    a, b = misplace(image, np.random.default_rng(3)), misplace(image, np.random.default_rng(3))
    np.testing.assert_array_equal(a[0], b[0])


def test_synthetic_defects_are_each_kind_per_image_and_seeded():
    images = [_photo(64, 64, s) for s in range(3)]
    drawn = synthetic_defects(images, 2, defect_generator(0))
    assert len(drawn) == 3 * 2 * 2  # images x per_image x kinds (misplace, CutPaste)
    again, other = synthetic_defects(images, 2, defect_generator(0)), synthetic_defects(images, 2, defect_generator(1))
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(drawn, again))
    assert not all(np.array_equal(x[0], y[0]) for x, y in zip(drawn, other))


@pytest.mark.parametrize("pixel, aupro, pays", [(-0.002, -0.005, False), (+0.001, -0.008, True), (-0.002, +0.002, True),
                                                (-0.0005, -0.008, True), (-0.002, -0.0015, True),  # within the tolerance
                                                (None, -0.01, True)])
def test_the_prior_is_dropped_only_when_position_loses_on_pixel_auroc_and_aupro(pixel, aupro, pays):
    assert DROP_BELOW == {"pixel_auroc": -0.001, "aupro": -0.002}
    base = {"image_auroc": 0.9, "pixel_auroc": 0.95, "aupro": 0.9}
    position = {"image_auroc": 0.5,  # image AUROC is recorded, never decides: ~20 held-out images move it by pairs
                "pixel_auroc": None if pixel is None else 0.95 + pixel, "aupro": 0.9 + aupro}
    assert position_pays({"patchcore": base, "position": position}) is pays


@pytest.fixture
def small_bank_checked(monkeypatch):
    """The check run on the suite's 16-image categories: 6 memory-bank images pass the memory-bank floor."""
    import pni_ray.position_check as position_check

    monkeypatch.setattr(position_check, "MIN_MEMORY_IMAGES", 1)


def _holdout_config(**position):
    """Enough held-out images for the check: 16 synthetic train images, 10 held out (6 in the memory bank)."""
    cfg = tiny_config()
    return cfg.replace(scoring=dataclasses.replace(cfg.scoring, holdout_fraction=0.65),
                       position=dataclasses.replace(cfg.position, **position))


def test_training_records_the_check_and_deploys_its_mode(synthetic_root, tmp_path, small_bank_checked):
    from pni_ray.bundle import load_bundle, save_bundle
    from pni_ray.models.pni import build_detector
    from pni_ray.training import train_category

    trained = train_category(synthetic_root, "washer", _holdout_config(), progress=False)
    facts = trained.report["deterministic"]
    assert facts["n_holdout_images"] >= MIN_IMAGES
    check = facts["position_check"]
    assert check["defects"] == 2 * facts["n_holdout_images"]
    assert all(check[m][k] is not None for m in ("patchcore", "position") for k in ("pixel_auroc", "aupro"))
    assert check["position"] != check["patchcore"]  # two modes scored, not one twice
    assert set(check["patchcore"]) == set(check["position"]) == {"image_auroc", "pixel_auroc", "aupro"}
    assert check["kept"] == position_pays({m: check[m] for m in ("patchcore", "position")})
    assert trained.config.scoring.mode == ("pni" if check["kept"] else "neighbourhood")
    # the record is the check's own: the same bundle checked again gives the same figures
    from pni_ray.data.images import load_rgb
    images = [load_rgb(synthetic_root / "washer" / "train" / "good" / n) for n in facts["holdout_images"]]
    again = check_position(build_detector(trained), images, 1, trained.config.seed)
    assert again.record()["position"] == check["position"]
    loaded, manifest = load_bundle(save_bundle(trained, tmp_path / "b"))
    assert manifest["training"]["position_check"] == check
    from pni_ray.orchestration.train_task import mode_fields
    assert mode_fields(tmp_path / "b") == {"mode": trained.config.scoring.mode,
                                           "position_check": "kept" if check["kept"] else "dropped"}
    assert build_detector(loaded).mode == trained.config.scoring.mode


@pytest.mark.parametrize("configured", ["pni", "position"])  # pni_split maps as pni does
def test_a_prior_that_loses_leaves_the_scoring_mode_and_the_threshold_follows(synthetic_root, monkeypatch, tmp_path,
                                                                             configured, small_bank_checked, bundle_tiny):
    """Forced to lose, pni deploys neighbourhood (position: patchcore), calibration scores in that mode, and
    train-all compares the bundle's config as it was asked for (a rerun skips it, not "a bundle of another config")."""
    import pni_ray.position_check as position_check
    from pni_ray.bundle import read_manifest, save_bundle
    from pni_ray.bundle_manifest import read_ensemble_manifest
    from pni_ray.models.pni import build_detector
    from pni_ray.orchestration.train_plan import canonical, config_diff, recorded_config
    from pni_ray.training import calibrate, train_category

    monkeypatch.setattr(position_check, "position_pays", lambda metrics: False)
    cfg = _holdout_config()
    cfg = cfg.replace(scoring=dataclasses.replace(cfg.scoring, mode=configured))
    trained = train_category(synthetic_root, "washer", cfg, progress=False)
    assert trained.report["deterministic"]["position_check"]["kept"] is False
    assert trained.config.scoring.mode == WITHOUT_POSITION[configured]
    detector = build_detector(trained)
    assert detector.mode == WITHOUT_POSITION[configured]
    paths = [synthetic_root / "washer" / "train" / "good" / n for n in trained.report["deterministic"]["holdout_images"]]
    again = calibrate(detector, paths, cfg.batch_size, cfg.scoring.threshold_sigmas)
    assert trained.normalisation.threshold == pytest.approx(again.threshold)
    assert trained.normalisation.image_mean == pytest.approx(again.image_mean)
    bundle = save_bundle(trained, tmp_path / "b")
    manifest = read_manifest(bundle)
    assert manifest["config"]["scoring"]["mode"] == WITHOUT_POSITION[configured]
    # train-all's summary row and table say the mode it scores in and that the check chose it
    from pni_ray.orchestration.train_all import format_table, mode_note
    from pni_ray.orchestration.train_task import mode_fields
    row = {"category": "washer", "backbone": "b", "status": "trained", "bundle": "washer/b", **mode_fields(bundle)}
    assert row["mode"] == WITHOUT_POSITION[configured] and row["position_check"] == "dropped"
    assert f" {WITHOUT_POSITION[configured]}* " in format_table([row]).splitlines()[1]
    assert mode_note([row]).startswith("* washer/b: the position check") and mode_note([{**row, "position_check": "kept"}]) is None
    # an ensemble records the mode its member scores in, not the one it trained for
    from pni_ray.ensemble_bundle import save_ensemble
    ensemble = read_ensemble_manifest(save_ensemble([bundle, bundle_tiny], tmp_path / "ens"))
    assert [m["mode"] for m in ensemble["members"]] == [WITHOUT_POSITION[configured], "pni"]
    from pni_ray.orchestration.score_model import describe_model
    assert describe_model(tmp_path / "ens").trained_on == "colour"  # its members agree: score's grey hint applies
    assert manifest["training"]["position_check"]["requested_mode"] == configured
    assert config_diff(canonical(recorded_config(manifest)), canonical(cfg.to_dict())) == []
    other = cfg.replace(scoring=dataclasses.replace(cfg.scoring, blur_sigma=3.0))
    assert config_diff(canonical(recorded_config(manifest)), canonical(other.to_dict())) == ["scoring.blur_sigma: 2.0 -> 3.0"]


def test_the_check_is_skipped_with_few_held_out_images_or_when_turned_off(trained_tiny, synthetic_root, monkeypatch):
    import pni_ray.position_check as position_check
    from pni_ray.training import train_category

    few = trained_tiny.report["deterministic"]  # the suite's tiny bundle: 2-3 held-out images, 13-14 in the bank
    assert few["position_check"] == {"skipped": f"{few['n_holdout_images']} held-out images, fewer than {MIN_IMAGES}; "
                                                f"{few['n_memory_images']} memory-bank images, fewer than {MIN_MEMORY_IMAGES}"}
    assert trained_tiny.config.scoring.mode == "pni"
    monkeypatch.setattr(position_check, "position_pays", lambda metrics: False)  # would drop the prior if it ran
    small_bank = train_category(synthetic_root, "washer", _holdout_config(), progress=False)  # 10 held out, 6 in the bank
    assert small_bank.report["deterministic"]["position_check"] == {"skipped": f"6 memory-bank images, fewer than {MIN_MEMORY_IMAGES}"}
    assert small_bank.config.scoring.mode == "pni"
    off = train_category(synthetic_root, "washer", _holdout_config(check_defects=0), progress=False)
    assert "position_check" not in off.report["deterministic"] and off.config.scoring.mode == "pni"


def test_a_bad_check_setting_fails_when_the_config_is_read():
    from pni_ray.config import PositionConfig

    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="position.check_defects"):
            PositionConfig(check_defects=bad)
