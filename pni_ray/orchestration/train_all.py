"""`train-all` driver: every (category, backbone) pair as one Ray task, fault-isolated and resumable.

The driver plans (train_plan), joins Ray (ray_session: --address, else $RAY_ADDRESS, else an
embedded local Ray), checks on a cluster that every node sees OUT and DATA_ROOT
(shared_storage), submits one task per pair (train_task.train_pair), prints progress and writes
the summary. Only small records travel back; bundles are written by the tasks.

- Resources: ``num_cpus=--cpus-per-task`` and ``num_gpus=--gpus-per-task``; inside the task torch
  runs ``--threads`` (default: --cpus-per-task) intra-op threads, so two 1-CPU tasks on two cores
  do not fight, and a pair gives the same bundle as `pni-ray train --threads` with that count.
- Fault isolation: a pair that raises fails alone and is not retried; a dead worker (OOM kill,
  segfault) or a lost node is a system failure and is retried ``--max-retries`` times, then
  reported as failed; the command exits non-zero when any pair failed, and a rerun with the
  same OUT trains exactly the pairs without a verified bundle, and evaluates (a task that does not
  train) a verified bundle with no metrics of it on record (saved, then its evaluation failed or the
  run was killed, or trained by a --no-eval run).
- Summary: one row per pair (category, backbone, status, node id and host, seconds, peak memory,
  metrics when the category has a test split), written atomically to ``OUT/summary.json`` and
  ``OUT/summary.parquet``.
- The embedded local Ray runs its workers at the caller's priority (Ray's default nice 15 lets
  any other process on a shared machine starve the training tasks); a cluster keeps its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import click

from pni_ray.config import TrainConfig
from pni_ray.options import absolute_weights, training_threads
from pni_ray.orchestration.ray_session import RaySession, join_ray, live_node_resources, unplaceable
from pni_ray.orchestration.shared_storage import Probe, check_all_nodes
from pni_ray.orchestration.train_plan import FAILED, NEW, SKIPPED, TRAINED, Pair, PlanItem, pair_config, plan_pairs
from pni_ray.orchestration.train_task import (METRIC_KEYS, PairError, marker_path, metric_fields, mode_fields,
                                              recorded_metrics, train_pair)

log = logging.getLogger(__name__)

SUMMARY_JSON = "summary.json"
SUMMARY_PARQUET = "summary.parquet"
PROGRESS_DIR = ".progress"
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # only small result records go through it


@dataclass
class TrainAllResult:
    rows: list[dict[str, Any]]
    wall_seconds: float
    out: Path
    summary_json: Path | None = None
    summary_parquet: Path | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == FAILED]

    @property
    def ok(self) -> bool:
        return not self.failed


def task_options(cpus_per_task: int, gpus_per_task: float, max_retries: int) -> dict[str, Any]:
    """Ray options of a training task: resources, system-failure retries, no application retries."""
    return {
        "num_cpus": cpus_per_task,
        "num_gpus": gpus_per_task,
        "max_retries": max_retries,
        "retry_exceptions": False,
    }


def _check_capacity(cpus_per_task: int, gpus_per_task: float, local: bool) -> None:
    """Refuse tasks no node can hold on this machine's Ray; warn on a cluster (an autoscaler may add one)."""
    problem = unplaceable("training task", cpus_per_task, gpus_per_task, live_node_resources())
    if problem:
        message = f"cannot schedule any task: {problem} (--cpus-per-task, --gpus-per-task)"
        if local:
            raise click.UsageError(message)
        log.warning("%s: waiting for the cluster to scale up (a fixed cluster never will: stop the run and lower "
                    "them)", message)


def _echo(message: str) -> None:
    click.echo(message, err=True)


class Progress:
    """Prints done / running / queued / failed whenever they change (and every `heartbeat` s)."""

    def __init__(self, total: int, skipped: int, progress_dir: Path, echo: Callable[[str], None], heartbeat: float = 30.0):
        self.total, self.skipped, self.dir, self.echo, self.heartbeat = total, skipped, progress_dir, echo, heartbeat
        self.t0 = time.perf_counter()
        self.done = self.failed = 0
        self.last: tuple | None = None
        self.last_time = 0.0

    def running(self, pending: list[Pair]) -> list[Pair]:
        return [p for p in pending if marker_path(str(self.dir), p.key).exists()]  # type: ignore[union-attr]

    def update(self, pending: list[Pair]) -> None:
        running = self.running(pending)
        state = (self.done, self.failed, tuple(p.key for p in running))
        now = time.perf_counter()
        if state == self.last and now - self.last_time < self.heartbeat:
            return
        self.last, self.last_time = state, now
        names = ", ".join(p.key for p in running[:4]) + (" ..." if len(running) > 4 else "")
        self.echo(
            f"[{now - self.t0:6.1f} s] {self.done + self.failed}/{self.total} finished: done {self.done}  "
            f"failed {self.failed}  running {len(running)}  queued {len(pending) - len(running)}"
            + (f"  (skipped {self.skipped})" if self.skipped else "")
            + (f"  | running: {names}" if running else "")
        )


