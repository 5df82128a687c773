"""Backbone ensembles: normalised-map averaging, the self-contained format, tampering, evaluation."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from click.testing import CliRunner
from torch import nn

from pni_ray.bundle import BundleError, MEMORY, model_id, save_bundle
from pni_ray.config import GeometryConfig, TrainConfig
from pni_ray.data.mvtec import load_category
from pni_ray.data.transforms import load_batch
from pni_ray.ensemble_bundle import save_ensemble, verify_ensemble
from pni_ray.evaluate import evaluate_category
from pni_ray.inference import load_detector
from pni_ray.models.anomaly_map import image_scores
from pni_ray.models.ensemble import EnsembleDetector, estimated_normalisation
from pni_ray.models.pni import Normalisation
from pni_ray.predict import detector_geometry
from pni_ray.training import train_category

from conftest import tiny_config


class ConstantMember(nn.Module):
    """Stands in for a PNIDetector: returns a fixed map, records the mode it was asked for."""

    def __init__(self, value: torch.Tensor, mode: str = "pni", image_size: int = 4) -> None:
        super().__init__()
        self.value, self.mode, self.image_size, self.calls = value, mode, image_size, []

    def forward(self, images, mode=None, refine=None):
        self.calls.append(mode)
        maps = self.value.expand(images.shape[0], *self.value.shape).clone()
        return maps, maps.flatten(1).max(1).values


def test_ensemble_detector_math_on_fixed_maps():
    a = torch.tensor([[0.0, 2.0], [4.0, 6.0]])
    b = torch.tensor([[10.0, 10.0], [10.0, 30.0]])
    ens = EnsembleDetector(
        [ConstantMember(a, "pni"), ConstantMember(b, "patchcore")],
        [Normalisation(pixel_mean=2.0, pixel_std=2.0), Normalisation(pixel_mean=10.0, pixel_std=10.0)],
    )
    maps, scores = ens(torch.zeros(3, 3, 2, 2))
    expected = ((a - 2.0) / 2.0 + (b - 10.0) / 10.0) / 2.0  # [[-0.5, 0], [0.5, 2.0]]
    assert torch.allclose(maps, expected.expand(3, 2, 2))
    assert torch.allclose(scores, torch.full((3,), 0.5))  # image score: the 2 x 2 map's average (window clipped)
    assert ens.mode == "member"  # members disagree: each scores in its own mode
    ens(torch.zeros(1, 3, 2, 2), mode="position")
    assert [m.calls for m in ens.members] == [[None, "position"], [None, "position"]]
    with pytest.raises(ValueError, match="one input size"):
        EnsembleDetector([ConstantMember(a, image_size=4), ConstantMember(b, image_size=8)], [Normalisation()] * 2)
    # members scored through another geometry than a plain resize are refused (their bundle's config says)
    odd = ConstantMember(b)
    odd.config = TrainConfig().replace(geometry=GeometryConfig(policy="letterbox"))
    with pytest.raises(ValueError, match="default geometry"):
        EnsembleDetector([ConstantMember(a), odd], [Normalisation()] * 2)
    odd.config = TrainConfig().replace(geometry=GeometryConfig(white_level=4095))  # reads 16-bit grey otherwise
    with pytest.raises(ValueError, match="the 16-bit scale"):
        EnsembleDetector([ConstantMember(a), odd], [Normalisation()] * 2)
    assert detector_geometry(ens).cfg == GeometryConfig() and detector_geometry(ens).image_window == ens.image_window


def test_a_refined_member_scores_through_its_refiner_as_deployed():
    """The ensemble takes a refined member's statistics and threshold, measured on its refined maps; scoring asked
    members for maps without their refiner (refine=False), so that member's maps were another model's."""
    from pni_ray.geometry import Prepared
    from pni_ray.predict import score_prepared

    class RefinedMember(ConstantMember):
        def forward(self, images, mode=None, refine=None):
            maps, scores = super().forward(images, mode, refine)
            self.calls[-1] = (mode, refine)
            return (maps + 100.0, scores + 100.0) if refine in (None, True) else (maps, scores)  # refined by default

    a = torch.arange(32 * 32, dtype=torch.float32).reshape(32, 32) / 100.0
    refined = RefinedMember(a, image_size=32)
    ens = EnsembleDetector([ConstantMember(a, image_size=32), refined], [Normalisation(pixel_mean=0.0, pixel_std=1.0)] * 2)
    canvas = torch.zeros(32, 32, 3, dtype=torch.uint8).numpy()
    prepared = [Prepared(canvas=canvas, original_hw=(32, 32), content=(0, 0, 32, 32))]
    maps, _, _ = score_prepared(ens, detector_geometry(ens), prepared, ["pni"])
    assert refined.calls == [("pni", None)]
    assert torch.allclose(torch.as_tensor(maps["pni"][0]), (a + a + 100.0) / 2.0)


def test_an_ensemble_calibrated_on_unrefined_maps_of_a_refined_member_is_refused(tmp_path):
    """Ensembles made with --calibrate before refined members scored through their refiners hold a threshold of
    other maps than they now score: refused, saying to build them again; new ones record what they measured."""
    from pni_ray.bundle_manifest import MEMBERS_SCORED, check_calibrated_as_scored

    refined, plain = {"files": {"refiner.safetensors": {}}}, {"files": {"memory.arrow": {}}}
    old = {"threshold_method": "holdout"}
    with pytest.raises(BundleError, match=r"set \(--calibrate\) on maps of its refined member\(s\) without their "
                                          r"refiner.*--calibrate DATA_ROOT --force"):
        check_calibrated_as_scored(tmp_path, old, [plain, refined])
    check_calibrated_as_scored(tmp_path, old, [plain, plain])  # no refiner: the same maps then and now
    check_calibrated_as_scored(tmp_path, {"threshold_method": "members"}, [refined])  # the members' own thresholds
    check_calibrated_as_scored(tmp_path, {**old, "members_scored": MEMBERS_SCORED}, [refined])


def test_estimated_threshold_is_mean_of_normalised_member_thresholds():
    norm = estimated_normalisation([
        Normalisation(image_mean=5.0, image_std=1.0, pixel_mean=1.0, pixel_std=2.0, threshold=8.0),
        Normalisation(image_mean=0.5, image_std=0.1, pixel_mean=0.2, pixel_std=0.1, threshold=0.8),
    ])
    assert norm.threshold == pytest.approx(((8.0 - 1.0) / 2.0 + (0.8 - 0.2) / 0.1) / 2.0)
    assert norm.image_mean == pytest.approx(((5.0 - 1.0) / 2.0 + (0.5 - 0.2) / 0.1) / 2.0)
    assert (norm.pixel_mean, norm.pixel_std) == (0.0, 1.0)


@pytest.fixture(scope="module")
def lite1_bundle(synthetic_root, tmp_path_factory):
    """A second backbone of the same category (washer), tiny config."""
    cfg = tiny_config()
    cfg = cfg.replace(features=dataclasses.replace(cfg.features, backbone="efficientnet_lite1"))
    return save_bundle(train_category(synthetic_root, "washer", cfg, progress=False),
                       tmp_path_factory.mktemp("lite1") / "washer-lite1")


@pytest.fixture(scope="module")
def ensemble_dir(bundle_tiny, lite1_bundle, tmp_path_factory):
    from pni_ray.orchestration.train_all_cli import ensemble_cmd

    out = tmp_path_factory.mktemp("ens") / "washer-ensemble"
    result = CliRunner().invoke(ensemble_cmd, [str(bundle_tiny), str(lite1_bundle), "--out", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "ensemble of 2 (washer)" in result.output
    return out


def test_ensemble_averages_members_normalised_maps(ensemble_dir, bundle_tiny, lite1_bundle, synthetic_root):
    manifest = verify_ensemble(ensemble_dir)
    assert manifest["format"] == "pni-ray-ensemble" and manifest["category"] == "washer"
    members = manifest["members"]
    assert [m["path"] for m in members] == ["members/00-efficientnet_lite0", "members/01-efficientnet_lite1"]
    assert [m["model_id"] for m in members] == [model_id(bundle_tiny), model_id(lite1_bundle)]
    for m in members:  # self-contained: byte-identical copies inside the ensemble
        assert model_id(ensemble_dir / m["path"]) == m["model_id"]

    images = load_batch([s.path for s in load_category(synthetic_root, "washer").test[:5]], 128)
    expected, thresholds = [], []
    for path in (bundle_tiny, lite1_bundle):
        detector, member_manifest = load_detector(path)
        norm = member_manifest["normalisation"]
        maps, _ = detector(images)
        expected.append((maps - norm["pixel_mean"]) / norm["pixel_std"])
        thresholds.append((norm["threshold"] - norm["pixel_mean"]) / norm["pixel_std"])
    expected_maps = (expected[0] + expected[1]) / 2

    ensemble, ens_manifest = load_detector(ensemble_dir)
    assert isinstance(ensemble, EnsembleDetector)
    maps, scores = ensemble(images)
    assert maps.shape == (5, 128, 128)
    assert torch.allclose(maps, expected_maps, atol=1e-5)
    assert torch.allclose(scores, image_scores(expected_maps, 24), atol=1e-5)  # the 3 x 3-patch box maximum
    assert ens_manifest["threshold_method"] == "members"
    assert ens_manifest["threshold"] == pytest.approx(sum(thresholds) / 2)
    assert ensemble.threshold == pytest.approx(ens_manifest["threshold"])


def _copy(src, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_tampered_or_swapped_member_is_refused(ensemble_dir, synthetic_root, tmp_path):
    flipped = _copy(ensemble_dir, tmp_path, "flipped")
    target = flipped / "members" / "01-efficientnet_lite1" / MEMORY
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"01-efficientnet_lite1/memory.arrow: checksum mismatch"):
        load_detector(flipped)
    with pytest.raises(BundleError, match="checksum mismatch"):
        verify_ensemble(flipped)
    from pni_ray.orchestration.score import ScoreError
    from pni_ray.orchestration.score_model import describe_model

    with pytest.raises(ScoreError, match=r"01-efficientnet_lite1/memory.arrow: checksum mismatch"):
        describe_model(flipped)  # score refuses it before Ray starts (its workers failed on it, 265 lines later)

    edited = _copy(ensemble_dir, tmp_path, "edited")  # member manifest edited: files still verify, id does not
    member_manifest = edited / "members" / "00-efficientnet_lite0" / "manifest.json"
    content = json.loads(member_manifest.read_text())
    content["threshold"] = -1.0
    member_manifest.write_text(json.dumps(content))
    with pytest.raises(BundleError, match="00-efficientnet_lite0/manifest.json: member manifest differs"):
        load_detector(edited)

    missing = _copy(ensemble_dir, tmp_path, "missing")
    shutil.rmtree(missing / "members" / "00-efficientnet_lite0")
    with pytest.raises(BundleError, match="ensemble member is missing"):
        load_detector(missing)

    escaping = _copy(ensemble_dir, tmp_path, "escaping")
    manifest = json.loads((escaping / "manifest.json").read_text())
    manifest["members"][0]["path"] = "../flipped/members/00-efficientnet_lite0"
    (escaping / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="must be relative and inside"):
        load_detector(escaping)

    for name, edit, said in (("no-id", lambda m: m["members"][0].pop("model_id"), r"members\[0\] has no model_id"),
                             ("no-threshold", lambda m: m.pop("threshold"), "'threshold' must be a number or null"),
                             ("no-members", lambda m: m.pop("members"), "'members' is missing or not a list"),
                             ("two-thresholds", lambda m: m.update(threshold=-5.0),  # score read the other one
                              r"'threshold' \(-5.0\) and 'normalisation.threshold' \(.*\) differ")):
        edited = _copy(ensemble_dir, tmp_path, name)  # an edited ensemble manifest: named, not a KeyError
        manifest = json.loads((edited / "manifest.json").read_text())
        edit(manifest)
        (edited / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match=said):
            load_detector(edited)
    from pni_ray.cli import main

    out = tmp_path / "scores"  # score's driver checks it as the loader does: before OUT, not in the actors
    result = CliRunner().invoke(main, ["score", str(tmp_path / "two-thresholds"), str(synthetic_root / "washer" / "test"),
                                       "--out", str(out), "--engine", "local"])
    assert result.exit_code == 3 and "'normalisation.threshold'" in result.output and not out.exists(), result.output


def test_evaluate_works_on_an_ensemble(ensemble_dir, synthetic_root):
    from pni_ray.cli import main

    detector, _ = load_detector(ensemble_dir)
    results = evaluate_category(detector, load_category(synthetic_root, "washer"),
                                modes=("patchcore", "pni"), progress=False)
    assert set(results) == {"patchcore", "pni"}
    for row in results.values():
        for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
            assert 0.0 <= row[key] <= 1.0
        assert row["n_test_images"] == 10 and row["images_per_s"] > 0
    assert results["pni"]["image_auroc"] > 0.8  # washer defects are easy for both members

    cli = CliRunner().invoke(main, ["evaluate", str(ensemble_dir), str(synthetic_root), "--threads", "1"])
    assert cli.exit_code == 0, cli.output
    assert "pni" in cli.output and "image_auroc" in cli.output
    ablation = CliRunner().invoke(main, ["evaluate", str(ensemble_dir), str(synthetic_root), "--ablation", "--threads", "1"])
    assert ablation.exit_code == 0, ablation.output  # its members' priors differ: no table of n/a rows
    assert "prior diagnostics: none measured" in ablation.output and "allowed_share" not in ablation.output


def test_calibrated_threshold_from_shared_holdout(bundle_tiny, lite1_bundle, synthetic_root, tmp_path):
    from pni_ray.bundle import verify_bundle

    out = save_ensemble([bundle_tiny, lite1_bundle], tmp_path / "cal", calibrate_root=synthetic_root)
    detector, manifest = load_detector(out)
    assert manifest["threshold_method"] == "holdout" and manifest["members_scored"] == "as deployed"
    import pni_ray.bundle_manifest as bundle_manifest
    import pni_ray.ensemble_bundle as ensemble_bundle

    old_style = dict(manifest)
    del old_style["members_scored"]
    with pytest.MonkeyPatch.context() as mp:  # a manifest of before the key, whose first member holds a refiner
        mp.setattr(bundle_manifest, "REFINER", "memory.arrow")
        mp.setattr(bundle_manifest, "read_ensemble_manifest", lambda path: old_style)
        mp.setattr(ensemble_bundle, "read_ensemble_manifest", lambda path: old_style)
        for check in (bundle_manifest.verify_ensemble, ensemble_bundle.load_ensemble):
            with pytest.raises(BundleError, match="build it again with the same command and --force"):
                check(out)
    names = set(verify_bundle(bundle_tiny)["training"]["holdout_images"])
    paths = [p for p in load_category(synthetic_root, "washer").train if p.name in names]
    assert len(paths) >= 2
    _, scores = detector(load_batch(paths, 128))
    scores = scores.double()
    assert manifest["threshold"] == pytest.approx(float(scores.mean() + 3.0 * scores.std()), rel=1e-5)
    assert manifest["normalisation"]["extras"]["members_threshold"] > 0


def test_calibrate_names_a_wrong_data_root_before_copying(bundle_tiny, lite1_bundle, synthetic_root, tmp_path, caplog):
    """The category folder itself given as DATA_ROOT: said as `train` says it, before any member is copied."""
    with pytest.raises(ValueError, match=r"--calibrate: no category folder .*washer/washer\.[\s\S]*pass its parent"):
        save_ensemble([bundle_tiny, lite1_bundle], tmp_path / "e", calibrate_root=synthetic_root / "washer")
    assert not list(tmp_path.iterdir())
    with caplog.at_level("WARNING"):
        save_ensemble([bundle_tiny, lite1_bundle], tmp_path / "cal", calibrate_root=synthetic_root)
    assert "train/good images, those every member held out, calibrate the ensemble's threshold (fewer than 5)" in caplog.text


def test_bad_member_sets_are_refused(bundle_tiny, ensemble_dir, synthetic_root, tmp_path):
    with pytest.raises(ValueError, match="at least two"):
        save_ensemble([bundle_tiny], tmp_path / "one")
    with pytest.raises(ValueError, match="listed twice"):
        save_ensemble([bundle_tiny, bundle_tiny], tmp_path / "dup")
    other = _copy(bundle_tiny, tmp_path, "granite")  # same files, another category in its manifest
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["category"] = "granite"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="one category"):
        save_ensemble([bundle_tiny, other], tmp_path / "mixed")
    with pytest.raises(BundleError, match="is an ensemble"):
        save_ensemble([bundle_tiny, ensemble_dir], tmp_path / "nested")
    wide = _copy(bundle_tiny, tmp_path, "wide")  # its threshold is of 7 x 7-window image scores
    manifest = json.loads((wide / "manifest.json").read_text())
    manifest["config"]["scoring"]["image_window"] = 7
    (wide / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"wide: scores an image over a 7 x 7 window of patches, the ensemble over 3 x 3"
                                         r", so its stored threshold does not bound"):
        save_ensemble([bundle_tiny, wide], tmp_path / "windows")
    twelve = _copy(bundle_tiny, tmp_path, "twelve")  # reads 16-bit grey images on a 12-bit camera's scale
    manifest = json.loads((twelve / "manifest.json").read_text())
    manifest["config"]["geometry"]["white_level"] = 4095
    (twelve / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"twelve: reads 16-bit grey images with white level 4095; ensembles read"):
        save_ensemble([bundle_tiny, twelve], tmp_path / "scales")
    calibrated = save_ensemble([bundle_tiny, wide], tmp_path / "windows", calibrate_root=synthetic_root)
    assert json.loads((calibrated / "manifest.json").read_text())["threshold_method"] == "holdout"
    with pytest.raises(FileExistsError):
        save_ensemble([bundle_tiny, other], ensemble_dir)
    assert not list(tmp_path.glob(".*partial*"))  # failed builds leave no temp directories
