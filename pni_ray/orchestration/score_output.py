"""`pni-ray score`'s output directory: one run at a time (a lock), one model and map format per OUT
(its identity file), atomic part commits, error rows made retryable, and the summary read back from
the committed parts, which are the only source of truth."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from pni_ray.orchestration.score_inputs import Inputs
from pni_ray.orchestration.score_model import ModelInfo, ScoreError
from pni_ray.results import (
    PATH_TEXT,
    TABLE_FORMAT,
    atomic_write_bytes,
    atomic_write_json,
    has_threshold,
    now_utc,
    part_files,
    path_of_row,
    read_part,
    read_table,
    row_path,
    table_to_parquet_bytes,
)

DATASET_FILE = "_dataset.json"
SUMMARY_FILE = "_summary.json"
LOCK_FILE = "_lock"
MAX_FAILURES_LISTED = 1000


class OutInUse(ScoreError):
    """Another run holds OUT's lock."""


@contextlib.contextmanager
def locked(out: Path) -> Iterator[Callable[[], None]]:
    """One run per OUT at a time (an flock: released by the kernel even on SIGKILL). Yields a check that OUT is
    still the folder locked: one removed (and made again) during the run holds neither the lock nor its identity,
    so parts written there could never be resumed and a second run could lock it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fh = open(out / LOCK_FILE, "a+")
    except OSError as exc:
        raise ScoreError(f"{out}: cannot write the output directory ({exc.strerror or exc}: {exc.filename or out}); "
                         "choose a writable --out") from exc
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise OutInUse(f"{out}: another pni-ray run (score or nightly) is writing here") from exc
        held = os.fstat(fh.fileno())

        def still_ours() -> None:
            try:
                now = os.stat(out / LOCK_FILE)
            except OSError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
                raise ScoreError(f"{out} was removed or replaced during the run (its {LOCK_FILE} is not this run's): "
                                 "stopped; parts this run committed went with the removed folder. Rerun to score "
                                 "into the folder now at that path")

        try:
            yield still_ours
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def check_dataset(out: Path, info: ModelInfo, map_format: str, runtime: str = "onnxruntime",
                  named: Callable[[str], str] = str) -> None:
    """OUT holds the scores of one model in one map format from one backbone runtime; refuse to mix.

    The identity binds OUT once a part is committed: a run that committed none (a refused Ray join, a
    wrong --address, a kill before the first chunk) leaves an identity that the next run replaces.
    An OUT whose identity has no ``path_text`` was written before `row_path` doubled backslashes: where
    none of its rows holds a backslash, both forms read it alike and it is marked as the current form;
    otherwise a row's text could stand for two files (a name with a backslash, a non-UTF-8 name), and
    resuming could take one file's row for the other's, so it is refused."""
    path = out / DATASET_FILE
    parts = part_files(out)
    if path.is_file() and parts:
        ds = json.loads(path.read_text())
        if "source_model_id" not in ds and ds.get("model_kind") == "export" and ds.get("model_id") == info.source_model_id:
            raise ScoreError(f"{out} was written by an older pni-ray, which named an export by its bundle's id, so "
                             f"it cannot tell which export of that bundle (FP32, INT8, ...) scored it: use another {named('--out')}")
        if ds.get("model_id") != info.model_id:
            raise ScoreError(f"{out} holds scores of another model (model_id {str(ds.get('model_id'))[:12]}..., "
                             f"from {ds.get('model_path')}); this model is {info.model_id[:12]}...: use another {named('--out')}")
        if ds.get("map_format") != map_format:
            raise ScoreError(f"{out} holds maps in format {ds.get('map_format')!r}, not {map_format!r}: "
                             f"use the same {named('--map-format')} or another {named('--out')}")
        # an export's backbone may run in several runtimes; a bundle's only in torch (OUTs written before
        # bundles recorded "torch" say "onnxruntime" there, or nothing: the same model either way)
        if info.kind == "export" and ds.get("backbone_runtime", "onnxruntime") != runtime:
            raise ScoreError(f"{out} holds scores whose backbone ran in {ds.get('backbone_runtime', 'onnxruntime')}, "
                             f"this run's would run in {runtime}: use the same {named('--backbone-runtime')} and "
                             f"{named('--backbone-precision')}, or another {named('--out')}")
        form = ds.get("path_text", 1)
        if form > PATH_TEXT:
            raise ScoreError(f"{out} was written by a newer pni-ray (path_text {form}): upgrade, or use another {named('--out')}")
        if form < PATH_TEXT:
            escaped = min((p for p in committed_paths(out) if "\\" in p), default=None)  # the first, in order
            if escaped is not None:
                raise ScoreError(f"{out} was written by an older pni-ray, whose path column cannot tell a name with a "
                                 f"backslash from a non-UTF-8 one ({escaped}): resuming could take one file's row for "
                                 f"another's; use another {named('--out')}")
            atomic_write_json(path, {**ds, "path_text": PATH_TEXT})  # read alike in both forms
        return
    if parts:
        raise ScoreError(f"{out} has part files but no {DATASET_FILE}: not a pni-ray score output, use another {named('--out')}")
    atomic_write_json(path, {"format": TABLE_FORMAT, "path_text": PATH_TEXT, "model_id": info.model_id,
                             "model_path": info.path, "model_kind": info.kind, "source_model_id": info.source_model_id,
                             "category": info.category, "threshold": json_float(info.threshold),
                             "map_format": map_format, "backbone_runtime": runtime, "created_at": now_utc().isoformat(),
                             # how the model reads 16-bit grey: `report` shows the images as they were scored
                             "white_level": ((info.geometry.get("config") or {}).get("geometry") or {}).get("white_level")})


def json_float(x: float) -> float | None:
    """JSON has no Infinity: a model without a threshold is written as null."""
    return float(x) if math.isfinite(x) else None


def remove_stale_temps(out: Path) -> int:
    """Temp files of a run killed mid-write: parts, summary, identity (removed only while holding the lock)."""
    n = 0
    for p in out.glob(".*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def committed_paths(out: Path) -> set[str]:
    return set(read_table(out, columns=["path"]).column("path").to_pylist())


def _path_errors(out: Path) -> Iterator[tuple[str, str | None]]:
    """(path, error) of each row in OUT; error None for a scored row."""
    table = read_table(out, columns=["path", "error"])
    return zip(table.column("path").to_pylist(), table.column("error").to_pylist())


def error_paths(out: Path, of: set[str]) -> set[str]:
    """The paths of `of` whose rows in OUT are error rows only (what --retry-failed scores again; a path that also
    holds a scored row keeps it, its error rows only removed)."""
    failed, scored = set(), set()
    for p, e in _path_errors(out):
        if p in of:
            (scored if e is None else failed).add(p)
    return failed - scored


def scored_in(out: Path, limit: int = 3) -> list[str]:
    """Up to `limit` inputs OUT holds a scored row of whose files are still there: ones the workers scored before."""
    found: list[str] = []
    for text, error in _path_errors(out):
        if error is None and os.path.isfile(path_of_row(text)):
            found.append(path_of_row(text))
            if len(found) >= limit:
                break
    return found


def commit(out: Path, result: dict[str, Any]) -> Path:
    final = out / f"part-{result['chunk']}.parquet"
    atomic_write_bytes(final, result["parquet"])
    return final


def retry_failed(out: Path, paths: set[str]) -> int:
    """Rewrite each part without the error rows of `paths` (this run's inputs, as `row_path` writes
    them; atomic replace of the same name), so those inputs rerun; other inputs' error rows stay."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = pa.array(sorted(paths), type=pa.string())
    n = 0
    for part in part_files(out):
        table = read_part(part)
        bad = pc.and_(pc.is_valid(table.column("error")), pc.is_in(table.column("path"), value_set=wanted))
        n_bad = pc.sum(bad).as_py() or 0
        if not n_bad:
            continue
        kept = table.filter(pc.invert(bad))
        if kept.num_rows:
            atomic_write_bytes(part, table_to_parquet_bytes(kept))
        else:
            part.unlink()
        n += n_bad
    return n


