"""Errors a user can fix reach them as one line naming the file and what to do: bad training images,
too few of them, mixed aspect ratios, bad config values, tampered exports; and what a killed save
leaves behind is cleaned up by the next save."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from PIL import Image

from pni_ray.cli import main
from pni_ray.config import TrainConfig
from pni_ray.data.images import ImageError, image_size
from conftest import tiny_config


def _category(root: Path, synthetic_root: Path, n: int, name: str = "cat") -> Path:
    good = root / name / "train" / "good"
    good.mkdir(parents=True)
    for src in sorted((synthetic_root / "washer" / "train" / "good").glob("*.png"))[:n]:
        shutil.copy(src, good / src.name)
    return good


def _train(tmp_path: Path, root: Path, *extra: str, name: str = "cat"):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config().to_dict()))
    return CliRunner().invoke(main, ["train", str(root), "-c", name, "--out", str(tmp_path / "B"),
                                     "--config", str(config), *extra])


def test_a_truncated_png_is_named_when_its_header_is_read(tmp_path, synthetic_root):
    src = sorted((synthetic_root / "washer" / "train" / "good").glob("*.png"))[0]
    data = src.read_bytes()  # a PNG without EXIF in its header: Pillow reads to the end looking for one
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
    with Image.open(src) as image:
        assert image_size(src) == image.size
    with pytest.raises(ImageError, match=r"half\.png: corrupt or truncated"):
        image_size(tmp_path / "half.png")


def test_training_input_errors_are_one_line_naming_the_file(tmp_path, synthetic_root):
    root = tmp_path / "data"
    good = _category(root, synthetic_root, 8)
    data = sorted(good.glob("*.png"))[3].read_bytes()
    Image.open(sorted(good.glob("*.png"))[3]).convert("RGB").save(good / "zz_broken.jpg")
    jpeg = (good / "zz_broken.jpg").read_bytes()
    (good / "zz_broken.jpg").write_bytes(jpeg[: len(jpeg) // 3])  # header fine, pixels cut
    result = _train(tmp_path, root)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    # found by the layout check, before the features (it used to surface mid-fit, from the image reader)
    assert f"invalid MVTec AD layout:\n  - {good / 'zz_broken.jpg'}: corrupt or truncated" in result.output
    # under short-side, images of another aspect ratio: said at training, with what to do
    (good / "zz_broken.jpg").unlink()
    Image.open(good / sorted(p.name for p in good.glob("*.png"))[0]).resize((128, 64)).save(good / "zz_wide.png")
    result = _train(tmp_path, root, "--geometry", "short-side")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "zz_wide.png" in result.output and "must share one aspect ratio" in result.output
    assert "--geometry resize or letterbox" in result.output
    result = _train(tmp_path, root, "--tile", "--tile-size", "64", "--tile-overlap", "16", "--force")  # --geometry does not apply
    assert result.exit_code == 1 and "must share one aspect ratio and size" in result.output, result.output
    assert "bring them to one size, or train without --tile" in result.output
    assert data  # the category itself is fine otherwise


def test_too_few_good_images_are_refused_with_what_to_add(tmp_path, synthetic_root):
    root = tmp_path / "data"
    good = _category(root, synthetic_root, 2)
    result = _train(tmp_path, root)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"{good}: 2 good training image(s); at least 3 are needed" in result.output
    assert not (tmp_path / "B").exists()


@pytest.mark.parametrize("bad, match", [
    ({"neighbourhood": {"epochs": "3"}}, "NeighbourhoodConfig.epochs must be int, got '3'"),
    ({"neighbourhood": None}, "neighbourhood is a section of settings"),
    ({"features": {"image_size": 7}}, "image_size must be >= 32"),
    ({"features": {"patch_size": 4}}, "patch_size is an odd number"),
    ({"coreset": {"ratio": 0}}, r"coreset.ratio is the share of patches kept, > 0"),
    ({"coreset": {"min_size": 0}}, "min_size <= max_size"),
    ({"neighbourhood": {"epochs": 0}}, "epochs, dist_size and hidden >= 1"),
    ({"neighbourhood": {"dist_size": 0}}, "epochs, dist_size and hidden >= 1"),
    ({"neighbourhood": {"lr": 0}}, "lr and temperature must be > 0"),
    ({"seed": True}, "TrainConfig.seed must be int"),
    # choices and shapes that used to pass the reading and fail minutes later (after the MLP trained)
    ({"mode": "foo"}, "mode must be one of pni, patchcore, got 'foo'"),
    ({"scoring": {"mode": "foo"}}, "scoring.mode must be one of"),
    ({"scoring": {"combine": "x"}}, "scoring.combine must be one of both, mean"),
    ({"scoring": {"holdout_fraction": 2.0}}, "holdout_fraction is a share of train/good in"),
    ({"geometry": {"policy": "x"}}, "geometry.policy must be one of resize, letterbox, short-side"),
    ({"neighbourhood": {"train_precision": "fp8"}}, "neighbourhood.train_precision must be one of"),
    ({"neighbourhood": {"cut_candidates": ["a"]}}, "cut_candidates must be a list of numbers"),
    ({"refiner": {"defect_weights": {"bogus": 1}}}, "refiner.defect_weights maps defect kinds"),
    ({"refiner": {"defect_weights": [1, 2]}}, "refiner.defect_weights maps defect kinds"),
    ({"refiner": {"decoder_channels": ["a"]}}, "decoder_channels is a list of 5 whole numbers"),
    # values that failed only after the PNI model trained, or were read as another value (0 as null)
    ({"refiner": {"decoder_channels": [16]}}, r"decoder_channels is a list of 5 whole numbers >= 1 \(widths at"),
    ({"refiner": {"lr": -1.0}}, "refiner needs lr > 0"),
    ({"refiner": {"target_sigmas": -2.0}}, r"target_sigmas > 0 \(null: measured\), got 0.001, 0.1 and -2.0"),
    ({"seed": -1}, r"seed is a whole number in 0..4294967295, got -1"),
    ({"seed": 2**64 - 1}, r"seed is a whole number in 0..4294967295"),
    ({"batch_size": 0}, "batch_size is the images per backbone forward, >= 1"),
    ({"coreset": {"ratio": 5.0}}, r"coreset.ratio is the share of patches kept, in \(0, 1\]"),
    ({"neighbourhood": {"bottleneck": 0}}, "neighbourhood.bottleneck and positions_per_image are >= 1"),
    ({"neighbourhood": {"positions_per_image": -3}}, "neighbourhood.bottleneck and positions_per_image are >= 1"),
    ({"features": {"projection_dim": -4}}, "features.projection_dim is a feature width >= 1"),
    ({"refiner": {"n_samples": 0}}, "refiner needs n_samples >= 2"),
    ({"neighbourhood": {"window": 4}}, "neighbourhood.window is the odd side"),
    ({"neighbourhood": {"window": 1}}, "neighbourhood.window is the odd side"),
    ({"neighbourhood": {"lr_step": 0}}, "neighbourhood needs lr_step >= 1"),
    ({"coreset": {"chunk_size": 0}}, r"coreset needs projection_dim >= 0 \(0: no projection\), chunk_size >= 1"),
    ({"geometry": {"max_pixels": 0}}, "geometry needs max_pixels >= 1"),
    ({"features": {"image_size": 100000}}, r"features.image_size 100000 is a 100000 x 100000 model input of "
                                           r"10,000,000,000 pixels, over geometry.max_pixels \(50,000,000\)"),
    ({"geometry": {"pad_value": 999}}, "a pad_value grey level in 0..255"),
    ({"position": {"min_keep": 2}}, r"position.min_keep is a share of held-out patches in \(0, 1\], got 2"),
    ({"position": {"min_keep": 0}}, r"position.min_keep is a share of held-out patches in \(0, 1\], got 0"),
    ({"scoring": {"threshold_sigmas": -5}}, "scoring.threshold_sigmas is k >= 0 in threshold = mean"),
    ({"coreset": {"max_candidates": 1}}, r"coreset.max_candidates is at least coreset.min_size \(64\)"),
])
def test_bad_config_values_fail_when_the_config_is_read(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(bad).check_trainable()  # check_trainable: what a bundle's recorded config may still hold


def test_a_bundles_recorded_config_loads_with_values_training_now_refuses():
    """Bundles trained with a ratio above 1, a 0 read as null or a negative seed still load and score."""
    old = {"coreset": {"ratio": 5.0}, "seed": -1, "batch_size": 0, "neighbourhood": {"bottleneck": 0},
           "features": {"projection_dim": 0}}
    cfg = TrainConfig.from_manifest(old)
    assert cfg.coreset.ratio == 5.0 and cfg.seed == -1 and cfg.neighbourhood.bottleneck == 0
    with pytest.raises(ValueError, match="seed is a whole number"):
        cfg.check_trainable()  # as the base of a new fit (--config manifest.json), refused


def test_a_weights_file_is_recorded_by_its_absolute_path_and_needed_to_load(tmp_path, synthetic_root, monkeypatch):
    """`--weights w.pth` typed relative to the working directory: the bundle loads from anywhere, has the
    model id of the same file given absolutely, and says what is missing when the file is moved away; a
    config file's features.weights that is not a file is a usage error before any work."""
    import torch

    from pni_ray.bundle import load_bundle, model_id
    from pni_ray.models.backbones import create_classifier

    torch.manual_seed(0)
    from safetensors.torch import save_file

    save_file(create_classifier("efficientnet_lite0", pretrained=False).state_dict(), str(tmp_path / "w.safetensors"))
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config().to_dict()))
    monkeypatch.chdir(tmp_path)
    args = ["train", str(synthetic_root), "-c", "washer", "--config", str(config), "--threads", "1"]
    assert CliRunner().invoke(main, [*args, "--out", "B1", "--weights", "w.safetensors"]).exit_code == 0
    assert CliRunner().invoke(main, [*args, "--out", "B2", "--weights", str(tmp_path / "w.safetensors")]).exit_code == 0
    m1 = json.loads((tmp_path / "B1" / "manifest.json").read_text())
    assert m1["config"]["features"]["weights"] == str(tmp_path / "w.safetensors")
    assert model_id(tmp_path / "B1") == model_id(tmp_path / "B2")  # one model, however the path was typed
    monkeypatch.chdir("/")
    load_bundle(tmp_path / "B1")
    (tmp_path / "w.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(ValueError, match=r"trained with the backbone weights file .*w\.safetensors .* put the file back"):
        load_bundle(tmp_path / "B1")
    from pni_ray.orchestration.score import ScoreError
    from pni_ray.orchestration.score_model import describe_model

    with pytest.raises(ScoreError, match=r"w\.safetensors .* put the file back"):  # score: before any worker starts
        describe_model(tmp_path / "B1")
    # a link (a Hugging Face cache names a suffix-less blob) is recorded as the link, whose suffix says the format
    (tmp_path / "blobs").mkdir()
    (tmp_path / "moved.safetensors").rename(tmp_path / "blobs" / "3f9a0c1d")
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "blobs" / "3f9a0c1d")
    assert CliRunner().invoke(main, [*args, "--out", str(tmp_path / "B4"), "--weights", str(tmp_path / "link.safetensors")]).exit_code == 0
    assert json.loads((tmp_path / "B4" / "manifest.json").read_text())["config"]["features"]["weights"] == str(tmp_path / "link.safetensors")
    load_bundle(tmp_path / "B4")
    # a config file's relative weights: from the config's folder, wherever the command runs
    beside = tmp_path / "cfgdir"
    beside.mkdir()
    (beside / "w.safetensors").symlink_to(tmp_path / "blobs" / "3f9a0c1d")
    (beside / "c.json").write_text(json.dumps({**tiny_config().to_dict(), "features": {**tiny_config().to_dict()["features"],
                                                                                     "weights": "w.safetensors"}}))
    result = CliRunner().invoke(main, ["train", str(synthetic_root), "-c", "washer", "--config", str(beside / "c.json"),
                                       "--out", str(tmp_path / "B5"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "B5" / "manifest.json").read_text())["config"]["features"]["weights"] == str(beside / "w.safetensors")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**tiny_config().to_dict(), "features": {**tiny_config().to_dict()["features"],
                                                                     "weights": str(tmp_path / "w.safetensors")}}))
    result = CliRunner().invoke(main, ["train", str(synthetic_root), "-c", "washer", "--config", str(bad),
                                       "--out", str(tmp_path / "B3")])
    assert result.exit_code == 2 and "features.weights" in result.output and "is not a file" in result.output


