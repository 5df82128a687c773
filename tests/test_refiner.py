"""Refinement network: loss, architecture, training on synthetic defects, bundles, evaluation."""

from __future__ import annotations

import builtins
import copy
import dataclasses
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import pni_ray.data.images
import pni_ray.data.transforms
import pni_ray.refine_training
from pni_ray.config import RefinerConfig
from pni_ray.models.backbones import create_classifier
from pni_ray.models.refiner import MapRefiner, build_refiner, finite_differences, refinement_loss

# seconds-scale refiner: 64 px network on the 128 px tiny model, a dozen samples
TINY = dict(image_size=64, decoder_channels=(32, 24, 16, 16, 8), n_samples=16, epochs=8, batch_size=4,
            lr=3e-3, val_fraction=0.25)


def tiny_refiner_config(**changes) -> RefinerConfig:
    return RefinerConfig(**{**TINY, **changes})


# ---------------------------------------------------------------- loss


def test_loss_constant_offset_has_no_gradient_term():
    pred, target = torch.zeros(1, 4, 4), torch.ones(1, 4, 4)
    loss, parts = refinement_loss(pred, target)
    assert float(parts["l_reg"]) == 1.0 and float(parts["l_grad"]) == 0.0
    assert float(loss) == 0.5


def test_loss_hand_computed_stripe():
    # pred [[0, 2], [0, 2]] against zeros: l_reg = (0+4+0+4)/4 = 2,
    # dx = [[2], [2]] -> l_dx = 4; dy = [[0, 0]] -> l_dy = 0; l_grad = 2; loss = (2 + 2) / 2 = 2
    pred = torch.tensor([[[0.0, 2.0], [0.0, 2.0]]])
    loss, parts = refinement_loss(pred, torch.zeros_like(pred))
    assert float(parts["l_reg"]) == 2.0
    assert float(parts["l_dx"]) == 4.0 and float(parts["l_dy"]) == 0.0 and float(parts["l_grad"]) == 2.0
    assert float(loss) == 2.0


def test_loss_edge_misplacement_and_symmetry():
    # a 1-pixel shift of a step edge: one column differs by 1 (l_reg = 3/9 per row... over 3x3)
    target = torch.tensor([[[0.0, 1.0, 1.0]] * 3])
    pred = torch.tensor([[[0.0, 0.0, 1.0]] * 3])
    loss, parts = refinement_loss(pred, target)
    assert float(parts["l_reg"]) == pytest.approx(3 / 9)
    # dx target [1, 0], pred [0, 1] per row: squared diffs 1, 1 over 6 entries
    assert float(parts["l_dx"]) == pytest.approx(6 / 6)
    assert float(parts["l_dy"]) == 0.0
    assert float(loss) == pytest.approx((3 / 9 + 0.5) / 2)
    assert float(refinement_loss(target, pred)[0]) == pytest.approx(float(loss))
    assert float(refinement_loss(target, target)[0]) == 0.0


def test_loss_rejects_shape_mismatch_and_differences_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        refinement_loss(torch.zeros(1, 4, 4), torch.zeros(1, 4, 5))
    dx, dy = finite_differences(torch.arange(12.0).view(1, 3, 4))
    assert dx.shape == (1, 3, 3) and dy.shape == (1, 2, 4)
    assert torch.all(dx == 1) and torch.all(dy == 4)


# ---------------------------------------------------------------- architecture


@pytest.fixture(scope="module")
def tiny_refiner() -> MapRefiner:
    return build_refiner(tiny_refiner_config())


def test_forward_shape_and_identity_at_init(tiny_refiner):
    g = torch.Generator().manual_seed(0)
    images, maps = torch.rand(2, 3, 96, 80, generator=g), torch.rand(2, 96, 80, generator=g) * 5
    tiny_refiner.set_map_statistics(1.5, 0.7)
    with torch.no_grad():
        out = tiny_refiner(images, maps)
    assert out.shape == (2, 96, 80)
    assert torch.equal(out, maps)  # zero-initialised head: residual exactly 0


