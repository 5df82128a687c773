"""Helpers of the issue-15 benchmarks that decide what they measure: inputs, memory polling, bank sizes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_ablation  # noqa: E402
import bench_coreset  # noqa: E402
import bench_neighbourhood_signal  # noqa: E402
import bench_peers  # noqa: E402
import bench_pixel_loss  # noqa: E402
import bench_scale  # noqa: E402
import bench_score  # noqa: E402


def test_link_inputs_gives_n_distinct_paths_over_a_small_pool(tmp_path: Path) -> None:
    pool = []
    for i in range(3):
        path = tmp_path / f"p{i}.png"
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(path)
        pool.append(path)
    root = bench_scale.link_inputs(tmp_path, pool, 2500)
    files = sorted(root.rglob("*.png"))
    assert len(files) == 2500
    assert len({f.parent for f in files}) == 3  # 1000 per folder
    assert files[0].stat().st_ino == pool[0].stat().st_ino  # hard links: no extra disk


def test_tree_memory_sees_the_process_peak() -> None:
    code = "import time; x = bytearray(80 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(1.5)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    memory = bench_scale.TreeMemory(proc.pid, 0.1)
    proc.wait()
    time.sleep(0.2)
    memory.stop()
    assert memory.driver >= 80 * 2**20
    assert memory.worker == 0  # not a Ray worker


def test_tree_memory_sees_a_spike_between_two_polls() -> None:
    """200 MB held for 0.05 s, then freed, polled every 1 s: RSS read at the polls would miss it, VmHWM keeps it."""
    code = ("import time; time.sleep(0.3); x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096]); "
            "time.sleep(0.05); del x; time.sleep(1.5)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    memory = bench_scale.TreeMemory(proc.pid, 1.0)
    proc.wait()
    memory.stop()
    assert memory.driver >= 200 * 2**20


def test_scratch_dir_keeps_a_given_folder_and_removes_a_temporary_one(tmp_path: Path) -> None:
    with bench_scale.scratch_dir(tmp_path / "keep", "x-") as kept:
        (kept / "f").write_text("1")
    assert (tmp_path / "keep" / "f").is_file()
    with bench_scale.scratch_dir(None, "x-") as temporary:
        assert temporary.is_dir()
    assert not temporary.exists()


def test_bank_ratio() -> None:
    assert bench_peers.bank_ratio("1%") == 0.01
    assert bench_peers.bank_ratio("default") is None


def test_engine_filter_names_what_it_refuses() -> None:
    known = {"torch", "onnxruntime-int8", "openvino"}
    assert bench_peers.chosen_engines("", known) is None  # every path
    assert bench_peers.chosen_engines("torch,openvino", known) == {"torch", "openvino"}
    assert bench_peers.chosen_engines("openvino, ", known) == {"torch", "openvino"}  # torch: the accuracy reference
    with pytest.raises(SystemExit, match="--engines tensorrt: choose from onnxruntime-int8, openvino, torch"):
        bench_peers.chosen_engines("torch,tensorrt", known)
    # a path that exists but is off in this run says what turns it on, instead of timing torch alone
    with pytest.raises(SystemExit, match="--engines onnxruntime-int8: needs --int8"):
        bench_peers.chosen_engines("onnxruntime-int8", known, {"onnxruntime-int8": "needs --int8 GRAPHS"})


def test_pni_score_engines_pick_the_export_and_the_backbone_runtime(tmp_path: Path, monkeypatch) -> None:
    """Engine onnxruntime-int8-ov times the INT8 export with its backbone in OpenVINO, the rest as before."""
    import pni_ray.export.runtime

    loaded = []

    class Model:
        def predict(self, x):
            return np.zeros((len(x), bench_peers.SIZE, bench_peers.SIZE), np.float32), np.zeros(len(x), np.float32)

    def fake_load(path, threads=None, backbone_runtime="onnxruntime"):
        loaded.append((path, threads, backbone_runtime))
        return Model()

    monkeypatch.setattr(pni_ray.export.runtime, "load_exported", fake_load)
    monkeypatch.setattr(bench_peers, "decoded_test_images", lambda root, cat: np.zeros((3, 3, 8, 8), np.float32))
    spec = {"data_root": str(tmp_path), "category": "c", "threads": 1, "batch": 2, "repeats": 1,
            "export": "E", "export_int8": "E8"}
    for engine in ("onnxruntime", "onnxruntime-int8", "onnxruntime-int8-ov"):
        out = bench_peers.worker_pni_score({**spec, "engine": engine, "maps": str(tmp_path / f"{engine}.npz")})
        assert out["images_per_s"] > 0 and np.load(tmp_path / f"{engine}.npz")["maps"].shape[0] == 3
    assert loaded == [("E", 1, "onnxruntime"), ("E8", 1, "onnxruntime"), ("E8", 1, "openvino")]


def test_missing_anomalib_is_skipped_with_the_reason(tmp_path: Path) -> None:
    args = argparse.Namespace(anomalib_python=tmp_path / "nope" / "python")
    python, note, engines = bench_peers.anomalib_python(args)
    assert python is None and engines == []
    assert "anomalib skipped" in note and "--setup-anomalib" in note


def test_anomalib_engines_follow_what_its_venv_imports(tmp_path: Path) -> None:
    """OpenVINO rows need openvino (and nncf for INT8_PTQ) in anomalib's venv; missing ones are named."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\ncase "$2" in *nncf*) exit 1;; *openvino*) exit 0;; *) echo 2.7.0;; esac\n')
    fake.chmod(0o755)
    python, note, engines = bench_peers.anomalib_python(argparse.Namespace(anomalib_python=fake))
    assert python == fake and engines == ["torch", "onnxruntime", "openvino"]
    assert "anomalib 2.7.0" in note and "openvino-int8 skipped" in note and "nncf" in note


