"""`pni-ray score`: inputs, chunking, map codec, bad files, resume, Ray Data at scale, readers."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from pni_ray.data.images import load_rgb
from pni_ray.orchestration.corpus import make_image_corpus, write_bad_inputs, write_odd_modes
from pni_ray.orchestration.ray_session import unplaceable
from pni_ray.orchestration.score import Options, ScoreError, decode_chunk, score, worker_count
from pni_ray.orchestration.score_inputs import chunk_id, expand_inputs, make_chunks
from pni_ray.orchestration.score_output import committed_paths
from pni_ray.config import GeometryConfig
from pni_ray.geometry import Geometry, resize_map
from pni_ray.results import decode_map, decode_row, encode_map, part_files, read_table

REPO = Path(__file__).resolve().parents[1]
PNI_RAY = [sys.executable, "-c", "from pni_ray.cli import main; main()"]  # the console script's entry point
# 1,000 for the acceptance run (PNI_RAY_SCORE_IMAGES=1000 pytest tests/test_score.py -m ray);
# fewer by default to keep the suite short on two cores. The SIGKILL test needs >= 250.
CORPUS_IMAGES = max(250, int(os.environ.get("PNI_RAY_SCORE_IMAGES", "300")))


def sources(synthetic_root: Path) -> list[Path]:
    return sorted((synthetic_root / "washer" / "test").glob("*/*.png"))


def model_map(model, path: str) -> tuple[np.ndarray, float]:
    """The model's own output for one file, restored to the file's size: the reference."""
    prepared = model.geometry.prepare(load_rgb(path))
    maps, scores = model.canvas_maps([prepared])
    return model.geometry.restore(maps[0], prepared), float(scores[0])


def check_exactly_once(out: Path, inputs: list[str]) -> None:
    paths = read_table(out, columns=["path"]).column("path").to_pylist()
    assert len(paths) == len(set(paths)), "duplicate rows"
    assert sorted(paths) == sorted(inputs), "rows != inputs"


# ------------------------------------------------------------------------------------------
# no Ray
# ------------------------------------------------------------------------------------------


def test_expand_inputs_dirs_globs_lists_duplicates(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    for rel in ("a/1.png", "a/sub/2.jpg", "a/.hidden.png", "a/.cache/3.png", "b/4.png", "b/5.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(tmp_path / rel)
    (tmp_path / "a" / "notes.txt").write_text("not scanned from a directory")
    lst = tmp_path / "lists" / "inputs.lst"
    lst.parent.mkdir()
    lst.write_text("# comment\n\n../b/4.png\n../b/../b/4.png\n../missing.png\n../b/*.png\n../nomatch/*.png\n")
    got = expand_inputs([str(tmp_path / "a"), f"@{lst}", str(tmp_path / "a" / "1.png")])
    t = str(tmp_path)
    assert got.paths == sorted([f"{t}/a/1.png", f"{t}/a/sub/2.jpg", f"{t}/b/4.png", f"{t}/b/5.png",
                                f"{t}/missing.png", f"{t}/nomatch/*.png"])
    assert got.duplicates == 3  # b/4.png twice more (normalised + glob), a/1.png once more
    assert got.preset_errors == {f"{t}/nomatch/*.png": f"{t}/nomatch/*.png: no file matches this pattern (line 7 of {lst})",
                                 f"{t}/missing.png": f"{t}/missing.png: file not found (line 5 of {lst})"}
    # a .txt/.lst argument that exists is a list file; order of arguments does not matter
    again = expand_inputs([str(tmp_path / "a" / "1.png"), str(lst), str(tmp_path / "a")])
    assert again.paths == got.paths
    # a Windows list: a byte-order mark and CRLF; a name whose bytes are not UTF-8 (Latin-1 'é')
    odd = os.fsdecode(b"b/caf\xe9.png")
    Image.fromarray(rgb).save(os.path.join(os.fsencode(tmp_path), os.fsencode(odd)))
    windows = tmp_path / "windows.txt"
    windows.write_bytes(b"\xef\xbb\xbf" + f"{t}/b/4.png\r\nb/5.png\r\n".encode() + b"b/caf\xe9.png\r\n")
    listed = expand_inputs([f"@{windows}"])
    assert listed.paths == sorted([f"{t}/b/4.png", f"{t}/b/5.png", f"{t}/{odd}"]) and not listed.preset_errors
    # PowerShell's `>`: UTF-16 with its byte-order mark; without one, refused in one line, not one garbage row per line
    (tmp_path / "ps.txt").write_bytes(f"{t}/b/4.png\r\nb/5.png\r\n".encode("utf-16"))
    assert expand_inputs([f"@{tmp_path / 'ps.txt'}"]).paths == sorted([f"{t}/b/4.png", f"{t}/b/5.png"])
    (tmp_path / "bare.txt").write_bytes(f"{t}/b/4.png\n".encode("utf-16-le"))
    bare = expand_inputs([f"@{tmp_path / 'bare.txt'}"])
    assert bare.paths == [str(tmp_path / "bare.txt")] and "UTF-16 without its byte-order mark" in bare.preset_errors[bare.paths[0]]
    # a list that names nothing (an upstream step that wrote no names) is one error row, as an empty folder is
    (tmp_path / "empty.txt").write_text("# tonight's images\n\n")
    empty = expand_inputs([str(tmp_path / "empty.txt")])
    assert empty.paths == [str(tmp_path / "empty.txt")]
    assert empty.preset_errors[empty.paths[0]].endswith("empty.txt: the list file names no images (empty, or only comments)")


def test_chunks_are_deterministic():
    paths = [f"/d/{i:04d}.png" for i in range(130)]
    chunks = make_chunks(paths, 64)
    assert [len(c) for c in chunks] == [64, 64, 2]
    assert [chunk_id(c) for c in chunks] == [chunk_id(c) for c in make_chunks(list(paths), 64)]
    assert len({chunk_id(c) for c in chunks}) == 3
    with pytest.raises(ValueError):
        make_chunks(paths, 0)


def test_map_codec_roundtrip():
    rng = np.random.default_rng(0)
    amap = (rng.random((37, 53)) * 20 + 5).astype(np.float32)
    payload, dtype, lo, hi = encode_map(amap, "uint8")
    assert dtype == "uint8" and len(payload) == 37 * 53 and lo == pytest.approx(amap.min())
    back = decode_map(payload, dtype, 37, 53, lo, hi)
    assert np.abs(back - amap).max() <= (hi - lo) / 510 + 1e-5
    payload, dtype, lo, hi = encode_map(amap, "float16")
    assert np.allclose(decode_map(payload, dtype, 37, 53), amap, rtol=1e-3)
    assert encode_map(amap, "none")[0] is None and decode_map(None, None, 37, 53) is None
    flat = np.full((4, 6), 3.5, np.float32)
    assert np.allclose(decode_map(*encode_map(flat, "uint8")[:2], 4, 6, 3.5, 3.5), 3.5)
    payload, dtype, lo, hi = encode_map(amap, "float32")
    assert dtype == "float32" and np.array_equal(decode_map(payload, dtype, 37, 53), amap)
    up = resize_map(amap[:8, :8], (16, 24))
    assert up.shape == (16, 24) and amap[:8, :8].min() - 1e-4 <= up.min() and up.max() <= amap[:8, :8].max() + 1e-4
    with pytest.raises(ValueError):
        encode_map(amap, "png")


def test_decode_stage_names_every_bad_file_and_scores_odd_modes(tmp_path, synthetic_root):
    rgb = load_rgb(sources(synthetic_root)[0])
    bad = write_bad_inputs(tmp_path / "bad", rgb, max_pixels=200_000)
    odd = write_odd_modes(tmp_path / "odd", rgb)
    inputs = expand_inputs([str(p) for p in list(bad) + odd])  # errors known before decoding, too
    paths = inputs.paths
    assert len(paths) == len(bad) + len(odd)
    row = {"chunk": "c", "meta": json.dumps({"paths": paths, "preset": inputs.preset_errors})}
    decoded = decode_chunk(row, geometry=Geometry(GeometryConfig(), 64).spec(), max_pixels=200_000)
    meta = json.loads(decoded["meta"])
    errors = dict(zip(meta["paths"], meta["errors"]))
    assert len(bad) >= 12
    for path, phrase in bad.items():
        assert errors[str(path)] is not None, f"{path} decoded although it is bad"
        assert str(path) in errors[str(path)] and phrase in errors[str(path)], errors[str(path)]
    for path in odd:
        assert errors[str(path)] is None, errors[str(path)]
    assert len(decoded["pixels"]) == len(odd) * 64 * 64 * 3
    rotated = [hw for p, hw in zip(meta["paths"], meta["hw"]) if p.endswith("exif_rotated.jpg")][0]
    assert rotated == [rgb.shape[1], rgb.shape[0]] or rgb.shape[0] == rgb.shape[1]


def test_model_loader_bundle(bundle_tiny):
    from pni_ray.bundle import model_id
    from pni_ray.orchestration.model_loader import load_scoring_model

    model = load_scoring_model(bundle_tiny)
    manifest = json.loads((bundle_tiny / "manifest.json").read_text())
    assert model.kind == "bundle" and model.image_size == (128, 128) and model.category == "washer"
    assert model.threshold == manifest["normalisation"]["threshold"] and model.model_id == model_id(bundle_tiny)
    rng = np.random.default_rng(0)
    prepared = [model.geometry.prepare(rng.integers(0, 256, (90, 140, 3), dtype=np.uint8)) for _ in range(2)]
    maps, scores = model.canvas_maps(prepared)
    assert maps.shape == (2, 128, 128) and scores.shape == (2,) and maps.dtype == np.float32
    from pni_ray.geometry import STRIDE, box_max  # image score: the map's 3x3-patch average at its maximum

    assert model.geometry.image_window == 3
    assert np.allclose(scores, [box_max(m, 3 * STRIDE) for m in maps], rtol=1e-5)
    assert (scores < maps.reshape(2, -1).max(1)).all()


def test_model_loader_export(bundle_tiny, tmp_path):
    runtime = pytest.importorskip("pni_ray.export.runtime")
    from pni_ray.cli import main
    from pni_ray.orchestration.model_loader import load_scoring_model

    if "export" not in main.commands:
        pytest.skip("pni_ray.export.runtime exists but no `pni-ray export` command to build an export directory")
    out = tmp_path / "exported"
    result = CliRunner().invoke(main, ["export", str(bundle_tiny), "--out", str(out), "--threads", "1"])
    if result.exit_code != 0:  # the exporter has its own tests; this one is about the adapter
        pytest.skip(f"`pni-ray export` could not export the tiny bundle: {result.output[-300:]}")
    model = load_scoring_model(out, threads=1)
    assert model.kind == "export" and model.image_size == (128, 128)
    assert model.model_id == runtime.load_exported(out).model_id
    rng = np.random.default_rng(0)
    prepared = [model.geometry.prepare(rng.integers(0, 256, (90, 140, 3), dtype=np.uint8)) for _ in range(2)]
    ref_maps, ref_scores = load_scoring_model(bundle_tiny).canvas_maps(prepared)
    maps, scores = model.canvas_maps(prepared)
    assert maps.shape == (2, 128, 128) and np.allclose(scores, ref_scores, rtol=1e-3, atol=1e-3)
    from pni_ray.orchestration.score_model import describe_model
    assert describe_model(out).trained_on == describe_model(bundle_tiny).trained_on == "colour"  # the grey hint's


def test_score_export_with_openvino_backbone(small_set, bundle_tiny, tmp_path, monkeypatch):
    """`pni-ray score EXPORT --backbone-runtime openvino`: the backbone runs in OpenVINO, every input gets its
    row, scores match the onnxruntime run's, OUT records the runtime and refuses another on resume; a bundle,
    a GPU run, a precision without OpenVINO or a missing OpenVINO are refused before anything runs (exit 3)."""
    pytest.importorskip("openvino")
    from pni_ray.export.openvino_backbone import OpenVINOBackbone
    from pni_ray.cli import main

    root, _ = small_set
    runner = CliRunner()
    exported = tmp_path / "exported"
    made = runner.invoke(main, ["export", str(bundle_tiny), "--out", str(exported), "--threads", "1"])
    assert made.exit_code == 0, made.output
    common = [str(root / "good"), "--engine", "local", "--threads", "1", "--no-progress"]
    ov = ["--backbone-runtime", "openvino", "--backbone-precision", "f32"]
    batches = []
    run = OpenVINOBackbone.run
    monkeypatch.setattr(OpenVINOBackbone, "run", lambda self, feeds: batches.append(len(feeds["images"])) or run(self, feeds))
    ort_run = runner.invoke(main, ["score", str(exported), *common, "--out", str(tmp_path / "ort")])
    assert ort_run.exit_code == 0 and batches == [], ort_run.output
    ov_run = runner.invoke(main, ["score", str(exported), *common, "--out", str(tmp_path / "ov"), *ov])
    assert ov_run.exit_code == 0, ov_run.output
    assert sum(batches) == 24  # every image's backbone ran in OpenVINO
    a, b = (read_table(tmp_path / d, columns=["path", "image_score"]).to_pandas().sort_values("path") for d in ("ort", "ov"))
    assert len(b) == 24 and list(a["path"]) == list(b["path"])
    np.testing.assert_allclose(b["image_score"], a["image_score"], rtol=1e-3, atol=1e-3)
    summary = json.loads((tmp_path / "ov" / "_summary.json").read_text())
    assert summary["run"]["backbone_runtime"] == "openvino-f32"
    assert json.loads((tmp_path / "ort" / "_summary.json").read_text())["run"]["backbone_runtime"] == "onnxruntime"
    mixed = runner.invoke(main, ["score", str(exported), *common, "--out", str(tmp_path / "ort"), *ov])
    assert mixed.exit_code == 3 and "backbone ran in onnxruntime" in mixed.output
    refused = {
        "b": ([str(bundle_tiny), *common, "--backbone-runtime", "openvino"], "export directories only"),
        "g": ([str(exported), *common, "--backbone-runtime", "openvino", "--gpus-per-worker", "1"], "on the CPU"),
        "p": ([str(exported), *common, "--backbone-precision", "bf16"], "applies to --backbone-runtime openvino"),
    }
    for out, (args, phrase) in refused.items():
        result = runner.invoke(main, ["score", *args, "--out", str(tmp_path / out)])
        assert result.exit_code == 3 and phrase in result.output, (out, result.output)
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    missing = runner.invoke(main, ["score", str(exported), *common, "--out", str(tmp_path / "c"), *ov])
    assert missing.exit_code == 3 and "pip install 'pni-ray[openvino]'" in missing.output
    assert not any((tmp_path / d).exists() for d in ("b", "g", "p", "c"))


def test_out_holds_one_model_refuses_another_export_of_the_same_bundle(small_set, bundle_tiny, tmp_path):
    """Two exports of one bundle are two models (here: coresets as constants or as inputs; FP32 and INT8
    alike): each has its own model_id, the bundle's id is their source, and an OUT of one refuses the
    other, the bundle itself, another map format, and a model directory as OUT."""
    from pni_ray.export.runtime import load_exported
    from pni_ray.bundle import model_id
    from pni_ray.cli import main

    root, _ = small_set
    runner = CliRunner()
    exports = {}
    for name, extra in (("constant", []), ("input", ["--coresets", "input"])):
        exports[name] = tmp_path / name
        made = runner.invoke(main, ["export", str(bundle_tiny), "--out", str(exports[name]), "--threads", "1", *extra])
        assert made.exit_code == 0, made.output
    copied = tmp_path / "copy-of-bundle"  # the same bundle from another path exports as the same model
    shutil.copytree(bundle_tiny, copied)
    again = runner.invoke(main, ["export", str(copied), "--out", str(tmp_path / "again"), "--threads", "1"])
    assert again.exit_code == 0, again.output
    loaded = {k: load_exported(v) for k, v in {**exports, "again": tmp_path / "again"}.items()}
    assert loaded["constant"].model_id != loaded["input"].model_id
    assert loaded["again"].model_id == loaded["constant"].model_id
    assert loaded["again"].manifest["source_bundle"]["path"] != loaded["constant"].manifest["source_bundle"]["path"]
    assert loaded["constant"].source_model_id == loaded["input"].source_model_id == model_id(bundle_tiny)
    common = [str(root / "good"), "--engine", "local", "--threads", "1", "--no-progress"]
    out = tmp_path / "out"
    first = runner.invoke(main, ["score", str(exports["constant"]), *common, "--out", str(out)])
    assert first.exit_code == 0, first.output
    dataset = json.loads((out / "_dataset.json").read_text())
    assert dataset["model_id"] == loaded["constant"].model_id and dataset["source_model_id"] == model_id(bundle_tiny)
    assert set(read_table(out, columns=["model_id"]).column("model_id").to_pylist()) == {loaded["constant"].model_id}
    rows = len(read_table(out, columns=["path"]))
    for model in (exports["input"], bundle_tiny):
        mixed = runner.invoke(main, ["score", str(model), *common, "--out", str(out)])
        assert mixed.exit_code == 3 and "holds scores of another model" in mixed.output, mixed.output
    other_format = runner.invoke(main, ["score", str(exports["constant"]), *common, "--out", str(out),
                                        "--map-format", "float16"])
    assert other_format.exit_code == 3 and "holds maps in format 'uint8'" in other_format.output
    assert len(read_table(out, columns=["path"])) == rows  # nothing added by the refused runs
    legacy = {k: v for k, v in dataset.items() if k != "source_model_id"}  # an OUT of an older pni-ray
    (out / "_dataset.json").write_text(json.dumps({**legacy, "model_id": model_id(bundle_tiny)}))
    old = runner.invoke(main, ["score", str(exports["constant"]), *common, "--out", str(out)])
    assert old.exit_code == 3 and "older pni-ray" in old.output, old.output
    for model_dir in (bundle_tiny, exports["input"]):
        before = sorted(p.name for p in model_dir.iterdir())
        into = runner.invoke(main, ["score", str(exports["constant"]), *common, "--out", str(model_dir)])
        assert into.exit_code == 3 and "is a model directory" in into.output, into.output
        assert sorted(p.name for p in model_dir.iterdir()) == before


def test_max_pixels_option_lifts_the_limit_past_the_training_config_and_pillow(bundle_tiny, tmp_path):
    """--max-pixels is the limit a run decodes and prepares with: above the model's geometry.max_pixels
    (50 MP) and above Pillow's own bomb warning (89.5 MP) alike; under the default both images are
    refused with a message that says how to raise it."""
    from PIL import Image

    from pni_ray.cli import main

    folder = tmp_path / "big"
    folder.mkdir()
    Image.new("L", (7200, 7200), 128).save(folder / "over_model_limit.png")  # 51.8 MP
    Image.new("L", (9500, 9500), 128).save(folder / "over_pillow_limit.png")  # 90.3 MP
    runner = CliRunner()
    common = [str(bundle_tiny), str(folder), "--engine", "local", "--threads", "1", "--no-progress", "--map-format", "none"]
    refused = runner.invoke(main, ["score", *common, "--out", str(tmp_path / "default")])
    assert refused.exit_code == 1, refused.output
    errors = read_table(tmp_path / "default", columns=["path", "error"]).to_pylist()
    assert len(errors) == 2 and all("exceeds the limit of 50000000" in r["error"] and "--max-pixels" in r["error"]
                                    for r in errors), errors
    pillow_limit = Image.MAX_IMAGE_PIXELS
    lifted = runner.invoke(main, ["score", *common, "--out", str(tmp_path / "lifted"), "--max-pixels", "100000000"])
    assert lifted.exit_code == 0, lifted.output
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # lifted for each open only, never left raised
    rows = read_table(tmp_path / "lifted", columns=["path", "error", "image_score"]).to_pylist()
    assert len(rows) == 2 and all(r["error"] is None and np.isfinite(r["image_score"]) for r in rows), rows


def test_ensemble_is_a_torch_model(tmp_path):
    from pni_ray.orchestration.model_loader import model_kind

    (tmp_path / "manifest.json").write_text(json.dumps({"format": "pni-ray-ensemble"}))
    assert model_kind(tmp_path) == "ensemble"
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "pni-ray-onnx"}))
    assert model_kind(tmp_path) == "export"
    with pytest.raises(ValueError, match="no manifest.json"):
        model_kind(tmp_path / "nothing")
    out = tmp_path / "bundles"  # a train-all OUT: OUT/<category>/<backbone>
    (out / "washer" / "efficientnet_lite0").mkdir(parents=True)
    (out / "washer" / "efficientnet_lite0" / "manifest.json").write_text("{}")
    for given in (out / "washer", out):
        with pytest.raises(ValueError, match=r"models inside it: .*washer/efficientnet_lite0"):
            model_kind(given)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory, synthetic_root):
    root = tmp_path_factory.mktemp("small")
    good = make_image_corpus(sources(synthetic_root), root / "good", 24)
    rgb = load_rgb(sources(synthetic_root)[0])
    (root / "bad").mkdir()
    Image.fromarray(rgb).save(root / "bad" / "ok_until_broken.png")
    data = (root / "bad" / "ok_until_broken.png").read_bytes()
    (root / "bad" / "truncated.png").write_bytes(data[: len(data) // 3])
    (root / "bad" / "empty.jpg").write_bytes(b"")
    wide = root / "wide"
    wide.mkdir()
    Image.fromarray(np.ascontiguousarray(rgb[16:112])).resize((160, 96)).save(wide / "wide.png")
    return root, good


def test_local_engine_resume_retry_and_identity(small_set, bundle_tiny, tmp_path):
    root, good = small_set
    out = tmp_path / "out"
    specs = [str(root / "good"), str(root / "bad"), str(root / "wide")]
    expected = expand_inputs(specs).paths
    opts = Options(chunk_size=4, threads=1)
    first = score(bundle_tiny, specs, out, opts, engine="local")
    assert first["rows"] == first["inputs"] == len(expected) == 28 and first["failed"] == 2
    assert first["run"]["chunks"] == 7 and len(part_files(out)) == 7
    check_exactly_once(out, expected)
    # a crash leaves a stale temp file and loses a committed part: the rerun fixes exactly that
    lost = part_files(out)[3]
    lost_rows = pq.read_table(lost).num_rows
    lost.unlink()
    (out / ".part-deadbeef.parquet.1234abcd.tmp").write_bytes(b"half a parquet file")
    second = score(bundle_tiny, specs, out, opts, engine="local")
    assert second["run"]["scheduled"] == lost_rows and second["run"]["stale_temp_files_removed"] == 1
    assert second["rows"] == 28 and second["duplicate_rows"] == 0 and second["missing"] == 0
    check_exactly_once(out, expected)
    # nothing to do: no new parts
    parts = part_files(out)
    third = score(bundle_tiny, specs, out, opts, engine="local")
    assert third["run"]["scheduled"] == 0 and part_files(out) == parts
    # error rows are final, unless retried: repair one bad file and retry
    fixed = root / "bad" / "truncated.png"
    original = fixed.read_bytes()
    try:
        fixed.write_bytes((root / "bad" / "ok_until_broken.png").read_bytes())
        retried = score(bundle_tiny, specs, out, opts, engine="local", retry=True)
    finally:
        fixed.write_bytes(original)
    assert retried["run"]["error_rows_retried"] == 2 and retried["failed"] == 1
    check_exactly_once(out, expected)
    # OUT holds one model's scores in one map format
    with pytest.raises(ScoreError, match="map"):
        score(bundle_tiny, specs, out, Options(map_format="float16", threads=1), engine="local")


def test_grey_images_on_a_colour_model_are_counted_and_named(synthetic_root, bundle_tiny, tmp_path, caplog):
    """A camera switched to mono, or a wrong folder: a colour model scores grey frames on another footing, every one
    perhaps above its threshold. The run says how many, with one example and what to check; colour inputs say nothing."""
    from PIL import Image

    from pni_ray.bundle_manifest import read_manifest, trained_on

    manifest = read_manifest(bundle_tiny)
    assert manifest["training"]["grey_memory_images"] == 0 and trained_on(manifest) == "colour"
    folder = tmp_path / "in"
    folder.mkdir()
    for i, src in enumerate(sources(synthetic_root)[:5]):
        image = Image.open(src).convert("RGB")
        (image.convert("L") if i < 3 else image).save(folder / f"{i}.png")  # three grey frames, two in colour
    opts = Options(chunk_size=2, threads=1)
    with caplog.at_level("WARNING"):
        summary = score(bundle_tiny, [str(folder)], tmp_path / "out", opts, engine="local")
    assert summary["run"]["grey_inputs_scored"] == 3 and summary["failed"] == 0
    said = summary["run"]["unlike_training"]
    assert said.startswith("3 of the 5 images scored this run are grey (three equal channels; e.g. ") and "0.png" in said
    assert "was trained on colour images only" in said and said in caplog.text
    from pni_ray.orchestration.score import unlike_training
    from pni_ray.orchestration.score_model import describe_model
    grey_model = dataclasses.replace(describe_model(bundle_tiny), trained_on="grey")
    assert unlike_training(grey_model, 5, 3, "/g.png", "/c.png").startswith(
        "2 of the 5 images scored this run are in colour (channels that differ; e.g. /c.png) but")
    colour = tmp_path / "colour"
    colour.mkdir()
    for name in ("3.png", "4.png"):
        (colour / name).write_bytes((folder / name).read_bytes())
    quiet = score(bundle_tiny, [str(colour)], tmp_path / "out2", opts, engine="local")
    assert quiet["run"]["grey_inputs_scored"] == 0 and quiet["run"]["unlike_training"] is None
    # what a manifest says: all grey, all colour, mixed or unrecorded (an older bundle); an export carries its bundle's
    facts = lambda grey, total: {"training": {"grey_memory_images": grey, "n_memory_images": total}}  # noqa: E731
    assert [trained_on(facts(4, 4)), trained_on(facts(0, 4)), trained_on(facts(1, 4)), trained_on({"training": {}})] == [
        "grey", "colour", None, None]
    assert trained_on({"trained_on": "grey"}) == "grey"


def test_running_out_of_memory_in_score_says_what_to_lower(small_set, bundle_tiny, tmp_path, monkeypatch):
    """The driver (or --engine local) out of memory: one line saying what to lower and that a rerun resumes, not
    "scoring run failed" with a traceback."""
    from pni_ray.cli import main
    from pni_ray.orchestration import score_cli

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried")

    monkeypatch.setattr(score_cli, "score", out_of_memory)
    root, _ = small_set
    result = CliRunner().invoke(main, ["score", str(bundle_tiny), str(root / "wide"), "--out", str(tmp_path / "o"),
                                       "--engine", "local"])
    assert result.exit_code == 3 and "out of memory ([enforce fail" in result.output, result.output
    assert "a smaller --batch-size (score: also fewer --workers)" in result.output and "rerun to resume" in result.output
    assert "Traceback" not in result.output


def test_another_categorys_images_all_above_the_threshold_are_remarked_on(synthetic_root, bundle_tiny, tmp_path, caplog):
    """A new user scored another category's folder: every image flagged, exit 0 and no word. A run whose scored images
    (ten or more) are all above the threshold now says what that usually means."""
    from pni_ray.orchestration.score import ALL_ANOMALOUS_MIN, all_anomalous
    from pni_ray.orchestration.score_model import describe_model

    opts = Options(chunk_size=8, threads=1)
    weave = sorted((synthetic_root / "weave" / "train" / "good").glob("*.png"))[:ALL_ANOMALOUS_MIN]
    with caplog.at_level("WARNING"):
        summary = score(bundle_tiny, [str(p) for p in weave], tmp_path / "other", opts, engine="local")
    said = summary["run"]["all_anomalous"]
    assert summary["anomalous"] == summary["scored"] == len(weave), summary
    assert said.startswith(f"all {len(weave)} images scored are above the threshold of ") and "(category washer)" in said
    assert said in caplog.text
    info = describe_model(bundle_tiny)
    few = {"scored": ALL_ANOMALOUS_MIN - 1, "anomalous": ALL_ANOMALOUS_MIN - 1}  # too few to say anything
    assert all_anomalous(info, few) == "" and all_anomalous(info, {"scored": 20, "anomalous": None}) == ""
    assert all_anomalous(info, {"scored": 20, "anomalous": 19}) == ""  # one good image among them: nothing to say


def test_a_bundle_records_torch_and_resumes_an_out_that_said_onnxruntime(small_set, bundle_tiny, tmp_path):
    """A bundle's backbone runs in torch, and OUT says so; OUTs of bundles written when every model recorded
    "onnxruntime" still resume (a bundle has one runtime, so only its model_id must match)."""
    root, _ = small_set
    out = tmp_path / "b"
    first = score(bundle_tiny, [str(root / "wide")], out, Options(threads=1), engine="local")
    dataset = out / "_dataset.json"
    assert first["run"]["backbone_runtime"] == "torch" and json.loads(dataset.read_text())["backbone_runtime"] == "torch"
    legacy = json.loads(dataset.read_text())
    legacy["backbone_runtime"] = "onnxruntime"
    dataset.write_text(json.dumps(legacy))
    again = score(bundle_tiny, [str(root / "wide")], out, Options(threads=1), engine="local")
    assert again["scored"] == 1 and again["run"]["already_done"] == 1


def test_a_run_that_committed_nothing_does_not_bind_out(small_set, bundle_tiny, tmp_path, monkeypatch):
    """A run that fails before its first part (a refused Ray join, a wrong --address) leaves OUT's identity
    file; the next run, with another map format, takes OUT instead of being told to use another --out.
    Once a part is committed the identity binds."""
    import pni_ray.orchestration.score as score_module

    root, _ = small_set
    out = tmp_path / "refused"

    def refused(rows, info, opts):
        raise ScoreError("cannot join the Ray cluster at 127.0.0.1:1")
        yield  # a generator, as the engines are

    monkeypatch.setitem(score_module.ENGINES, "local", refused)
    with pytest.raises(ScoreError, match="cannot join"):
        score(bundle_tiny, [str(root / "wide")], out, Options(threads=1), engine="local")
    assert json.loads((out / "_dataset.json").read_text())["map_format"] == "uint8" and not part_files(out)
    monkeypatch.undo()
    taken = score(bundle_tiny, [str(root / "wide")], out, Options(map_format="float16", threads=1), engine="local")
    assert taken["scored"] == 1 and json.loads((out / "_dataset.json").read_text())["map_format"] == "float16"
    with pytest.raises(ScoreError, match="holds maps in format 'float16'"):
        score(bundle_tiny, [str(root / "wide")], out, Options(threads=1), engine="local")


def test_float16_maps_at_original_resolution(small_set, bundle_tiny, tmp_path):
    from pni_ray.orchestration.model_loader import load_scoring_model

    root, _ = small_set
    out = tmp_path / "f16"
    summary = score(bundle_tiny, [str(root / "wide")], out, Options(map_format="float16", threads=1), engine="local")
    assert summary["scored"] == 1
    row = read_table(out).to_pylist()[0]
    assert (row["height"], row["width"], row["map_dtype"]) == (96, 160, "float16")
    ref, ref_score = model_map(load_scoring_model(bundle_tiny), row["path"])
    assert np.allclose(decode_row(row), ref, rtol=2e-3, atol=1e-3)
    assert row["image_score"] == pytest.approx(ref_score, rel=1e-4)


def test_worker_count_follows_the_cluster_and_is_cut_to_the_chunks_with_a_log_line(caplog):
    cpus = {"CPU": 8.0}
    assert worker_count(Options(), cpus, 100) == 8
    assert worker_count(Options(cpus_per_worker=2.0), cpus, 100) == 4
    assert worker_count(Options(gpus_per_worker=0.5), {"CPU": 8.0, "GPU": 2.0}, 100) == 4
    assert worker_count(Options(workers=3), cpus, 100) == 3
    with caplog.at_level("INFO", logger="pni_ray.orchestration.score"):
        assert worker_count(Options(workers=3), cpus, 100) == 3
        assert not caplog.records  # nothing cut, nothing said
        assert worker_count(Options(workers=3, chunk_size=64), cpus, 1) == 1
    assert "1 chunk(s) to score, of at most 64 images each (--chunk-size): 1 worker(s), not 3" in caplog.text
    assert worker_count(Options(), cpus, 0) == 1  # nothing left to score still starts one actor


def test_the_pool_is_sized_once_the_cluster_shows_the_nodes_it_needs(monkeypatch, caplog):
    """A RayJob's head has num-cpus 0: a run that started before the worker nodes joined saw no CPUs and sized its
    pool at one worker for the whole night. It waits for a CPU (a GPU, for GPU workers) before sizing the pool."""
    import pni_ray.orchestration.score as score_module
    from pni_ray.orchestration.score import cluster_resources_when_ready

    monkeypatch.setattr(score_module.time, "sleep", lambda seconds: None)
    seen = iter([{}, {}, {"CPU": 8.0}, {"CPU": 32.0}])
    calls = []

    def joining():
        calls.append(1)
        return next(seen)

    with caplog.at_level("INFO", logger="pni_ray.orchestration.score"):
        found = cluster_resources_when_ready(Options(), joining)
    assert found == {"CPU": 32.0} and len(calls) == 4 and worker_count(Options(), found, 100) == 32
    assert "the cluster shows no CPU yet" in caplog.text
    assert cluster_resources_when_ready(Options(workers=4), lambda: {}) == {}  # --workers: no wait
    assert cluster_resources_when_ready(Options(), lambda: {"CPU": 2.0}) == {"CPU": 2.0}
    caplog.clear()
    with caplog.at_level("WARNING", logger="pni_ray.orchestration.score"):
        assert cluster_resources_when_ready(Options(gpus_per_worker=1.0), lambda: {"CPU": 8.0}, wait=0.0) == {"CPU": 8.0}
    assert "no GPU joined the cluster in 0 s: one model worker for the whole run; give --workers N" in caplog.text


def test_cli_cluster_it_cannot_join_is_one_line_saying_what_to_change(small_set, bundle_tiny, tmp_path, monkeypatch):
    """A refused join (no token, wrong address) scored nothing: exit 3 with join_ray's message, no traceback
    and no "rerun to resume"."""
    from pni_ray.cli import main
    from pni_ray.orchestration import ray_session

    def refuse(address, **kwargs):
        raise ray_session.RayJoinError(f"cannot join the Ray cluster at {address} (from --address): set RAY_AUTH_MODE=token")

    monkeypatch.setattr(ray_session, "join_ray", refuse)
    root, _ = small_set
    result = CliRunner().invoke(main, ["score", str(bundle_tiny), str(root / "wide"), "--out", str(tmp_path / "s"),
                                       "--address", "127.0.0.1:6999", "--no-progress"])
    assert result.exit_code == 3, result.output
    assert "cannot join the Ray cluster at 127.0.0.1:6999 (from --address): set RAY_AUTH_MODE=token" in result.output
    assert "Traceback" not in result.output and "rerun" not in result.output


def test_cli_exit_status(small_set, bundle_tiny, tmp_path):
    from pni_ray.cli import main

    root, _ = small_set
    assert {"score", "report"} <= set(main.commands)
    runner = CliRunner()
    ok = runner.invoke(main, ["score", str(bundle_tiny), str(root / "wide"), "--out", str(tmp_path / "a"),
                              "--engine", "local", "--threads", "1", "--no-progress"])
    assert ok.exit_code == 0, ok.output
    assert "1 inputs: 1 scored, 0 failed" in ok.output
    assert "highest image scores (1 of 1 scored; the table has every row):" in ok.output
    bad = runner.invoke(main, ["score", str(bundle_tiny), str(root / "bad"), "--out", str(tmp_path / "b"),
                               "--engine", "local", "--threads", "1", "--no-progress"])
    assert bad.exit_code == 1 and "2 failed" in bad.output
    summary = json.loads((tmp_path / "b" / "_summary.json").read_text())
    assert {f["path"] for f in summary["failures"]} == {str(root / "bad" / "truncated.png"),
                                                         str(root / "bad" / "empty.jpg")}
    notamodel = runner.invoke(main, ["score", str(root), str(root / "wide"), "--out", str(tmp_path / "c")])
    assert notamodel.exit_code == 3 and "manifest.json" in notamodel.output
    # a rerun keeps the error rows: it says how to score them again once fixed
    again = runner.invoke(main, ["score", str(bundle_tiny), str(root / "bad"), "--out", str(tmp_path / "b"),
                                 "--engine", "local", "--threads", "1", "--no-progress"])
    assert again.exit_code == 1 and "2 of these error rows are an earlier run's" in again.output
    assert "rerun with --retry-failed" in again.output
    # an empty INPUT (an unset shell variable) would name the working directory: refused, nothing written
    blank = runner.invoke(main, ["score", str(bundle_tiny), "", "--out", str(tmp_path / "d"), "--engine", "local"])
    assert blank.exit_code == 3 and "an input is empty (an unset variable?)" in blank.output, blank.output
    assert not (tmp_path / "d").exists()
    # a mistyped folder leaves its error row in OUT; the run with the right name says so, and what to do
    local = ["--engine", "local", "--threads", "1", "--no-progress"]
    typo = runner.invoke(main, ["score", str(bundle_tiny), str(root / "wdie"), "--out", str(tmp_path / "e"), *local])
    assert typo.exit_code == 1 and "file not found" in typo.output
    right = runner.invoke(main, ["score", str(bundle_tiny), str(root / "wide"), "--out", str(tmp_path / "e"), *local])
    assert right.exit_code == 0, right.output
    assert "also holds 1 row of inputs this run did not name (earlier runs'), 1 of them error rows" in right.output
    assert "score into a new OUT" in right.output


# ------------------------------------------------------------------------------------------
# Ray: one module-scoped local Ray session for the tests below
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    from pni_ray.orchestration.score import ensure_ray

    started = ensure_ray(num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, synthetic_root):
    """CORPUS_IMAGES good images, a dozen kinds of bad file, odd modes, non-square images, duplicates."""
    root = tmp_path_factory.mktemp("corpus")
    good = make_image_corpus(sources(synthetic_root), root / "good", CORPUS_IMAGES)
    rgb = load_rgb(sources(synthetic_root)[0])
    bad = write_bad_inputs(root / "bad", rgb)
    odd = write_odd_modes(root / "odd", rgb)
    Image.fromarray(np.ascontiguousarray(rgb[16:112])).resize((160, 96)).save(root / "odd" / "wide.png")
    Image.fromarray(rgb).resize((200, 300)).save(root / "odd" / "tall.jpg", quality=92)
    odd += [root / "odd" / "wide.png", root / "odd" / "tall.jpg"]
    lst = root / "inputs.txt"
    lst.write_text("# the bad files, relative to this list\n" + "".join(f"bad/{p.name}\n" for p in bad)
                   + "good/00/img_00000.png\nodd\n")
    specs = [str(root / "good"), str(root / "odd"), str(lst), str(root / "good" / "00" / "img_0000[0-4].png")]
    return {"root": root, "good": good, "bad": bad, "odd": odd, "specs": specs}


@pytest.fixture(scope="module")
def scored_corpus(ray_session, corpus, bundle_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("scored") / "out"
    import logging

    import ray.util.debug

    notices: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = notices.append  # type: ignore[method-assign]
    logging.getLogger("ray.data._internal.progress").addHandler(handler)
    ray.util.debug._logged.discard("ray_data_progress_manager_disabled")  # Ray says it once a process
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = score(bundle_tiny, corpus["specs"], out, Options(workers=2, batch_size=8), engine="ray")
    finally:
        logging.getLogger("ray.data._internal.progress").removeHandler(handler)
    summary["_wall"] = time.perf_counter() - t0
    summary["_warnings"] = [str(w.message) for w in caught] + [r.getMessage() for r in notices]
    return out, summary


def test_ray_scoring_prints_no_notice_the_user_cannot_act_on(scored_corpus):
    """The retry bounds go through Ray Data's remote arguments (deprecated, pinned below 2.64 in pyproject), and
    Ray Data's own progress bars are off (score has --progress): neither is said on every run."""
    said = scored_corpus[1]["_warnings"]
    assert not [w for w in said if "ray_remote_args" in w or "Progress bars disabled" in w], said