def test_an_unknown_backbone_or_refiner_encoder_in_a_config_file_is_a_usage_error(tmp_path, synthetic_root):
    for config, said in (({"features": {"backbone": "nope"}}, "unknown backbone 'nope'"),
                         ({"refiner": {"enabled": True, "encoder": "nope"}}, "refiner.encoder: unknown backbone 'nope'")):
        path = tmp_path / "config.json"
        path.write_text(json.dumps(config))
        result = CliRunner().invoke(main, ["train", str(synthetic_root), "-c", "washer", "--out", str(tmp_path / "B"),
                                           "--config", str(path)])
        assert result.exit_code == 2 and said in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / "B").exists()


def test_config_values_of_the_right_types_still_read():
    cfg = TrainConfig.from_dict({"neighbourhood": {"lr": 1, "cut": None, "cut_candidates": [1, 2]},
                                 "features": {"projection_dim": None}, "coreset": {"ratio": 1},
                                 "geometry": {"max_pixels": 5e7}})
    assert cfg.neighbourhood.lr == 1 and cfg.coreset.ratio == 1 and cfg.features.projection_dim is None
    assert cfg.geometry.max_pixels == 50_000_000 and isinstance(cfg.geometry.max_pixels, int)
    # values with a meaning at the ends of their range still read: 0 always searches densely, above 1 always
    # uses the candidate lists; a blend above 1 pushes the map past the refined one
    for share in (0.0, 2.0):
        assert TrainConfig.from_manifest({"scoring": {"candidate_share": share}}).scoring.candidate_share == share
    assert TrainConfig.from_dict({"refiner": {"blend": 1.5}}).refiner.blend == 1.5