def _failure_record(pair: Pair, error: BaseException, system: bool, max_retries: int) -> dict[str, Any]:
    import ray

    if isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, PairError):
        return dict(error.cause.record)
    if isinstance(error, PairError):
        return dict(error.record)
    cause = getattr(error, "cause", None) or error
    retries = "unlimited retries" if max_retries < 0 else f"{max_retries} retries"
    kind = f"system failure after {retries}: " if system else ""
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    text = lines[0] + (f" ... {lines[-1].strip()}" if len(lines) > 1 else "") if lines else ""  # last line: the root cause
    return {"category": pair.category, "backbone": pair.backbone, "status": FAILED, "stage": "ray",
            "error": f"{kind}{type(cause).__name__}: {text}"}


@dataclass(frozen=True)
class TaskSpec:
    """What every task of one run gets besides its pair."""

    data_root: Path
    out: Path
    cfg: TrainConfig
    cpus: int
    gpus: float
    threads: int
    evaluate: bool
    max_retries: int


def train_all(
    data_root: Path | str,
    out: Path | str,
    cfg: TrainConfig = TrainConfig(),
    categories: list[str] | None = None,
    backbones: list[str] | None = None,
    address: str | None = None,
    cpus_per_task: int = 1,
    gpus_per_task: float = 0.0,
    threads: int | None = None,
    force: bool = False,
    evaluate: bool = True,
    max_retries: int = 2,
    num_cpus: int | None = None,
    echo: Callable[[str], None] = _echo,
    poll_seconds: float = 0.5,
) -> TrainAllResult:
    """Train every (category, backbone) pair as Ray tasks; write bundles and the summary to `out`."""
    from pni_ray.data.mvtec import list_categories, missing_category_message
    from pni_ray.models.backbones import get_spec

    t_start = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    data_root, out = Path(data_root).resolve(), Path(out).resolve()
    # each named once (a repeat would train the same pair twice at once into one folder)
    categories = list(dict.fromkeys(categories)) if categories else list_categories(data_root)
    if not categories:
        raise click.UsageError(f"{data_root}: no category folders (expected <category>/train/good/)")
    for category in categories:  # a misspelt name is a usage error now, not a failed task after Ray started
        message = missing_category_message(data_root, category)
        if message is not None:
            raise click.UsageError(f"--categories {category}: there is {message}".replace("Did you mean -c ", "Did you mean "))
    backbones = list(dict.fromkeys(backbones)) if backbones else [cfg.features.backbone]
    for name in backbones:
        try:
            get_spec(name)  # an unknown backbone is a usage error, before anything starts
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
    if cpus_per_task < 1:
        raise click.UsageError("--cpus-per-task must be at least 1")
    cfg = absolute_weights(cfg)  # as `train` records it: the same bundle, loadable from any node's directory
    threads = training_threads(threads or cpus_per_task)
    pairs = [Pair(c, b) for c in categories for b in backbones]
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_pairs(out, pairs, cfg, force, threads)
    previous = _previous_rows(out)
    rows: dict[Pair, dict[str, Any]] = {}
    for item in plan:
        if item.action == "skip":
            row = {"category": item.pair.category, "backbone": item.pair.backbone, "status": SKIPPED,
                   "model_id": item.model_id, "reason": item.reason, **mode_fields(item.pair.bundle(out))}
            prev = previous.get(item.pair.key)
            if prev and prev.get("model_id") == item.model_id:  # metrics of this very model, from the last run
                row.update(metric_fields(prev))
            else:  # the last run's driver died before its summary: its task left them beside the bundle
                row.update(recorded_metrics(item.pair.bundle(out), item.model_id))
            if evaluate and "image_auroc" not in row and _has_test_split(data_root, item.pair.category):
                # saved, then its evaluation failed or its run was killed: evaluate it, do not retrain it
                item.action, item.reason = "evaluate", f"{item.reason}; no metrics of it on record: evaluation only"
                continue
            rows[item.pair] = row
            echo(f"skip  {item.pair.key}: {item.reason}")
        elif item.action == "fail":
            rows[item.pair] = {"category": item.pair.category, "backbone": item.pair.backbone, "status": FAILED,
                               "stage": "plan", "error": item.reason}
            echo(f"FAIL  {item.pair.key}: {item.reason}")
    to_train = [item for item in plan if item.action in ("train", "evaluate")]
    spec = TaskSpec(data_root, out, cfg, cpus_per_task, gpus_per_task, threads, evaluate, max_retries)
    ray_info: dict[str, Any] = {"cpus_per_task": cpus_per_task, "gpus_per_task": gpus_per_task,
                                "threads": threads, "max_retries": max_retries}
    if to_train:
        rows.update(_run_tasks(spec, to_train, address, num_cpus, echo, poll_seconds,
                               skipped=sum(item.action == "skip" for item in plan), ray_info=ray_info))
    _clear_progress(out, pairs)
    ordered = [_finish_row(rows[p]) for p in pairs]
    counts = {s: sum(r["status"] == s for r in ordered) for s in (TRAINED, SKIPPED, FAILED)}
    result = TrainAllResult(ordered, time.perf_counter() - t_start, out, counts=counts)
    result.summary_json, result.summary_parquet = write_summary(
        out, ordered, {"started": started, "data_root": str(data_root), "wall_seconds": result.wall_seconds,
                       "ray": ray_info, "config": cfg.to_dict(), "backbones": backbones, "counts": counts}
    )
    return result