def test_extra_channel_is_zero_and_rgb_path_is_pretrained(tiny_refiner):
    stem = tiny_refiner.encoder.conv_stem
    reference = create_classifier("efficientnet_lite0").conv_stem.weight
    assert stem.weight.shape[1] == 4 and type(stem).__name__ == "Conv2dSame"
    assert torch.all(stem.weight[:, 3] == 0)
    assert torch.equal(stem.weight[:, :3], reference)
    # at init the map channel cannot change the encoder's features
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a = tiny_refiner.encoder.forward_intermediates(torch.cat([x, torch.zeros(1, 1, 64, 64)], 1),
                                                       indices=tiny_refiner.indices, intermediates_only=True)
        b = tiny_refiner.encoder.forward_intermediates(torch.cat([x, torch.randn(1, 1, 64, 64) * 9], 1),
                                                       indices=tiny_refiner.indices, intermediates_only=True)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_units_residual_and_blend():
    ref = build_refiner(tiny_refiner_config(blend=0.25, target_sigmas=2.0), pretrained=False)
    ref.set_map_statistics(10.0, 3.0)
    maps = torch.full((1, 32, 32), 16.0)
    assert torch.allclose(ref.to_units(maps), torch.ones(1, 32, 32))  # (16 - 10) / (2 * 3)
    with torch.no_grad():
        ref.head.bias.fill_(0.5)  # r = 0.5 everywhere
        out = ref(torch.rand(1, 3, 32, 32), maps)
        refined = ref.refine_units(torch.rand(1, 3, 32, 32), ref.to_units(maps))
    # raw = map + blend * target_sigmas * std * r = 16 + 0.25 * 2 * 3 * 0.5
    assert torch.allclose(out, torch.full_like(maps, 16.75))
    assert torch.allclose(refined, torch.full_like(maps, 1.5))  # u + r
    with pytest.raises(ValueError):
        ref.set_map_statistics(0.0, 0.0)


def test_densenet161_option_random_weights():
    cfg = tiny_refiner_config(encoder="densenet161", pretrained=False, decoder_channels=(32, 16, 16, 8, 8))
    ref = build_refiner(cfg)
    assert ref.encoder.features.conv0.weight.shape[1] == 4
    assert torch.all(ref.encoder.features.conv0.weight[:, 3] == 0)
    maps = torch.rand(1, 64, 64)
    with torch.no_grad():
        assert torch.equal(ref(torch.rand(1, 3, 64, 64), maps), maps)
        torch.nn.init.normal_(ref.head.weight, std=0.1)
        assert ref(torch.rand(1, 3, 64, 64), maps).shape == (1, 64, 64)


def test_onnx_export_matches_torch(tmp_path):
    import onnxruntime as ort

    ref = build_refiner(tiny_refiner_config(), pretrained=False)
    ref.set_map_statistics(0.5, 0.2)
    torch.nn.init.normal_(ref.head.weight, std=0.1)  # a non-trivial residual
    g = torch.Generator().manual_seed(1)
    images, maps = torch.rand(2, 3, 72, 80, generator=g), torch.rand(2, 72, 80, generator=g)
    with torch.no_grad():
        expected = ref(images, maps)
    assert not torch.allclose(expected, maps)
    path = tmp_path / "refiner.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ref, (images, maps), str(path), input_names=["images", "maps"],
                          output_names=["refined"], dynamo=False, opset_version=17)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy(), "maps": maps.numpy()})[0]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)


# ---------------------------------------------------------------- training


class ReadRecorder:
    """Records every path opened through builtins.open, os.open, PIL and pni-ray's loaders."""

    def __init__(self, monkeypatch) -> None:
        self.paths: list[Path] = []
        real_open, real_os_open, real_pil_open = builtins.open, os.open, PIL.Image.open
        real_load_rgb = pni_ray.data.images.load_rgb

        def record(path) -> None:
            if isinstance(path, (str, bytes, os.PathLike)):
                self.paths.append(Path(os.fsdecode(path)).resolve())

        def wrap(fn):
            def inner(file, *args, **kwargs):
                record(file)
                return fn(file, *args, **kwargs)

            return inner

        monkeypatch.setattr(builtins, "open", wrap(real_open))
        monkeypatch.setattr(os, "open", wrap(real_os_open))
        monkeypatch.setattr(PIL.Image, "open", wrap(real_pil_open))
        for module in (pni_ray.data.images, pni_ray.data.transforms):
            monkeypatch.setattr(module, "load_rgb", wrap(real_load_rgb))

    def under(self, root: Path) -> list[Path]:
        root = root.resolve()
        return [p for p in self.paths if p.is_relative_to(root)]


