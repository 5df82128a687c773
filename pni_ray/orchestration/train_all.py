"""`pni-ray train-all`: every (category, backbone) pair as one Ray task, fault-isolated and resumable.

Design
- One Ray task per pair. The task receives only paths and a config dict; it reads the images
  from shared storage itself and writes its bundle to ``OUT/<category>/<backbone>/`` (the bundle
  write is atomic: temp directory + rename). On a cluster, DATA_ROOT and OUT must therefore be
  the same path on every node (NFS, a mounted bucket); nothing large travels as an argument or
  through the object store, only a small result record comes back.
- Resources: ``num_cpus=--cpus-per-task`` and ``num_gpus=--gpus-per-task``; inside the task torch
  runs with that many intra-op threads, so two 1-CPU tasks on two cores do not fight.
- GPU tasks: Ray sets CUDA_VISIBLE_DEVICES to the task's GPU (`ray.get_gpu_ids()`), which torch
  sees as cuda:0. `training.train_category` has no device argument yet, so what runs on the GPU
  is the backbone: the feature extractor is wrapped (`DeviceExtractor`) to run on the assigned
  device for the memory-bank features, the calibration and the evaluation, returning features
  on the CPU; coreset selection, the neighbourhood MLP and the patch scoring stay on CPU
  tensors. GPU bundles are not byte-identical to CPU bundles (different float kernels).
- Fault isolation: a pair that raises (bad layout, unreadable image, MemoryError, ...) fails
  alone: the task raises `PairError` carrying its record and Ray does not retry it
  (``retry_exceptions=False``); a dead worker (OOM kill, segfault, lost node) is a system
  failure and is retried ``--max-retries`` times. Every other pair carries on; the command exits
  non-zero when any pair failed.
- Resume: a pair whose bundle exists and verifies (every checksum) with the same training
  config is skipped unless ``--force``; a bundle that fails verification is retrained; a
  verified bundle trained with a different config is not overwritten without ``--force``
  (that pair fails with the differing keys named). Stale temp directories of a killed run are
  removed before retraining.
- Summary: one row per pair (category, backbone, status, seconds, peak memory, metrics when the
  category has a test split, evaluated inside the task right after training from the saved
  bundle), printed and written atomically to ``OUT/summary.json`` and ``OUT/summary.parquet``.
  Peak memory is the worker process's peak resident set size (Linux VmHWM from
  /proc/self/status, reset at the start of each task via /proc/self/clear_refs, so it is the
  task's own peak including the ~0.3-0.5 GB of the worker's imports); where that reset is not
  allowed it falls back to ``ru_maxrss`` (the worker's lifetime peak); ``peak_rss_source`` says
  which.
- The embedded local Ray runs its workers at nice 0 (Ray's default is 15, which lets any other
  process on a shared machine starve the training tasks); a cluster keeps its own setting.
- Live progress: each task drops a small marker in ``OUT/.progress/`` when it starts; the
  driver polls Ray and prints done / running / queued / failed as they change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import resource
import shutil
import socket
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import click
import torch
from torch import nn

from pni_ray.config import TrainConfig

log = logging.getLogger(__name__)

SUMMARY_JSON = "summary.json"
SUMMARY_PARQUET = "summary.parquet"
PROGRESS_DIR = ".progress"
METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # only small result records go through it

TRAINED, SKIPPED, FAILED = "trained", "skipped", "failed"


# ----------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Pair:
    category: str
    backbone: str

    @property
    def key(self) -> str:
        return f"{self.category}/{self.backbone}"

    def bundle(self, out: Path) -> Path:
        return out / self.category / self.backbone


@dataclass
class PlanItem:
    pair: Pair
    action: str  # "train" | "skip" | "fail"
    reason: str
    model_id: str | None = None


def pair_config(cfg: TrainConfig, backbone: str) -> TrainConfig:
    return cfg.replace(features=dataclasses.replace(cfg.features, backbone=backbone))


def _canonical(obj: Any) -> Any:
    """JSON round trip, so tuples/lists and int/float spellings compare as a manifest stores them."""
    return json.loads(json.dumps(obj, sort_keys=True))


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return keys


def plan_pairs(out: Path, pairs: list[Pair], cfg: TrainConfig, force: bool = False) -> list[PlanItem]:
    """What to do with each pair: train, skip (verified bundle with this config) or fail."""
    from pni_ray.bundle import BundleError, model_id, verify_bundle

    plan = []
    for pair in pairs:
        path = pair.bundle(out)
        if not path.exists():
            plan.append(PlanItem(pair, "train", "new"))
            continue
        if force:
            plan.append(PlanItem(pair, "train", "forced (--force)"))
            continue
        try:
            manifest = verify_bundle(path)
        except BundleError as exc:
            plan.append(PlanItem(pair, "train", f"retrain: existing bundle failed verification: {exc}"))
            continue
        wanted = _canonical(pair_config(cfg, pair.backbone).to_dict())
        diff = config_diff(_canonical(manifest.get("config", {})), wanted)
        if manifest.get("category") != pair.category:
            diff.insert(0, f"category: {manifest.get('category')!r} -> {pair.category!r}")
        if diff:
            shown = "; ".join(diff[:6]) + (f"; ... {len(diff) - 6} more" if len(diff) > 6 else "")
            plan.append(PlanItem(
                pair, "fail",
                f"{path} is a valid bundle trained with a different config ({shown}); "
                "use --force to retrain it or another --out",
            ))
            continue
        plan.append(PlanItem(pair, "skip", "verified bundle with this config", model_id(path)))
    return plan


def remove_stale_temps(bundle: Path) -> list[Path]:
    """Temp siblings (`.<name>.partial-*`, `.<name>.old-*`) a killed save left behind."""
    removed = []
    if bundle.parent.is_dir():
        for pattern in (f".{bundle.name}.partial-*", f".{bundle.name}.old-*"):
            for stale in bundle.parent.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale)
    return removed


# ------------------------------------------------------------------------------- inside a task


class PairError(RuntimeError):
    """An application error of one pair; carries the pair's summary record (never retried)."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(record.get("error", "failed"))
        self.record = record

    def __reduce__(self):  # keep the record through pickling (Ray ships it to the driver)
        return (PairError, (self.record,))


