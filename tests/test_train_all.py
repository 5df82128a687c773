"""`train-all` on a local Ray: same bundles as sequential training, fault isolation, resume.

One Ray session for the whole module (ray.init costs seconds and hundreds of MB).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import time
from pathlib import Path

import click
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from pni_ray.bundle import MEMORY, model_id, save_bundle
from pni_ray.orchestration.train_all import _failure_record, task_options, train_all
from pni_ray.orchestration.train_all_cli import train_all_cmd
from pni_ray.orchestration.train_plan import (
    FAILED,
    SKIPPED,
    TRAINED,
    Pair,
    _refiners_compared,
    canonical,
    config_diff,
    plan_pairs,
    recorded_config,
)
from pni_ray.orchestration.train_task import PairError
from pni_ray.fit import fit_category

from conftest import tiny_config

pytestmark = pytest.mark.ray

CATEGORIES = ("weave", "granite", "washer")
BACKBONE = "efficientnet_lite0"


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=128 * 2**20,
             configure_logging=False, _system_config={"worker_niceness": 0})  # as train-all's own local Ray
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def sequential_ids(synthetic_root, tmp_path_factory):
    """model_id of `fit_category` (what `pni-ray train` runs) + `save_bundle` in this process, 1 thread."""
    out = tmp_path_factory.mktemp("sequential")
    return {category: model_id(save_bundle(fit_category(synthetic_root, category, tiny_config(), threads=1,
                                                        progress=False), out / category))
            for category in CATEGORIES}


@pytest.fixture(scope="module")
def first_run(ray_session, synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_all")
    lines: list[str] = []
    result = train_all(synthetic_root, out, tiny_config(), categories=list(CATEGORIES), backbones=[BACKBONE],
                       cpus_per_task=1, echo=lines.append, poll_seconds=0.2)
    return result, out, lines


def test_train_all_matches_sequential_training(first_run, sequential_ids):
    import pyarrow.parquet as pq

    result, out, lines = first_run
    assert result.ok and result.counts == {TRAINED: 3, SKIPPED: 0, FAILED: 0}, result.rows
    for category in CATEGORIES:
        assert model_id(out / category / BACKBONE) == sequential_ids[category], category
    summary = json.loads((out / "summary.json").read_text())
    assert [r["category"] for r in summary["rows"]] == list(CATEGORIES)
    table = pq.read_table(out / "summary.parquet").to_pylist()
    assert [r["status"] for r in table] == [TRAINED] * 3
    for row in table:
        assert row["model_id"] == sequential_ids[row["category"]]
        assert row["seconds"] > 0 and row["cpu_seconds"] > 0 and row["threads"] == 1 and row["device"] == "cpu"
        assert row["peak_rss_mb"] > 100 and row["peak_rss_source"] in ("VmHWM", "ru_maxrss")
        for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):  # synthetic data has a test split
            assert 0.0 <= row[key] <= 1.0
        assert row["n_test_images"] >= 6
        manifest = json.loads((out / row["category"] / BACKBONE / "manifest.json").read_text())
        assert row["mode"] == manifest["config"]["scoring"]["mode"] == "pni"  # the mode its metrics are of
        assert row["position_check"] == "unchecked"  # 16 train images leave fewer held out than the check needs
    assert any("3/3 finished: done 3  failed 0  running 0" in line for line in lines), lines
    assert any("running 1" in line or "running 2" in line for line in lines), lines  # live progress saw tasks run
    assert not (out / ".progress").exists()


def _corrupt(path):
    path.write_bytes(b"this is not a png")


def test_broken_category_fails_alone_with_file_named(ray_session, synthetic_root, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    shutil.copytree(synthetic_root / "weave", root / "weave")
    (root / "weave" / "train" / "good" / "camera.log").write_text("exposure 4 ms\n")  # a file training does not read
    for path in sorted((root / "weave" / "train" / "good").glob("*.png"))[:3]:  # a mono camera's frames among them
        Image.open(path).convert("L").save(path)
    shutil.copytree(synthetic_root / "pillbox", root / "pillbox")
    bad = sorted((root / "pillbox" / "train" / "good").iterdir())[3]
    _corrupt(bad)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config().to_dict()))
    out = tmp_path / "out"
    cli = CliRunner().invoke(train_all_cmd, [
        str(root), "--out", str(out), "--backbones", BACKBONE, "--config", str(config), "--no-eval",
    ])
    assert cli.exit_code == 1, cli.output
    assert f"pillbox/train/good/{bad.name}" in cli.output  # the message names the file
    rows = {r["category"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows["pillbox"]["status"] == FAILED and rows["pillbox"]["stage"] == "load"
    assert "LayoutError" in rows["pillbox"]["error"] and f"train/good/{bad.name}" in rows["pillbox"]["error"]
    assert rows["weave"]["status"] == TRAINED  # the other category finished
    assert (out / "weave" / BACKBONE / "manifest.json").is_file()
    # what its worker warned of reaches the console and the summary (Ray keeps the worker's own log on its node)
    said = [w for w in rows["weave"]["warnings"] if "1 file(s) not read" in w and "camera.log" in w]
    assert len(said) == 1 and f"warn  weave/{BACKBONE}: {said[0]}" in cli.output, (rows["weave"], cli.output)
    assert any("memory-bank images are grey (three equal channels" in w for w in rows["weave"]["warnings"]), rows
    table = pq.read_table(out / "summary.parquet").to_pylist()
    assert any(said[0] in (r["warnings"] or "") for r in table if r["category"] == "weave")
    assert not (out / "pillbox" / BACKBONE).exists()  # no half-written bundle


def test_resume_skips_verified_and_retrains_tampered(ray_session, first_run, sequential_ids, synthetic_root, tmp_path):
    _, first_out, _ = first_run
    out = tmp_path / "out"
    shutil.copytree(first_out, out)
    tampered = out / "granite" / BACKBONE / MEMORY
    data = bytearray(tampered.read_bytes())
    data[-10] ^= 0xFF
    tampered.write_bytes(bytes(data))
    stale = out / "granite" / f".{BACKBONE}.partial-deadbeef"  # what a killed save would leave
    stale.mkdir()
    untouched = {c: (out / c / BACKBONE / MEMORY).stat().st_mtime_ns for c in ("weave", "washer")}

    lines: list[str] = []
    result = train_all(synthetic_root, out, tiny_config(), categories=list(CATEGORIES), backbones=[BACKBONE],
                       cpus_per_task=1, echo=lines.append, poll_seconds=0.2)
    rows = {r["category"]: r for r in result.rows}
    assert result.ok and result.counts == {TRAINED: 1, SKIPPED: 2, FAILED: 0}
    assert rows["granite"]["status"] == TRAINED and "checksum mismatch" in rows["granite"]["reason"]
    assert model_id(out / "granite" / BACKBONE) == sequential_ids["granite"]
    assert not stale.exists()
    for category in ("weave", "washer"):
        assert rows[category]["status"] == SKIPPED
        assert (out / category / BACKBONE / MEMORY).stat().st_mtime_ns == untouched[category]
        assert rows[category]["image_auroc"] is not None  # metrics of the same model carried from the last summary
        assert rows[category]["mode"] == "pni" and rows[category]["position_check"] == "unchecked"  # read from the bundle
    assert any("skip  weave" in line for line in lines)


def test_resume_after_a_killed_driver_keeps_each_pairs_metrics(first_run, synthetic_root, tmp_path):
    """A driver killed before it wrote summary.json lost the metrics of every pair its tasks had
    trained and evaluated: the rerun skipped those verified bundles with no metrics. Each task now
    leaves its evaluation beside its bundle (.<backbone>.metrics.json, with the model_id it is of)."""
    _, first_out, _ = first_run
    out = tmp_path / "out"
    shutil.copytree(first_out, out)
    (out / "summary.json").unlink()  # killed before the summary was written
    (out / "summary.parquet").unlink()
    progress = out / ".progress"  # and before it removed its finished tasks' progress markers
    progress.mkdir()
    for category in CATEGORIES:
        (progress / f"{category}__{BACKBONE}.json").write_text("{}")
    result = train_all(synthetic_root, out, tiny_config(), categories=list(CATEGORIES), backbones=[BACKBONE],
                       cpus_per_task=1, echo=lambda line: None)  # every pair verified: no Ray needed
    first = {r["category"]: r for r in first_run[0].rows}
    for row in result.rows:
        assert row["status"] == SKIPPED
        for key in ("image_auroc", "pixel_auroc", "aupro", "n_test_images"):
            assert row[key] == first[row["category"]][key], (row["category"], key)
    assert not progress.exists()
    # metrics of another model are not taken: a stale file beside a bundle is ignored, and the bundle,
    # with no metrics of its own on record, is evaluated (not retrained)
    stale = out / "weave" / f".{BACKBONE}.metrics.json"
    stale.write_text(stale.read_text().replace(first["weave"]["model_id"], "0" * 64))
    (out / "summary.json").unlink()
    lines: list[str] = []
    result = train_all(synthetic_root, out, tiny_config(), categories=["weave"], backbones=[BACKBONE],
                       cpus_per_task=1, echo=lines.append, poll_seconds=0.2)
    row = result.rows[0]
    assert row["status"] == SKIPPED and row["model_id"] == first["weave"]["model_id"] and "evaluation only" in row["reason"]
    assert row["image_auroc"] == first["weave"]["image_auroc"] and row["aupro"] == first["weave"]["aupro"]
    assert any(line.startswith("evaluated  weave/") for line in lines), lines
    assert json.loads(stale.read_text())["model_id"] == first["weave"]["model_id"]


def test_a_bundle_saved_but_never_evaluated_is_evaluated_on_the_rerun(first_run, synthetic_root, tmp_path):
    """A pair whose bundle was saved but not evaluated (its evaluation failed on a test image, its run was
    killed while evaluating, or the run had --no-eval) was skipped on every rerun with no metrics and exit
    0. A rerun that evaluates now evaluates that bundle without retraining it; a --no-eval rerun, or a
    category without a test split, only skips it."""
    _, first_out, _ = first_run
    out = tmp_path / "out"
    shutil.copytree(first_out, out)
    for name in ("summary.json", "summary.parquet", f"washer/.{BACKBONE}.metrics.json"):
        (out / name).unlink()  # killed after the save, before the evaluation was written anywhere
    bundle_files = {p: p.stat().st_mtime_ns for p in (out / "washer" / BACKBONE).iterdir()}
    quiet: list[str] = []
    no_eval = train_all(synthetic_root, out, tiny_config(), categories=["washer"], backbones=[BACKBONE],
                        cpus_per_task=1, evaluate=False, echo=quiet.append)
    assert no_eval.rows[0]["status"] == SKIPPED and no_eval.rows[0].get("image_auroc") is None
    assert "evaluation only" not in no_eval.rows[0]["reason"] and not any("task(s) on Ray" in line for line in quiet), quiet
    lines: list[str] = []
    fixed = train_all(synthetic_root, out, tiny_config(), categories=["washer"], backbones=[BACKBONE],
                      cpus_per_task=1, echo=lines.append, poll_seconds=0.2)
    first = {r["category"]: r for r in first_run[0].rows}
    assert fixed.ok and fixed.rows[0]["status"] == SKIPPED and "evaluation only" in fixed.rows[0]["reason"]
    assert fixed.rows[0]["image_auroc"] == first["washer"]["image_auroc"]
    assert any(line.startswith("evaluated  washer/") for line in lines), lines
    assert {p: p.stat().st_mtime_ns for p in (out / "washer" / BACKBONE).iterdir()} == bundle_files  # not retrained
    data = tmp_path / "data"  # the same category without its test split: nothing to evaluate, a plain skip
    shutil.copytree(synthetic_root / "washer" / "train", data / "washer" / "train")
    for name in ("summary.json", f"washer/.{BACKBONE}.metrics.json"):
        (out / name).unlink()
    bare = train_all(data, out, tiny_config(), categories=["washer"], backbones=[BACKBONE], cpus_per_task=1,
                     echo=lambda line: None)
    assert bare.rows[0]["status"] == SKIPPED and bare.rows[0].get("image_auroc") is None
    assert "evaluation only" not in bare.rows[0]["reason"]


def test_each_pair_on_a_reused_worker_hears_its_files_warnings(tmp_path):
    """A Ray worker runs pairs one after another (two backbones of one category): a file's warning, said once per
    process, reached only the first pair's record."""
    from pni_ray.data.images import warn_once
    from pni_ray.orchestration.train_task import collected_warnings

    for _ in range(2):
        with collected_warnings() as said:
            warn_once("not images", tmp_path, "%s: 1 file(s) not read")
            warn_once("not images", tmp_path, "%s: 1 file(s) not read")  # read again in the same pair: once
        assert said == [f"{tmp_path}: 1 file(s) not read"]


