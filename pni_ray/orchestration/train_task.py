"""The body of one `train-all` Ray task: train, save and evaluate one (category, backbone) pair.

The task receives only paths and a config dict; it reads the images from shared storage itself
and writes its bundle to ``OUT/<category>/<backbone>/`` (atomic: temp directory + rename), so
nothing large travels as an argument or through the object store; a small record comes back.

- Threads: torch runs exactly ``threads`` intra-op threads (``--threads``, default
  ``--cpus-per-task``), through the same `fit.fit_category` as `pni-ray train`, so a pair trained
  here and by `train` with the same thread count gives the same bundle.
- Shared storage: before anything else the task checks that it sees the driver's OUT (the
  probe file, see shared_storage) and fails alone, naming its node, when it does not.
- GPU tasks: Ray sets CUDA_VISIBLE_DEVICES to the task's GPU (`ray.get_gpu_ids()`), which torch
  sees as cuda:0. `training.train_category` has no device argument, so what runs on the GPU is
  the backbone: the feature extractor is wrapped (`DeviceExtractor`) to run on the assigned
  device for the memory-bank features, the calibration and the evaluation, returning features
  on the CPU; coreset selection, the neighbourhood MLP and the patch scoring stay on CPU
  tensors. GPU bundles are not byte-identical to CPU bundles (different float kernels).
- Errors: any application error raises `PairError` carrying the pair's record (Ray does not
  retry it); a dead worker or a lost node is a system failure that Ray retries.
- Peak memory is the worker process's peak resident set size (Linux VmHWM from
  /proc/self/status, reset at the start of each task via /proc/self/clear_refs, so it is the
  task's own peak including the ~0.3-0.5 GB of the worker's imports); where that reset is not
  allowed it falls back to ``ru_maxrss`` (the worker's lifetime peak); ``peak_rss_source`` says
  which.
- Live progress: the task drops a small marker in ``OUT/.progress/`` when it starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from pni_ray.config import TrainConfig
from pni_ray.orchestration.process_memory import peak_rss_mb, reset_peak_rss
from pni_ray.orchestration.shared_storage import Probe, SharedStorageError, probe_problem
from pni_ray.orchestration.train_plan import FAILED, SKIPPED, TRAINED

log = logging.getLogger(__name__)

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
MAX_WARNINGS = 20  # distinct warning lines a pair's record carries


class _Collected(logging.Handler):
    """The distinct WARNING-and-above lines of pni_ray's loggers, in order."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.messages and len(self.messages) < MAX_WARNINGS:
            self.messages.append(message)


@contextlib.contextmanager
def collected_warnings() -> Iterator[list[str]]:
    """What a pair's training warned of (files not read, a small training set, the position check's verdict), kept
    for its record: train-all's workers do not log to the driver, so without it those lines reach only Ray's files."""
    from pni_ray.data.images import warn_anew

    warn_anew()  # a worker that ran another pair before has said its files' warnings already: this pair hears them too
    handler = _Collected()
    logger = logging.getLogger("pni_ray")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