@pytest.fixture(scope="module")
def refined_tiny(trained_tiny, synthetic_root):
    """(trained model with a refiner, every path read while training it)."""
    from pni_ray.refine_training import train_refiner

    mp = pytest.MonkeyPatch()
    trained = copy.deepcopy(trained_tiny)
    trained.config = trained.config.replace(refiner=tiny_refiner_config())
    recorder = ReadRecorder(mp)
    try:
        out = train_refiner(trained, synthetic_root, "washer", progress=False)
    finally:
        mp.undo()
    return out, recorder.paths


def test_training_reads_only_train_good(refined_tiny, synthetic_root):
    _, paths = refined_tiny
    root = (synthetic_root / "washer").resolve()
    read = sorted({p for p in paths if p.is_relative_to(root)})
    assert read, "the recorder saw no image read at all: it is not recording"
    assert all(p.relative_to(root).parts[:2] == ("train", "good") for p in read), read
    assert not [p for p in read if p.relative_to(root).parts[0] in ("test", "ground_truth")]


def test_read_recorder_catches_test_and_mask_reads(synthetic_root, monkeypatch):
    """The recorder above would see a forbidden read: the no-test-read test can fail."""
    root = synthetic_root / "washer"
    test_image = next(p for p in sorted((root / "test").rglob("*.png")))
    mask = next(p for p in sorted((root / "ground_truth").rglob("*.png")))
    recorder = ReadRecorder(monkeypatch)
    pni_ray.data.images.load_rgb(test_image)
    pni_ray.data.images.load_mask(mask)
    with open(mask, "rb"):
        pass
    seen = {p.relative_to(root.resolve()).parts[0] for p in recorder.under(root)}
    assert seen == {"test", "ground_truth"}


def test_training_improves_the_loss(refined_tiny):
    trained, _ = refined_tiny
    history = trained.report["refiner"]["history"]
    assert history[0]["epoch"] == 0
    start = history[0]["val_loss"]
    assert start == pytest.approx(history[0]["val_identity_loss"])  # untrained = identity
    assert history[-1]["val_loss"] < 0.9 * start, history
    assert history[-1]["train_loss"] < history[1]["train_loss"], history
    assert isinstance(trained.refiner, MapRefiner) and not trained.refiner.training
    assert trained.config.refiner.enabled
    facts = trained.report["deterministic"]["refiner"]
    assert facts["n_samples"] == 16 and facts["n_val"] == 4 and facts["n_train"] == 12
    # the refiner carries the unrefined model's held-out statistics (its input maps' scale)
    assert float(trained.refiner.map_mean) == pytest.approx(trained.normalisation.extras["parent_pixel_mean"])
    assert float(trained.refiner.map_std) == pytest.approx(trained.normalisation.extras["parent_pixel_std"])


def test_refiner_data_is_seeded(trained_tiny, synthetic_root):
    from pni_ray.refine_training import good_images, make_refiner_data

    trained = copy.deepcopy(trained_tiny)
    trained.config = trained.config.replace(refiner=tiny_refiner_config(n_samples=4))
    paths = good_images(synthetic_root, "washer")[:3]
    a = make_refiner_data(trained, paths, 4, seed=0, progress=False)
    b = make_refiner_data(trained, paths, 4, seed=0, progress=False)
    c = make_refiner_data(trained, paths, 4, seed=1, progress=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks) and torch.equal(a.maps, b.maps)
    assert not torch.equal(a.images, c.images)
    assert a.maps.shape == (4, 128, 128) and a.masks.any()
    # masks mark exactly the changed pixels of the good image they were drawn on
    goods = {p.name: pni_ray.data.transforms.resize_rgb(pni_ray.data.images.load_rgb(p), 128) for p in paths}
    for img, mask, src in zip(a.images.numpy(), a.masks.numpy(), a.sources):
        assert np.array_equal(np.any(img != goods[src], axis=-1), mask)


def test_bad_source_refused_when_the_config_is_read():
    from pni_ray.config import TrainConfig

    with pytest.raises(ValueError, match="refiner.source must be one of all, holdout, got 'test'"):
        tiny_refiner_config(source="test")
    data = TrainConfig().to_dict()
    data["refiner"]["source"] = "test"
    with pytest.raises(ValueError, match="refiner.source"):  # a --config file: before any training
        TrainConfig.from_dict(data)