def test_a_pair_whose_evaluation_fails_says_its_bundle_is_usable(first_run, synthetic_root, tmp_path):
    """A test split with a missing mask fails the pair at its evaluation, after the save: the error says the bundle
    was saved and that a rerun evaluates it without retraining (it read as if the model were lost)."""
    from pni_ray.orchestration.train_task import train_pair

    _, first_out, _ = first_run
    data = tmp_path / "data"
    shutil.copytree(synthetic_root / "washer", data / "washer")
    next((data / "washer" / "ground_truth").glob("*/*_mask.png")).unlink()
    with pytest.raises(PairError) as err:
        train_pair(str(data), "washer", tiny_config().to_dict(), str(first_out / "washer" / BACKBONE), threads=1,
                   train=False)
    record = err.value.record
    assert record["stage"] == "evaluate" and "LayoutError" in record["error"], record
    assert "(the bundle was saved and scores as usual: a rerun evaluates it, without retraining" in record["error"]


@pytest.mark.parametrize("split", ["absent", "defects only"])
def test_a_pair_left_unevaluated_says_why(first_run, synthetic_root, tmp_path, split):
    """The table's dashes for a category without a test split of both labels came with no word of why."""
    from pni_ray.orchestration.train_task import train_pair

    _, first_out, _ = first_run
    data = tmp_path / "data"
    shutil.copytree(synthetic_root / "washer", data / "washer")
    if split == "absent":
        shutil.rmtree(data / "washer" / "test")
    else:
        shutil.rmtree(data / "washer" / "test" / "good")
    record = train_pair(str(data), "washer", tiny_config().to_dict(), str(first_out / "washer" / BACKBONE), threads=1,
                        train=False)
    assert record.get("image_auroc") is None
    said = {"absent": "not evaluated: no test images", "defects only": "not evaluated: the test split holds defect "
            "images only"}[split]
    assert any(said in w for w in record["warnings"]), record["warnings"]