def test_backbone_given_on_the_command_line_replaces_an_unknown_one_in_the_config():
    """train-all --backbones names what it trains: a config file's unknown backbone is then not refused."""
    import click

    from pni_ray.options import build_config

    base = TrainConfig().replace(features=TrainConfig().features.__class__(backbone="nope"))
    with pytest.raises(click.UsageError, match="unknown backbone 'nope'"):
        build_config(base=base)
    assert build_config(base=base, backbone="efficientnet_lite0").features.backbone == "efficientnet_lite0"


def test_scoring_a_tampered_export_is_refused_before_the_run(bundle_tiny, tmp_path, synthetic_root):
    from pni_ray.export.onnx_export import export_bundle
    from pni_ray.orchestration.score import ScoreError, score

    export = tmp_path / "E"
    export_bundle(bundle_tiny, export)
    table = next(p for p in export.iterdir() if p.suffix == ".arrow")
    data = bytearray(table.read_bytes())
    data[-12] ^= 0xFF
    table.write_bytes(bytes(data))
    with pytest.raises(ScoreError, match=rf"{table.name}: checksum mismatch"):
        score(export, [str(synthetic_root / "washer" / "test" / "good")], tmp_path / "out", engine="local")
    assert not (tmp_path / "out").exists()


def test_a_save_removes_what_a_killed_save_left(tmp_path, trained_tiny):
    from pni_ray.bundle import save_bundle

    out = tmp_path / "B"
    partial = tmp_path / ".B.partial-deadbeef"  # a save killed before its rename (8 hex digits, as staged_dir names it)
    partial.mkdir()
    save_bundle(trained_tiny, out)
    assert not partial.exists()
    old = tmp_path / ".B.old-cafef00d"  # a replace killed before it deleted the replaced copy
    old.mkdir()
    save_bundle(trained_tiny, out, overwrite=True)
    assert not old.exists()
    shutil.rmtree(out)
    (tmp_path / ".B.old-0badc0de").mkdir()  # without B, the only copy of the last bundle: kept
    save_bundle(trained_tiny, out)
    assert (tmp_path / ".B.old-0badc0de").exists()
    other = tmp_path / ".B.partial-x.partial-12345678"  # another bundle's (B.partial-x) staging: not ours
    other.mkdir()
    (tmp_path / "cam[1]").mkdir()
    glob_like = tmp_path / ".cam1.partial-12345678"  # a name that cam[1] as a glob pattern would match
    glob_like.mkdir()
    save_bundle(trained_tiny, out, overwrite=True)
    save_bundle(trained_tiny, tmp_path / "cam[1]", overwrite=True)
    assert other.exists() and glob_like.exists()
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # safetensors' own writer made its file 0600


