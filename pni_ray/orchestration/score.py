"""`pni-ray score`: batch scoring of any number of images to Parquet, on Ray Data, never losing one.

Pipeline (one Ray Data dataset, streamed)::

    sorted, de-duplicated inputs -> chunks of --chunk-size paths (rows of `from_items`)
      -> map(decode_chunk)            read, decode, prepare with the model's geometry (resize,
                                      letterbox, short-side, tiles: pni_ray.geometry, as `evaluate`);
                                      each bad file or misfit image becomes an error
      -> map(ScoreWorker)             actor pool: the model (bundle or export), --batch-size images
                                      per forward pass, image scores over each image's content
      -> map(encode_chunk)            maps back to each image's (H, W) with evaluate's resize, encode
      -> driver commits OUT/part-<chunk hash>.parquet atomically (temp file + rename)

`--stages split` runs decode and encode as their own Ray tasks (the default when actors hold
GPUs: CPUs decode while the GPU scores); `fused` (the default on CPUs) runs all three in the
model actors, which on few cores beats paying an interpreter per extra worker process.

Exactly once: a chunk's part file appears only when all of its rows exist, and a run first reads
the `path` column of the committed parts and schedules only inputs without a row. A run killed
anywhere (even by SIGKILL, even mid-rename) and rerun with the same OUT therefore ends with one row
per input. Error rows are final: a rerun does not retry them (`--retry-failed` does). An image that
kills a Ray worker is isolated within the run (`_isolate_lost`); one that kills the `--engine local`
process, across runs (`score_inflight`).

Inputs: `score_inputs` (files, directories, globs, list files); the model as the driver sees it:
`score_model`; OUT's lock, identity, commits and summary: `score_output`. The command: `score_cli`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from pni_ray.config import threads_from_env
from pni_ray.data.images import DEFAULT_MAX_PIXELS, ImageError, is_grey
from pni_ray.fileio import inside
from pni_ray.geometry import Geometry, GeometryError, Prepared, restore_map
from pni_ray.options import backbone_option_error
from pni_ray.orchestration import score_inflight as inflight
from pni_ray.orchestration.ray_session import LOCAL, RaySession, live_node_resources, unplaceable
from pni_ray.orchestration.ray_session import FLAG as ADDRESS_FLAG
from pni_ray.orchestration.score_inputs import CHUNK_SIZE, chunk_id, expand_inputs, make_chunks
from pni_ray.orchestration.score_model import ModelInfo, ScoreError, describe_model
from pni_ray.orchestration.score_output import (
    SUMMARY_FILE,
    check_dataset,
    commit,
    committed_paths,
    error_paths,
    locked,
    remove_stale_temps,
    retry_failed,
    scored_in,
    summarise,
)
from pni_ray.results import (
    MAP_FORMATS,
    atomic_write_json,
    error_row,
    message_text,
    now_utc,
    row_path,
    rows_to_table,
    schema,
    scored_row,
    table_to_parquet_bytes,
)

log = logging.getLogger(__name__)

PROGRESS_LOG_SECONDS = 60.0  # without a progress bar, a line saying how far the run is at most this often

# A chunk whose actor dies (a decoder crash, an OOM kill) is tried this many more times, then dropped from the
# stream (logged by Ray Data) for `score` to try its images one at a time, as one whose actor raises is at once.
# Ray Data's default, retrying for ever, hung a run on one image that killed its worker.
CHUNK_RETRIES = 2


# ------------------------------------------------------------------------------------------
# pipeline stages (module-level functions and one class: Ray ships them to workers)
# ------------------------------------------------------------------------------------------


def decode_chunk(row: dict[str, Any], geometry: dict[str, Any], max_pixels: int) -> dict[str, Any]:
    """Read, decode and prepare one chunk with the model's geometry (pni_ray.geometry, as `evaluate`
    does); a file that cannot be used, or whose geometry does not fit the model, becomes an error."""
    geo = Geometry.from_manifest(geometry).with_max_pixels(max_pixels)  # the run's limit, not the training config's
    meta = json.loads(row["meta"])
    preset = meta.pop("preset", {})
    errors: list[str | None] = []
    hw: list[list[int] | None] = []
    content: list[list[int] | None] = []
    grey: list[bool] = []  # of the decoded inputs, in order: three equal channels (data.images.is_grey)
    pixels: list[np.ndarray] = []
    for path in meta["paths"]:
        err = preset.get(path)
        if err is None:
            try:
                prepared = geo.prepare(geo.load(path))
                geo.check(prepared, name=path)  # also an image too thin to leave content cells, by name
                pixels.append(prepared.canvas)
                grey.append(is_grey(prepared.canvas))
                hw.append(list(prepared.original_hw))
                content.append(list(prepared.content))
            except (ImageError, GeometryError) as exc:
                err = str(exc) if path in str(exc) else f"{path}: {exc}"
            except MemoryError:
                err = f"{path}: out of memory while decoding (lower --max-pixels, max_pixels in the nightly config, or give workers more memory)"
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the job
                err = f"{path}: cannot decode ({exc.__class__.__name__}: {exc})"
        if err is not None:
            hw.append(None)
            content.append(None)
        errors.append(err)
    meta.update(errors=errors, hw=hw, content=content, grey=grey)
    data = np.ascontiguousarray(np.stack(pixels)).tobytes() if pixels else b""
    return {"chunk": row["chunk"], "meta": json.dumps(meta), "pixels": data}


class ModelFailed(ScoreError):
    """The model raised on every image of a chunk (a CUDA or ONNX Runtime error, its memory): error rows would make
    a failure of the model final for images that are fine. The chunk is not committed, as a chunk Ray Data drops
    is not, and `_isolate_lost` asks an image scored before whether the workers still score."""


class ScoreWorker:
    """One model per actor; torch (or ORT) threads pinned to the actor's CPUs.

    With `decode` / `encode` (the stage functions' keyword arguments) the actor runs those stages
    itself on each chunk: the fused pipeline, fewer processes, no pixels through the object store.
    """

    def __init__(self, model_path: str, threads: int = 1, batch_size: int = 8, device: str = "cpu",
                 decode: dict[str, Any] | None = None, encode: dict[str, Any] | None = None,
                 backbone_runtime: str = "onnxruntime", backbone_precision: str = "auto",
                 model_id: str | None = None) -> None:
        from pni_ray.allocator import keep_freed_memory

        keep_freed_memory()
        self.decode, self.encode = decode, encode
        threads = max(1, int(threads))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        try:
            import torch

            torch.set_num_threads(threads)
        except ImportError:  # pragma: no cover - export-only installs
            pass
        from pni_ray.orchestration.model_loader import load_scoring_model

        self.model = load_scoring_model(model_path, device=device, threads=threads, backbone_runtime=backbone_runtime,
                                        backbone_precision=backbone_precision)
        if backbone_runtime != "onnxruntime":
            log.info("%s: backbone in %s, %d thread(s)", model_path, self.model.runtime.backbone_label, threads)
        self.batch_size = max(1, int(batch_size))
        # An actor (re)started after `train --force` replaced the model would score with another model under the
        # run's model id and threshold: it scores nothing, and the driver stops the run (`abort`)
        self.changed = "" if model_id in (None, self.model.model_id) else (
            f"{model_path}: the model changed during the run (now model {self.model.model_id[:12]}, the run started "
            f"with {model_id[:12]}): stopped, the parts committed so far hold the first model's scores; score the "
            "new model into another --out")

    def _predict(self, prepared: list[Prepared]) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.model.canvas_maps(prepared)
        return np.asarray(maps, np.float32), np.asarray(scores, np.float64).reshape(-1)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.changed:  # before decoding the chunk
            return aborted(row["chunk"], self.changed)
        if self.decode is not None:
            row = decode_chunk(row, **self.decode)
        row = self.score(row)
        return encode_chunk(row, **self.encode) if self.encode is not None else row

    def score(self, row: dict[str, Any]) -> dict[str, Any]:
        meta = json.loads(row["meta"])
        if self.changed:  # split stages: encode_chunk passes it on
            return {"chunk": row["chunk"], "meta": json.dumps({**meta, "abort": self.changed}), "maps": b""}
        paths, errors = meta["paths"], meta["errors"]
        ok = [i for i, e in enumerate(errors) if e is None]
        h, w = self.model.image_size
        images = np.frombuffer(row["pixels"], np.uint8).reshape(len(ok), h, w, 3) if ok else None
        prepared = [self.model.geometry.rebuild(images[j], meta["hw"][i], meta["content"][i]) for j, i in enumerate(ok)]
        maps = np.zeros((len(ok), h, w), np.float32)
        scores = np.full(len(ok), np.nan)
        failed: dict[int, str] = {}
        for start in range(0, len(ok), self.batch_size):
            stop = min(start + self.batch_size, len(ok))
            try:
                maps[start:stop], scores[start:stop] = self._predict(prepared[start:stop])
            except Exception:  # noqa: BLE001 - retry one by one to isolate the culprit
                for j in range(start, stop):
                    try:
                        maps[j: j + 1], scores[j: j + 1] = self._predict(prepared[j: j + 1])
                    except Exception as exc:  # noqa: BLE001
                        failed[j] = f"{paths[ok[j]]}: scoring failed ({exc.__class__.__name__}: {exc})"
        if ok and len(failed) == len(ok):  # the model's fault, or the images'? `_isolate_lost` asks
            raise ModelFailed(f"the model failed on each of the {len(ok)} image(s) of a chunk, also one at a time "
                              f"(first: {failed[0]}): not committed; an image scored before tells whether the model "
                              "or these images fail")
        out_scores: list[float | None] = [None] * len(paths)
        keep = []
        for j, i in enumerate(ok):
            if j in failed:
                errors[i] = failed[j]
            elif not math.isfinite(scores[j]):
                errors[i] = f"{paths[i]}: the model produced a non-finite score ({scores[j]})"
            else:
                out_scores[i] = float(scores[j])
                keep.append(j)
        meta.update(errors=errors, scores=out_scores)
        return {"chunk": row["chunk"], "meta": json.dumps(meta),
                "maps": np.ascontiguousarray(maps[keep]).tobytes()}


def encode_chunk(row: dict[str, Any], map_format: str, model: dict[str, Any]) -> dict[str, Any]:
    """Canvas maps back to each image's own (H, W) (content cropped, `pni_ray.geometry.resize_map`,
    the resize `evaluate` uses), encoded; the chunk as Parquet bytes."""
    meta = json.loads(row["meta"])
    if meta.get("abort"):
        return aborted(row["chunk"], meta["abort"])
    scores, hw, content = meta["scores"], meta["hw"], meta["content"]
    # the table's text, once: each path as `row_path` writes it (one to one), a message's bytes as \xNN
    paths = [row_path(p) for p in meta["paths"]]
    errors = [None if e is None else message_text(e) for e in meta["errors"]]
    h, w = model["image_size"]
    n_maps = sum(v is not None for v in scores)
    maps = np.frombuffer(row["maps"], np.float32).reshape(n_maps, h, w)
    scored_at = now_utc()
    rows = []
    j = 0
    for i, path in enumerate(paths):
        if scores[i] is None:
            rows.append(error_row(path, model["category"], errors[i] or f"{path}: not scored", model["model_id"], scored_at))
            continue
        amap = maps[j]
        j += 1
        try:
            full = restore_map(amap, content[i], hw[i])
            rows.append(scored_row(path, model["category"], scores[i], model["threshold"], full, map_format,
                                   model["model_id"], scored_at))
        except Exception as exc:  # noqa: BLE001
            rows.append(error_row(path, model["category"], f"{path}: encoding the map failed "
                                  f"({exc.__class__.__name__}: {exc})", model["model_id"], scored_at))
    table_schema = schema(map_format, model["threshold"], {
        "model_id": model["model_id"], "category": model["category"] or "", "model_path": model["path"]})
    try:
        table = rows_to_table(rows, table_schema)
    except (ValueError, TypeError, pa.ArrowException) as exc:  # a value Arrow refuses would fail every rerun: store why
        log.error("chunk %s: its rows could not be stored (%s: %s); writing error rows", row["chunk"],
                  exc.__class__.__name__, exc)
        rows = [error_row(r["path"], model["category"], f"{r['path']}: its row could not be stored "
                          f"({exc.__class__.__name__}: {exc}); rerun with --retry-failed once fixed",
                          model["model_id"], scored_at) for r in rows]
        table = rows_to_table(rows, table_schema)
    n_failed = sum(r["error"] is not None for r in rows)
    grey, colour = scored_grey(meta, [r["error"] is None for r in rows])
    scored_paths = [p for p, r in zip(meta["paths"], rows) if r["error"] is None]
    return {"chunk": row["chunk"], "parquet": table_to_parquet_bytes(table), "n": len(rows), "n_failed": n_failed,
            "abort": "", "n_grey": len(grey), "grey_example": grey[0] if grey else "",
            "colour_example": colour[0] if colour else "", "scored_example": scored_paths[0] if scored_paths else ""}


def scored_grey(meta: dict[str, Any], scored: list[bool]) -> tuple[list[str], list[str]]:
    """The chunk's scored inputs that are grey, and those in colour (meta["grey"] holds one flag per decoded input,
    in order; an input that did not decode has none)."""
    flags = iter(meta.get("grey") or [])
    grey_flags = [next(flags, None) if decoded is not None else None for decoded in meta["hw"]]
    grey = [path for path, g, ok in zip(meta["paths"], grey_flags, scored) if ok and g is True]
    colour = [path for path, g, ok in zip(meta["paths"], grey_flags, scored) if ok and g is False]
    return grey, colour


def unlike_training(info: ModelInfo, scored: int, grey: int, grey_example: str, colour_example: str) -> str:
    """What to say when a colour model scored grey images, or a grey model colour ones ("" when nothing is unlike):
    its features, and so its scores, stand on another footing (a camera switched to mono, a wrong folder)."""
    if info.trained_on == "colour" and grey > 0:
        n, what, example, other = grey, "grey (three equal channels", grey_example, "grey"
    elif info.trained_on == "grey" and scored - grey > 0:
        n, what, example, other = scored - grey, "in colour (channels that differ", colour_example, "colour"
    else:
        return ""
    what += f"; e.g. {example})" if example else ")"
    return (f"{n} of the {scored} images scored this run are {what} but {info.path} was trained on {info.trained_on} "
            f"images only: their scores are not comparable with its threshold. Check the camera or the folder, or train "
            f"a model on {other} images for them")


ALL_ANOMALOUS_MIN = 10  # scored images of a run all above the threshold before it is remarked on


def all_anomalous(info: ModelInfo, summary: dict[str, Any]) -> str:
    """What to say when every one of a run's scored images (at least ALL_ANOMALOUS_MIN) is above the threshold ("" when
    not): production batches hold mostly good parts, so this is more often images unlike the model's (another
    category's folder, another camera or lighting) than a batch of defects; scores do not say which."""
    scored, anomalous = summary["scored"], summary["anomalous"]
    if anomalous is None or scored < ALL_ANOMALOUS_MIN or anomalous < scored:
        return ""
    what = f"{info.path}" + (f" (category {info.category})" if info.category else "")
    return (f"all {scored} images scored are above the threshold of {what}: unless every one is defective, they are "
            "likely not what the model learned (another category's folder, another camera, lens or lighting); look at "
            "a few in `pni-ray report`")