def test_a_category_or_backbone_named_twice_is_one_pair(first_run, synthetic_root, tmp_path):
    """--categories washer,washer used to train the pair twice at once into one folder."""
    _, first_out, _ = first_run
    out = tmp_path / "out"
    shutil.copytree(first_out, out)
    lines: list[str] = []
    result = train_all(synthetic_root, out, tiny_config(), categories=["washer", "washer"],
                       backbones=[BACKBONE, BACKBONE], cpus_per_task=1, echo=lines.append)
    assert [(r["category"], r["status"]) for r in result.rows] == [("washer", SKIPPED)]  # verified: no Ray needed
    with pytest.raises(click.UsageError, match=r"(?s)--categories wsher: .*Did you mean washer\?"):
        train_all(synthetic_root, out, tiny_config(), categories=["washer", "wsher"], backbones=[BACKBONE],
                  cpus_per_task=1, echo=lines.append)


def test_plan_force_and_changed_config(first_run):
    _, out, _ = first_run
    pairs = [Pair(c, BACKBONE) for c in CATEGORIES]
    assert [p.action for p in plan_pairs(out, pairs, tiny_config())] == ["skip"] * 3
    assert [p.action for p in plan_pairs(out, pairs, tiny_config(), force=True)] == ["train"] * 3
    changed = tiny_config(seed=7)
    plan = plan_pairs(out, pairs, changed)
    assert [p.action for p in plan] == ["fail"] * 3  # a valid bundle of another config is not overwritten silently
    assert "seed: 0 -> 7" in plan[0].reason and "--force" in plan[0].reason
    assert plan_pairs(out, [Pair("pillbox", BACKBONE)], tiny_config())[0].action == "train"
    # the torch thread count changes the floats: bundles of another count are kept (evaluating one needs no
    # retraining), and the reason says so and what matches it
    ran = json.loads((out / CATEGORIES[0] / BACKBONE / "manifest.json").read_text())["training"]["torch_threads"]
    plan = plan_pairs(out, pairs, tiny_config(), threads=ran)
    assert [p.action for p in plan] == ["skip"] * 3 and plan[0].reason == "verified bundle with this config"
    plan = plan_pairs(out, pairs, tiny_config(), threads=ran + 1)
    assert [p.action for p in plan] == ["skip"] * 3
    assert f"trained on {ran} torch threads, this run asks {ran + 1}" in plan[0].reason and f"--threads {ran} matches" in plan[0].reason
    # the MLP's precision: "auto" accepts what the bundle trained in; an explicit one must be it
    trained = json.loads((out / CATEGORIES[0] / BACKBONE / "manifest.json").read_text())["training"]["mlp"]["precision"]
    other = {"float32": "bfloat16", "bfloat16": "float32"}[trained]

    def with_precision(precision: str):
        cfg = tiny_config()
        return cfg.replace(neighbourhood=dataclasses.replace(cfg.neighbourhood, train_precision=precision))

    assert [p.action for p in plan_pairs(out, pairs, with_precision(trained))] == ["skip"] * 3
    plan = plan_pairs(out, pairs, with_precision(other))
    assert [p.action for p in plan] == ["fail"] * 3
    assert f"neighbourhood.train_precision: '{trained}' -> '{other}'" in plan[0].reason