class PairError(RuntimeError):
    """An application error of one pair; carries the pair's summary record (never retried)."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(record.get("error", "failed"))
        self.record = record

    def __reduce__(self):  # keep the record through pickling (Ray ships it to the driver)
        return (PairError, (self.record,))


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


def metrics_path(bundle: str | Path) -> Path:
    """OUT/<category>/.<backbone>.metrics.json: a pair's evaluation, kept beside its bundle with the
    model_id it is of, so a rerun that skips the bundle still reports it when the driver that saw
    it was killed before writing summary.json."""
    bundle = Path(bundle)
    return bundle.with_name(f".{bundle.name}.metrics.json")


def recorded_metrics(bundle: str | Path, model_id: str) -> dict[str, Any]:
    """The metrics `metrics_path` holds for this very model; {} when absent, unreadable or of another."""
    try:
        data = json.loads(metrics_path(bundle).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("model_id") != model_id:
        return {}
    return metric_fields(data)


def mode_fields(bundle: str | Path) -> dict[str, Any]:
    """The mode a bundle scores in (what its metrics and `pni-ray score` use) and what its position check decided
    (`bundle_manifest.position_check_outcome`); {} when its manifest cannot be read (the row's error says why)."""
    from pni_ray.bundle_manifest import position_check_outcome, read_manifest, scoring_mode

    try:
        manifest = read_manifest(bundle)
        return {"mode": scoring_mode(manifest), "position_check": position_check_outcome(manifest)}
    except (ValueError, KeyError, TypeError):
        return {}


def metric_fields(record: dict[str, Any]) -> dict[str, Any]:
    """A row's or record's evaluation: the metrics and test-image count it holds (None left out)."""
    return {k: record[k] for k in (*METRIC_KEYS, "n_test_images") if record.get(k) is not None}


def marker_path(progress_dir: str | None, key: str) -> Path | None:
    """OUT/.progress/<category>__<backbone>.json: the driver shows the pair as running while it exists."""
    return Path(progress_dir) / (key.replace("/", "__") + ".json") if progress_dir else None


def _node_id() -> str | None:
    with contextlib.suppress(Exception):
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    return None


def save_fit(trained: Any, bundle: Path, replace: bool) -> None:
    """Save the fit at `bundle`; without `replace`, a bundle that appeared there while it trained is kept
    when it records the same config (what this fit would write), and refused, naming it, when not: two
    runs on one OUT with different configs must not silently overwrite each other."""
    from pni_ray.bundle import read_manifest, save_bundle
    from pni_ray.orchestration.train_plan import canonical

    try:
        save_bundle(trained, bundle, overwrite=replace)
    except FileExistsError:
        try:
            theirs = read_manifest(bundle).get("config")
        except ValueError:
            theirs = None
        if canonical(theirs) == canonical(trained.config.to_dict()):
            log.info("%s: saved meanwhile with this config (an earlier attempt, or another run): kept", bundle)
            return
        raise FileExistsError(f"{bundle}: another bundle was saved there while this pair trained (a second "
                              "train-all on this OUT?) and its config differs; this fit is not saved. Rerun to "
                              "keep that one, or with --force to replace it") from None


def train_pair(
    data_root: str,
    category: str,
    cfg_dict: dict[str, Any],
    bundle: str,
    threads: int,
    gpus: float = 0.0,
    evaluate: bool = True,
    progress_dir: str | None = None,
    probe: Probe | None = None,
    train: bool = True,
    replace: bool = True,
) -> dict[str, Any]:
    """Train, save and (when a test split exists) evaluate one pair; the body of each Ray task.

    train False: the verified bundle already there is only evaluated (a run that saved it and then
    failed or was killed while evaluating); its record says "skipped" with the metrics.
    replace False: the driver found no bundle at `bundle`, so one that is there at the save came from
    elsewhere meanwhile (another run on this OUT, or this task's earlier attempt): kept if it holds this
    fit's config (the same computation), else this pair fails and it stays (see save_fit).
    Raises PairError (with the record) on any application error. The record's "warnings": the pair's warning lines.
    """
    from pni_ray.bundle import atomic_write_json, model_id
    from pni_ray.data.images import ImageError
    from pni_ray.data.mvtec import LayoutError, load_category
    from pni_ray.fit import fit_category

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
        "node_id": _node_id(),
        "pid": os.getpid(),
        "peak_rss_source": source,
    }
    with collected_warnings() as warnings:
        record["warnings"] = warnings  # filled as the pair runs: the record returned or raised carries them
        try:
            if probe is not None:
                record["stage"] = "storage"
                problem = probe_problem(probe, category)
                if problem:
                    raise SharedStorageError(f"on {record['host']} (node {(record['node_id'] or '?')[:8]}): {problem}; "
                                               "OUT and DATA_ROOT must be on storage shared by every node")
            marker = marker_path(progress_dir, f"{category}/{cfg.features.backbone}")
            if marker is not None:  # progress only: never fails the pair
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    attempt = 1 + (json.loads(marker.read_text()).get("attempt", 0) if marker.exists() else 0)
                    record["attempt"] = attempt  # > 1 after a worker crash and retry
                    atomic_write_json(marker, {"started": time.time(), "host": record["host"], "pid": record["pid"],
                                               "node_id": record["node_id"], "attempt": attempt})
            record["stage"] = "setup"
            device = assigned_device(gpus)
            record["device"] = str(device)
            record["stage"] = "load"
            # train/good: what training reads
            cat = load_category(data_root, category, **_load_kwargs(cfg), with_test=False)
            if train:
                record["stage"] = "train"
                with extractor_on(device):
                    trained = fit_category(data_root, category, cfg, threads, progress=False, category_data=cat)
                record["stage"] = "save"
                save_fit(trained, Path(bundle), replace)
                record.update(train_seconds=trained.report.get("seconds", {}), seconds=time.perf_counter() - t0)
            record["model_id"] = model_id(bundle)
            record.update(mode_fields(bundle))
            if evaluate:  # the test split is read and checked now: its problems fail the evaluation, the bundle is kept
                record["stage"] = "evaluate"
                cat = load_category(data_root, category, **_load_kwargs(cfg), with_train=False)
            if cat.has_test:  # loaded with_test=False above: no test samples unless the evaluation read them
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
                try:  # a convenience for reruns: a failed write does not fail a trained, evaluated pair
                    atomic_write_json(metrics_path(bundle), {"model_id": record["model_id"], **metric_fields(record)})
                except OSError as exc:
                    log.warning("%s: metrics not kept beside the bundle (%s)", bundle, exc)
            elif evaluate:  # the table's dashes, said (a warning line of the pair: train-all prints it, summary keeps it)
                has = "no test images (test/<type>/ missing or empty)" if not cat.test else (
                    f"the test split holds {'defect' if cat.test[0].label else 'good'} images only, and the metrics "
                    "here need both (`pni-ray evaluate` gives what a one-label split allows)")
                log.warning("%s: not evaluated: %s", cat.root, has)
            if not train:  # an evaluation-only task's time is all of it
                record["seconds"] = time.perf_counter() - t0
            record["stage"] = "done"
            record["status"] = TRAINED if train else SKIPPED
        except Exception as exc:  # noqa: BLE001 - every application error fails this pair alone
            record["error"] = f"{type(exc).__name__}: {exc}"
            if record["stage"] == "evaluate" and isinstance(exc, (LayoutError, ImageError)):  # the test split failed
                record["error"] += (" (the bundle was saved and scores as usual: a rerun evaluates it, without "
                                    "retraining, once the test split is fixed)")
            record["traceback"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-8:])
            record.setdefault("seconds", time.perf_counter() - t0)  # a trained pair's stops at its save
            record.update(peak_rss_mb=peak_rss_mb(source), cpu_seconds=_cpu_seconds() - cpu0)
            raise PairError(record) from None
    record.update(peak_rss_mb=peak_rss_mb(source), cpu_seconds=_cpu_seconds() - cpu0)
    return record


def _load_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """How train_category itself would load the category (image-size limit, 16-bit white level)."""
    from pni_ray.geometry import Geometry

    return Geometry.from_config(cfg).read_options()


def _cpu_seconds() -> float:
    """User + system CPU time of this (worker) process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