def test_unplaceable_asks_one_node_not_the_cluster_sum():
    nodes = [{"CPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert unplaceable("worker", 8.0, 1.0, nodes) is None
    assert unplaceable("worker", 1.0, 0.25, nodes) is None
    assert "one worker of 1 CPU and 2 GPU" in unplaceable("worker", 1.0, 2.0, nodes)
    assert "nodes: 1 CPU / 0 GPU, 1 CPU / 0 GPU)" in unplaceable("task", 2.0, 0.0, [{"CPU": 1.0}, {"CPU": 1.0}])


@pytest.mark.ray
def test_workers_no_node_can_hold_are_refused_on_this_machines_ray(ray_session, bundle_tiny, corpus, tmp_path):
    """A GPU worker on a CPU-only local Ray (or more CPUs than it has) waited for ever, printing Ray's
    "No available node types" every 35 s: refused at once, before any chunk, OUT holding no part."""
    gpus = ray_session.cluster_resources().get("GPU", 0)  # a GPU host's embedded Ray holds a GPU worker
    for opts in (Options(gpus_per_worker=gpus + 1.0), Options(cpus_per_worker=1024.0)):
        with pytest.raises(ScoreError, match="no Ray node can hold one scoring worker.*cannot grow"):
            score(bundle_tiny, [str(corpus["good"][0])], tmp_path / "out", opts, engine="ray")
        assert not list((tmp_path / "out").glob("part-*"))


@pytest.mark.ray
def test_ray_many_images_and_bad_files_one_row_each(scored_corpus, corpus):
    out, summary = scored_corpus
    n_inputs = len(corpus["good"]) + len(corpus["bad"]) + len(corpus["odd"])
    assert len(corpus["bad"]) >= 12
    assert summary["inputs"] == summary["rows"] == n_inputs, summary
    assert summary["duplicates_ignored"] == 1 + len(corpus["odd"]) + 5
    assert summary["failed"] == len(corpus["bad"]) and summary["scored"] == n_inputs - len(corpus["bad"])
    assert summary["missing"] == 0 and summary["duplicate_rows"] == 0
    check_exactly_once(out, expand_inputs(corpus["specs"]).paths)
    rows = {r["path"]: r for r in read_table(out, columns=["path", "error", "image_score", "anomaly_map"]).to_pylist()}
    for path, phrase in corpus["bad"].items():
        r = rows[str(path)]
        assert r["error"] and str(path) in r["error"] and phrase in r["error"], r["error"]
        assert r["image_score"] is None and r["anomaly_map"] is None
    for path in corpus["odd"]:
        assert rows[str(path)]["error"] is None and rows[str(path)]["image_score"] is not None
    assert 0 < summary["anomalous"] < summary["scored"]
    assert summary["top"][0]["image_score"] >= summary["top"][-1]["image_score"]
    on_disk = json.loads((out / "_summary.json").read_text())
    assert on_disk["rows"] == n_inputs and on_disk["run"]["engine"] == "ray"
    print(f"\n{len(corpus['good'])}-image Ray run: {summary['_wall']:.1f} s wall, "
          f"{summary['run']['images_per_s']} images/s, first chunk after {summary['run']['first_chunk_seconds']} s")


@pytest.mark.ray
def test_parquet_readable_by_pandas_pyarrow_duckdb(scored_corpus, corpus, bundle_tiny):
    import duckdb
    import pandas as pd
    import pyarrow.dataset as pads

    from pni_ray.orchestration.model_loader import load_scoring_model

    out, summary = scored_corpus
    n = summary["rows"]
    df = pd.read_parquet(out)
    table = pads.dataset(out, format="parquet").to_table()
    con = duckdb.connect()
    glob = str(out / "*.parquet")
    assert len(df) == table.num_rows == con.execute(f"SELECT count(*) FROM read_parquet('{glob}')").fetchone()[0] == n
    assert con.execute(f"SELECT count(error) FROM read_parquet('{glob}')").fetchone()[0] == summary["failed"]
    assert list(df.columns)[:4] == ["path", "category", "image_score", "is_anomalous"]
    meta = pq.read_schema(part_files(out)[0]).metadata
    assert b"pni_ray.decode.uint8" in meta and float(meta[b"pni_ray.threshold"]) == summary["threshold"]

    model = load_scoring_model(bundle_tiny)
    top = summary["top"][0]["path"]
    for path in (top, str(corpus["root"] / "odd" / "wide.png"), str(corpus["root"] / "odd" / "tall.jpg")):
        ref, ref_score = model_map(model, path)
        r = df[df.path == path].iloc[0]
        span = float(r.map_max - r.map_min)
        # pandas turns int columns with nulls (the error rows) into floats: int() them
        from_pandas = r.map_min + np.frombuffer(r.anomaly_map, np.uint8).reshape(int(r.height), int(r.width)) / 255 * span
        a = table.filter(pads.field("path") == path).to_pylist()[0]
        from_arrow = decode_row(a)
        blob, h, w, lo, hi = con.execute(
            f"SELECT anomaly_map, height, width, map_min, map_max FROM read_parquet('{glob}') WHERE path = ?",
            [path]).fetchone()
        from_duckdb = decode_map(bytes(blob), "uint8", h, w, lo, hi)
        assert ref.shape == (int(r.height), int(r.width)) == from_arrow.shape == from_duckdb.shape
        tol = span / 510 + 1e-3 * max(1.0, abs(float(r.map_max)))
        for got in (from_pandas, from_arrow, from_duckdb):
            assert np.abs(got - ref).max() <= tol
        assert r.image_score == pytest.approx(ref_score, rel=1e-4)
        assert bool(r.is_anomalous) == (ref_score > model.threshold)


@pytest.mark.ray
def test_sigkill_mid_run_then_rerun_gives_each_input_once(ray_session, corpus, bundle_tiny, tmp_path):
    """`pni-ray score` as its own process (a driver on this module's Ray cluster, as under `ray job
    submit`), SIGKILLed once parts are committed, then rerun: every input exactly once."""
    out = tmp_path / "killed"
    specs = [str(corpus["root"] / "good" / "00")]  # 250 images, 32 chunks of 8
    inputs = expand_inputs(specs).paths
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    cmd = [*PNI_RAY, "-q", "score", str(bundle_tiny), *specs, "--out", str(out),
           "--chunk-size", "8", "--workers", "1", "--batch-size", "8", "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and len(part_files(out)) < 2:
            time.sleep(0.05)
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        assert len(part_files(out)) >= 2, "no part file appeared in time"
    finally:
        proc.send_signal(signal.SIGKILL)  # no cleanup of any kind; Ray reaps the dead driver's actors
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    t_kill = time.perf_counter() - t0
    committed = committed_paths(out)
    assert 0 < len(committed) < len(inputs), "the kill did not land mid-run"
    summary = score(bundle_tiny, specs, out, Options(chunk_size=8, workers=1, stages="split"), engine="ray")
    print(f"\nkilled after {t_kill:.1f} s with {len(committed)}/{len(inputs)} rows committed; "
          f"rerun {summary['run']['seconds']:.1f} s (first chunk after {summary['run']['first_chunk_seconds']} s)")
    assert summary["run"]["already_done"] == len(committed)
    assert summary["run"]["scheduled"] == len(inputs) - len(committed)
    assert summary["rows"] == summary["inputs"] == len(inputs) and summary["duplicate_rows"] == 0
    check_exactly_once(out, inputs)


def test_a_run_without_a_bar_logs_how_far_it_is_and_skipped_files_are_counted(small_set, bundle_tiny, tmp_path,
                                                                              monkeypatch, caplog):
    """In a job's log (no bar) a 100k-image run used to say nothing between its first line and its summary; files
    that are not images were left out of a folder without a word."""
    import logging

    import pni_ray.orchestration.score as score_module

    root, _ = small_set
    folder = shutil.copytree(root / "good", tmp_path / "good")  # the module's set stays as the other tests want it
    (folder / "notes.txt").write_text("camera settings")
    monkeypatch.setattr(score_module, "PROGRESS_LOG_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="pni_ray"):
        summary = score(bundle_tiny, [str(folder)], tmp_path / "out", Options(chunk_size=4, threads=1),
                        engine="local", progress=False)
    n = summary["inputs"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scored ")]
    assert lines and lines[0].startswith(f"scored 4 of {n} (0 failed)") and "images/s, about" in lines[0]
    assert len(lines) == n // 4 - 1 + (n % 4 > 0)  # after every chunk but the last (the summary says that one)
    assert f"{folder}: 1 file(s) below it not scored, their extensions not an image's (e.g. notes.txt)" in caplog.text