def aborted(chunk: str, why: str) -> dict[str, Any]:
    """An encoded chunk with no rows that tells the driver to stop the run (`_Commits.all`), saying why."""
    return {"chunk": chunk, "parquet": b"", "n": 0, "n_failed": 0, "abort": why}


FAILED_ALONE = (f"scoring failed on it in its chunk and again on it alone (its worker died, under Ray after "
                f"{CHUNK_RETRIES + 1} tries each: a decoder crash or its memory limit; or the model raised on it: the "
                "run's log says which)")
# --engine local: the process is the worker (pni_ray.orchestration.score_inflight)
DIED_ALONE = ("the scoring process died on it in its chunk and again on it alone, in two runs or more before this "
              "one (--engine local: a decoder or model crash, or its memory)")


def failed_alone(paths: list[str], info: ModelInfo, map_format: str, why: str = FAILED_ALONE) -> dict[str, Any]:
    """Error rows, as `encode_chunk` writes them, for inputs whose workers failed in their chunk and alone."""
    errors = [f"{p}: not scored: {why}; --retry-failed tries it again" for p in paths]
    meta = {"paths": paths, "errors": errors, "scores": [None] * len(paths), "hw": [None] * len(paths),
            "content": [None] * len(paths)}
    return encode_chunk({"chunk": chunk_id(paths), "meta": json.dumps(meta), "maps": b""}, map_format,
                        _model_fields(info))