def reset_peak_rss() -> str:
    """Reset this process's VmHWM so the next reading is this task's peak; returns the method."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return "VmHWM"
    except OSError:
        return "ru_maxrss"


def peak_rss_mb(source: str) -> float:
    if source == "VmHWM":
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
        except OSError:
            pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


class DeviceExtractor(nn.Module):
    """Runs a feature extractor on `device`; takes and returns CPU tensors (see module doc)."""

    def __init__(self, inner: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.inner = inner.to(device)
        self.device = device

    @property
    def dim(self) -> int:
        return self.inner.dim  # type: ignore[return-value]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner(images.to(self.device)).float().cpu()


@contextlib.contextmanager
def extractor_on(device: torch.device) -> Iterator[None]:
    """Make `train_category` build its extractor on `device` (no-op on CPU)."""
    if device.type == "cpu":
        yield
        return
    import pni_ray.training as training

    original = training.build_extractor
    training.build_extractor = lambda cfg: DeviceExtractor(original(cfg), device)  # type: ignore[assignment]
    try:
        yield
    finally:
        training.build_extractor = original  # type: ignore[assignment]


def assigned_device(gpus: float) -> torch.device:
    if gpus <= 0:
        return torch.device("cpu")
    ids: list = []
    with contextlib.suppress(Exception):
        import ray

        if ray.is_initialized():
            ids = list(ray.get_gpu_ids())
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"the task was given GPU(s) {ids} but torch sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch {torch.__version__})"
        )
    return torch.device("cuda", 0)  # Ray restricts CUDA_VISIBLE_DEVICES to the assigned GPU(s)


def _marker(progress_dir: str | None, key: str) -> Path | None:
    return Path(progress_dir) / (key.replace("/", "__") + ".json") if progress_dir else None


def train_pair(
    data_root: str,
    category: str,
    cfg_dict: dict[str, Any],
    bundle: str,
    threads: int,
    gpus: float = 0.0,
    evaluate: bool = True,
    progress_dir: str | None = None,
) -> dict[str, Any]:
    """Train, save and (when a test split exists) evaluate one pair; the body of each Ray task.

    Raises PairError (with the record) on any application error.
    """
    from pni_ray.bundle import atomic_write_json, model_id, save_bundle
    from pni_ray.data.mvtec import load_category
    from pni_ray.training import train_category

    source = reset_peak_rss()
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    cfg = TrainConfig.from_dict(cfg_dict)
    record: dict[str, Any] = {
        "category": category,
        "backbone": cfg.features.backbone,
        "status": FAILED,
        "stage": "setup",
        "threads": threads,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "peak_rss_source": source,
    }
    marker = _marker(progress_dir, f"{category}/{cfg.features.backbone}")
    try:
        if marker is not None:  # progress only: never fails the pair
            with contextlib.suppress(OSError, ValueError, AttributeError):
                attempt = 1 + (json.loads(marker.read_text()).get("attempt", 0) if marker.exists() else 0)
                record["attempt"] = attempt  # > 1 after a worker crash and retry
                atomic_write_json(marker, {"started": time.time(), "host": record["host"], "pid": record["pid"],
                                           "attempt": attempt})
        torch.set_num_threads(max(1, int(threads)))
        device = assigned_device(gpus)
        record["device"] = str(device)
        record["stage"] = "load"
        cat = load_category(data_root, category, **_load_kwargs(cfg))
        record["stage"] = "train"
        with extractor_on(device):
            trained = train_category(data_root, category, cfg, progress=False, category_data=cat)
            if cfg.refiner.enabled:
                from pni_ray.refine_training import train_refiner

                train_refiner(trained, data_root, category)
        record["stage"] = "save"
        save_bundle(trained, bundle, overwrite=True)
        record.update(model_id=model_id(bundle), seconds=time.perf_counter() - t0,
                      train_seconds=trained.report.get("seconds", {}))
        if evaluate and cat.has_test:
            record["stage"] = "evaluate"
            from pni_ray.evaluate import evaluate_category
            from pni_ray.inference import load_detector

            t1 = time.perf_counter()
            detector, _ = load_detector(bundle)
            if device.type != "cpu":
                detector.extractor = DeviceExtractor(detector.extractor, device)
            result = next(iter(evaluate_category(detector, cat, progress=False).values()))
            record.update({k: float(result[k]) for k in METRIC_KEYS})
            record["n_test_images"] = int(result["n_test_images"])
            record["eval_seconds"] = time.perf_counter() - t1
        record["stage"] = "done"
        record["status"] = TRAINED
    except Exception as exc:  # noqa: BLE001 - every application error fails this pair alone
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-8:])
        record.setdefault("seconds", time.perf_counter() - t0)
        record.update(peak_rss_mb=peak_rss_mb(source), cpu_seconds=_cpu_seconds() - cpu0)
        raise PairError(record) from None
    record.update(peak_rss_mb=peak_rss_mb(source), cpu_seconds=_cpu_seconds() - cpu0)
    return record


def _load_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The image-size limit train_category itself would load the category with."""
    try:
        from pni_ray.data.geometry import Geometry
    except ImportError:  # pragma: no cover - older trees without image geometries
        return {}
    return {"max_pixels": Geometry.from_config(cfg).max_pixels}