def test_a_bundle_written_before_source_existed_drew_on_the_holdout():
    from pni_ray.config import TrainConfig

    data = TrainConfig().to_dict()
    assert TrainConfig.from_manifest(data).refiner.source == "all"  # recorded: kept
    del data["refiner"]["source"]
    assert TrainConfig.from_manifest(data).refiner.source == "holdout"
    assert TrainConfig.from_dict(data).refiner.source == "all"  # a new config: today's default


# ---------------------------------------------------------------- bundle and evaluation


@pytest.fixture(scope="module")
def refined_bundle(refined_tiny, tmp_path_factory) -> Path:
    from pni_ray.bundle import save_bundle

    return save_bundle(refined_tiny[0], tmp_path_factory.mktemp("refined") / "washer")


def test_bundle_roundtrip_with_refiner(refined_tiny, refined_bundle, synthetic_root):
    from pni_ray.bundle import load_bundle
    from pni_ray.data.mvtec import load_category
    from pni_ray.data.transforms import load_batch
    from pni_ray.models.pni import build_detector

    trained, _ = refined_tiny
    loaded, manifest = load_bundle(refined_bundle)
    assert "refiner.safetensors" in manifest["files"]
    assert manifest["config"]["refiner"]["enabled"] is True
    assert manifest["training"]["refiner"]["n_samples"] == 16
    state, state2 = trained.refiner.state_dict(), loaded.refiner.state_dict()
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)
    cat = load_category(synthetic_root, "washer")
    images = load_batch([s.path for s in cat.test[:4]], 128)
    before, after = build_detector(trained), build_detector(loaded)
    m1, s1 = before(images)
    m2, s2 = after(images)
    assert torch.equal(m1, m2) and torch.equal(s1, s2)
    plain, _ = after(images, refine=False)
    assert not torch.equal(plain, m2)  # the refiner is applied when present


