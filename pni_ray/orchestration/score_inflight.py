"""What a `--engine local` scoring run was doing when its process died: what Ray tells the driver, and a process
cannot tell itself.

Under Ray a worker that dies on an image is seen by the driver, which tries the chunk again and then its images
one at a time (`score._isolate_lost`). Under `--engine local` the worker is the run's own process: an image that
crashes its decoder or the model (a segfault, the OOM killer) takes the run with it, and every rerun would meet
that image at the same place and die again, never scoring the images after it. So before each chunk the run
records in OUT/_inflight.json the chunk's paths and the suspects it has not tried yet, and a run that stops by
itself (finished, failed, refused after it planned, or interrupted) removes the record.

The next local run reads it: the dead chunk's images join the suspects, each with the number of times the process
died on it alone. Suspects are scored last, one at a time, so every other image is scored first (and one scored
before is there to ask). A suspect the process died on alone twice gets an error row, once an image scored before
still scores; with none to ask it is tried again, and if the known image kills the process too (the record says
"probe"), the model or the machine is at fault: that run is refused, the record removed. An image that kills the
process so costs four runs, in which every other image is scored by the second; a death that was no image's fault
(a user's SIGKILL, another job's memory) costs a suspect one of its two lives, not its row.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from pni_ray.orchestration.score_model import ScoreError
from pni_ray.results import atomic_write_json, now_utc, row_path

log = logging.getLogger(__name__)

INFLIGHT_FILE = "_inflight.json"
KINDS = ("chunk", "suspect", "probe")  # a planned chunk; one suspect alone; an image scored before, asked
LIVES = 2  # deaths alone before a suspect's error row (one may be no fault of its own)


@dataclass(frozen=True)
class Inflight:
    """The record a process left when it died: the `path` column texts (`row_path`) it was scoring, what kind of
    work that was, and the suspects not tried yet with the deaths each had alone."""

    paths: tuple[str, ...]
    kind: str
    pending: dict[str, int] = field(default_factory=dict)
    started: str = ""

    def suspects(self) -> dict[str, int]:
        """Every suspect after this death, with its deaths alone."""
        suspects = dict(self.pending)
        if self.kind == "suspect":
            suspects[self.paths[0]] = suspects.get(self.paths[0], 0) + 1
        else:
            suspects.update({p: suspects.get(p, 0) for p in self.paths})
        return suspects


def read(out: Path) -> Inflight | None:
    """The record in OUT, None without one; an unreadable record is ignored with a warning (it only speeds up
    finding an image that kills the process, which the next deaths find again)."""
    path = out / INFLIGHT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s), ignored", path, exc)
        return None
    fields = data if isinstance(data, dict) else {}
    paths, kind, pending = fields.get("paths"), fields.get("kind"), fields.get("pending", {})
    if (kind not in KINDS or not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths)
            or (kind != "chunk" and len(paths) != 1) or not isinstance(pending, dict)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in pending.values())):
        log.warning("%s: not a record of the paths a run was scoring (%s), ignored", path, ", ".join(KINDS))
        return None
    return Inflight(tuple(paths), kind, pending, str(fields.get("started", "")))


def record(out: Path, paths: list[str], kind: str, pending: dict[str, int] | None = None) -> None:
    """Write the record before the paths are scored (atomic: a death mid-write leaves the previous one)."""
    atomic_write_json(out / INFLIGHT_FILE, {
        "paths": [row_path(p) for p in paths], "kind": kind,
        "pending": {row_path(p): d for p, d in (pending or {}).items()},
        "pid": os.getpid(), "started": now_utc().isoformat()})


def clear(out: Path) -> None:
    (out / INFLIGHT_FILE).unlink(missing_ok=True)


def recording(out: Path, rows: Iterable[dict[str, Any]], suspects: dict[str, int], kind: str = "chunk"
              ) -> Iterator[dict[str, Any]]:
    """The engine's chunk rows, each recorded as it is taken, with the suspects (input path -> deaths alone) whose
    rows are not taken yet: the local engine takes a row only after it committed the one before, so the record
    names what the process was scoring. A one-path row of a suspect is recorded as "suspect"; others as `kind`."""
    taken: set[str] = set()
    for row in rows:
        paths = json.loads(row["meta"])["paths"]
        alone = paths[0] if len(paths) == 1 and paths[0] in suspects else None
        record(out, paths, "suspect" if alone else kind, {p: d for p, d in suspects.items() if p not in taken})
        if alone:
            taken.add(alone)
        yield row


def after_a_crash(out: Path, todo: list[str]) -> dict[str, int]:
    """The inputs of `todo` a dead local run suspected (input path -> deaths alone), from its record; empty without
    one. Refused where the process died on an image it had scored before (the model or the machine, not the images):
    the record is removed, so the next run tries again."""
    crashed = read(out)
    if crashed is None:
        return {}
    if crashed.kind == "probe":
        clear(out)
        raise ScoreError(f"the last run on {out} (--engine local, started {crashed.started}) died while scoring "
                         f"{crashed.paths[0]}, an image it had scored before, to tell an image that kills the process "
                         "from a model that does: the model, its device or the machine (its memory) killed it, not "
                         "the images (or it was killed from outside); no error rows were written. Once that is fixed, "
                         "rerun the same command to resume")
    texts = crashed.suspects()
    suspects = {p: texts[row_path(p)] for p in todo if row_path(p) in texts}
    if suspects:
        shown = ", ".join(list(suspects)[:3]) + (", ..." if len(suspects) > 3 else "")
        log.warning("the last run on %s (--engine local, started %s) died while scoring %s: %d suspect(s) (%s), "
                    "scored last, one at a time", out, crashed.started,
                    "one of them alone" if crashed.kind == "suspect" else "a chunk", len(suspects), shown)
    return suspects


@contextmanager
def removed_at_exit(out: Path) -> Iterator[None]:
    """The record removed when the run stops by itself, however it stops: only a dead process leaves one."""
    try:
        yield
    finally:
        clear(out)