def test_a_config_field_added_since_a_bundle_was_written_is_no_difference():
    """Bundles written before neighbourhood.train_precision existed trained in float32: skip, not fail,
    whether float32 is asked for or today's "auto" (which accepts either precision); bfloat16 differs."""
    from pni_ray.config import TrainConfig
    from pni_ray.orchestration.train_plan import canonical, config_diff, recorded_config, trained_precision

    cfg = TrainConfig()
    assert cfg.neighbourhood.train_precision == "auto"
    fp32 = cfg.replace(neighbourhood=dataclasses.replace(cfg.neighbourhood, train_precision="float32"))
    old = fp32.to_dict()
    del old["neighbourhood"]["train_precision"]
    recorded = canonical(recorded_config({"config": old}))
    assert config_diff(recorded, canonical(fp32.to_dict())) == []
    assert recorded["neighbourhood"]["train_precision"] == "float32"
    for wanted in ("auto", "float32"):
        assert trained_precision({"config": old}, recorded, wanted) == wanted
    assert trained_precision({"config": old}, recorded, "bfloat16") == "float32"  # -> a difference
    new = {"config": cfg.to_dict(), "training": {"mlp": {"precision": "bfloat16"}}}  # "auto" that ran in bf16
    assert [trained_precision(new, cfg.to_dict(), w) for w in ("auto", "float32", "bfloat16")] == [
        "auto", "bfloat16", "bfloat16"]
    patchcore = cfg.replace(mode="patchcore").to_dict()  # no MLP: its precision never differs
    assert trained_precision({"config": patchcore}, patchcore, "float32") == "float32"
    for broken in ({"training": None}, {"training": {"mlp": None}}, {"training": []}):  # as configured
        assert trained_precision(broken, recorded, "bfloat16") == "float32"
    assert recorded_config({"config": {"from_the_future": 1}}) == {"from_the_future": 1}  # compared as stored
    del old["neighbourhood"]["images_per_epoch"]  # older still: every image each epoch, not today's 256
    assert config_diff(canonical(recorded_config({"config": old})), canonical(fp32.to_dict())) == [
        "neighbourhood.images_per_epoch: None -> 256"]