# ------------------------------------------------------------------------------------------
# engines: a stream of encoded chunks
# ------------------------------------------------------------------------------------------


@dataclass
class Options:
    batch_size: int = 8
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    map_format: str = "uint8"
    max_pixels: int = DEFAULT_MAX_PIXELS
    chunk_size: int = CHUNK_SIZE
    address: str | None = None
    address_named_by: str = ADDRESS_FLAG  # what gave `address`, for a refused join's message
    threads: int | None = None  # local engine only; default: $PNI_RAY_THREADS, else all cores
    stages: str = "auto"  # fused: decode+score+encode in the model actors; split: separate task stages
    backbone_runtime: str = "onnxruntime"  # exports only: "openvino" runs the backbone graph with OpenVINO
    backbone_precision: str = "auto"  # OpenVINO's inference precision: auto (its CPU default), f32, bf16
    # chunks queued on one model actor at once (None: Ray Data's default). A chunk queued behind one that kills
    # the actor dies with it: the isolation pass takes 1, so an image alone fails for its own sake only
    chunks_in_flight: int | None = None
    # how the caller names score's options in a refusal's remedy (the nightly job: its config's keys), as
    # address_named_by names where the address came from; an option not in it keeps its flag
    option_names: dict[str, str] = field(default_factory=dict)

    def named(self, flag: str) -> str:
        return self.option_names.get(flag, flag)


