"""What a `--engine local` scoring run was doing when its process died: what Ray tells the driver, and a process
cannot tell itself.

Under Ray a worker that dies on an image is seen by the driver, which tries the chunk again and then its images
one at a time (`score._isolate_lost`). Under `--engine local` the worker is the run's own process: an image that
crashes its decoder or the model (a segfault, the OOM killer) takes the run with it, and every rerun would meet
that image at the same place and die again, never scoring the images after it. So before each chunk the run
records the chunk's paths in OUT/_inflight.json, and a run that stops by itself (finished, failed, refused after
it planned, or interrupted) removes the record. A record found at the next start says the process died on those
paths: that run scores them first, one at a time, each recorded as a suspect. A suspect found at a start died
alone too, its second death: it gets an error row, once an image scored before still scores (else the model or
the machine crashes, not the image). A record of that check ("probe") says the process died on an image it had
scored before: the run is refused and the record removed, so the run after tries again.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pni_ray.orchestration.score_model import ScoreError
from pni_ray.results import atomic_write_json, now_utc, row_path

log = logging.getLogger(__name__)

INFLIGHT_FILE = "_inflight.json"
KINDS = ("chunk", "suspect", "probe")  # a chunk as planned; one path after a death; an image scored before


@dataclass(frozen=True)
class Inflight:
    """The record a process left when it died: the `path` column texts (`row_path`) it was scoring, and why."""

    paths: frozenset[str]
    kind: str
    started: str = ""

    def plan(self, todo: list[str]) -> tuple[list[str], list[str]]:
        """(todo paths that died alone as suspects: an error row each; todo paths to score one at a time first)."""
        hit = [p for p in todo if row_path(p) in self.paths]
        return (hit, []) if self.kind == "suspect" else ([], hit)


def read(out: Path) -> Inflight | None:
    """The record in OUT, None without one; an unreadable record is ignored with a warning (it only speeds up
    finding an image that crashes the process, which the next deaths find again)."""
    path = out / INFLIGHT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s), ignored", path, exc)
        return None
    fields = data if isinstance(data, dict) else {}
    paths, kind = fields.get("paths"), fields.get("kind")
    if kind not in KINDS or not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        log.warning("%s: not a record of paths and their kind (%s), ignored", path, ", ".join(KINDS))
        return None
    return Inflight(frozenset(paths), kind, str(fields.get("started", "")))


def record(out: Path, paths: list[str], kind: str) -> None:
    """Write the record before the paths are scored (atomic: a death mid-write leaves the previous one)."""
    atomic_write_json(out / INFLIGHT_FILE, {"paths": [row_path(p) for p in paths], "kind": kind, "pid": os.getpid(),
                                            "started": now_utc().isoformat()})


def clear(out: Path) -> None:
    (out / INFLIGHT_FILE).unlink(missing_ok=True)


def recording(out: Path, rows: Iterable[dict[str, Any]], kind_of: Callable[[dict[str, Any]], str]
              ) -> Iterator[dict[str, Any]]:
    """The engine's chunk rows, each recorded as it is taken: the local engine takes a row only after it
    committed the one before, so the record names what the process was scoring."""
    for row in rows:
        record(out, json.loads(row["meta"])["paths"], kind_of(row))
        yield row


def after_a_crash(out: Path, todo: list[str]) -> tuple[list[str], list[str]]:
    """(inputs the process died on alone: an error row each; inputs to score one at a time first) from the record a
    local run left when its process died; nothing without one. Refused where the process died on an image it had
    scored before (the model or the machine, not the images): the record is removed, so the next run tries again."""
    crashed = read(out)
    if crashed is None:
        return [], []
    if crashed.kind == "probe":
        clear(out)
        raise ScoreError(f"the last run on {out} (--engine local, started {crashed.started}) died while scoring "
                         f"{next(iter(crashed.paths))}, an image it had scored before, to tell a crashing image from a "
                         "crashing model: the model, its device or the machine (its memory) kill the process, not the "
                         "images; no error rows were written. Once that is fixed, rerun the same command to resume")
    died_alone, suspects = crashed.plan(todo)
    if suspects:
        log.warning("the last run on %s (--engine local, started %s) died while scoring a chunk of %d input(s): "
                    "scoring them one at a time first", out, crashed.started, len(suspects))
    return died_alone, suspects


@contextmanager
def removed_at_exit(out: Path) -> Iterator[None]:
    """The record removed when the run stops by itself, however it stops: only a dead process leaves one."""
    try:
        yield
    finally:
        clear(out)