def _run_tasks(
    spec: TaskSpec, items: list[PlanItem], address: str | None, num_cpus: int | None,
    echo: Callable[[str], None], poll_seconds: float, skipped: int, ray_info: dict,
) -> dict[Pair, dict[str, Any]]:
    import ray

    t0 = time.perf_counter()
    session = join_ray(address, num_cpus=num_cpus, object_store_bytes=LOCAL_OBJECT_STORE_BYTES, log_to_driver=False)
    ray_info.update(address=session.address, joined=session.source, init_seconds=time.perf_counter() - t0,
                    nodes={n["NodeID"]: n.get("NodeManagerAddress") for n in ray.nodes() if n.get("Alive")})
    probe = Probe.write(spec.out, spec.data_root, tuple(item.pair.category for item in items))
    try:
        _check_capacity(spec.cpus, spec.gpus, local=not session.is_cluster)
        if session.is_cluster:
            check_all_nodes(probe)
        return _submit_and_wait(spec, items, probe, session, echo, poll_seconds, skipped)
    finally:
        probe.remove()
        if session.started:
            ray.shutdown()


def _submit_and_wait(
    spec: TaskSpec, items: list[PlanItem], probe: Probe, session: RaySession, echo: Callable[[str], None],
    poll_seconds: float, skipped: int,
) -> dict[Pair, dict[str, Any]]:
    """One task per pair; a row per pair as each finishes (retried by Ray after system failures)."""
    import ray

    progress_dir = spec.out / PROGRESS_DIR
    progress_dir.mkdir(exist_ok=True)
    remote = ray.remote(**task_options(spec.cpus, spec.gpus, spec.max_retries))(train_pair)
    pending: dict[Any, PlanItem] = {}
    for item in items:
        bundle = item.pair.bundle(spec.out)  # what a killed save left beside it goes when it is saved (staged_dir)
        marker = marker_path(str(progress_dir), item.pair.key)
        if marker is not None and marker.exists():
            marker.unlink()
        ref = remote.options(name=f"train {item.pair.key}").remote(
            str(spec.data_root), item.pair.category, pair_config(spec.cfg, item.pair.backbone).to_dict(), str(bundle),
            spec.threads, spec.gpus, spec.evaluate, str(progress_dir), probe, item.action == "train",
            item.reason != NEW,  # a pair the plan found no bundle for replaces none (train_task.save_fit)
        )
        pending[ref] = item
    echo(f"train-all: {len(items)} task(s) on Ray ({session.address} from {session.source}, {spec.cpus} CPU"
         f"{f', {spec.gpus:g} GPU' if spec.gpus else ''} and {spec.threads} torch thread(s) per task)")
    progress = Progress(len(items), skipped, progress_dir, echo)
    rows: dict[Pair, dict[str, Any]] = {}
    progress.update([i.pair for i in pending.values()])
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=poll_seconds)
        for ref in ready:
            item = pending.pop(ref)
            try:
                row = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                row = _failure_record(item.pair, exc, system=False, max_retries=spec.max_retries)
            except ray.exceptions.RayError as exc:  # worker died / node lost, after max_retries
                row = _failure_record(item.pair, exc, system=True, max_retries=spec.max_retries)
            row["reason"] = item.reason
            rows[item.pair] = row
            for warning in row.get("warnings") or ():  # the worker's log stays on its node: its warnings come here
                echo(f"warn  {item.pair.key}: {warning}")
            marker = marker_path(str(progress_dir), item.pair.key)
            if marker is not None:
                marker.unlink(missing_ok=True)
            if row["status"] == FAILED:
                progress.failed += 1
                echo(f"FAIL  {item.pair.key} ({row.get('stage')}): {row.get('error')}")
            else:
                progress.done += 1
                metric = f", image AUROC {row['image_auroc']:.3f}" if row.get("image_auroc") is not None else ""
                where = f" on node {row['node_id'][:8]}" if row.get("node_id") else ""
                done = "done" if item.action == "train" else "evaluated"
                echo(f"{done}  {item.pair.key} in {row.get('seconds', 0):.1f} s{where}{metric}")
        progress.update([i.pair for i in pending.values()])
    return rows