def test_a_bundle_from_before_pool_padding_differs_from_todays_defaults():
    """Its bank holds border patches averaged over the cells inside the grid: train-all must not skip it as
    up to date under today's zeros (it names the setting), and must skip it where "inside" is asked for."""
    from pni_ray.config import TrainConfig
    from pni_ray.orchestration.train_plan import canonical, config_diff, recorded_config

    cfg = TrainConfig()
    old = cfg.to_dict()
    del old["features"]["pool_padding"]
    recorded = canonical(recorded_config({"config": old}))
    assert config_diff(recorded, canonical(cfg.to_dict())) == ["features.pool_padding: 'inside' -> 'zeros'"]
    inside = cfg.replace(features=dataclasses.replace(cfg.features, pool_padding="inside"))
    assert config_diff(recorded, canonical(inside.to_dict())) == []


def test_refiner_settings_differ_only_where_a_refiner_was_trained(first_run):
    """Bundles trained before the refiner's defaults changed (source "holdout", 240 samples) are skipped
    when no refiner is wanted or was trained; a refined one, or one a refiner is now asked of, differs."""
    _, out, _ = first_run
    pairs = [Pair(c, BACKBONE) for c in CATEGORIES]
    cfg = tiny_config()
    older = cfg.replace(refiner=dataclasses.replace(cfg.refiner, source="holdout", n_samples=240))
    assert [p.action for p in plan_pairs(out, pairs, older)] == ["skip"] * 3
    refined = cfg.replace(refiner=dataclasses.replace(cfg.refiner, enabled=True))
    plan = plan_pairs(out, pairs, refined)
    assert [p.action for p in plan] == ["fail"] * 3
    assert "(refiner.enabled: False -> True)" in plan[0].reason  # the one difference that matters, alone
    bundle = out / CATEGORIES[0] / BACKBONE  # as if trained with a refiner at the older settings
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["config"]["refiner"].update(enabled=True, source="holdout", n_samples=240)
    recorded, wanted = _refiners_compared(canonical(recorded_config(manifest)), canonical(refined.to_dict()))
    assert config_diff(recorded, wanted) == [
        f"refiner.n_samples: 240 -> {refined.refiner.n_samples}", "refiner.source: 'holdout' -> 'all'"]