def test_small_commands_refuse_bad_input_in_one_line(tmp_path, synthetic_root):
    """make-defects, make-synthetic, refine and report: a user's mistake is an error line, not a traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    runner = CliRunner()
    good = synthetic_root / "washer" / "train" / "good"
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    data = sorted(good.glob("*.png"))[0].read_bytes()
    (tmp_path / "broken" / "half.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "foreign").mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "foreign" / "part-0.parquet")
    cases = [
        (["make-defects", str(good), str(tmp_path / "d1"), "--kind", "bogus"], 2, "'bogus' is not one of"),
        (["make-defects", str(good), str(tmp_path / "d2"), "-n", "0"], 2, "-n"),
        (["make-defects", str(tmp_path / "empty"), str(tmp_path / "d3")], 1, "no images"),
        (["make-defects", str(tmp_path / "broken"), str(tmp_path / "d4")], 1, "half.png: corrupt or truncated"),
        (["make-synthetic", str(tmp_path / "s"), "--size", "128", "--categories", "tile"], 2, "unknown category 'tile'"),
        (["refine", str(tmp_path), str(synthetic_root), "--out", str(tmp_path / "r"), "--epochs", "0"], 2, "--epochs"),
        (["refine", str(tmp_path), str(synthetic_root), "--out", str(tmp_path / "r"), "--samples", "1"], 2, "--samples"),
        (["report", str(tmp_path / "foreign"), "--html", str(tmp_path / "r.html")], 1, "not a pni-ray score part file"),
        (["report", str(tmp_path / "foreign"), "--html", str(tmp_path / "r.html"), "--top", "-1"], 2, "--top"),
        (["evaluate", str(tmp_path), str(synthetic_root), "--threads", "0"], 2, "--threads"),
    ]
    for args, code, phrase in cases:
        result = runner.invoke(main, args)
        assert result.exit_code == code and phrase in result.output, (args, result.output)
        assert "Traceback" not in result.output, args


def test_evaluate_and_report_refuse_what_they_cannot_do_before_the_work(tmp_path, synthetic_root, bundle_tiny):
    """A mode the model lacks, --mode with --ablation, an output that would land inside the command's own
    input or under a file, a bad thread count, a damaged part file: each one line, no traceback, and
    nothing of the input overwritten."""
    from pni_ray.bundle import save_bundle
    from pni_ray.training import train_category

    runner = CliRunner()
    patchcore = save_bundle(train_category(synthetic_root, "washer", tiny_config(mode="patchcore"), progress=False),
                            tmp_path / "pc")
    ens = tmp_path / "ens"
    made = runner.invoke(main, ["ensemble", str(bundle_tiny), str(patchcore), "--out", str(ens), "--threads", "1"])
    assert made.exit_code == 0, made.output
    assert "efficientnet_lite0 (pni mode)" in made.output and "efficientnet_lite0 (patchcore mode)" in made.output
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "link").symlink_to(bundle_tiny)
    fifo = tmp_path / "a_fifo"
    os.mkfifo(fifo)  # as /dev/null is a device: a rename over it made it a regular file (as root, /dev/null too)
    data = str(synthetic_root)
    cases = [
        ([str(bundle_tiny), data, "--json", str(fifo)], 2, f"{fifo}: cannot write the metrics: it is a FIFO, not a file"),
        ([str(patchcore), data, "--mode", "pni"], 1, f"{patchcore} is a PatchCore-only bundle: --mode pni needs a PNI bundle"),
        ([str(patchcore), data, "--mode", "position"], 1, "--mode position needs a PNI bundle"),
        ([str(patchcore), data, "--ablation"], 1, "PatchCore-only bundle: --ablation needs a PNI bundle"),
        ([str(ens), data, "--mode", "pni"], 1, f"{ens} has a PatchCore-only member: --mode pni needs PNI members only"),
        ([str(bundle_tiny), data, "--ablation", "--mode", "pni"], 2, "--mode and --ablation are alternatives"),
        ([str(bundle_tiny), data, "--json", str(bundle_tiny / "manifest.json")], 2,
         f"the metrics would be written inside {bundle_tiny}, the command's own input"),
        ([str(bundle_tiny), data, "--json", str(tmp_path / "link" / "manifest.json")], 2,
         f"the metrics would be written inside {bundle_tiny}"),  # a link into the bundle is the bundle
        ([str(bundle_tiny), data, "--json", str(tmp_path / "a_file" / "m.json")], 2,
         f"cannot write the metrics: {tmp_path / 'a_file'} is a file, not a folder"),
        ([str(bundle_tiny), data, "--threads", "0"], 2, "--threads"),
    ]
    manifest = (bundle_tiny / "manifest.json").read_bytes()
    for args, code, phrase in cases:
        result = runner.invoke(main, ["evaluate", *args])
        assert result.exit_code == code and phrase in result.output and "Traceback" not in result.output, (args, result.output)
    assert (bundle_tiny / "manifest.json").read_bytes() == manifest
    files = sorted(p.name for p in bundle_tiny.iterdir())
    own = runner.invoke(main, ["ensemble", str(patchcore), str(bundle_tiny), "--out", str(tmp_path / "link" / "ens")])
    assert own.exit_code == 1 and f"would be written inside {bundle_tiny}, one of its members" in own.output, own.output
    assert sorted(p.name for p in bundle_tiny.iterdir()) == files  # no staging folder, no copies of copies
    in_a_file = runner.invoke(main, ["ensemble", str(bundle_tiny), str(patchcore), "--out", str(tmp_path / "a_file" / "e")])
    assert in_a_file.exit_code == 2 and f"cannot write the ensemble: {tmp_path / 'a_file'} is a file, not a folder" \
        in in_a_file.output, in_a_file.output  # was errno 17's "File exists: 'a_file'"
    bad_threads = runner.invoke(main, ["ensemble", str(bundle_tiny), str(patchcore), "--out", str(tmp_path / "e2"),
                                       "--threads", "-1"])
    assert bad_threads.exit_code == 2 and "'--threads': -1 is not in the range x>=1" in bad_threads.output
    from pni_ray.options import set_threads

    with pytest.raises(click.UsageError, match="--threads must be at least 1, not 0"):  # demo's, where 0 meant all cores
        set_threads(0)
    # report: into the output's own files refused; a damaged part file named with what to do
    out = tmp_path / "scores"
    scored = runner.invoke(main, ["score", str(bundle_tiny), str(synthetic_root / "washer" / "test"), "--out", str(out),
                                  "--engine", "local", "--threads", "1"])
    assert scored.exit_code == 0, scored.output
    part = sorted(out.glob("part-*.parquet"))[0]
    into = runner.invoke(main, ["report", str(out), "--html", str(part)])
    assert into.exit_code == 2 and "the report would be written inside" in into.output
    plain = runner.invoke(main, ["report", str(out), "--html", str(out / "report.html")])  # pd.read_parquet(OUT) would
    assert plain.exit_code == 2 and "inside OUT a report needs a name starting with _" in plain.output  # read it
    assert runner.invoke(main, ["report", str(out), "--html", str(out / "_report.html")]).exit_code == 0
    import pandas as pd

    assert len(pd.read_parquet(out)) == len(list((synthetic_root / "washer" / "test").rglob("*.png")))
    into_fifo = runner.invoke(main, ["report", str(out), "--html", str(fifo)])
    assert into_fifo.exit_code == 2 and "cannot write the report: it is a FIFO" in into_fifo.output
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    from pni_ray.fileio import atomic_write_bytes

    with pytest.raises(OSError, match="it is a FIFO, not a file"):  # the writer itself, under every command
        atomic_write_bytes(fifo, b"x")
    part.write_bytes(part.read_bytes()[:100])
    damaged = runner.invoke(main, ["report", str(out), "--html", str(tmp_path / "r.html")])
    assert damaged.exit_code == 1 and f"{part}: not a readable Parquet file" in damaged.output, damaged.output
    assert "remove it and rerun `pni-ray score`" in damaged.output
    rescore = runner.invoke(main, ["score", str(bundle_tiny), str(synthetic_root / "washer" / "test"), "--out", str(out),
                                   "--engine", "local", "--threads", "1"])
    assert rescore.exit_code == 3 and f"{part}: not a readable Parquet file" in rescore.output, rescore.output
    assert "Traceback" not in rescore.output
    part.unlink()  # as the message says: the rerun scores that part's inputs again
    rescore = runner.invoke(main, ["score", str(bundle_tiny), str(synthetic_root / "washer" / "test"), "--out", str(out),
                                   "--engine", "local", "--threads", "1"])
    assert rescore.exit_code == 0 and "10 inputs: 10 scored, 0 failed" in rescore.output, rescore.output


def test_an_ensembles_ablation_reports_no_cut_it_does_not_have(bundle_tiny, tmp_path, synthetic_root):
    from pni_ray.evaluate import attach_diagnostics

    results = {"pni": {"pixel_auroc": 0.9}}
    attach_diagnostics(results, {}, {"format": "pni-ray-ensemble", "members": [{}, {}]})
    assert "neighbourhood_cut" not in results["pni"].get("diagnostics", {})
    results = {"pni": {"pixel_auroc": 0.9}}
    attach_diagnostics(results, {}, {"neighbourhood_cut": 2.0})
    assert results["pni"]["diagnostics"]["neighbourhood_cut"] == 2.0


def test_training_outputs_and_options_are_checked_before_any_work(tmp_path, synthetic_root):
    """An OUT under a file, train-all's out-of-range numbers: usage errors before features or Ray start;
    `-c ./washer/` (tab completion) is the category washer, the same model as `-c washer`."""
    from pni_ray.bundle import model_id

    (tmp_path / "a_file").write_text("x")
    under_file = str(tmp_path / "a_file" / "sub")
    for cmd in (["train", str(synthetic_root), "-c", "washer", "--out", under_file],
                ["train-all", str(synthetic_root), "--out", under_file]):
        result = CliRunner().invoke(main, cmd)
        assert result.exit_code == 2 and f"{tmp_path / 'a_file'} is a file, not a folder" in result.output, result.output
    for option, value in (("--max-retries", "-5"), ("--gpus-per-task", "-1"), ("--num-cpus", "0"), ("--threads", "0"),
                          ("--cpus-per-task", "0")):
        result = CliRunner().invoke(main, ["train-all", str(synthetic_root), "--out", str(tmp_path / "ta"), option, value])
        assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, (option, result.output)
        assert not (tmp_path / "ta").exists()
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config().to_dict()))
    for name, category in (("B1", "./washer/"), ("B2", "washer")):
        result = CliRunner().invoke(main, ["train", str(synthetic_root), "-c", category, "--out", str(tmp_path / name),
                                           "--config", str(config), "--threads", "1"])
        assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "B1" / "manifest.json").read_text())["category"] == "washer"
    assert model_id(tmp_path / "B1") == model_id(tmp_path / "B2")


def test_a_bf16_mlp_this_cpu_would_emulate_is_a_usage_error(tmp_path, synthetic_root):
    from pni_ray.training import native_bf16

    if native_bf16():
        pytest.skip("this CPU runs bf16 natively")
    result = CliRunner().invoke(main, ["train", str(synthetic_root), "-c", "washer", "--out", str(tmp_path / "B"),
                                       "--mlp-precision", "bfloat16"])
    assert result.exit_code == 2 and "needs a CPU with native bf16" in result.output and "Traceback" not in result.output


def test_options_the_geometry_or_the_backbones_cannot_take_are_usage_errors_before_any_work(tmp_path, synthetic_root):
    """They were tracebacks from deep inside (train) or failed every pair after Ray started (train-all)."""
    from pni_ray.options import build_config

    for extra, said in ((["--tile", "--tile-size", "50"], "tile_size must be a positive multiple of 16"),
                        (["--geometry", "letterbox", "--image-size", "72"], "needs an image size divisible by 16")):
        for cmd in (["train", str(synthetic_root), "-c", "washer", "--out", str(tmp_path / "B")],
                    ["train-all", str(synthetic_root), "--out", str(tmp_path / "ta")]):
            result = CliRunner().invoke(main, cmd + extra)
            assert result.exit_code == 2 and said in result.output, (cmd, extra, result.output)
    from pni_ray.models.backbones import OFFLINE_BACKBONES, get_spec, offline_weight_path

    lite2 = offline_weight_path(get_spec("efficientnet_lite2"))
    result = CliRunner().invoke(main, ["train-all", str(synthetic_root), "--out", str(tmp_path / "ta"),
                                       "--backbones", "efficientnet_lite2,efficientnet_lite0", "--weights", str(lite2)])
    assert result.exit_code == 2 and "--backbones names 2: train each backbone with its own weights" in result.output
    assert not (tmp_path / "ta").exists() and "efficientnet_lite0" in OFFLINE_BACKBONES
    from pni_ray.models.backbones import WeightsError, create_classifier

    with pytest.raises(WeightsError, match=rf"{lite2}: not weights of efficientnet_lite0 \(unexpected key"):
        create_classifier("efficientnet_lite0", weights=lite2)
    # --no-refine turns off what a config file (or a refined bundle's manifest) turned on
    on = build_config(refine=True)
    assert on.refiner.enabled and not build_config(base=on, refine=False).refiner.enabled
    assert build_config(base=on).refiner.enabled


def test_a_broken_test_split_never_stops_training(tmp_path, synthetic_root):
    """train reads train/good alone; a train-all pair trains and saves its bundle, then fails at its
    evaluation naming the test file (as `--no-eval` trains and succeeds)."""
    from pni_ray.orchestration.train_task import PairError, train_pair

    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "washer", root / "washer")
    broken = sorted((root / "washer" / "test" / "good").glob("*.png"))[0]
    broken.write_bytes(broken.read_bytes()[:60])
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config().to_dict()))
    result = CliRunner().invoke(main, ["train", str(root), "-c", "washer", "--out", str(tmp_path / "B"),
                                       "--config", str(config), "--threads", "1"])
    assert result.exit_code == 0, result.output
    cfg = tiny_config().to_dict()
    assert train_pair(str(root), "washer", cfg, str(tmp_path / "P1"), 1, evaluate=False)["status"] == "trained"
    with pytest.raises(PairError) as failed:
        train_pair(str(root), "washer", cfg, str(tmp_path / "P2"), 1)
    record = failed.value.record
    assert record["stage"] == "evaluate" and broken.name in record["error"] and (tmp_path / "P2" / "manifest.json").is_file()


def test_scoring_an_incomplete_bundle_is_refused_before_the_run(bundle_tiny, tmp_path, synthetic_root):
    """The driver checks a bundle as its loader will (the files its mode needs, the manifest's keys), so a
    manifest that lists no memory bank fails before OUT exists, not in every actor with resume advice."""
    from pni_ray.orchestration.score import ScoreError, score

    bundle = tmp_path / "B"
    shutil.copytree(bundle_tiny, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["files"]["memory.arrow"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ScoreError, match=r"incomplete bundle, manifest lists no memory.arrow"):
        score(bundle, [str(synthetic_root / "washer" / "test" / "good")], tmp_path / "out", engine="local")
    del manifest["normalisation"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ScoreError, match=r"manifest.json: 'normalisation' is missing"):
        score(bundle, [str(synthetic_root / "washer" / "test" / "good")], tmp_path / "out", engine="local")
    assert not (tmp_path / "out").exists()