def summarise(out: Path, inputs: Inputs, info: ModelInfo, top_n: int = 20) -> dict[str, Any]:
    """Counts over this run's inputs, read back from the committed parts (the source of truth)."""
    table = read_table(out, columns=["path", "image_score", "is_anomalous", "error"])
    wanted = {row_path(p) for p in inputs.paths}
    paths = table.column("path").to_pylist()
    scores = table.column("image_score").to_pylist()
    flags = table.column("is_anomalous").to_pylist()
    errs = table.column("error").to_pylist()
    seen: dict[str, int] = {}
    scored, failures = [], []
    other_failed = 0  # error rows of inputs this run does not name (a path mistyped in an earlier run)
    for p, s, a, e in zip(paths, scores, flags, errs):
        if p not in wanted:
            other_failed += e is not None
            continue
        seen[p] = seen.get(p, 0) + 1
        if e is None:
            scored.append((s, p, a))
        else:
            failures.append({"path": p, "error": e})
    decided = has_threshold(info.threshold)
    anomalous = sum(1 for _, _, a in scored if a) if decided else None  # None: the model has no threshold
    scored.sort(key=lambda t: (-t[0], t[1]))
    failures.sort(key=lambda f: f["path"])
    n_dup = sum(c - 1 for c in seen.values() if c > 1)
    return {
        "out": str(out),
        "model": info.path,
        "model_id": info.model_id,
        "model_kind": info.kind,
        "category": info.category,
        "threshold": json_float(info.threshold),
        "inputs": len(inputs.paths),
        "duplicates_ignored": inputs.duplicates,
        "rows": sum(seen.values()),  # of this run's inputs
        # OUT keeps every row it was given: those of inputs earlier runs named and this one does not
        "other_rows": len(paths) - sum(seen.values()),
        "other_failed_rows": other_failed,
        "missing": len(wanted) - len(seen),
        "duplicate_rows": n_dup,
        "scored": len(scored),
        "failed": len(failures),
        "anomalous": anomalous,
        "anomaly_rate": (anomalous / len(scored)) if scored and anomalous is not None else None,
        # the model's verdict, not the row's: a no-threshold OUT resumed from before rows were null holds False rows
        "top": [{"path": p, "image_score": s, "is_anomalous": a if decided else None} for s, p, a in scored[:top_n]],
        "failures": failures[:MAX_FAILURES_LISTED],
        "failures_truncated": len(failures) > MAX_FAILURES_LISTED,
    }