def check_options(opts: Options) -> None:
    """Refuse, before the model loads or OUT is touched, options no run can take."""
    for name, value in (("batch size", opts.batch_size), ("chunk size", opts.chunk_size),
                        ("max pixels", opts.max_pixels), ("threads", opts.threads)):
        if value is not None and value < 1:
            raise ScoreError(f"{name} must be >= 1, got {value}")
    if opts.workers is not None and opts.workers < 0:
        raise ScoreError(f"workers must be >= 0 (0 or none: one per CPU or GPU), got {opts.workers}")
    if opts.cpus_per_worker <= 0 or opts.gpus_per_worker < 0:
        raise ScoreError(f"CPUs per worker must be > 0 and GPUs per worker >= 0, got {opts.cpus_per_worker} and "
                         f"{opts.gpus_per_worker}")
    error = backbone_option_error(opts.backbone_runtime, opts.backbone_precision)
    if error:
        raise ScoreError(error)
    try:
        threads_from_env()  # the local engine's default, and each ONNX Runtime session's
    except ValueError as exc:
        raise ScoreError(str(exc)) from None
    if opts.backbone_runtime != "onnxruntime" and opts.gpus_per_worker > 0:
        raise ScoreError("--backbone-runtime openvino runs the backbone on the CPU: with --gpus-per-worker the "
                         "export runs on the GPU through onnxruntime (or TensorRT); drop one of the two")


def _model_fields(info: ModelInfo) -> dict[str, Any]:
    """What encode_chunk writes of the model into each row and the table's metadata."""
    return {"image_size": info.image_size, "threshold": info.threshold, "model_id": info.model_id,
            "category": info.category, "path": info.path}


def runtime_args(opts: Options) -> dict[str, str]:
    """How an export's graphs run (ScoreWorker's keyword arguments)."""
    return {"backbone_runtime": opts.backbone_runtime, "backbone_precision": opts.backbone_precision}


def _bound_worker(**kwargs: Any) -> type:
    """ScoreWorker with its arguments baked in: no constructor arguments in Ray's object store."""

    class BoundScoreWorker(ScoreWorker):
        def __init__(self) -> None:
            super().__init__(**kwargs)

    return BoundScoreWorker


def _chunk_rows(chunks: list[list[str]], preset: dict[str, str]) -> list[dict[str, Any]]:
    return [{"chunk": chunk_id(c), "meta": json.dumps({"paths": c, "preset": {p: preset[p] for p in c if p in preset}})}
            for c in chunks]


def join_scoring_ray(address: str | None = None, num_cpus: int | None = None, named_by: str = ADDRESS_FLAG) -> RaySession:
    """Join Ray the one shared way (ray_session.join_ray, looked up when called), saying where."""
    from pni_ray.orchestration.ray_session import join_ray

    session = join_ray(address, num_cpus=num_cpus, log_to_driver=True, named_by=named_by)
    log.info("ray: %s (from %s)", "embedded, this command's alone" if session.address == LOCAL else session.address,
             session.source)
    return session


def ensure_ray(address: str | None = None, num_cpus: int | None = None, named_by: str = ADDRESS_FLAG) -> bool:
    """Join Ray (join_scoring_ray); True if this call started it."""
    return join_scoring_ray(address, num_cpus, named_by).started