def _cpu_seconds() -> float:
    """User + system CPU time of this (worker) process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------------------------- driver


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


def _init_ray(address: str | None, num_cpus: int | None, cpus_per_task: int, gpus_per_task: float) -> bool:
    """Connect to `address` or start an embedded local Ray; returns True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        num_cpus = num_cpus or os.cpu_count() or 1
        # Ray starts workers at nice 15 by default; the training tasks are the job itself, so run
        # them at the priority `pni-ray train` would have (a busy machine otherwise starves them).
        kwargs: dict[str, Any] = dict(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                                      object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                                      _system_config={"worker_niceness": 0})
        ray.init(**kwargs)  # GPUs are detected by Ray
    return True


def _check_capacity(cpus_per_task: int, gpus_per_task: float, local: bool) -> None:
    import ray

    total = ray.cluster_resources()
    short = []
    if total.get("CPU", 0) < cpus_per_task:
        short.append(f"{cpus_per_task} CPUs per task but the cluster has {total.get('CPU', 0):g}")
    if gpus_per_task > 0 and total.get("GPU", 0) < gpus_per_task:
        short.append(f"{gpus_per_task:g} GPUs per task but the cluster has {total.get('GPU', 0):g}")
    if short:
        message = "cannot schedule any task: " + "; ".join(short)
        if local:
            raise click.UsageError(message)
        log.warning("%s (waiting for the cluster to scale up)", message)


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
        return [p for p in pending if _marker(str(self.dir), p.key).exists()]  # type: ignore[union-attr]

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
    kind = f"system failure after {max_retries} retries: " if system else ""
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    text = lines[0] + (f" ... {lines[-1].strip()}" if len(lines) > 1 else "") if lines else ""  # last line: the root cause
    return {"category": pair.category, "backbone": pair.backbone, "status": FAILED, "stage": "ray",
            "error": f"{kind}{type(cause).__name__}: {text}"}


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
    from pni_ray.data.mvtec import list_categories
    from pni_ray.models.backbones import get_spec

    t_start = time.perf_counter()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    data_root, out = Path(data_root).resolve(), Path(out).resolve()
    categories = list(categories) if categories else list_categories(data_root)
    if not categories:
        raise click.UsageError(f"{data_root}: no category folders (expected <category>/train/good/)")
    backbones = list(backbones) if backbones else [cfg.features.backbone]
    for name in backbones:
        try:
            get_spec(name)  # an unknown backbone is a usage error, before anything starts
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
    if cpus_per_task < 1:
        raise click.UsageError("--cpus-per-task must be at least 1")
    if cfg.features.weights:
        cfg = cfg.replace(features=dataclasses.replace(cfg.features, weights=str(Path(cfg.features.weights).resolve())))
    threads = threads or cpus_per_task
    pairs = [Pair(c, b) for c in categories for b in backbones]
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_pairs(out, pairs, cfg, force)
    previous = _previous_rows(out)
    rows: dict[Pair, dict[str, Any]] = {}
    for item in plan:
        if item.action == "skip":
            row = {"category": item.pair.category, "backbone": item.pair.backbone, "status": SKIPPED,
                   "model_id": item.model_id, "reason": item.reason}
            prev = previous.get(item.pair.key)
            if prev and prev.get("model_id") == item.model_id:  # metrics of this very model, from the last run
                row.update({k: prev[k] for k in (*METRIC_KEYS, "n_test_images") if prev.get(k) is not None})
            rows[item.pair] = row
            echo(f"skip  {item.pair.key}: {item.reason}")
        elif item.action == "fail":
            rows[item.pair] = {"category": item.pair.category, "backbone": item.pair.backbone, "status": FAILED,
                               "stage": "plan", "error": item.reason}
            echo(f"FAIL  {item.pair.key}: {item.reason}")
    to_train = [item for item in plan if item.action == "train"]
    ray_info: dict[str, Any] = {"address": address or "local", "cpus_per_task": cpus_per_task,
                                "gpus_per_task": gpus_per_task, "max_retries": max_retries}
    if to_train:
        rows.update(_run_tasks(
            data_root, out, cfg, to_train, address, cpus_per_task, gpus_per_task, threads, evaluate,
            max_retries, num_cpus, echo, poll_seconds, skipped=len(plan) - len(to_train), ray_info=ray_info,
        ))
    ordered = [_finish_row(rows[p], out) for p in pairs]
    counts = {s: sum(r["status"] == s for r in ordered) for s in (TRAINED, SKIPPED, FAILED)}
    result = TrainAllResult(ordered, time.perf_counter() - t_start, out, counts=counts)
    result.summary_json, result.summary_parquet = write_summary(
        out, ordered, {"started": started, "data_root": str(data_root), "wall_seconds": result.wall_seconds,
                       "ray": ray_info, "config": cfg.to_dict(), "backbones": backbones, "counts": counts}
    )
    return result