def test_a_folder_that_is_not_a_bundle_fails_its_pair_at_planning_and_is_kept(first_run, tmp_path):
    """An interrupted copy (manifest cut short) or a user's folder at OUT/<category>/<backbone>: the pair
    fails before any training, with what the folder holds, and nothing is deleted (also with --force)."""
    _, first_out, _ = first_run
    out = tmp_path / "out"
    shutil.copytree(first_out, out)
    manifest = out / "granite" / BACKBONE / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    user = out / "washer" / BACKBONE
    shutil.rmtree(user)
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    pairs = [Pair(c, BACKBONE) for c in CATEGORIES]
    for force in (False, True):
        plan = {p.pair.category: p for p in plan_pairs(out, pairs, tiny_config(), force=force)}
        assert plan["granite"].action == "fail" and "unreadable manifest.json" in plan["granite"].reason
        assert plan["washer"].action == "fail" and "holds 1 file and no bundle manifest" in plan["washer"].reason
        assert plan["weave"].action == ("train" if force else "skip")
    assert (user / "notes.txt").read_text() == "mine" and manifest.is_file()


def test_system_failures_retried_application_errors_not(ray_session, tmp_path):
    ray = ray_session

    def crash_once(marker: str) -> str:
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # the worker dies: a system failure
        return "recovered"

    def app_error(counter: str) -> None:
        with open(counter, "a") as fh:
            fh.write("x")
        raise PairError({"status": FAILED, "error": "ValueError: bad data"})

    crash = ray.remote(**task_options(1, 0, max_retries=1))(crash_once)
    assert ray.get(crash.remote(str(tmp_path / "crashed"))) == "recovered"

    failing = ray.remote(**task_options(1, 0, max_retries=3))(app_error)
    with pytest.raises(ray.exceptions.RayTaskError) as info:
        ray.get(failing.remote(str(tmp_path / "count")))
    assert (tmp_path / "count").read_text() == "x"  # ran once: application errors are not retried
    record = _failure_record(Pair("c", "b"), info.value, system=False, max_retries=3)
    assert record == {"status": FAILED, "error": "ValueError: bad data"}

    always = ray.remote(**task_options(1, 0, max_retries=0))(lambda: os._exit(1))
    with pytest.raises(ray.exceptions.RayError) as info:
        ray.get(always.remote())
    record = _failure_record(Pair("c", "b"), info.value, system=True, max_retries=0)
    assert record["status"] == FAILED and record["error"].startswith("system failure after 0 retries")


def test_gpu_tasks_build_the_extractor_on_their_device():
    import torch

    import pni_ray.training as training
    from pni_ray.orchestration.train_task import DeviceExtractor, assigned_device, extractor_on

    original = training.build_extractor
    assert assigned_device(0) == torch.device("cpu")
    with extractor_on(torch.device("cpu")):
        assert training.build_extractor is original  # CPU: nothing is wrapped
    with extractor_on(torch.device("meta")):
        wrapped = training.build_extractor(tiny_config().features)
        assert isinstance(wrapped, DeviceExtractor) and next(wrapped.inner.parameters()).device.type == "meta"
        assert wrapped.dim == wrapped.inner.dim
    assert training.build_extractor is original
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
            assigned_device(1)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_train_pair_on_gpu(synthetic_root, tmp_path):
    from pni_ray.bundle import verify_bundle
    from pni_ray.orchestration.train_task import train_pair

    record = train_pair(str(synthetic_root), "washer", tiny_config().to_dict(), str(tmp_path / "washer"), 1, gpus=1)
    assert record["status"] == TRAINED and record["device"] == "cuda:0"
    verify_bundle(tmp_path / "washer")
    assert record["image_auroc"] > 0.8


