"""What a `--engine local` scoring run was doing when its process died: what Ray tells the driver, and a process
cannot tell itself.

Under Ray a worker that dies on an image is seen by the driver, which tries the chunk again and then its images
one at a time (`score._isolate_lost`). Under `--engine local` the worker is the run's own process: an image that
crashes its decoder or the model (a segfault, the OOM killer) takes the run with it, and every rerun would meet
that image at the same place and die again, never scoring the images after it. So before each chunk the run
records in OUT/_inflight.json the chunk's paths and the suspects it has not tried yet, and a run that stops by
itself (finished, failed, refused after it planned, or interrupted) removes the record.

The next local run reads it: the dead chunk's images join the suspects, each with the number of times the process
died on it alone. Suspects are scored after every other input, one at a time, fewest deaths first (so an image
this run scored is there to ask). A suspect the process died on alone twice gets an error row, once an image
scored before still scores; with none to ask it is tried again, and if the known image kills the process too (the
record says "probe"), the model or the machine is at fault: that run is refused, the record removed (the counts
with it). A run stopped (Ctrl-C, SIGTERM, a refusal) records the suspects it has not scored, counts kept. An image
that kills the process so costs four runs: the inputs outside its chunk are scored by the second, its chunk's by
the third; a death that was no image's fault (a kill from outside, another job's memory) costs a suspect one of
its two lives, not its row. A run on another engine removes the record (Ray isolates such images itself).
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pni_ray.orchestration.score_model import ScoreError
from pni_ray.orchestration.score_output import committed_paths
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
def kept_for_the_next_run(out: Path, suspects: Callable[[], dict[str, int]]) -> Iterator[None]:
    """The record removed when the run ends by itself; stopped by an exception (Ctrl-C, SIGTERM, a refusal), the
    suspects (input path -> deaths alone) it has not scored are recorded for the next run, counts kept, so a stop
    does not send an image that killed the process back into a whole chunk. Only a dead process leaves more."""
    try:
        yield
    except BaseException:
        try:
            left = suspects()
            if left:
                done = committed_paths(out)
                left = {p: d for p, d in left.items() if row_path(p) not in done}
            if left:
                record(out, list(left), "chunk", left)
            else:
                clear(out)
        except OSError as exc:  # OUT gone or full: the stop's own error is what to report
            log.warning("%s: not updated (%s)", out / INFLIGHT_FILE, exc)
        raise
    clear(out)