def _run_tasks(
    data_root: Path, out: Path, cfg: TrainConfig, items: list[PlanItem], address: str | None,
    cpus_per_task: int, gpus_per_task: float, threads: int, evaluate: bool, max_retries: int,
    num_cpus: int | None, echo: Callable[[str], None], poll_seconds: float, skipped: int, ray_info: dict,
) -> dict[Pair, dict[str, Any]]:
    import ray

    t0 = time.perf_counter()
    started_here = _init_ray(address, num_cpus, cpus_per_task, gpus_per_task)
    ray_info["init_seconds"] = time.perf_counter() - t0
    try:
        _check_capacity(cpus_per_task, gpus_per_task, local=not address)
        progress_dir = out / PROGRESS_DIR
        progress_dir.mkdir(exist_ok=True)
        remote = ray.remote(**task_options(cpus_per_task, gpus_per_task, max_retries))(train_pair)
        pending: dict[Any, PlanItem] = {}
        for item in items:
            bundle = item.pair.bundle(out)
            remove_stale_temps(bundle)
            marker = _marker(str(progress_dir), item.pair.key)
            if marker is not None and marker.exists():
                marker.unlink()
            ref = remote.options(name=f"train {item.pair.key}").remote(
                str(data_root), item.pair.category, pair_config(cfg, item.pair.backbone).to_dict(), str(bundle),
                threads, gpus_per_task, evaluate, str(progress_dir),
            )
            pending[ref] = item
        echo(f"train-all: {len(items)} task(s) on Ray ({ray_info['address']}, {cpus_per_task} CPU"
             f"{f', {gpus_per_task:g} GPU' if gpus_per_task else ''} per task)")
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
                    row = _failure_record(item.pair, exc, system=False, max_retries=max_retries)
                except ray.exceptions.RayError as exc:  # worker died / node lost, after max_retries
                    row = _failure_record(item.pair, exc, system=True, max_retries=max_retries)
                row["reason"] = item.reason
                rows[item.pair] = row
                marker = _marker(str(progress_dir), item.pair.key)
                if marker is not None:
                    marker.unlink(missing_ok=True)
                if row["status"] == FAILED:
                    progress.failed += 1
                    echo(f"FAIL  {item.pair.key} ({row.get('stage')}): {row.get('error')}")
                else:
                    progress.done += 1
                    metric = f", image AUROC {row['image_auroc']:.3f}" if row.get("image_auroc") is not None else ""
                    echo(f"done  {item.pair.key} in {row.get('seconds', 0):.1f} s{metric}")
            progress.update([i.pair for i in pending.values()])
        with contextlib.suppress(OSError):
            progress_dir.rmdir()
        return rows
    finally:
        if started_here:
            ray.shutdown()