def test_masks_resized_nearest_to_the_common_resolution(tmp_path: Path) -> None:
    mask = np.zeros((512, 300), np.uint8)
    mask[100:200, 50:150] = 255
    path = tmp_path / "m.png"
    Image.fromarray(mask).save(path)
    out = bench_peers.masks_at([path, None])
    assert out.shape == (2, bench_peers.SIZE, bench_peers.SIZE)
    assert out.dtype == bool and not out[1].any()
    assert abs(out[0].mean() - (mask > 127).mean()) < 0.01


def test_borrowed_bank_is_the_bundles_c_emb(bundle_tiny: Path, trained_tiny, tmp_path: Path) -> None:
    import torch

    fit = bench_peers.borrow_bank(str(bundle_tiny), str(tmp_path / "bank.pt"))
    bank = torch.load(tmp_path / "bank.pt")
    assert torch.equal(bank, trained_tiny.memory) and fit["entries"] == trained_tiny.memory.shape[0]
    assert fit["fit_s"] != fit["fit_s"]  # NaN: no anomalib fit was measured


def test_worker_peak_rss_is_its_own_not_its_parents() -> None:
    """A scoring worker started by a driver that holds 400 MB reports its own peak: Linux carries
    ru_maxrss across fork + exec, which made every worker report at least the driver's peak."""
    ballast = np.ones(400 * 2**20, np.uint8)  # touched pages: the driver's RSS high-water mark
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from bench_peers import peak_rss_mb; "
            "print(peak_rss_mb())")
    out = subprocess.run([sys.executable, "-c", code, str(Path(bench_peers.__file__).parent)],
                         capture_output=True, text=True, check=True)
    assert ballast.sum() > 0
    assert float(out.stdout.split()[-1]) < 300, out.stdout  # the child imports numpy and friends, not 400 MB


def test_ratio_paths_must_keep_their_systems_accuracy() -> None:
    """A fast path that loses accuracy (anomalib's INT8_PTQ on bottle: 0.9606 / 0.8678) is not the peer the
    ratio uses; image AUROC counts too."""
    rows = [{"system": "anomalib", "engine": "torch", "image_auroc": 1.0, "pixel_auroc": 0.9842, "aupro": 0.9488},
            {"system": "anomalib", "engine": "openvino", "image_auroc": 1.0, "pixel_auroc": 0.9841, "aupro": 0.9488},
            {"system": "anomalib", "engine": "openvino-int8", "image_auroc": 1.0, "pixel_auroc": 0.9606, "aupro": 0.8678},
            {"system": "anomalib", "engine": "onnxruntime", "image_auroc": 0.99, "pixel_auroc": 0.9842, "aupro": 0.9488},
            {"system": "pni-ray", "engine": "onnxruntime-int8", "image_auroc": 0.9, "pixel_auroc": 0.9, "aupro": 0.9}]
    assert [r["engine"] for r in bench_peers.accurate_paths(rows, "anomalib")] == ["torch", "openvino"]
    assert bench_peers.accurate_paths(rows, "pni-ray") == []  # no torch row to hold the INT8 path to
    rows.append({"system": "pni-ray", "engine": "onnxruntime", "image_auroc": 0.9, "pixel_auroc": 0.9, "aupro": 0.9})
    assert [r["engine"] for r in bench_peers.accurate_paths(rows, "pni-ray")] == ["onnxruntime"]


def test_memory_bank_seconds_are_the_stages_patchcore_fits() -> None:
    row = {"stages_s": {"features": 7.5, "coreset": 3.5, "assignment": 8.0, "mlp": 80.0, "calibration": 1.0}}
    assert bench_peers.memory_bank_seconds(row) == 11.0
    assert bench_peers.memory_bank_seconds({"stages_s": {"features": 7.5}}) is None  # an older fit record
    assert bench_peers.memory_bank_seconds({"fit_s": float("nan")}) is None  # a borrowed bank


def test_pixel_loss_splits_sum_to_one_minus_auroc() -> None:
    """Each split of the wrongly ordered pairs sums to 1 - pixel AUROC (ties half), as pni_ray.metrics
    computes it; a blurred map loses its pairs at normal pixels next to the defect, none on good images."""
    from scipy.ndimage import gaussian_filter

    from pni_ray.metrics import pixel_auroc

    rng = np.random.default_rng(0)
    masks = [np.zeros((64, 64), bool) for _ in range(3)]
    masks[0][20:40, 20:36] = True
    masks[1][5:9, 50:60] = True
    maps = [gaussian_filter(m.astype(np.float32), 4) + 0.01 * rng.random(m.shape).astype(np.float32) for m in masks]
    maps[1][0, 0] = maps[1][6, 52]  # an exact tie between a normal and a defect pixel
    maps[0] *= 3  # the first image's defect (type "big") scores high, the second's ("small") low
    groups = [bench_pixel_loss.pixel_groups(m) for m in masks]
    kind = np.concatenate([np.full(m.size, k, np.int16) for m, k in zip(masks, (0, 1, 2))])
    out = bench_pixel_loss.loss_by_group(np.concatenate([m.ravel() for m in maps]),
                                         np.concatenate([g[0].ravel() for g in groups]),
                                         np.concatenate([g[1].ravel() for g in groups]), kind, ("big", "small", "good"))
    expected = pixel_auroc(masks, maps)
    assert out["pixel_auroc"] == pytest.approx(expected, abs=1e-12)
    assert sum(out["loss_by_defect_pixels"].values()) == pytest.approx(1 - expected, abs=1e-12)
    assert sum(out["loss_by_normal_pixels"].values()) == pytest.approx(1 - expected, abs=1e-12)
    near = out["loss_by_normal_pixels"]["0-8 px from a defect"] + out["loss_by_normal_pixels"]["8-24 px from a defect"]
    assert near > 0.9 * (1 - expected) and out["loss_by_normal_pixels"]["good images"] < 0.05 * (1 - expected)
    assert sum(out["normal_pixel_share"].values()) == pytest.approx(1.0)
    by_defect, by_normal = out["loss_by_defect_pixels_of"], out["loss_by_normal_pixels_of"]
    assert set(by_defect) == {"big", "small"} and set(by_normal) == {"big", "small", "good"}
    assert sum(by_defect.values()) == pytest.approx(1 - expected, abs=1e-12)
    assert sum(by_normal.values()) == pytest.approx(1 - expected, abs=1e-12)
    # the low-scoring defect loses its pairs to the normal pixels around the high-scoring one
    assert by_defect["small"] > 0.9 * (1 - expected) and by_normal["big"] > 0.9 * (1 - expected)