def _has_test_split(data_root: Path, category: str) -> bool:
    """Whether evaluating a category's bundle gives metrics (test/good and a defect type; names only)."""
    from pni_ray.data.mvtec import LayoutError, load_category

    try:
        return load_category(data_root, category, check_files=False).has_test
    except LayoutError:  # what is wrong with the category is reported where it is loaded to be evaluated
        return True


def _clear_progress(out: Path, pairs: list[Pair]) -> None:
    """Remove this run's pairs' progress markers and OUT/.progress/ once empty: a killed driver left
    the markers of tasks that had finished, which no later run (skipping those pairs) removed."""
    progress_dir = out / PROGRESS_DIR
    for pair in pairs:
        marker = marker_path(str(progress_dir), pair.key)
        if marker is not None:
            marker.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: another run's pairs are still running
        progress_dir.rmdir()


def _finish_row(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    row["bundle"] = f"{row['category']}/{row['backbone']}"
    for key in ("seconds", "peak_rss_mb", "eval_seconds", "cpu_seconds"):
        if row.get(key) is not None:
            row[key] = round(float(row[key]), 3)
    return row


def _previous_rows(out: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((out / SUMMARY_JSON).read_text())
        return {f"{r['category']}/{r['backbone']}": r for r in data.get("rows", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


PARQUET_COLUMNS: tuple[tuple[str, str], ...] = (
    ("category", "string"), ("backbone", "string"), ("status", "string"), ("seconds", "float64"),
    ("eval_seconds", "float64"), ("cpu_seconds", "float64"), ("peak_rss_mb", "float64"), ("peak_rss_source", "string"),
    ("mode", "string"), ("position_check", "string"),
    ("image_auroc", "float64"), ("pixel_auroc", "float64"), ("aupro", "float64"), ("f1_max", "float64"),
    ("n_test_images", "int64"), ("model_id", "string"), ("bundle", "string"), ("stage", "string"),
    ("error", "string"), ("reason", "string"), ("device", "string"), ("threads", "int64"), ("host", "string"),
    ("node_id", "string"), ("attempt", "int64"), ("warnings", "string"),  # the pair's warning lines, one per line
)


def write_summary(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[Path, Path]:
    """summary.json (rows + run metadata) and summary.parquet (flat rows), each written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pni_ray.fileio import atomic_write_bytes, atomic_write_json

    json_path, parquet_path = out / SUMMARY_JSON, out / SUMMARY_PARQUET
    atomic_write_json(json_path, {"format": "pni-ray-train-all-summary", **meta, "rows": rows})
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in PARQUET_COLUMNS])
    flat = [{name: "\n".join(row[name]) if isinstance(row.get(name), list) else row.get(name) for name, _ in PARQUET_COLUMNS}
            for row in rows]
    table = pa.Table.from_pylist(flat, schema=schema)
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    atomic_write_bytes(parquet_path, buffer.getvalue().to_pybytes())
    return json_path, parquet_path


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per pair; `mode` is what the bundle scores in (its metrics' mode), marked `*` where the position check
    dropped p(c|x) from the mode that was asked for (see `mode_note`)."""
    headers = ("category", "backbone", "status", "mode", "seconds", "peak MB", "img AUROC", "pix AUROC", "AUPRO", "F1max")
    cells = []
    for r in rows:
        num = lambda k, f: "-" if r.get(k) is None else format(r[k], f)  # noqa: E731
        mode = (r.get("mode") or "-") + ("*" if r.get("position_check") == "dropped" else "")
        cells.append((r["category"], r["backbone"], r["status"], mode, num("seconds", ".1f"), num("peak_rss_mb", ".0f"),
                      *(num(k, ".4f") for k in METRIC_KEYS)))
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) if i < 4 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    for c in cells:
        lines.append("  ".join(v.ljust(w) if i < 4 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))))
    return "\n".join(lines)


def mode_note(rows: list[dict[str, Any]]) -> str | None:
    """The table's footnote for pairs whose position check dropped p(c|x); None when there are none."""
    dropped = [r["bundle"] for r in rows if r.get("position_check") == "dropped"]
    if not dropped:
        return None
    return (f"* {', '.join(dropped)}: the position check found p(c|x) costs on synthetic defects of held-out images, so "
            "the bundle scores without it (the manifest's training.position_check); `pni-ray evaluate BUNDLE DATA_ROOT "
            "--ablation` compares every mode; to keep the prior, retrain with --force and a --config file holding "
            "{\"position\": {\"check_defects\": 0}}")