def check_placeable(opts: Options, session: RaySession) -> None:
    """Refuse a run whose actors Ray could never place on this machine's own Ray (it cannot grow, so they
    would wait for ever); on a joined cluster an autoscaler may add such a node, so only warn there."""
    problem = unplaceable("scoring worker", opts.cpus_per_worker, opts.gpus_per_worker, live_node_resources())
    if problem is None:
        return
    if not session.is_cluster:  # embedded, or an existing one-node session: as train-all decides
        raise ScoreError(f"{problem}: this machine's Ray cannot grow; lower them, or join a cluster that has such "
                         f"a node ({opts.address_named_by})")
    log.warning("%s: the workers wait until the cluster's autoscaler adds such a node (a fixed cluster never "
                "will: stop the run and lower them)", problem)


def _configure_ray_data() -> int:
    """Quiet progress, and failed chunks dropped rather than ending the run (`score` isolates their images).
    Returns the context's max_errored_blocks before, which `run_ray` puts back: other pipelines of the process
    (a notebook's, the demo's) keep failing on a failed block."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    before, ctx.max_errored_blocks = ctx.max_errored_blocks, -1
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # its "Progress bars disabled. To enable, set ..." on every run: score's own bar is --progress
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    return before


NODES_WAIT_SECONDS = 120.0  # how long a run waits for a joined cluster's first CPU (GPU) node, polled every 2 s


def cluster_resources_when_ready(opts: Options, resources: Callable[[], dict[str, float]],
                                 wait: float = NODES_WAIT_SECONDS, poll: float = 2.0) -> dict[str, float]:
    """The cluster's resources once it shows what the model workers need. The pool is sized once, when the run
    starts: on a head started with num-cpus 0 (jobs/README's RayJob) before its worker nodes have joined, it saw
    no CPUs and scored the whole run with one worker. --workers (nightly: workers) sizes it without waiting."""
    kind = "GPU" if opts.gpus_per_worker > 0 else "CPU"
    found = resources()
    if opts.workers or found.get(kind, 0) > 0:
        return found
    log.info("ray scoring: the cluster shows no %s yet (a head with num-cpus 0 whose worker nodes have not joined?): "
             "waiting up to %.0f s for one before sizing the worker pool", kind, wait)
    deadline = time.monotonic() + wait
    while found.get(kind, 0) <= 0 and time.monotonic() < deadline:
        time.sleep(poll)
        found = resources()
    if found.get(kind, 0) <= 0:
        log.warning("ray scoring: no %s joined the cluster in %.0f s: one model worker for the whole run; give "
                    "--workers N (nightly: workers) to size the pool for the nodes that will join", kind, wait)
    else:
        time.sleep(poll)  # the other worker nodes of a group start together: one more look takes them in
        found = resources()
    return found


def worker_count(opts: Options, resources: dict[str, float], n_chunks: int) -> int:
    """Model actors for a run: --workers, else the cluster's GPUs or CPUs over each actor's share; never
    more than the chunks to score, since an actor scores whole chunks (the cut is logged, not silent)."""
    if opts.workers:
        workers = opts.workers
    elif opts.gpus_per_worker > 0:
        workers = max(1, int(resources.get("GPU", 0) // opts.gpus_per_worker))
    else:
        workers = max(1, int(resources.get("CPU", 1) // max(opts.cpus_per_worker, 1e-3)))
    used = max(1, min(workers, n_chunks))
    cpus = resources.get("CPU", 0)
    if opts.gpus_per_worker == 0 and cpus and used * opts.cpus_per_worker > cpus:
        log.warning("ray scoring: %d workers x %g CPU, but the cluster has %g CPUs: %d run at a time, the rest wait "
                    "(--workers)", used, opts.cpus_per_worker, cpus, max(1, int(cpus // opts.cpus_per_worker)))
    if used < workers:
        log.info("ray scoring: %d chunk(s) to score, of at most %d images each (--chunk-size): %d worker(s), not %d",
                 n_chunks, opts.chunk_size, used, workers)
    return used


def run_ray(rows: list[dict[str, Any]], info: ModelInfo, opts: Options) -> Iterator[dict[str, Any]]:
    """The Ray Data pipeline; yields encoded chunks as they finish."""
    import ray
    import ray.data

    session = join_scoring_ray(opts.address, named_by=opts.address_named_by)
    started = session.started
    errored_blocks = None
    try:
        check_placeable(opts, session)
        errored_blocks = _configure_ray_data()
        workers = worker_count(opts, cluster_resources_when_ready(opts, ray.cluster_resources), len(rows))
        model = _model_fields(info)
        decode = {"geometry": info.geometry, "max_pixels": opts.max_pixels}
        encode = {"map_format": opts.map_format, "model": model}
        device = "cuda" if opts.gpus_per_worker > 0 else "cpu"
        # fused on CPUs: each extra Ray worker process costs an interpreter and its imports, which on
        # a few cores outweighs overlapping decode with inference; split when actors hold GPUs, so
        # that CPU tasks decode while the GPU scores.
        stages = opts.stages if opts.stages != "auto" else ("split" if opts.gpus_per_worker > 0 else "fused")
        log.info("ray scoring: %d chunks, %d workers x %.2g CPU / %.2g GPU, %s stages", len(rows), workers,
                 opts.cpus_per_worker, opts.gpus_per_worker, stages)
        worker_args = {"model_path": info.path, "threads": max(1, int(opts.cpus_per_worker)),
                       "batch_size": opts.batch_size, "device": device, "model_id": info.model_id, **runtime_args(opts)}
        in_flight = {"max_tasks_in_flight_per_actor": opts.chunks_in_flight} if opts.chunks_in_flight else {}
        actors = {"compute": ray.data.ActorPoolStrategy(size=workers, **in_flight), "num_cpus": opts.cpus_per_worker,
                  "num_gpus": opts.gpus_per_worker, "max_task_retries": CHUNK_RETRIES}  # actors still restart
        ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
        # the retry bounds have no named parameter yet: Ray's deprecation of its remote arguments is answered by
        # pyproject's ray<2.64, not by a warning every run prints and no user can act on
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
            if stages == "fused":
                ds = ds.map(_bound_worker(**worker_args, decode=decode, encode=encode), **actors)
            else:
                # Decode/encode tasks reserve no CPU, so actors holding every CPU cannot starve them;
                # their own concurrency bounds them.
                io_tasks = ray.data.TaskPoolStrategy(size=max(2, workers))
                ds = ds.map(decode_chunk, fn_kwargs=decode, num_cpus=0, compute=io_tasks, max_retries=CHUNK_RETRIES)
                ds = ds.map(_bound_worker(**worker_args), **actors)
                ds = ds.map(encode_chunk, fn_kwargs=encode, num_cpus=0, compute=io_tasks, max_retries=CHUNK_RETRIES)
        yield from ds.iter_rows()
    finally:
        if errored_blocks is not None:
            ray.data.DataContext.get_current().max_errored_blocks = errored_blocks
        if started:
            ray.shutdown()


def run_local(rows: list[dict[str, Any]], info: ModelInfo, opts: Options) -> Iterator[dict[str, Any]]:
    """The same stages in this process, no Ray: for small jobs, tests and machines without Ray."""
    model = _model_fields(info)
    threads = opts.threads or threads_from_env() or os.cpu_count() or 1
    worker = ScoreWorker(info.path, threads=threads, batch_size=opts.batch_size,
                         decode={"geometry": info.geometry, "max_pixels": opts.max_pixels},
                         encode={"map_format": opts.map_format, "model": model}, model_id=info.model_id,
                         **runtime_args(opts))
    for row in rows:
        try:
            yield worker(row)
        except ModelFailed as exc:  # lost, as under Ray: `_isolate_lost` decides between the model and the images
            log.warning("%s", exc)


ENGINES = {"ray": run_ray, "local": run_local}


@dataclass
class _Commits:
    """A run's commits: each finished chunk's part written to OUT (checked still the folder locked), the bar
    and the counts updated."""

    out: Path
    still_ours: Callable[[], None]
    bar: Any
    total: int = 0  # inputs this run scores
    done: int = 0
    failed: int = 0
    grey: int = 0  # scored inputs whose three channels are equal
    grey_example: str = ""
    colour_example: str = ""
    scored_example: str = ""  # an input this run scored: whether the workers still score (`_workers_score`)
    first: float | None = None  # when the first chunk was committed
    chunks: set[str] = field(default_factory=set)  # ids of the chunks committed: which inputs a run lost
    started: float = field(default_factory=time.perf_counter)
    logged: float = field(default_factory=time.perf_counter)  # when progress was last logged (no bar)
    # what changes OUT before the first part (the last summary removed, --retry-failed's rows): run once, at the
    # first commit, so a run refused before it scores anything (Ray not joined, the model not loaded) leaves OUT
    before_first: Callable[[], None] | None = None

    def start_writing(self) -> None:
        if self.before_first is not None:
            self.before_first()
            self.before_first = None

    def all(self, results: Iterator[dict[str, Any]]) -> None:
        """Commit each result as it arrives; stop the run if a worker found the model changed."""
        for result in results:
            if result.get("abort"):
                raise ScoreError(result["abort"])
            self.still_ours()  # OUT removed mid-run: stop, rather than write parts nothing can resume
            self.start_writing()
            commit(self.out, result)
            self.chunks.add(result["chunk"])
            if self.first is None:
                self.first = time.perf_counter()
            self.done += int(result["n"])
            self.failed += int(result["n_failed"])
            self.grey += int(result.get("n_grey", 0))
            self.grey_example = self.grey_example or result.get("grey_example", "")
            self.colour_example = self.colour_example or result.get("colour_example", "")
            self.scored_example = self.scored_example or result.get("scored_example", "")
            self.bar.update(int(result["n"]))
            self.bar.set_postfix(failed=self.failed, refresh=False)
            if self.bar.disable:
                self._log_progress()

    def _log_progress(self) -> None:
        """Without a bar (a job's log, --no-progress) a line at most every PROGRESS_LOG_SECONDS: how far, how fast."""
        now = time.perf_counter()
        if now - self.logged < PROGRESS_LOG_SECONDS or self.done >= self.total:
            return
        self.logged = now
        rate = self.done / max(now - self.started, 1e-9)
        log.info("scored %d of %d (%d failed), %.1f images/s, about %.0f min left", self.done, self.total, self.failed,
                 rate, (self.total - self.done) / max(rate, 1e-9) / 60)


def _stream(engine: str, rows: list[dict[str, Any]], info: ModelInfo, opts: Options, out: Path,
            suspects: dict[str, int] | None = None, kind: str = "chunk") -> Iterator[dict[str, Any]]:
    """The engine's encoded chunks; under --engine local each chunk recorded in OUT before it is scored, with the
    suspects not tried yet, so a run after a crash of this process knows which images it died on (`score_inflight`)."""
    if engine == "local":
        return ENGINES[engine](inflight.recording(out, rows, suspects or {}, kind), info, opts)
    return ENGINES[engine](rows, info, opts)


def _workers_score(path: str, engine: str, info: ModelInfo, opts: Options, out: Path) -> bool | None:
    """Whether the workers score `path`, an input they scored before, now: what tells images that fail alone (their
    own error rows) from workers or a model that fail on everything (no rows, exit 3). None: it came back an error
    row of its own (rewritten, deleted or too large since), which says nothing of the model. Not committed."""
    try:
        results = list(_stream(engine, _chunk_rows([[path]], {}), info, opts, out, kind="probe"))
    except Exception as exc:  # noqa: BLE001 - Ray's engine drops what the local one may raise
        log.warning("%s, scored before, fails now too (%s: %s)", path, exc.__class__.__name__, exc)
        return False
    finally:  # the process lived through it: a later death is not this image's
        inflight.clear(out)
    if not results:  # lost: a worker died on it, or the model failed on it (ModelFailed)
        return False
    return True if any(r.get("scored_example") for r in results) else None


def _workers_work(commits: _Commits, engine: str, info: ModelInfo, opts: Options) -> tuple[str, bool | None]:
    """(an image scored before, whether the workers score it now): this run's, then up to three in OUT; ("", None)
    when none answers (nothing scored before, or each now an error row of its own)."""
    def candidates() -> Iterator[str]:  # OUT is read only when this run's own image does not answer
        if commits.scored_example:
            yield commits.scored_example
        yield from (p for p in scored_in(commits.out, limit=3) if p != commits.scored_example)

    for known in candidates():
        works = _workers_score(known, engine, info, opts, commits.out)
        if works is not None:
            return known, works
    return "", None


def _isolate_lost(rows: list[dict[str, Any]], engine: str, info: ModelInfo, opts: Options, preset: dict[str, str],
                  commits: _Commits, earlier: int) -> None:
    """Inputs whose chunk failed every try (Ray Data drops it: a worker died or raised on one of its images; the
    model raised on each of its images, ModelFailed) are scored again one at a time; those that fail alone get an
    error row, so one bad image costs its own row only and a rerun does not meet it again. Before that pass and
    again before those rows, an image the workers scored before (this run's, or one in OUT) is scored again:
    failing, the workers or the model fail on every image, not the images, and the run stops (exit 3) without
    error rows, to be rerun once fixed. With no such image (a first run that scored nothing), several inputs
    failing alone are taken for the same. A resume or a --retry-failed run may hold only the bad images: it
    writes their rows."""
    lost = [p for row in rows if row["chunk"] not in commits.chunks for p in json.loads(row["meta"])["paths"]]
    if not lost:
        return
    alone = replace(opts, chunks_in_flight=1)  # else a good image queued behind a killer dies with it

    def check_workers(when: str) -> str:
        known, works = _workers_work(commits, engine, info, alone)
        if works is False:
            raise ScoreError(f"the scoring workers failed on {len(lost)} input(s){when}, and now fail on {known}, "
                             "which they scored before: a failure of the workers or the model (its device, its "
                             "memory), not of the images (see the errors above); no error rows were written for them: "
                             "rerun the same command to resume once it is fixed")
        return known

    # first: with the workers broken (a GPU lost mid-run), each lost image tried alone would fail too
    check_workers(" in chunks they could not score")
    log.warning("%d input(s) in chunks whose worker died on every try or raised (see the errors above): scoring "
                "them one at a time", len(lost))
    commits.all(_stream(engine, _chunk_rows(make_chunks(lost, 1), preset), info, alone, commits.out))
    lost = [p for p in lost if chunk_id([p]) not in commits.chunks]
    if not lost:
        return
    known = check_workers(", also one at a time")  # again: broken since the first ask, they fail everything
    if not known and commits.done == 0 and len(lost) > 1 and not earlier:
        raise ScoreError(f"the scoring workers failed on each of {len(lost)} inputs, also one at a time, and scored "
                         "none: a failure of the workers, not of the images (see the errors above); no error rows "
                         "were written for them: rerun the same command to resume once it is fixed")
    log.error("%d input(s) failed alone as in their chunk: an error row each (first: %s)", len(lost), lost[0])
    commits.all(iter([failed_alone(lost, info, opts.map_format)]))


def _died_alone(paths: list[str], engine: str, info: ModelInfo, opts: Options, commits: _Commits) -> bool:
    """Error rows for inputs the process died on alone twice (`score_inflight`), once an image scored before is
    scored again (recorded as the probe): if the model fails on it too, the model fails, not these images (refused);
    with no image to ask, no rows (False): they are tried again, after every other input."""
    known, works = _workers_work(commits, engine, info, opts)
    if works is None:
        log.warning("%d input(s) killed the scoring process alone twice (first: %s), but no image scored before "
                    "is there to tell them from a model that kills it on every image: tried again, last", len(paths),
                    paths[0])
        return False
    if works is False:
        raise ScoreError(f"the last runs' process died on {paths[0]} alone, and the model now fails on {known}, "
                         "which it scored before: a failure of the model or its device, not of the image (see the "
                         "errors above); no error rows were written: rerun the same command to resume once it is fixed")
    log.error("%d input(s) killed the scoring process alone twice, in the runs before this one: an error row each "
              "(first: %s)", len(paths), paths[0])
    commits.all(iter([failed_alone(paths, info, opts.map_format, why=DIED_ALONE)]))
    return True


def score(
    model: Path | str,
    inputs: Sequence[str],
    out: Path | str,
    opts: Options | None = None,
    engine: str = "ray",
    top_n: int = 20,
    progress: bool = False,
    retry: bool = False,
) -> dict[str, Any]:
    """Score every input into OUT (resuming), write OUT/_summary.json, return the summary."""
    opts = opts or Options()
    if opts.map_format not in MAP_FORMATS:
        raise ScoreError(f"map format must be one of {MAP_FORMATS}, got {opts.map_format!r}")
    if any(not str(spec).strip() for spec in inputs):  # it would name the working directory
        raise ScoreError("an input is empty (an unset variable?): each names a file, folder, glob or list file; "
                         "to score the current directory, name it: .")
    out = Path(out).resolve()
    t0 = time.perf_counter()
    check_options(opts)
    info = describe_model(model, opts.backbone_runtime, opts.backbone_precision)
    runtime = info.backbone
    expanded = expand_inputs(inputs)
    if (out / "manifest.json").exists():
        raise ScoreError(f"{out} is a model directory (it holds manifest.json): scores go to a directory of "
                         f"their own; use another {opts.named('--out')}")
    if inside(out, info.path):  # retraining or re-exporting the model with --force would delete them
        raise ScoreError(f"{out} is inside the model {info.path}: scores go to a directory of their own; use "
                         f"another {opts.named('--out')}")
    with locked(out) as still_ours:
        check_dataset(out, info, opts.map_format, runtime, opts.named)
        stale = remove_stale_temps(out)
        retrying = {row_path(p) for p in (*expanded.paths, *expanded.stand_ins)} if retry else set()
        failed_before = error_paths(out, retrying) if retrying else set()
        retried = len(failed_before)
        done = committed_paths(out) - failed_before  # --retry-failed: scored again, rows removed at the first write

        def start_writing() -> None:
            (out / SUMMARY_FILE).unlink(missing_ok=True)  # until this run finishes, no summary claims OUT is complete
            if retrying:
                retry_failed(out, retrying)

        todo = [p for p in expanded.paths if row_path(p) not in done]
        # a dead local run's suspects, scored last and alone (`score_inflight`); a Ray run isolates them in-run.
        # Fewest deaths first: an image that never killed the process alone does not wait behind one that did
        suspects = inflight.after_a_crash(out, todo) if engine == "local" else {}
        regular = _chunk_rows(make_chunks([p for p in todo if p not in suspects], opts.chunk_size),
                              expanded.preset_errors)
        rows = regular + _chunk_rows(make_chunks(sorted(suspects, key=suspects.__getitem__), 1), expanded.preset_errors)
        log.info("%d inputs (%d duplicates ignored), %d already in %s, %d to score in %d chunks",
                 len(expanded.paths), expanded.duplicates, len(expanded.paths) - len(todo), out, len(todo), len(rows))
        t_run = time.perf_counter()
        from tqdm import tqdm

        with tqdm(total=len(todo), unit="img", desc="score", disable=not progress or not rows, file=sys.stderr,
                  dynamic_ncols=True) as bar, inflight.kept_for_the_next_run(out, lambda: suspects):
            commits = _Commits(out, still_ours, bar, total=len(todo), before_first=start_writing)
            if regular:
                commits.all(_stream(engine, regular, info, opts, out, suspects))
            # after the other inputs, so an image this run scored can tell a killer from a model that kills
            died = [p for p, deaths in suspects.items() if deaths >= inflight.LIVES and p not in expanded.preset_errors]
            if died and _died_alone(died, engine, info, opts, commits):
                gone = {chunk_id([p]) for p in died}
                rows = [row for row in rows if row["chunk"] not in gone]
                suspects = {p: deaths for p, deaths in suspects.items() if p not in died}
            if len(rows) > len(regular):
                commits.all(_stream(engine, rows[len(regular):], info, opts, out, suspects))
            if rows:
                _isolate_lost(rows, engine, info, opts, expanded.preset_errors, commits,
                              earlier=len(expanded.paths) - len(todo))
            commits.start_writing()  # nothing to score (or every chunk lost): stale stand-in rows still go
        n_done, n_failed, t_first = commits.done, commits.failed, commits.first
        unlike = unlike_training(info, n_done - n_failed, commits.grey, commits.grey_example, commits.colour_example)
        if unlike:
            log.warning("%s", unlike)
        seconds = time.perf_counter() - t_run
        summary = summarise(out, expanded, info, top_n=top_n)
        suspicious = all_anomalous(info, summary)
        if suspicious:
            log.warning("%s", suspicious)
        summary["run"] = {
            "engine": engine,
            "map_format": opts.map_format,
            "backbone_runtime": runtime,
            "already_done": len(expanded.paths) - len(todo),
            "scheduled": len(todo),
            "rows_this_run": n_done,  # scored + failed
            "scored_this_run": n_done - n_failed,
            "failed_this_run": n_failed,
            "chunks": len(rows),
            "stale_temp_files_removed": stale,
            "error_rows_retried": retried,
            "grey_inputs_scored": commits.grey,  # three equal channels, of scored_this_run
            "unlike_training": unlike or None,
            "all_anomalous": suspicious or None,  # every scored image above the threshold (all_anomalous)
            "seconds": round(time.perf_counter() - t0, 3),
            "pipeline_seconds": round(seconds, 3),
            # start-up (Ray, model loading) and the first chunk, then the steady state
            "first_chunk_seconds": None if t_first is None else round(t_first - t_run, 3),
            "images_per_s": round(n_done / seconds, 3) if n_done and seconds > 0 else None,
            "finished_at": now_utc().isoformat(),
        }
        atomic_write_json(out / SUMMARY_FILE, summary)
    return summary
