"""End to end on a tiny synthetic category: train, save, load, score, evaluate."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch

from pni_ray.bundle import BundleError, MEMORY, MLP, load_bundle, model_id, save_bundle, verify_bundle
from pni_ray.data.mvtec import load_category
from pni_ray.data.transforms import load_batch
from pni_ray.evaluate import ABLATION_MODES, evaluate_category
from pni_ray.inference import load_detector
from pni_ray.models.pni import build_detector
from pni_ray.training import stage_sha256, train_category

from conftest import tiny_config


def test_trained_model_shapes(trained_tiny):
    t = trained_tiny
    assert t.memory.shape[1] == t.feature_dim
    assert t.dist_size == min(64, t.memory.shape[0])
    assert t.emb_to_dist.shape == (t.memory.shape[0],)
    assert t.emb_to_dist[: t.dist_size].tolist() == list(range(t.dist_size))  # C_dist entries map to themselves
    assert t.grid == (16, 16)
    assert np.isfinite(t.normalisation.threshold)
    assert t.normalisation.threshold > t.normalisation.image_mean


def test_bundle_roundtrip_scores_identical(trained_tiny, bundle_tiny, synthetic_root):
    paths = load_category(synthetic_root, "washer").test[:4]
    images = load_batch([s.path for s in paths], 128)
    before_maps, before_scores = build_detector(trained_tiny)(images)
    detector, manifest = load_detector(bundle_tiny)
    after_maps, after_scores = detector(images)
    assert torch.equal(before_maps, after_maps) and torch.equal(before_scores, after_scores)
    assert manifest["category"] == "washer" and manifest["mode"] == "pni"
    assert set(manifest["files"]) == {"memory.arrow", "position_prior.arrow", "neighbourhood.safetensors"}
    assert after_maps.shape == (4, 128, 128)


def test_tampered_and_incomplete_bundles_refused(bundle_tiny, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle_tiny, copy)
    verify_bundle(copy)
    data = bytearray((copy / MLP).read_bytes())
    data[-1] ^= 0xFF
    (copy / MLP).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="neighbourhood.safetensors: checksum mismatch"):
        load_bundle(copy)
    (copy / MEMORY).unlink()
    with pytest.raises(BundleError, match="memory.arrow: missing"):
        verify_bundle(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        verify_bundle(copy)

    # files verify, the manifest disagrees with them: named, not a traceback; the last three are edits the files'
    # checksums cannot catch (the manifest is their root), each named against what its config or files hold
    cannot_read = "/manifest.json: the bundle's files cannot be read as it describes"
    for name, edit, message in (
        ("hidden", lambda m: m["config"]["neighbourhood"].update(hidden=65), cannot_read),  # the MLP's shape
        ("normalisation", lambda m: m["normalisation"].update(bogus=1), cannot_read),
        ("grid", lambda m: m.update(grid=[m["grid"][0], m["grid"][1] + 1]), "/manifest.json: 'grid' is .* was edited"),
        ("n_memory", lambda m: m.update(n_memory=m["n_memory"] - 1), "/manifest.json: 'n_memory' is .* was edited"),
        ("mode", lambda m: m.update(mode="patchcore"), "/manifest.json: 'mode' is .* was edited"),
    ):
        edited = tmp_path / name
        shutil.copytree(bundle_tiny, edited)
        manifest = json.loads((edited / "manifest.json").read_text())
        edit(manifest)
        (edited / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match=f"{name}{message}"):
            load_bundle(edited)


def test_a_patchcore_bundles_edited_grid_is_refused(trained_tiny, tmp_path):
    """A PatchCore-only bundle has no position prior to hold its grid: at a fixed canvas the grid follows from the
    image size, so an edited one is refused at load instead of failing every scored image."""
    import shutil

    patchcore = dataclasses.replace(trained_tiny, config=trained_tiny.config.replace(mode="patchcore"), mlp=None,
                                    position_prior=None, emb_to_dist=None, dist_size=0)
    path = save_bundle(patchcore, tmp_path / "pc")
    load_bundle(path)
    edited = tmp_path / "edited"
    shutil.copytree(path, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["grid"] = [8, 8]
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"edited/manifest.json: 'grid' is \[8, 8\] but the grid of its 128 px input is \[16, 16\]"):
        load_bundle(edited)


def test_a_bundle_that_vanishes_between_a_saves_renames_is_read_once_it_is_back(trained_tiny, tmp_path, monkeypatch):
    """A reader that lands between replace_dir's two renames finds no folder: it waits for the new bundle rather than
    saying the save did not finish; a bundle that stays missing is still named as missing."""
    import pni_ray.bundle_manifest as bundle_manifest
    from pni_ray.bundle import load_bundle_and_id

    path = save_bundle(trained_tiny, tmp_path / "b")
    aside = tmp_path / "aside"
    path.rename(aside)  # the gap: the old bundle renamed away, the new one not yet in place
    monkeypatch.setattr(bundle_manifest.time, "sleep", lambda s: aside.rename(path))  # the save's second rename
    _, _, found = load_bundle_and_id(path)
    assert found == model_id(path)
    monkeypatch.setattr(bundle_manifest.time, "sleep", lambda s: None)
    with pytest.raises(BundleError, match="not a bundle directory"):
        load_bundle_and_id(tmp_path / "never")


def test_save_is_atomic(trained_tiny, tmp_path, monkeypatch):
    import pni_ray.bundle as bundle_mod

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(bundle_mod, "save_tensors", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_bundle(trained_tiny, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its temp directory remain
    with pytest.raises(FileExistsError):
        monkeypatch.undo()
        save_bundle(trained_tiny, tmp_path / "out")
        save_bundle(trained_tiny, tmp_path / "out")


@pytest.mark.parametrize("replaced", [True, False])
def test_a_bundle_replaced_while_it_loads_is_loaded_whole_under_its_own_id(trained_tiny, tmp_path, monkeypatch, replaced):
    """`train --force` beside a nightly run renames a new bundle into place. One that lands between reading the manifest
    and reading the files was loaded as the new files under the old manifest (unchecked); now every file is checked as
    it is read and parsed from those bytes, a bundle replaced meanwhile is read again whole and reported under the
    id of the manifest that was loaded, and a file changed in place (no new manifest) is still refused."""
    import pni_ray.bundle_manifest as bundle_manifest
    from pni_ray.bundle import load_bundle_and_id

    path = save_bundle(trained_tiny, tmp_path / "b")
    old_id = model_id(path)
    newer = dataclasses.replace(trained_tiny, memory=trained_tiny.memory + 1.0)
    read_manifest = bundle_manifest.read_manifest
    calls = []

    def read_then_change(folder, raw=None):
        manifest = read_manifest(folder, raw)
        if not calls:  # once, after the first manifest was read and before its files are
            calls.append(folder)
            if replaced:
                save_bundle(newer, path, overwrite=True)
            else:
                data = bytearray((path / MEMORY).read_bytes())
                data[-1] ^= 0xFF
                (path / MEMORY).write_bytes(bytes(data))
        return manifest

    monkeypatch.setattr(bundle_manifest, "read_manifest", read_then_change)
    if not replaced:
        with pytest.raises(BundleError, match="memory.arrow: checksum mismatch"):
            load_bundle_and_id(path)
        return
    loaded, manifest, found = load_bundle_and_id(path)
    assert found == model_id(path) != old_id  # the new bundle, under its own id
    assert torch.equal(loaded.memory, newer.memory)
    assert manifest["files"] == json.loads((path / "manifest.json").read_text())["files"]


def test_training_is_deterministic(synthetic_root, bundle_tiny, tmp_path):
    again = train_category(synthetic_root, "washer", tiny_config(), progress=False)
    path = save_bundle(again, tmp_path / "again")
    assert model_id(path) == model_id(bundle_tiny)


def test_stage_digests_name_the_stage_that_differs(trained_tiny, synthetic_root):
    """Two fits that should match but do not: the manifest's stage digests say where they parted."""
    facts = trained_tiny.report["deterministic"]["stage_sha256"]
    assert set(facts) == {"features", "coreset_order", "mlp_targets"}
    ratio = dataclasses.replace(tiny_config().coreset, ratio=0.05)  # same features, another search
    other = train_category(synthetic_root, "washer", tiny_config(coreset=ratio), progress=False)
    moved = other.report["deterministic"]["stage_sha256"]
    assert moved["features"] == facts["features"]
    assert moved["coreset_order"] != facts["coreset_order"]  # a shorter order ...
    assert moved["mlp_targets"] == facts["mlp_targets"]  # ... of which C_dist is the same prefix
    order = torch.arange(3)
    assert stage_sha256(order) == hashlib.sha256(order.numpy().tobytes()).hexdigest()


def test_evaluate_ablation_modes(bundle_tiny, synthetic_root):
    detector, _ = load_detector(bundle_tiny)
    results = evaluate_category(detector, load_category(synthetic_root, "washer"), modes=ABLATION_MODES, progress=False)
    assert set(results) == set(ABLATION_MODES)
    for row in results.values():
        for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
            assert 0.0 <= row[key] <= 1.0
        assert row["images_per_s"] > 0 and row["n_test_images"] == 4 + 3 * 2
    assert results["patchcore"]["image_auroc"] > 0.8  # washer defects are locally visible