def test_moved_copy_rolls_each_image_with_its_mask(tmp_path: Path) -> None:
    src = tmp_path / "data" / "cat"
    marker = np.zeros((20, 30, 3), np.uint8)
    marker[2, 3] = 255
    for rel in ("train/good/000.png", "train/good/001.png", "test/good/000.png", "test/crack/000.png"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(marker).save(src / rel)
    (src / "ground_truth/crack").mkdir(parents=True)
    Image.fromarray(marker[..., 0]).save(src / "ground_truth/crack/000_mask.png")
    out = bench_ablation.moved_copy(tmp_path / "data", "cat", tmp_path / "shifted", shift=0.4)
    where = {}
    for path in sorted((out / "cat").rglob("*.png")):
        lit = np.asarray(Image.open(path)).reshape(20, 30, -1).max(-1) > 0
        assert lit.sum() == 1  # rolled, not cropped or resized
        where[str(path.relative_to(out / "cat"))] = tuple(np.argwhere(lit)[0])
    assert len(where) == 5
    assert where["test/crack/000.png"] == where["ground_truth/crack/000_mask.png"]  # the mask moves with its image
    assert len({where[k] for k in where if k.startswith("t")}) > 1  # images move by different offsets
    rng = np.random.default_rng(0)  # the draws of earlier rounds' shift-only copies: two per image, in path order
    for name in ("test/crack/000.png", "test/good/000.png", "train/good/000.png", "train/good/001.png"):
        dy, dx = (int(v) for v in rng.uniform(-0.4, 0.4, 2) * (20, 30))
        assert where[name] == ((2 + dy) % 20, (3 + dx) % 30)
    again = bench_ablation.moved_copy(tmp_path / "data", "cat", tmp_path / "again", shift=0.4)
    assert all(np.array_equal(np.asarray(Image.open(out / "cat" / k)), np.asarray(Image.open(again / "cat" / k))) for k in where)


def test_moved_copy_turns_each_image_with_its_mask(tmp_path: Path) -> None:
    src = tmp_path / "data" / "cat"
    image = np.full((41, 41, 3), 40, np.uint8)
    image[4:12, 18:24] = 250  # a block above the centre: where it lands says the angle
    for rel in ("train/good/000.png", "train/good/001.png", "train/good/002.png", "test/crack/000.png"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(src / rel)
    (src / "ground_truth/crack").mkdir(parents=True)
    Image.fromarray(np.where(image[..., 0] > 128, 255, 0).astype(np.uint8)).save(src / "ground_truth/crack/000_mask.png")
    out = bench_ablation.moved_copy(tmp_path / "data", "cat", tmp_path / "turned", rotate=180)
    centre = {}
    for path in sorted((out / "cat").rglob("*.png")):
        pixels = np.asarray(Image.open(path))
        lit = (pixels if pixels.ndim == 2 else pixels[..., 0]) > 128
        assert pixels.shape[:2] == (41, 41) and 30 <= lit.sum() <= 66  # turned in place, not resized or cropped
        if pixels.ndim == 3:  # the image: no empty corners, the board reflected into them
            assert 30 <= pixels[..., 0][~lit].min() and pixels[..., 0][~lit].max() < 128
        centre[str(path.relative_to(out / "cat"))] = np.argwhere(lit).mean(0)
    assert np.allclose(centre["test/crack/000.png"], centre["ground_truth/crack/000_mask.png"], atol=1.0)  # mask turns with it
    angles = {round(float(np.degrees(np.arctan2(c[1] - 20, 20 - c[0])))) for k, c in centre.items() if k.startswith("train")}
    assert len(angles) == 3  # each image its own angle
    assert all(np.linalg.norm(c - 20) == pytest.approx(12.5, abs=1.5) for c in centre.values())  # about the centre
    assert set(np.unique(np.asarray(Image.open(out / "cat/ground_truth/crack/000_mask.png")))) <= {0, 255}  # nearest, not blended
    again = bench_ablation.moved_copy(tmp_path / "data", "cat", tmp_path / "again", rotate=180)
    assert all(np.array_equal(np.asarray(Image.open(out / "cat" / k)), np.asarray(Image.open(again / "cat" / k))) for k in centre)
    # turned, then rolled: each image is its turned copy rolled by the offset drawn before its angle
    both = bench_ablation.moved_copy(tmp_path / "data", "cat", tmp_path / "both", shift=0.25, rotate=180)
    rng = np.random.default_rng(0)
    for name in ("test/crack/000.png", "train/good/000.png", "train/good/001.png", "train/good/002.png"):  # path order
        offset = tuple(int(v) for v in rng.uniform(-0.25, 0.25, 2) * (41, 41))
        rng.uniform(-180, 180)  # the angle, the same draw as the turned-only copy's
        turned = np.asarray(Image.open(out / "cat" / name))
        assert np.array_equal(np.asarray(Image.open(both / "cat" / name)), np.roll(turned, offset, axis=(0, 1)))


def test_moved_copy_shrinks_each_image_with_its_mask_onto_a_ground_like_its_border(tmp_path: Path) -> None:
    src = tmp_path / "data" / "cat"
    rng = np.random.default_rng(5)
    image = np.clip(rng.normal(60, 4, (40, 40, 3)), 0, 255).astype(np.uint8)  # a noisy ground
    image[10:30, 10:30] = 230  # the part
    for rel in ("train/good/000.png", "test/crack/000.png"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(src / rel)
    (src / "ground_truth/crack").mkdir(parents=True)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 10:30] = 255
    Image.fromarray(mask).save(src / "ground_truth/crack/000_mask.png")
    out = bench_ablation.moved_copy(tmp_path / "data", "cat", tmp_path / "shrunk", shrink=0.5)
    small = np.asarray(Image.open(out / "cat/train/good/000.png"))
    lit = small[..., 0] > 150
    assert small.shape == image.shape and 81 <= lit.sum() <= 121  # the part at half its side: ~10 x 10, centred
    assert np.allclose(np.argwhere(lit).mean(0), 19.5, atol=1.0)
    ground = small[..., 0][~lit]
    assert abs(float(np.median(ground)) - 60) <= 2 and 1.0 <= float(ground.std()) <= 10  # the border's colour and noise
    shrunk_mask = np.asarray(Image.open(out / "cat/ground_truth/crack/000_mask.png"))
    assert set(np.unique(shrunk_mask)) <= {0, 255} and 81 <= (shrunk_mask > 0).sum() <= 121
    test = np.asarray(Image.open(out / "cat/test/crack/000.png"))[..., 0] > 150
    assert np.array_equal(test, shrunk_mask > 0)  # the mask shrinks with its image
    again = bench_ablation.moved_copy(tmp_path / "data", "cat", tmp_path / "again", shrink=0.5)
    assert np.array_equal(np.asarray(Image.open(again / "cat/train/good/000.png")), small)


def test_neighbourhood_cuts_tighten_p_n_alone_and_restore_the_bundles_cut(bundle_tiny: Path, synthetic_root: Path) -> None:
    from pni_ray.bundle import load_bundle
    from pni_ray.data.mvtec import load_category
    from pni_ray.evaluate import evaluate_category
    from pni_ray.models.pni import build_detector

    trained, manifest = load_bundle(bundle_tiny)
    detector, cat = build_detector(trained), load_category(synthetic_root, "washer")
    tau = detector.scorer.tau
    own = detector.scorer.tau_neighbourhood = 3.0 * tau  # as a bundle whose chosen cut is 3 tau
    loose, strict = bench_ablation.neighbourhood_cuts(detector, cat, manifest, [1.0, 1e6])
    assert detector.scorer.tau_neighbourhood == own  # restored: the bundle's cut, not tau
    detector.scorer.tau_neighbourhood = tau
    plain = evaluate_category(detector, cat, modes=("pni",), progress=False)["pni"]
    assert loose["pixel_auroc"] == plain["pixel_auroc"] and loose["aupro"] == plain["aupro"]
    assert 0.5 < loose["keep_neighbourhood"] <= 1.0 and strict["keep_neighbourhood"] == 0.0
    assert loose["keep_both"] <= loose["keep_neighbourhood"]
    detector.scorer.combine = "mean"
    with pytest.raises(ValueError, match="combine 'both'"):
        bench_ablation.neighbourhood_cuts(detector, cat, manifest, [4.0])


def test_neighbourhood_signals_per_patch_and_their_aurocs(bundle_tiny: Path, synthetic_root: Path) -> None:
    from pni_ray.bundle import load_bundle
    from pni_ray.data.mvtec import load_category
    from pni_ray.models.pni import build_detector

    trained, _ = load_bundle(bundle_tiny)
    detector, cat = build_detector(trained), load_category(synthetic_root, "washer")
    signals = bench_neighbourhood_signal.patch_signals(detector, cat, batch_size=3)
    normal, defect = signals["normal"], signals["defect"]
    grid = trained.grid[0] * trained.grid[1]
    assert len(normal["pni"]) == grid * sum(s.label == 0 for s in cat.test)  # every cell of every good image
    assert 0 < len(defect["pni"]) < grid * sum(s.label == 1 for s in cat.test)  # mask-covered cells only
    for group in (normal, defect):
        assert set(group) == set(bench_neighbourhood_signal.SIGNALS)
        assert np.all(group["pni"] >= group["patchcore"] - 1e-3)  # a masked minimum is never below the plain one
        assert np.all(group["surprise"] >= 0) and np.all(group["relative surprise"] >= -1e-6)
        assert np.all(group["distance to expected"] >= group["patchcore"] - 1e-3)  # a subset of C_emb
    table = bench_neighbourhood_signal.signal_table(signals, betas=(0.5,))
    assert table["patchcore"] > 0.9 and table["pni"] > 0.9  # the synthetic washer defects are easy
    assert all(0.0 <= table[k] <= 1.0 for k in table if not k.startswith("corr"))
    assert {"patchcore + 0.5 surprise", "pni + 0.5 surprise"} <= set(table)
    swapped = {"normal": defect, "defect": normal}  # labels swapped: every AUROC mirrors
    mirrored = bench_neighbourhood_signal.signal_table(swapped, betas=())
    assert mirrored["surprise"] == pytest.approx(1 - table["surprise"])


def test_neighbourhood_rescue_only_adds_entries_and_restores_the_scorer(bundle_tiny: Path, synthetic_root: Path) -> None:
    from pni_ray.bundle import load_bundle
    from pni_ray.data.mvtec import load_category
    from pni_ray.evaluate import evaluate_category
    from pni_ray.models.pni import build_detector
    from pni_ray.models.scorer import PatchScorer

    trained, manifest = load_bundle(bundle_tiny)
    detector, cat = build_detector(trained), load_category(synthetic_root, "washer")
    never, always = bench_ablation.neighbourhood_rescue(detector, cat, manifest, [1e30, 0.0])
    assert type(detector.scorer) is PatchScorer and "rescue" not in vars(detector.scorer)  # restored
    plain = evaluate_category(detector, cat, modes=("pni",), progress=False)["pni"]
    # nothing rescued: the definition's dense path gives what the candidate search gave
    assert never["pixel_auroc"] == plain["pixel_auroc"] and never["aupro"] == plain["aupro"]
    assert never["keep_rescued"] == never["keep_both"] <= always["keep_rescued"]
    # p(c|N) > 0 everywhere: every entry is allowed, which is patchcore's plain nearest neighbour
    patchcore = evaluate_category(detector, cat, modes=("patchcore",), progress=False)["patchcore"]
    assert always["keep_rescued"] == 1.0 and always["aupro"] == patchcore["aupro"] != plain["aupro"]
    detector.scorer.combine = "mean"
    with pytest.raises(ValueError, match="combine 'both'"):
        bench_ablation.neighbourhood_rescue(detector, cat, manifest, [4.0])


def test_rescue_rule_is_both_priors_or_a_confident_neighbourhood(bundle_tiny: Path) -> None:
    from pni_ray.bundle import load_bundle
    from pni_ray.models.pni import build_detector

    scorer = build_detector(load_bundle(bundle_tiny)[0]).scorer
    torch.manual_seed(0)
    n_rows = 64
    probs = torch.softmax(3 * torch.randn(n_rows, int(scorer.emb_to_dist.max()) + 1), 1)
    positions = torch.randint(0, scorer.position_prior.shape[0], (n_rows,))
    p_n = probs[:, scorer.emb_to_dist] * scorer.inv_cluster
    both = (p_n > scorer.tau_neighbourhood) & (scorer.position_prior[positions] > scorer.tau)
    scorer.__class__ = bench_ablation.RescueScorer
    for factor in (3.0, 30.0):
        scorer.rescue = factor
        expected = both | (p_n > factor * scorer.tau)
        assert (expected != both).any() and (expected != (p_n > factor * scorer.tau)).any()  # both parts matter
        assert torch.equal(scorer.allowed(probs, positions, None, "pni"), expected)
        idx = torch.randint(0, scorer.n_memory, (n_rows, 7))
        assert torch.equal(scorer.allowed(probs, positions, idx, "pni"), expected.gather(1, idx))
        assert torch.equal(scorer.allowed(probs, positions, None, "position"), scorer.position_prior[positions] > scorer.tau)
    assert not scorer.uses_candidates("pni")


def test_image_ranking_counts_the_pairs_image_auroc_loses(bundle_tiny: Path, synthetic_root: Path) -> None:
    from pni_ray.bundle import load_bundle
    from pni_ray.data.mvtec import load_category
    from pni_ray.evaluate import evaluate_category, run_modes
    from pni_ray.models.pni import build_detector

    detector, cat = build_detector(load_bundle(bundle_tiny)[0]), load_category(synthetic_root, "washer")
    # the lowest-scoring good image relabelled a defect: it ranks below every other good image
    scores = run_modes(detector, [s.path for s in cat.test], ("patchcore",), progress=False)["patchcore"].scores
    lowest = min((i for i, s in enumerate(cat.test) if not s.label), key=lambda i: scores[i])
    test = list(cat.test)
    test[lowest] = dataclasses.replace(test[lowest], defect_type="relabelled", mask_path=None)
    cat = dataclasses.replace(cat, test=test)
    ranked = bench_ablation.image_ranking(detector, cat, "patchcore")
    n_good = sum(1 for s in cat.test if not s.label)
    assert ranked["by_defect_type"].get("relabelled") == n_good
    assert ranked["pairs"] == n_good * (len(cat.test) - n_good)
    assert sum(ranked["by_good_image"].values()) == sum(ranked["by_defect_type"].values()) == ranked["misordered"]
    auroc = evaluate_category(detector, cat, modes=("patchcore",), progress=False)["patchcore"]["image_auroc"]
    # ties count whole here and half in AUROC; there are none between float32 maxima of different images
    assert ranked["misordered"] > 0 and 1 - ranked["misordered"] / ranked["pairs"] == pytest.approx(auroc)
    scores = [g["score"] for g in ranked["top_good"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == min(3, n_good)
    assert all(0 <= g["peak"][0] < g["size"][0] and 0 <= g["peak"][1] < g["size"][1] for g in ranked["top_good"])


def test_seed_spread_gives_mean_range_and_per_seed_gains(capsys) -> None:
    def run(pc: float, pni: float) -> dict:
        row = lambda v: {"image_auroc": 1.0, "pixel_auroc": v, "aupro": v - 0.05}  # noqa: E731
        return {"modes": {"patchcore": row(pc), "position": row(pni), "pni": row(pni)}}

    runs = {0: run(0.980, 0.990), 3: run(0.970, 0.975)}
    spread = bench_ablation.seed_spread(runs)
    assert spread["pni"]["pixel_auroc"]["min"] == 0.975 and spread["pni"]["pixel_auroc"]["max"] == 0.990
    assert spread["patchcore"]["aupro"]["mean"] == pytest.approx(0.925)
    assert spread["pni - patchcore"]["pixel_auroc"] == pytest.approx([0.010, 0.005])  # seed order
    assert spread["pni - position"]["image_auroc"] == [0.0, 0.0]
    bench_ablation.print_seed_spread("cat", runs)
    printed = capsys.readouterr().out
    assert "cat over seeds 0, 3" in printed and "0.9825 [0.9750, 0.9900]" in printed
    assert "pixel_auroc +0.0100 +0.0050" in printed
    figures = bench_ablation.json_figures({"cat": runs, "one": {2: runs[3]}})
    assert figures["one"] is runs[3] and figures["cat"]["runs"] is runs
    assert figures["cat"]["spread"]["pni - patchcore"]["pixel_auroc"] == pytest.approx([0.010, 0.005])


def test_seeds_option_trains_each_distinct_seed_in_its_own_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "data" / "cat" / "train" / "good").mkdir(parents=True)
    calls = []

    def fake_run(root, category, workdir, cfg, cut_factors, rescue_factors, ranking):
        assert ranking is False
        calls.append((category, workdir, cfg.seed))
        v = 0.9 + cfg.seed / 100
        row = {"image_auroc": 1.0, "pixel_auroc": v, "aupro": v}
        return {"train_seconds": 1.0, "position_spread": 0, "held_out_keep": {},
                "modes": {m: dict(row) for m in ("patchcore", "position", "pni")}}

    monkeypatch.setattr(bench_ablation, "run_category", fake_run)
    monkeypatch.setattr(bench_ablation, "print_category", lambda *a: None)
    out = tmp_path / "abl.json"
    monkeypatch.setattr(sys, "argv", ["bench_ablation.py", "--data-root", str(tmp_path / "data"), "--categories",
                                      "cat,absent", "--workdir", str(tmp_path / "w"), "--seeds", "0,2,2",
                                      "--json", str(out)])
    bench_ablation.main()
    assert calls == [("cat", tmp_path / "w", 0), ("cat", tmp_path / "w" / "seed-2", 2)]
    saved = json.loads(out.read_text())
    assert sorted(saved["cat"]["runs"]) == ["0", "2"] and saved["cat"]["runs"]["2"]["seed"] == 2
    assert saved["cat"]["spread"]["pni"]["aupro"]["max"] == pytest.approx(0.92)
    assert "skipping absent" in capsys.readouterr().out


def test_moved_copies_have_their_own_workdir_and_say_so_in_the_json(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "data" / "cat" / "train" / "good").mkdir(parents=True)
    copies, calls = [], []
    monkeypatch.setattr(bench_ablation, "moved_copy", lambda data, cat, out, shift, rotate, shrink: copies.append(
        (out, shift, rotate, shrink)) or tmp_path / "copied")
    monkeypatch.setattr(bench_ablation, "run_category", lambda root, cat, workdir, cfg, *a: calls.append(
        (root, workdir)) or {"modes": {}})
    monkeypatch.setattr(bench_ablation, "print_category", lambda *a: None)
    out = tmp_path / "abl.json"
    monkeypatch.setattr(sys, "argv", ["bench_ablation.py", "--data-root", str(tmp_path / "data"), "--categories", "cat",
                                      "--workdir", str(tmp_path / "w"), "--rotate", "90", "--json", str(out)])
    bench_ablation.main()
    assert copies == [(tmp_path / "w" / "rotated-90" / "data", 0.0, 90.0, 1.0)]
    assert calls == [(tmp_path / "copied", tmp_path / "w" / "rotated-90")]
    assert json.loads(out.read_text())["cat"]["copy"] == {"shift": 0.0, "rotate": 90.0, "shrink": 1.0, "seed": 0}
    monkeypatch.setattr(sys, "argv", sys.argv + ["--shrink", "0.5", "--shift", "0.25"])
    bench_ablation.main()
    assert copies[-1] == (tmp_path / "w" / "shrunk-0.5-shifted-0.25-rotated-90" / "data", 0.25, 90.0, 0.5)
    assert json.loads(out.read_text())["cat"]["copy"] == {"shift": 0.25, "rotate": 90.0, "shrink": 0.5, "seed": 0}


FAKE_WORKER = """#!{python}
import json, sys, time
import numpy as np
sys.path.insert(0, {bench!r})
import bench_peers
spec = json.loads(sys.argv[-1])  # called as bench_peers._launch calls a python: SCRIPT --worker NAME --spec JSON
sys.stderr.write("x" * 200_000)  # more than a pipe holds, before the common start
images = bench_peers.image_share(np.arange(10), spec)
time.sleep(1.0 * spec["share"][0])  # the second worker loads 1 s later: the common start waits for it
bench_peers.wait_for_start(spec)
start = time.time()
time.sleep(0.2)
np.savez(spec["maps"], maps=images.astype(np.float32).reshape(-1, 1, 1), scores=images.astype(np.float32))
print(json.dumps({{"images_per_s": 0.0, "window": [start, time.time()], "images": len(images),
                  "score_rss_mb": 100.0 + spec["share"][0], "threads": spec["threads"]}}))
"""


def _fake_python(tmp_path: Path, code: str) -> Path:
    path = tmp_path / "fake-python"
    path.write_text(code.format(python=sys.executable, bench=str(Path(bench_peers.__file__).parent)))
    path.chmod(0o755)
    return path


def test_processes_layout_starts_the_workers_together_and_joins_their_shares(tmp_path: Path, monkeypatch) -> None:
    """Layout `processes`: one-thread workers on contiguous shares, released together once all are
    ready (even when they write more than a pipe holds first); images/s from the common window, RSS
    summed, maps joined in image order."""
    seen = []
    launch = bench_peers._launch

    def spy(python, name, spec):
        seen.append(spec)
        return launch(python, name, spec)

    monkeypatch.setattr(bench_peers, "_launch", spy)
    maps = tmp_path / "path.npz"
    out = bench_peers.run_scoring(_fake_python(tmp_path, FAKE_WORKER), "pni-score", {"threads": 2, "maps": str(maps)},
                                  "processes")
    assert [s["threads"] for s in seen] == [1, 1] and [tuple(s["share"]) for s in seen] == [(0, 2), (1, 2)]
    assert all(s["repeats"] == bench_peers.SHARE_PASSES for s in seen)
    joined = np.load(maps)
    assert np.array_equal(joined["scores"], np.arange(10)) and joined["maps"].shape == (10, 1, 1)
    assert not list(tmp_path.glob("*.share*.npz"))
    # both timed windows start after the later worker is ready: ~0.2 s of wall for 10 images, not ~1.2
    # (the bound leaves a loaded machine 0.6 s of scheduling delay)
    assert 10 / 0.8 < out["images_per_s"] < 10 / 0.19
    assert out["score_rss_mb"] == 201.0
    assert bench_peers.image_share(np.arange(5), {}).tolist() == [0, 1, 2, 3, 4]


def test_processes_layout_reports_a_worker_that_fails_before_it_is_ready(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(bench_peers, "READY_TIMEOUT_S", 20)  # a driver that missed the failure times out instead
    failing = FAKE_WORKER.replace("spec = json.loads(sys.argv[-1])",
                                  "spec = json.loads(sys.argv[-1])\nif spec['share'][0] == 1: sys.exit('no model here')")
    out = bench_peers.run_scoring(_fake_python(tmp_path, failing), "pni-score",
                                  {"threads": 2, "maps": str(tmp_path / "m.npz")}, "processes")
    assert out["error"] == "no model here"


def test_timed_passes_times_after_the_warm_up_and_the_common_start(tmp_path: Path) -> None:
    calls = []
    barrier = tmp_path / "barrier"
    barrier.mkdir()

    def predict(x: np.ndarray):
        calls.append((len(x), (barrier / "ready-0").exists()))
        return np.zeros((len(x), 1)), np.zeros(len(x))

    (barrier / "go").touch()
    timing, maps, scores = bench_peers.timed_passes(predict, np.zeros((5, 1)), {"batch": 2, "repeats": 2,
                                                                               "barrier": str(barrier), "share": (0, 1)})
    assert (barrier / "ready-0").exists()
    # the warm-up batches (the full one and the last one's size) before this worker says it is ready, then
    # 2 timed passes of 3 batches after
    assert calls[:2] == [(2, False), (1, False)] and all(ready for _, ready in calls[2:]) and len(calls) == 2 + 2 * 3
    assert timing["images"] == 10 and timing["window"][0] <= timing["window"][1] and len(scores) == 5


def test_kernel_profile_drops_the_warm_up_and_sums_per_op() -> None:
    import bench_onnx

    def run(ts: float) -> dict:
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": 90}

    def kernel(node: str, op: str, ts: float, us: float) -> dict:
        return {"cat": "Node", "name": f"{node}_kernel_time", "ts": ts, "dur": us, "args": {"op_name": op}}

    events = [{"cat": "Session", "name": "session_initialization", "ts": 0, "dur": 50},
              run(100), kernel("conv_a", "Conv", 101, 9000), kernel("sm", "Softmax", 120, 7000),  # warm-up
              run(200), kernel("conv_a", "Conv", 201, 2000), kernel("sm", "Softmax", 220, 500),
              kernel("loop_body", "Add", 230, 1000), kernel("loop_body", "Add", 240, 1000),  # a node run twice in one run
              {"cat": "Node", "name": "conv_a_fence_before", "ts": 205, "dur": 10**6},
              run(300), kernel("conv_a", "Conv", 301, 4000), kernel("sm", "Softmax", 320, 1500)]
    by_op, by_node = bench_onnx.kernel_ms_per_run(events, warmup=1)
    assert by_node == {"conv_a": 3.0, "sm": 1.0, "loop_body": 1.0}
    assert by_op == {"Conv": 3.0, "Softmax": 1.0, "Add": 1.0}
    assert list(by_op)[0] == "Conv"  # largest first
    with pytest.raises(ValueError, match="holds 1 run"):
        bench_onnx.kernel_ms_per_run(events[:4], warmup=1)


def test_op_profile_of_an_openvino_backbone_model_starts_at_its_features(bundle_tiny: Path, tmp_path: Path) -> None:
    """--backbone-runtime openvino: the profiled onnxruntime graph is the other stages, fed OpenVINO's features."""
    pytest.importorskip("openvino")
    import bench_onnx

    from pni_ray.export.onnx_export import ExportOptions, export_bundle
    from pni_ray.export.runtime import load_exported

    export_bundle(bundle_tiny, tmp_path / "e", ExportOptions(max_batch=4))
    model = load_exported(tmp_path / "e", threads=1, backbone_runtime="openvino", backbone_precision="f32")
    bench_onnx.refuse_unprofilable(model)  # "features" is no longer an input it cannot feed
    x = np.random.default_rng(0).random((2, 3, 128, 128), dtype=np.float32)
    prof = bench_onnx.op_profile(model, x, threads=1, runs=1)
    nodes = prof["ms_per_batch_by_node"]
    assert nodes and not any(name.startswith("backbone/") for name in nodes) and any(n.startswith("scorer/") for n in nodes)
    plain = load_exported(tmp_path / "e", threads=1)
    assert any(n.startswith("backbone/") for n in bench_onnx.op_profile(plain, x, threads=1, runs=1)["ms_per_batch_by_node"])


def test_coreset_benchmark_pool_is_what_training_selects_from(trained_tiny, synthetic_root: Path, tmp_path: Path) -> None:
    """bench_coreset times the greedy search on train_category's own pool: the same rows, so the
    same seeded order picks the trained model's memory bank bit for bit."""
    import torch

    from conftest import tiny_config
    from pni_ray.models.coreset import greedy_kcenter_order

    cfg = tiny_config()
    pool = bench_coreset.training_pool(synthetic_root, "washer", tmp_path, cfg)
    memory = trained_tiny.memory
    order = greedy_kcenter_order(pool, memory.shape[0], cfg.coreset.projection_dim, cfg.coreset.chunk_size, cfg.seed,
                                 progress=False)
    assert torch.equal(pool[order], memory)
    assert torch.equal(bench_coreset.training_pool(synthetic_root, "washer", tmp_path, cfg), pool)  # from the cache


def test_coreset_benchmark_texture_category_is_built_once(tmp_path: Path) -> None:
    """--texture's granite set: an MVTec layout of n_train train/good images at the asked size, reused when there."""
    from PIL import Image

    from pni_ray.data.mvtec import load_category

    root = bench_coreset.make_texture_category(tmp_path, n_train=3, size=64)
    category = load_category(root, bench_coreset.TEXTURE_NAME)
    assert len(category.train) == 3 and not category.test
    with Image.open(category.train[0]) as im:
        assert im.size == (64, 64)
    stamp = category.train[0].stat().st_mtime_ns
    bench_coreset.make_texture_category(tmp_path, n_train=3, size=64)
    assert category.train[0].stat().st_mtime_ns == stamp
    bench_coreset.make_texture_category(tmp_path, n_train=3, size=72)  # another size: written anew
    with Image.open(category.train[0]) as im:
        assert im.size == (72, 72)


def test_coreset_benchmark_pool_cache_tells_data_roots_apart(synthetic_root: Path, tmp_path: Path) -> None:
    """Two data roots with a category of the same name get their own cached pools."""
    import shutil

    from conftest import tiny_config

    cfg = tiny_config()
    other = tmp_path / "other"
    shutil.copytree(synthetic_root / "washer", other / "washer")
    for image in sorted((other / "washer" / "train" / "good").glob("*.png"))[:-3]:
        image.unlink()  # a smaller washer (3 images: 2 held out, 1 in the bank): a different pool
    cache = tmp_path / "cache"
    a = bench_coreset.training_pool(synthetic_root, "washer", cache, cfg)
    b = bench_coreset.training_pool(other, "washer", cache, cfg)
    assert b.shape[0] < a.shape[0]


def test_scale_ratios_hold_the_rate_after_the_first_chunk_to_the_target() -> None:
    """The end-to-end rate rises with N by construction (a fixed start-up weighs less): the target is read on the
    rate after the first chunk, and a missing figure (one chunk, no Ray worker seen) is n/a, never a pass."""
    a = {"n": 100, "images_per_s": 10.0, "steady_images_per_s": 40.0, "driver_peak_mb": 800.0, "worker_peak_mb": 1000.0}
    b = {"n": 1000, "images_per_s": 30.0, "steady_images_per_s": 42.0, "driver_peak_mb": 840.0, "worker_peak_mb": 0.0}
    line = bench_scale.ratio_line(a, b)
    assert "after the 1st chunk 1.050x (target 0.9-1.1; end to end 3.000x)" in line
    assert "driver memory 1.050x" in line and "worker memory n/a" in line
    assert "after the 1st chunk n/a" in bench_scale.ratio_line({**a, "steady_images_per_s": None}, b)


def test_score_rate_after_the_first_chunk_is_none_when_one_chunk_holds_every_image() -> None:
    assert bench_score.after_first_chunk(bench_score.CHUNK_SIZE, 10.0, 4.0) is None
    assert bench_score.after_first_chunk(bench_score.CHUNK_SIZE + 60, 10.0, 4.0) == pytest.approx(10.0)


def test_reused_fits_are_marked_in_the_rows_and_the_ratio_line(tmp_path: Path, capsys) -> None:
    cache = tmp_path / "pni-fit.json"
    cache.write_text(json.dumps({"fit_s": 30.0, "entries": 3000}))
    fit = bench_peers.fit_once(Path(sys.executable), "pni-fit", {}, cache, reuse=True)
    assert fit["fit_s"] == 30.0 and str(cache) in fit["fit_from"]
    common = {"category": "bottle", "bank": "1%", "layout": "threads", "image_auroc": 1.0, "pixel_auroc": 0.98,
              "aupro": 0.95, "images_per_s": 20.0}
    rows = [{**common, "system": "pni-ray", "engine": "torch", **fit},
            {**common, "system": "anomalib", "engine": "torch", "fit_s": 300.0, "images_per_s": 10.0}]
    bench_peers.print_table(rows, argparse.Namespace(threads=2, batch=8, repeats=1, anomalib_allocator="default"))
    out = capsys.readouterr().out
    assert "torch (fit reused: --reuse)" in out and "fit 10.0x faster (pni-ray fit reused from an earlier run" in out


@pytest.mark.parametrize("script, args", [
    ("bench_coreset.py", ["--category", "bottle"]),
    ("bench_peers.py", ["--categories", "bottle", "--banks", "1%"]),
])
def test_benchmarks_skip_a_category_that_is_absent(tmp_path: Path, script: str, args: list[str]) -> None:
    """One line and exit 0 (a CI without the real data), not a LayoutError traceback."""
    empty = tmp_path / "data"
    empty.mkdir()
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / script
    proc = subprocess.run([sys.executable, str(bench), "--data-root", str(empty), *args], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "skipping" in proc.stdout and "not found under" in proc.stdout
