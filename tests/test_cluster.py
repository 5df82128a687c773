"""train-all and the nightly job on a real two-node Ray cluster, through `ray job submit`.

One cluster (head + worker, 1 CPU each, started with `ray start`, see ray_cluster.py) for the
module; tests that kill the worker node start a new one for the next test. Skipped, with the
reason, where the cluster cannot start.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_config
from ray_cluster import ClusterUnavailable, LocalCluster, can_hide_directories

pytestmark = [pytest.mark.ray, pytest.mark.cluster]

BACKBONE = "efficientnet_lite0"
DAY = "2024-05-01"


@pytest.fixture(scope="module")
def cluster():
    if not (Path(sys.executable).parent / "ray").exists():
        pytest.skip("the `ray` command is not installed beside this Python (pip install 'ray[default]')")
    c = LocalCluster(hide=can_hide_directories())
    try:
        c.start()
    except (ClusterUnavailable, OSError, subprocess.TimeoutExpired) as exc:
        c.stop()
        pytest.skip(f"cannot start a local two-node Ray cluster: {exc}")
    yield c
    c.stop()


@pytest.fixture
def live_cluster(cluster):
    """The cluster with both nodes alive (a previous test may have killed the worker)."""
    if "worker" not in cluster.procs or cluster.procs["worker"].poll() is not None:
        cluster.procs.pop("worker", None)
        cluster.start_worker()
    return cluster


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.json"
    path.write_text(json.dumps(tiny_config().to_dict()))
    return path


def train_all_entry(data: Path, out: Path, categories: str, config: Path, *extra: str) -> list[str]:
    return ["pni-ray", "train-all", str(data), "--out", str(out), "--categories", categories, "--backbones", BACKBONE,
            "--config", str(config), "--no-eval", *extra]


def summary_rows(out: Path) -> dict[str, dict]:
    return {r["category"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}


def test_train_all_job_uses_both_nodes(live_cluster, synthetic_root, tiny_json, bundle_tiny, tmp_path):
    from pni_ray.bundle import MEMORY, MLP, verify_bundle

    out = tmp_path / "bundles"
    job = live_cluster.submit(train_all_entry(synthetic_root, out, "weave,washer", tiny_json), "train-both-nodes")
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ray"]["joined"] == "RAY_ADDRESS"  # what `ray job submit` gives its entrypoint
    nodes = set(live_cluster.node_ids.values())
    assert set(summary["ray"]["nodes"]) == nodes
    rows = summary_rows(out)
    assert {r["status"] for r in rows.values()} == {"trained"}
    assert {r["node_id"] for r in rows.values()} == nodes  # one task on each 1-CPU node
    for category in rows:
        verify_bundle(out / category / BACKBONE)
    for name in (MEMORY, MLP):  # trained on whichever node: the same floats as training here
        assert (out / "washer" / BACKBONE / name).read_bytes() == (bundle_tiny / name).read_bytes(), name


def test_train_all_refuses_output_a_node_cannot_see(live_cluster, synthetic_root, tiny_json):
    if live_cluster.hidden is None:
        pytest.skip("cannot give the worker node a private mount namespace here (needs root and unshare)")
    out = live_cluster.hidden / "bundles"  # the driver's disk; the worker node sees an empty tmpfs there
    job = live_cluster.submit(train_all_entry(synthetic_root, out, "weave,washer", tiny_json), "train-not-shared")
    text = job.stdout + job.stderr
    assert job.returncode != 0, text[-3000:]
    assert "storage shared by every node" in text and str(out) in text, text[-3000:]
    assert live_cluster.node_ids["worker"][:8] in text  # names the node that cannot see it
    assert not (out / "weave").exists() and not (out / "washer").exists()  # nothing trained
    assert not list(out.glob(".pni-ray-shared-storage-*"))  # the probe is cleaned up


def test_embedded_ray_never_joins_a_cluster_left_running(live_cluster):
    """No --address, no RAY_ADDRESS: a bare ray.init() would join what `ray start` recorded and refuse num_cpus."""
    assert (live_cluster.temp_dir / "ray_current_cluster").is_file()
    env = {**live_cluster.env, "RAY_TMPDIR": str(live_cluster.root)}  # where that record is looked up
    code = (
        "import ray\n"
        "try:\n    ray.init(num_cpus=1)\nexcept ValueError as exc:\n    print('bare init refused:', exc)\n"
        "else:\n    raise SystemExit('a bare ray.init() started its own Ray: this test proves nothing')\n"
        "from pni_ray.orchestration.ray_session import join_ray\n"
        "session = join_ray(num_cpus=1)\n"
        "print('joined', session.source, len(ray.nodes()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "bare init refused" in done.stdout and "joined embedded 1" in done.stdout, done.stdout


def _nightly_config(tmp_path: Path, model: Path, images: Path, chunk_size: int) -> tuple[Path, Path]:
    root = tmp_path / "results"
    config = tmp_path / "nightly.toml"
    config.write_text(f'model = "{model}"\ninputs = ["{images}"]\noutput_root = "{root}"\ndate = "{DAY}"\n'
                      f"chunk_size = {chunk_size}\nworkers = 2\nmap_format = \"uint8\"\n")
    return config, root / f"dt={DAY}"


def _copies(src_dir: Path, dst: Path, n: int) -> list[str]:
    """n distinct input files (copies of the category's test images)."""
    sources = sorted(p for p in src_dir.rglob("*.png"))
    dst.mkdir(parents=True)
    paths = []
    for i in range(n):
        target = dst / f"img{i:03d}.png"
        shutil.copyfile(sources[i % len(sources)], target)
        paths.append(str(target))
    return paths


def _rows(partition: Path) -> list[str]:
    import pyarrow.dataset as ds

    return ds.dataset(str(partition), format="parquet").to_table(columns=["path"]).column("path").to_pylist()


def test_nightly_job_scores_every_input_once(live_cluster, bundle_tiny, synthetic_root, tmp_path):
    inputs = _copies(synthetic_root / "washer" / "test", tmp_path / "images", 12)
    config, partition = _nightly_config(tmp_path, bundle_tiny, tmp_path / "images", chunk_size=3)
    job = live_cluster.submit(["pni-ray", "nightly", "--config", str(config)], "nightly-both-nodes")
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert sorted(_rows(partition)) == sorted(inputs)
    record = json.loads((partition / "_nightly.json").read_text())
    assert record["exit_code"] == 0 and record["counts"]["scored"] == len(inputs)
    assert (partition / "_report.html").stat().st_size > 1000


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_lost_worker_node_train_all_reports_the_pair_and_a_rerun_completes_it(
    live_cluster, synthetic_root, tiny_json, tmp_path,
):
    from pni_ray.bundle import verify_bundle

    out = tmp_path / "bundles"
    # 150 MLP epochs, no early stopping: each task trains for seconds, so the node dies while its task runs
    slow = tiny_config()
    slow = slow.replace(neighbourhood=dataclasses.replace(slow.neighbourhood, patience=1000))
    slow_json = tmp_path / "slow.json"
    slow_json.write_text(json.dumps(slow.to_dict()))
    entry = train_all_entry(synthetic_root, out, "weave,washer", slow_json, "--max-retries", "0", "--epochs", "150")
    job = live_cluster.submit_async(entry, "train-lost-node")
    worker = live_cluster.node_ids["worker"]

    def pair_on_worker() -> str | None:
        for marker in (out / ".progress").glob("*.json"):
            try:
                if json.loads(marker.read_text()).get("node_id") == worker:
                    return marker.stem.split("__")[0]
            except (OSError, ValueError):
                pass
        return None

    lost = _wait_for(pair_on_worker, 180, "a training task to start on the worker node")
    live_cluster.kill_worker()
    output, _ = job.communicate(timeout=300)
    assert job.returncode != 0, output[-3000:]  # train-all exits 1: a pair failed
    rows = summary_rows(out)
    assert rows[lost]["status"] == "failed" and "system failure" in rows[lost]["error"], rows[lost]
    assert all(r["status"] == "trained" for c, r in rows.items() if c != lost), rows
    assert not (out / lost / BACKBONE).exists()

    live_cluster.start_worker()
    rerun = live_cluster.submit(entry, "train-lost-node-rerun")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    rows = summary_rows(out)
    assert rows[lost]["status"] == "trained"
    assert all(r["status"] == "skipped" for c, r in rows.items() if c != lost), rows
    for category in rows:
        verify_bundle(out / category / BACKBONE)
        assert not list((out / category).glob(f".{BACKBONE}.*"))  # no temp directories left


def test_lost_worker_node_scoring_ends_with_every_input_once(live_cluster, bundle_tiny, synthetic_root, tmp_path):
    inputs = _copies(synthetic_root / "washer" / "test", tmp_path / "images", 40)
    config, partition = _nightly_config(tmp_path, bundle_tiny, tmp_path / "images", chunk_size=1)
    entry = ["pni-ray", "nightly", "--config", str(config)]
    job = live_cluster.submit_async(entry, "nightly-lost-node")
    _wait_for(lambda: list(partition.glob("part-*.parquet")), 240, "the first committed part file")
    assert job.poll() is None, "the job finished before the node could be killed"
    live_cluster.kill_worker()
    output, _ = job.communicate(timeout=300)
    print(f"scoring after the lost node: {'recovered inside Ray' if job.returncode == 0 else 'failed; rerun resumes'}")
    if job.returncode != 0:  # Ray could not recover the pipeline: a rerun resumes where it stopped
        rerun = live_cluster.submit(entry, "nightly-lost-node-rerun")
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    paths = _rows(partition)
    assert len(paths) == len(set(paths)) == len(inputs)  # nothing duplicated
    assert sorted(paths) == sorted(inputs)  # nothing lost
    record = json.loads((partition / "_nightly.json").read_text())
    assert record["exit_code"] == 0 and record["counts"]["missing"] == 0 and record["counts"]["duplicate_rows"] == 0