def test_train_and_train_all_write_identical_bundles_at_their_defaults(first_run, synthetic_root, tmp_path):
    """`pni-ray train` in a fresh process (torch would use every core) vs the train-all task (1 CPU)."""
    import subprocess
    import sys

    import torch

    _, out, _ = first_run
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config().to_dict()))
    env = {k: v for k, v in os.environ.items()
           if k not in ("PNI_RAY_THREADS", "PNI_RAY_TEST_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    single = tmp_path / "washer"
    cmd = [sys.executable, "-c", "from pni_ray.cli import main; main()", "train", str(synthetic_root), "-c", "washer",
           "--backbone", BACKBONE, "--config", str(config), "--out", str(single)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    task_bundle = out / "washer" / BACKBONE
    names = sorted(p.name for p in task_bundle.iterdir())
    assert names == sorted(p.name for p in single.iterdir())
    for name in names:
        assert (single / name).read_bytes() == (task_bundle / name).read_bytes(), name
    facts = json.loads((single / "manifest.json").read_text())["training"]
    assert facts["torch_threads"] == 1 and facts["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_task_refuses_an_output_directory_that_is_not_the_drivers(synthetic_root, tmp_path):
    """Each task re-checks the probe (nodes that joined after the pre-flight check)."""
    from pni_ray.orchestration.shared_storage import Probe, probe_problem
    from pni_ray.orchestration.train_task import train_pair

    out = tmp_path / "out"
    out.mkdir()
    probe = Probe.write(out, synthetic_root)
    assert probe_problem(probe) is None
    elsewhere = Probe(str(tmp_path / "local-disk" / Path(probe.path).name), probe.token, probe.data_root)
    assert "cannot read its probe file" in probe_problem(elsewhere)
    assert "different directory" in probe_problem(Probe(probe.path, "0" * 32, probe.data_root))
    assert "does not exist here" in probe_problem(Probe(probe.path, probe.token, str(tmp_path / "no-data")))
    with pytest.raises(PairError) as info:
        train_pair(str(synthetic_root), "washer", tiny_config().to_dict(), str(tmp_path / "local-disk" / "washer"), 1,
                   probe=elsewhere)
    record = info.value.record
    assert record["stage"] == "storage" and "shared by every node" in record["error"]
    assert not (tmp_path / "local-disk" / "washer").exists()  # nothing trained or written
    probe.remove()
    assert not Path(probe.path).exists()


def test_a_node_whose_data_root_is_another_copy_is_named(synthetic_root, tmp_path):
    """A node with an empty or stale folder at DATA_ROOT's path passed the probe (the folder existed) and
    trained on what it held: the probe now compares each trained category's train/good listing."""
    import shutil

    from pni_ray.orchestration.shared_storage import Probe, probe_problem

    data = tmp_path / "data"
    shutil.copytree(synthetic_root / "washer", data / "washer")
    probe = Probe.write(tmp_path, data, ("washer",))
    assert probe_problem(probe) is None
    first = sorted((data / "washer" / "train" / "good").iterdir())[0]
    first.unlink()  # this "node"'s copy lacks an image
    assert "its washer/train/good holds" in probe_problem(probe) and "is not the driver's here" in probe_problem(probe)
    shutil.rmtree(data / "washer")
    data.joinpath("washer").mkdir()  # an empty look-alike
    assert "holds missing where the driver's holds" in probe_problem(probe)


def test_a_bundle_saved_meanwhile_is_kept_or_refused_never_overwritten(bundle_tiny, tmp_path):
    """Two train-all runs on one OUT: the second save used to overwrite the first silently. Without
    `replace` (the plan found no bundle), one saved meanwhile with this config is kept (an earlier attempt
    of this task, or an identical run), and one of another config is refused and left as it was."""
    import dataclasses
    import shutil

    from pni_ray.bundle import load_bundle, model_id
    from pni_ray.orchestration.train_task import save_fit

    trained, _ = load_bundle(bundle_tiny)
    there = tmp_path / "washer"
    shutil.copytree(bundle_tiny, there)
    before = model_id(there)
    save_fit(trained, there, replace=False)  # the same config: kept as it is
    other = dataclasses.replace(trained.config, seed=trained.config.seed + 1)
    trained.config = other
    with pytest.raises(FileExistsError, match="another bundle was saved there while this pair trained"):
        save_fit(trained, there, replace=False)
    assert model_id(there) == before
    save_fit(trained, there, replace=True)  # --force, or a bundle the plan found broken
    assert model_id(there) != before


def test_a_category_whose_name_holds_commas_is_named_whole(tmp_path):
    """--categories splits on commas, so a folder named "lot 7, line 2" could not be chosen; named whole, it is
    that folder, and other values still split (a typo among them is refused later, by name)."""
    from pni_ray.orchestration.train_all_cli import _split

    (tmp_path / "lot 7, line 2" / "train").mkdir(parents=True)
    assert _split("lot 7, line 2", "--categories", tmp_path) == ["lot 7, line 2"]
    assert _split("./lot 7, line 2/", "--categories", tmp_path) == ["lot 7, line 2"]
    assert _split("bottle,transistor", "--categories", tmp_path) == ["bottle", "transistor"]
    assert _split("lot 7, line 2", "--backbones") == ["lot 7", "line 2"]


def test_empty_category_list_is_refused_not_read_as_all(synthetic_root, tmp_path):
    from pni_ray.cli import main

    for value in (",", ""):
        result = CliRunner().invoke(main, ["train-all", str(synthetic_root), "--out", str(tmp_path / "o"),
                                           "--categories", value])
        assert result.exit_code == 2 and "names nothing" in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_a_killed_drivers_probe_file_is_removed_by_the_next_run(tmp_path):
    """train-all's shared-storage probe in OUT: a dead driver's (this host, pid gone) goes when the next
    probe is written; a live process's and another host's stay."""
    import socket
    import subprocess
    import sys

    from pni_ray.orchestration.shared_storage import PROBE_PREFIX, Probe

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live, elsewhere = (tmp_path / f"{PROBE_PREFIX}{n}.json" for n in ("dead", "live", "elsewhere"))
    dead.write_text(json.dumps({"token": "t", "host": socket.gethostname(), "pid": int(finished.stdout)}))
    live.write_text(json.dumps({"token": "t", "host": socket.gethostname(), "pid": os.getpid()}))
    elsewhere.write_text(json.dumps({"token": "t", "host": "another-node", "pid": int(finished.stdout)}))
    probe = Probe.write(tmp_path, tmp_path)
    assert not dead.exists() and live.exists() and elsewhere.exists() and Path(probe.path).exists()


@pytest.mark.parametrize("trouble", ["sigterm", "cluster", "storage", "full"])
def test_train_all_that_cannot_run_exits_with_its_own_status(monkeypatch, synthetic_root, tmp_path, trouble,
                                                             sigterm_guard):
    """Exit 1 means a pair failed. Stopped (SIGTERM raised as KeyboardInterrupt) or a cluster it cannot
    join: 3; OUT not shared by every node: 2, without click's usage text (the command line was right)."""
    import signal

    from pni_ray.cli import main
    from pni_ray.orchestration import train_all_cli
    from pni_ray.orchestration.ray_session import RayJoinError
    from pni_ray.orchestration.shared_storage import SharedStorageError

    def cannot_run(*args, **kwargs):
        if trouble == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's stop
            time.sleep(5)
        if trouble == "full":  # OUT's disk filled up by the time the summary is written
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "summary.parquet"))
        raise (RayJoinError if trouble == "cluster" else SharedStorageError)(f"{trouble}: what to change")

    monkeypatch.setattr(train_all_cli, "train_all", cannot_run)
    result = CliRunner().invoke(main, ["train-all", str(synthetic_root), "--out", str(tmp_path / "out")])
    said = {"sigterm": "interrupted (SIGTERM): the bundles saved so far are kept", "cluster": "cluster: what to change",
            "storage": "storage: what to change",
            "full": f"{tmp_path / 'out' / 'summary.parquet'}: No space left on device (OSError); the bundles"}[trouble]
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard
    assert result.exit_code == (2 if trouble == "storage" else 3), result.output
    assert said in result.output and "Usage:" not in result.output and "Traceback" not in result.output