def _finish_row(row: dict[str, Any], out: Path) -> dict[str, Any]:
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
    ("image_auroc", "float64"), ("pixel_auroc", "float64"), ("aupro", "float64"), ("f1_max", "float64"),
    ("n_test_images", "int64"), ("model_id", "string"), ("bundle", "string"), ("stage", "string"),
    ("error", "string"), ("reason", "string"), ("device", "string"), ("threads", "int64"), ("host", "string"),
)


def write_summary(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[Path, Path]:
    """summary.json (rows + run metadata) and summary.parquet (flat rows), each written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pni_ray.bundle import atomic_write_json

    json_path, parquet_path = out / SUMMARY_JSON, out / SUMMARY_PARQUET
    atomic_write_json(json_path, {"format": "pni-ray-train-all-summary", **meta, "rows": rows})
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in PARQUET_COLUMNS])
    table = pa.Table.from_pylist([{name: row.get(name) for name, _ in PARQUET_COLUMNS} for row in rows], schema=schema)
    tmp = parquet_path.with_name(f".{parquet_path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, parquet_path)
    finally:
        tmp.unlink(missing_ok=True)
    return json_path, parquet_path


def format_table(rows: list[dict[str, Any]]) -> str:
    headers = ("category", "backbone", "status", "seconds", "peak MB", "img AUROC", "pix AUROC", "AUPRO", "F1max")
    cells = []
    for r in rows:
        num = lambda k, f: "-" if r.get(k) is None else format(r[k], f)  # noqa: E731
        cells.append((r["category"], r["backbone"], r["status"], num("seconds", ".1f"), num("peak_rss_mb", ".0f"),
                      *(num(k, ".4f") for k in METRIC_KEYS)))
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    for c in cells:
        lines.append("  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- CLI


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _load_config_file(path: Path | None) -> TrainConfig | None:
    if path is None:
        return None
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "config" in data and "format" in data:  # a bundle manifest
        data = data["config"]
    return TrainConfig.from_dict(data)


class _WithTrainOptions(click.Command):
    """A command that gets `pni_ray.cli.train_options` when it is first parsed or shown.

    pni_ray.cli imports this module to register its commands, so importing pni_ray.cli here at
    import time would be circular; it also keeps the module (which every Ray worker imports to
    run `train_pair`) free of the whole CLI's imports.
    """

    _attached = False

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not self._attached:
            from pni_ray.cli import train_options

            collected = train_options(lambda **kwargs: None).__click_params__  # type: ignore[attr-defined]
            self.params.extend(reversed(collected))  # click stores decorator params innermost first
            self._attached = True
        return super().get_params(ctx)


@click.command("train-all", cls=_WithTrainOptions)
@click.argument("data_root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Bundles go to OUT/<category>/<backbone>/, the summary to OUT/summary.{json,parquet}.")
@click.option("--categories", default=None, help="Comma-separated categories (default: every folder with train/).")
@click.option("--backbones", default=None, help="Comma-separated backbones (default: the config's, efficientnet_lite2).")
@click.option("--address", default=None, help="Ray cluster to join (e.g. auto, ray://head:10001); default: embedded local Ray.")
@click.option("--cpus-per-task", type=int, default=1, help="CPUs (and torch threads) per training task.")
@click.option("--gpus-per-task", type=float, default=0.0, help="GPUs per task (fractions share a GPU).")
@click.option("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray (default: all cores).")
@click.option("--max-retries", type=int, default=2, help="Retries after a system failure (dead worker); errors are not retried.")
@click.option("--no-eval", is_flag=True, help="Skip evaluating on the test split after training.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="TrainConfig JSON (or a bundle's manifest.json) as the base; other options override it.")
@click.option("--force", is_flag=True, help="Retrain pairs whose bundle already exists and verifies.")
def train_all_cmd(data_root: Path, out: Path, categories: str | None, backbones: str | None, address: str | None,
                  cpus_per_task: int, gpus_per_task: float, num_cpus: int | None, max_retries: int, no_eval: bool,
                  config_file: Path | None, force: bool, threads: int | None, **overrides: Any) -> None:
    """Train every category x backbone of DATA_ROOT in parallel on Ray; resumable, fault-isolated.

    Exits with status 1 when any pair failed (the others still finish). --threads (torch threads
    per task) defaults to --cpus-per-task here.
    """
    from pni_ray.cli import build_config, set_threads

    set_threads(1)  # the driver only waits; the tasks set their own thread counts
    cfg = build_config(base=_load_config_file(config_file), **overrides)
    result = train_all(
        data_root, out, cfg, categories=_split(categories), backbones=_split(backbones), address=address,
        cpus_per_task=cpus_per_task, gpus_per_task=gpus_per_task, threads=threads, force=force,
        evaluate=not no_eval, max_retries=max_retries, num_cpus=num_cpus,
    )
    click.echo(format_table(result.rows))
    for row in result.failed:
        click.echo(f"\nFAILED {row['category']}/{row['backbone']} ({row.get('stage')}): {row.get('error')}")
    c = result.counts
    click.echo(f"\n{c[TRAINED]} trained, {c[SKIPPED]} skipped, {c[FAILED]} failed in {result.wall_seconds:.1f} s; "
               f"summary: {result.summary_json}, {result.summary_parquet}")
    if not result.ok:
        sys.exit(1)


@click.command("ensemble")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path), help="Ensemble directory to write.")
@click.option("--force", is_flag=True, help="Replace an existing ensemble.")
@click.option("--calibrate", "calibrate_root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="DATA_ROOT: set the threshold from the members' shared held-out train/good images "
                   "(default: from the members' stored statistics).")
@click.option("--threads", type=int, default=None)
def ensemble_cmd(bundles: tuple[Path, ...], out: Path, force: bool, calibrate_root: Path | None, threads: int | None) -> None:
    """Combine bundles of one category (e.g. one per backbone) into a self-contained ensemble.

    BUNDLE... are copied into OUT with a manifest pinning each one's model_id.

    Each member's maps are normalised with its own held-out statistics and averaged; the image
    score is the maximum of the averaged map. `pni-ray evaluate OUT DATA_ROOT` scores it.
    """
    from pni_ray.bundle import BundleError, model_id
    from pni_ray.cli import set_threads
    from pni_ray.models.ensemble import save_ensemble, verify_ensemble

    set_threads(threads)
    if out.exists() and not force:
        raise click.ClickException(f"{out} already exists; use --force to replace it")
    try:
        path = save_ensemble(bundles, out, overwrite=force, calibrate_root=calibrate_root)
    except (BundleError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    manifest = verify_ensemble(path)
    for m in manifest["members"]:
        click.echo(f"member {m['path']}: {m['backbone']} ({m['mode']}), model_id {m['model_id'][:12]}")
    click.echo(f"ensemble of {len(manifest['members'])} ({manifest['category']}) -> {path}; threshold "
               f"{manifest['threshold']:.4f} ({manifest['threshold_method']}); model_id {model_id(path)[:12]}")