def test_evaluate_reports_pni_plus_refine(refined_bundle, synthetic_root, tmp_path):
    from click.testing import CliRunner

    from pni_ray.cli import main

    out = tmp_path / "ablation.json"
    result = CliRunner().invoke(main, ["evaluate", str(refined_bundle), str(synthetic_root), "--ablation",
                                       "--json", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("pni+refine")]
    assert len(rows) == 1  # in the metrics; not a row of n/a among the prior diagnostics
    assert "at the model's threshold" in result.output and "(pni+refine, as `score` decides" in result.output
    modes = json.loads(out.read_text())["modes"]
    assert set(modes) == {"patchcore", "neighbourhood", "position", "pni", "pni+refine"}
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert 0.0 <= modes["pni+refine"][key] <= 1.0
    assert modes["pni+refine"]["pixel_auroc"] != modes["pni"]["pixel_auroc"]


def test_ablation_refines_the_mode_the_bundle_deploys(refined_bundle, synthetic_root, tmp_path):
    """A refined bundle whose own mode is not pni (the position check left p(c|x) out: neighbourhood) shows its
    refiner on that mode's maps, the ones `score` refines, not on pni's."""
    import shutil

    from click.testing import CliRunner

    from pni_ray.cli import main

    copy = tmp_path / "neighbourhood"
    shutil.copytree(refined_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["config"]["scoring"]["mode"] = "neighbourhood"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "ablation.json"
    result = CliRunner().invoke(main, ["evaluate", str(copy), str(synthetic_root), "--ablation", "--json", str(out),
                                       "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(out.read_text())["modes"]) == {"patchcore", "neighbourhood", "position", "pni",
                                                         "neighbourhood+refine"}
    assert "(neighbourhood+refine, as `score` decides" in result.output


def test_plain_evaluate_scores_what_is_deployed(refined_bundle, synthetic_root, tmp_path):
    """A refined bundle is scored with its refiner (`score`, exports): plain `evaluate` reports that map,
    and shows the unrefined one beside it."""
    from click.testing import CliRunner

    from pni_ray.cli import main

    out = tmp_path / "plain.json"
    result = CliRunner().invoke(main, ["evaluate", str(refined_bundle), str(synthetic_root), "--json", str(out),
                                       "--threads", "1"])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert payload["mode"] == "pni+refine" and "pni+refine" in result.output
    ablation = tmp_path / "ablation.json"
    CliRunner().invoke(main, ["evaluate", str(refined_bundle), str(synthetic_root), "--ablation", "--json",
                              str(ablation), "--threads", "1"])
    refined = json.loads(ablation.read_text())["modes"]["pni+refine"]
    assert payload["pixel_auroc"] == pytest.approx(refined["pixel_auroc"], abs=1e-9)


def test_refine_config_roundtrips_through_dict():
    from pni_ray.config import TrainConfig

    cfg = TrainConfig(refiner=tiny_refiner_config(enabled=True))
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert dataclasses.asdict(again.refiner) == {**dataclasses.asdict(cfg.refiner),
                                                 "decoder_channels": list(cfg.refiner.decoder_channels)}
    ref = build_refiner(again.refiner, pretrained=False)
    assert [b.conv2.out_channels for b in ref.decoder] == list(TINY["decoder_channels"])


def test_refine_command_adds_the_refiner_train_would(trained_tiny, refined_tiny, synthetic_root, tmp_path, caplog):
    """`pni-ray refine BUNDLE` on a saved PNI bundle gives the refiner `train --refine` trains in memory."""
    from click.testing import CliRunner

    from pni_ray.bundle import load_bundle, save_bundle
    from pni_ray.cli import main
    from pni_ray.fit import record_threads
    from pni_ray.refine_training import good_images
    from pni_ray.training import calibration_split

    trained = copy.deepcopy(trained_tiny)
    trained.config = trained.config.replace(refiner=tiny_refiner_config())
    record_threads(trained, 2)  # trained on 2 threads, refined on 1 below
    plain = save_bundle(trained, tmp_path / "plain")
    out = tmp_path / "refined"
    args = ["refine", str(plain), str(synthetic_root), "--out", str(out), "--threads", "1"]
    with caplog.at_level("WARNING", logger="pni_ray"):
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    # no bars where nobody watches (its stderr is no terminal); the few calibration images said, as train says them
    assert "\r" not in result.output and "synthetic defects:" not in result.output, result.output
    assert re.search(r"only \d held-out images calibrate the refined model's score scale", caplog.text), caplog.text
    loaded, manifest = load_bundle(out)
    assert manifest["config"]["refiner"]["enabled"] is True
    expected = refined_tiny[0].refiner.state_dict()
    got = loaded.refiner.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert torch.equal(loaded.memory, trained_tiny.memory)  # the PNI model itself is untouched
    parent = json.loads((plain / "manifest.json").read_text())["training"]
    facts = manifest["training"]  # the PNI model's training facts are kept beside the refiner's
    assert {k: v for k, v in facts.items() if k != "refiner"} == parent and "mlp" in parent, facts.keys()
    assert facts["torch_threads"] == 2 and facts["refiner"]["torch_threads"] == 1, facts["refiner"]
    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0 and "already exists" in again.output
    onto_itself = CliRunner().invoke(main, ["refine", str(plain), str(synthetic_root), "--out", str(plain), "--force"])
    assert onto_itself.exit_code != 0 and "new directory" in onto_itself.output
    # --source overrides the bundle's config: defects on the held-out images only (an older bundle's default)
    held = CliRunner().invoke(main, [*args[:4], str(tmp_path / "held"), "--threads", "1", "--source", "holdout"])
    assert held.exit_code == 0, held.output
    held_model, held_manifest = load_bundle(tmp_path / "held")
    assert manifest["config"]["refiner"]["source"] == "all" and held_manifest["config"]["refiner"]["source"] == "holdout"
    _, holdout = calibration_split(good_images(synthetic_root, "washer"), held_model.config)
    holdout = {p.name for p in holdout}
    assert set(held_manifest["training"]["refiner"]["source_images"]) < holdout
    assert set(manifest["training"]["refiner"]["source_images"]) - holdout  # "all" reaches the bank's images
    bad = CliRunner().invoke(main, [*args[:4], str(tmp_path / "bad"), "--source", "test"])
    assert bad.exit_code != 0 and "'test' is not one of 'all', 'holdout'" in bad.output


def test_train_refine_records_the_refiners_threads_where_refine_does(trained_tiny, synthetic_root, monkeypatch):
    """`train --refine` (fit_category) notes the refiner's torch threads at training.refiner.torch_threads,
    as `pni-ray refine` does, beside the PNI model's training.torch_threads."""
    import pni_ray.refine_training
    import pni_ray.training
    from pni_ray.fit import fit_category

    trained = copy.deepcopy(trained_tiny)
    monkeypatch.setattr(pni_ray.training, "train_category", lambda *args, **kwargs: trained)
    monkeypatch.setattr(pni_ray.refine_training, "train_refiner", lambda model, *args, **kwargs: model)
    cfg = trained.config.replace(refiner=dataclasses.replace(tiny_refiner_config(), enabled=True))
    facts = fit_category(synthetic_root, "washer", cfg, threads=1, progress=False).report["deterministic"]
    assert facts["torch_threads"] == 1 and facts["refiner"]["torch_threads"] == 1, facts


def test_refined_bundle_is_recalibrated_on_a_third_split(trained_tiny, refined_tiny, refined_bundle, synthetic_root):
    """Normalisation and threshold of a refined bundle come from refined maps of train/good images used
    neither by the memory bank nor by the refiner's synthetic defects."""
    from pni_ray.bundle import load_bundle
    from pni_ray.data.mvtec import load_category
    from pni_ray.models.pni import build_detector
    from pni_ray.training import calibrate

    trained, _ = refined_tiny
    loaded, manifest = load_bundle(refined_bundle)
    facts = manifest["training"]
    holdout = set(facts["holdout_images"])
    calibration, sources = set(facts["refiner"]["calibration_images"]), set(facts["refiner"]["source_images"])
    train = {p.name for p in load_category(synthetic_root, "washer").train}
    assert calibration and sources and calibration <= holdout  # never in the memory bank
    assert not calibration & sources  # never a synthetic-defect image
    assert loaded.config.refiner.source == "all" and facts["refiner"]["source"] == "all"  # the default
    assert sources == train - calibration  # every other train/good image, bank images included
    assert facts["refiner"]["n_source_images"] == len(sources)
    norm, parent = loaded.normalisation, trained_tiny.normalisation
    assert norm.threshold != parent.threshold and norm.pixel_std != parent.pixel_std
    assert norm.extras["parent_threshold"] == parent.threshold and norm.extras["n_calibration"] == len(calibration)
    assert manifest["threshold"] == norm.threshold
    # recomputed from the refined maps of exactly those images
    cfg = loaded.config
    paths = sorted(synthetic_root / "washer" / "train" / "good" / n for n in calibration)
    again = calibrate(build_detector(loaded), paths, 8, cfg.scoring.threshold_sigmas, name="pni+refine")
    assert again.threshold == pytest.approx(norm.threshold, rel=1e-6)
    assert again.pixel_mean == pytest.approx(norm.pixel_mean, rel=1e-6)
    unrefined = calibrate(build_detector(loaded), paths, 8, cfg.scoring.threshold_sigmas, name="pni")
    assert unrefined.threshold != pytest.approx(norm.threshold, rel=1e-6)  # the refined maps, not the raw ones


def test_refiner_splits_refuse_too_few_held_out_images(trained_tiny, synthetic_root):
    from pni_ray.refine_training import good_images, split_refiner_images

    paths = good_images(synthetic_root, "washer")
    cfg = trained_tiny.config.replace(refiner=tiny_refiner_config())
    sources, calibration = split_refiner_images(paths, cfg)
    assert sources and calibration and not set(sources) & set(calibration)
    every = split_refiner_images(paths, cfg.replace(refiner=dataclasses.replace(cfg.refiner, source="all")))
    assert every[1] == calibration and set(every[0]) == set(paths) - set(calibration)
    few = cfg.replace(scoring=dataclasses.replace(cfg.scoring, holdout_fraction=0.01, min_holdout=1))
    with pytest.raises(ValueError, match="needs at least 2"):
        split_refiner_images(paths, few)


def test_refiner_calibrates_on_the_images_the_bundle_held_out(trained_tiny, synthetic_root, tmp_path):
    """The refined model's calibration images come from the held-out names the bundle records, not from a
    split drawn again over train/good as it is now: with images added since training, that split named
    images of the memory bank; with a held-out image gone, the refine is refused naming it."""
    import shutil

    from click.testing import CliRunner

    from pni_ray.bundle import save_bundle
    from pni_ray.cli import main
    from pni_ray.refine_training import good_images, split_refiner_images

    cfg = trained_tiny.config.replace(refiner=tiny_refiner_config())
    held = trained_tiny.report["deterministic"]["holdout_images"]
    paths = good_images(synthetic_root, "washer")
    assert split_refiner_images(paths, cfg, held) == split_refiner_images(paths, cfg)  # unchanged data: the same
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "washer", root / "washer")
    good = root / "washer" / "train" / "good"
    for i, extra in enumerate(sorted((root / "washer" / "test" / "good").iterdir())):
        shutil.copy(extra, good / f"added_{i}.png")
    grown = good_images(root, "washer")
    _, calibration = split_refiner_images(grown, cfg, held)
    assert calibration and {p.name for p in calibration} <= set(held)
    _, drawn_again = split_refiner_images(grown, cfg)
    assert {p.name for p in drawn_again} - set(held)  # what the old code calibrated on: bank images too
    trained = copy.deepcopy(trained_tiny)
    trained.config = cfg
    bundle = save_bundle(trained, tmp_path / "plain")
    (good / held[0]).unlink()
    result = CliRunner().invoke(main, ["refine", str(bundle), str(root), "--out", str(tmp_path / "r"), "--threads", "1"])
    assert result.exit_code != 0 and f"held-out image(s) {held[0]}" in result.output and "are gone" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()


def test_ensemble_of_refined_bundles_uses_the_refined_statistics(refined_bundle, bundle_tiny, tmp_path):
    from pni_ray.bundle import load_bundle
    from pni_ray.ensemble_bundle import save_ensemble, verify_ensemble

    out = save_ensemble([refined_bundle, bundle_tiny], tmp_path / "ens")
    manifest = verify_ensemble(out)
    refined_norm = load_bundle(refined_bundle)[0].normalisation
    entry = manifest["members"][0]
    assert entry["normalisation"]["threshold"] == refined_norm.threshold
    assert entry["normalisation"]["pixel_std"] == refined_norm.pixel_std


def test_refine_takes_a_patchcore_bundle_as_train_refine_does(synthetic_root, tmp_path):
    """`train --mode patchcore --refine` saves a refiner over PatchCore maps; `refine` refused the same bundle."""
    from click.testing import CliRunner

    from pni_ray.bundle import load_bundle, save_bundle
    from pni_ray.cli import main
    from conftest import tiny_config
    from pni_ray.training import train_category

    plain = save_bundle(train_category(synthetic_root, "washer", tiny_config(mode="patchcore"), progress=False),
                        tmp_path / "pc")
    result = CliRunner().invoke(main, ["refine", str(plain), str(synthetic_root), "--out", str(tmp_path / "pcr"),
                                       "--threads", "1", "--epochs", "1", "--samples", "8"])
    assert result.exit_code == 0, result.output
    refined, manifest = load_bundle(tmp_path / "pcr")
    assert manifest["mode"] == "patchcore" and refined.refiner is not None


def test_an_int8_export_of_a_refined_bundle_recalibrates_on_the_refiners_calibration_images(refined_bundle,
                                                                                             synthetic_root, tmp_path):
    """A refined bundle's threshold came from the refined scores of its third split (the refiner's calibration
    images, not all held-out ones): the INT8 export takes its own from the same images through its own graphs,
    refiner included."""
    from pni_ray.bundle_manifest import calibration_images, read_manifest
    from pni_ray.export.onnx_export import ExportOptions, export_bundle
    from pni_ray.export.runtime import load_exported

    manifest = read_manifest(refined_bundle)
    names = calibration_images(manifest)
    assert names and names != manifest["training"]["holdout_images"]  # the refiner's split, fewer
    good = synthetic_root / "washer" / "train" / "good"
    out = tmp_path / "e"
    export_bundle(refined_bundle, out, ExportOptions(max_batch=4, int8=("mlp",), calibration=good, calibration_images=4))
    model = load_exported(out, threads=1)
    record = model.manifest["int8"]["threshold"]
    assert record["recalibrated"] and record["held_out_images"] == len(names), record
    assert "refiner" in model.stages
    scores = model.predict_images([model.geometry.load(good / n) for n in names])[1].astype(np.float64)
    k = manifest["config"]["scoring"]["threshold_sigmas"]
    std = max(scores.std(ddof=1) if len(scores) > 1 else 0.0, 1e-6 * max(1.0, abs(scores.mean())))  # training's rule
    assert model.threshold == pytest.approx(scores.mean() + k * std, rel=1e-5)
