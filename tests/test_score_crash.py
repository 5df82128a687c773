"""`pni-ray score --engine local` when an image kills the process (a decoder segfault, the OOM killer): the worker is
the run's own process, so every rerun used to meet the image at the same place and die again, never scoring what
came after it. The run records each chunk before scoring it (OUT/_inflight.json); the next run scores a dead
chunk's images last, one at a time, and an image that killed the process alone twice gets an error row."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow.parquet as pq
import pytest

from pni_ray.orchestration import score as score_mod
from pni_ray.orchestration.score import Options, ScoreError, score
from pni_ray.orchestration.score_inflight import INFLIGHT_FILE
from pni_ray.results import part_files

REPO = Path(__file__).resolve().parents[1]


class Died(BaseException):
    """The process's death, as the test sees it: nothing of the run's own cleanup may count, so the record it
    leaves is taken before the exception unwinds the run and put back after."""


def _dying_on(out: Path, killer: Callable[[str], bool]) -> Callable[..., Iterator[dict[str, Any]]]:
    """The local engine, dying (`Died`) when it takes a chunk holding a path `killer` names."""
    def engine(rows: Any, info: Any, opts: Options) -> Iterator[dict[str, Any]]:
        for row in rows:  # taking the row writes its record (score_inflight.recording)
            if any(killer(p) for p in json.loads(row["meta"])["paths"]):
                raise Died((out / INFLIGHT_FILE).read_bytes())
            yield from score_mod.run_local([row], info, opts)
    return engine


def _run(bundle: Path, folder: Path, out: Path, monkeypatch, killer: Callable[[str], bool]) -> dict[str, Any] | None:
    """One `score` run in a process that dies on `killer`'s images: its summary, or None where it died (the
    record a dead process leaves put back in OUT)."""
    monkeypatch.setitem(score_mod.ENGINES, "local", _dying_on(out, killer))
    try:
        return score(bundle, [str(folder)], out, Options(threads=1, chunk_size=2), engine="local")
    except Died as death:
        (out / INFLIGHT_FILE).write_bytes(death.args[0])
        return None


def _rows(out: Path) -> dict[str, dict[str, Any]]:
    rows = [r for part in part_files(out) for r in pq.read_table(part).to_pylist()]
    assert len(rows) == len({r["path"] for r in rows})  # one row per input
    return {Path(r["path"]).name: r for r in rows}


@pytest.fixture
def inputs(synthetic_root, tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for i, src in enumerate(sorted((synthetic_root / "washer" / "test" / "good").glob("*.png"))[:4]):
        shutil.copy(src, folder / f"img_{i}.png")
    shutil.copy(folder / "img_0.png", folder / "img_4.png")  # an image after the one that kills
    return folder


def _record(out: Path) -> tuple[str, list[str], dict[str, int]]:
    record = json.loads((out / INFLIGHT_FILE).read_text())
    return record["kind"], [Path(p).name for p in record["paths"]], {Path(p).name: d for p, d in record["pending"].items()}


def test_an_image_that_kills_the_process_gets_an_error_row_and_the_rest_are_scored(bundle_tiny, inputs, tmp_path,
                                                                                   monkeypatch):
    out = tmp_path / "out"
    killer = lambda p: p.endswith("img_3.png")  # noqa: E731 - chunks of 2: [0, 1], [2, 3], [4]
    assert _run(bundle_tiny, inputs, out, monkeypatch, killer) is None  # dies in the second chunk
    assert _record(out) == ("chunk", ["img_2.png", "img_3.png"], {})
    assert sorted(_rows(out)) == ["img_0.png", "img_1.png"]
    assert _run(bundle_tiny, inputs, out, monkeypatch, killer) is None  # img_4 first, then the suspects alone
    assert _record(out) == ("suspect", ["img_3.png"], {"img_3.png": 0})
    assert sorted(_rows(out)) == ["img_0.png", "img_1.png", "img_2.png", "img_4.png"]
    assert _run(bundle_tiny, inputs, out, monkeypatch, killer) is None  # one death alone may be no fault of its own
    assert _record(out) == ("suspect", ["img_3.png"], {"img_3.png": 1})
    summary = _run(bundle_tiny, inputs, out, monkeypatch, killer)  # a known image scores: img_3's error row
    assert summary is not None and summary["failed"] == 1 and summary["missing"] == 0 and summary["rows"] == 5
    rows = _rows(out)
    assert sorted(rows) == [f"img_{i}.png" for i in range(5)]
    assert all(rows[f"img_{i}.png"]["error"] is None for i in (0, 1, 2, 4))
    assert "img_3.png: not scored: the scoring process died on it in its chunk and again on it alone" in \
        rows["img_3.png"]["error"]
    assert not (out / INFLIGHT_FILE).exists()  # a run that ends by itself leaves no record


def test_a_death_that_was_no_images_fault_costs_no_error_row(bundle_tiny, inputs, tmp_path, monkeypatch):
    """A user's SIGKILL (or another job's memory) while a good suspect is alone, then the real killer: the good
    image is scored and the killer, remembered through the other death, gets the only error row."""
    out = tmp_path / "out"
    killer = lambda p: p.endswith("img_3.png")  # noqa: E731
    assert _run(bundle_tiny, inputs, out, monkeypatch, killer) is None
    assert _run(bundle_tiny, inputs, out, monkeypatch, lambda p: p.endswith("img_2.png")) is None  # not img_2's fault
    assert _record(out) == ("suspect", ["img_2.png"], {"img_2.png": 0, "img_3.png": 0})
    for _ in range(2):
        assert _run(bundle_tiny, inputs, out, monkeypatch, killer) is None
    assert _record(out) == ("suspect", ["img_3.png"], {"img_3.png": 1})
    assert _run(bundle_tiny, inputs, out, monkeypatch, killer)["failed"] == 1
    assert [name for name, r in _rows(out).items() if r["error"]] == ["img_3.png"]


def test_the_chunk_mates_of_a_killer_are_scored_by_the_third_run(bundle_tiny, inputs, tmp_path, monkeypatch):
    """Suspects go fewest deaths first: a good image of the killer's chunk does not wait behind the killer."""
    out = tmp_path / "out"
    killer = lambda p: p.endswith("img_2.png")  # noqa: E731 - the first of its chunk [2, 3]
    for _ in range(3):
        assert _run(bundle_tiny, inputs, out, monkeypatch, killer) is None
    assert sorted(_rows(out)) == ["img_0.png", "img_1.png", "img_3.png", "img_4.png"]
    assert _run(bundle_tiny, inputs, out, monkeypatch, killer)["failed"] == 1


def test_a_killer_gets_its_row_where_the_images_scored_before_are_gone(bundle_tiny, inputs, tmp_path, monkeypatch):
    """An inbox whose scored images are moved away: the run asks an image it scored itself, before the suspects."""
    out = tmp_path / "out"
    killer = lambda p: p.endswith("img_3.png")  # noqa: E731
    for _ in range(3):
        assert _run(bundle_tiny, inputs, out, monkeypatch, killer) is None
    for name in ("img_0.png", "img_1.png", "img_2.png", "img_4.png"):
        (inputs / name).rename(tmp_path / name)
    shutil.copy(tmp_path / "img_0.png", inputs / "img_5.png")  # the next night's image
    summary = _run(bundle_tiny, inputs, out, monkeypatch, killer)
    assert summary["failed"] == 1 and summary["run"]["scored_this_run"] == 1
    assert _rows(out)["img_3.png"]["error"] and _rows(out)["img_5.png"]["error"] is None


def test_a_stop_keeps_the_suspects_and_their_deaths(bundle_tiny, inputs, tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) while a suspect is scored alone is no death, and no reason to forget the suspects: the
    next run scores them alone again, the counts kept, instead of sending the killer back into a whole chunk."""
    out = tmp_path / "out"
    killer = lambda p: p.endswith("img_3.png")  # noqa: E731
    for _ in range(2):
        assert _run(bundle_tiny, inputs, out, monkeypatch, killer) is None
    assert _record(out) == ("suspect", ["img_3.png"], {"img_3.png": 0})

    def interrupted(rows: Any, info: Any, opts: Options) -> Iterator[dict[str, Any]]:
        for _ in rows:
            raise KeyboardInterrupt
        yield from ()
    monkeypatch.setitem(score_mod.ENGINES, "local", interrupted)
    with pytest.raises(KeyboardInterrupt):
        score(bundle_tiny, [str(inputs)], out, Options(threads=1, chunk_size=2), engine="local")
    assert _record(out) == ("chunk", ["img_3.png"], {"img_3.png": 1})
    assert _run(bundle_tiny, inputs, out, monkeypatch, killer) is None  # its second death alone
    assert _run(bundle_tiny, inputs, out, monkeypatch, killer)["failed"] == 1


def test_a_model_that_kills_the_process_on_every_image_gives_no_error_rows(bundle_tiny, inputs, tmp_path,
                                                                          monkeypatch):
    """With no image scored before to ask, a suspect that died alone twice is not given a row: a model (or runtime)
    that kills the process on every image would otherwise turn good images into error rows, one every two runs."""
    out = tmp_path / "out"
    for _ in range(8):
        assert _run(bundle_tiny, inputs, out, monkeypatch, lambda p: True) is None
    assert not part_files(out)
    summary = _run(bundle_tiny, inputs, out, monkeypatch, lambda p: False)  # fixed: every image scored
    assert summary["failed"] == 0 and summary["rows"] == 5


def test_a_process_that_dies_on_an_image_it_scored_before_is_refused_without_error_rows(bundle_tiny, inputs, tmp_path,
                                                                                        monkeypatch):
    """The model (its device, the machine's memory) kills the process, not the image: asked before the error row,
    an image scored before kills it too; the next run is refused and clears the record, so the one after retries."""
    out = tmp_path / "out"
    for _ in range(3):
        assert _run(bundle_tiny, inputs, out, monkeypatch, lambda p: p.endswith("img_3.png")) is None
    assert _run(bundle_tiny, inputs, out, monkeypatch, lambda p: True) is None  # now every image kills it, the probe's too
    assert _record(out)[0] == "probe"
    with pytest.raises(ScoreError, match="an image it had scored before"):
        _run(bundle_tiny, inputs, out, monkeypatch, lambda p: True)
    assert not (out / INFLIGHT_FILE).exists()
    assert all(r["error"] is None for r in _rows(out).values())
    summary = _run(bundle_tiny, inputs, out, monkeypatch, lambda p: False)  # fixed: every image scored
    assert summary is not None and summary["failed"] == 0 and summary["rows"] == 5


def test_only_a_local_run_reads_the_record(bundle_tiny, inputs, tmp_path, monkeypatch):
    """Ray isolates an image that kills a worker within the run: a local process's record neither refuses nor
    pre-judges a run on another engine, which removes it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / INFLIGHT_FILE).write_text(json.dumps({"kind": "probe", "paths": [str(inputs / "img_0.png")]}))
    monkeypatch.setitem(score_mod.ENGINES, "other", score_mod.run_local)
    summary = score(bundle_tiny, [str(inputs)], out, Options(threads=1), engine="other")
    assert summary["failed"] == 0 and summary["rows"] == 5
    assert not (out / INFLIGHT_FILE).exists()


@pytest.mark.parametrize("record", ['{"kind": "probe", "paths": []}', '{"kind": "suspect", "paths": ["a", "b"]}',
                                    '{"kind": "chunk", "paths": ["a"], "pending": {"a": -1}}', "[1, 2]", "{not json"])
def test_a_record_that_is_not_one_is_ignored(bundle_tiny, inputs, tmp_path, record):
    out = tmp_path / "out"
    out.mkdir()
    (out / INFLIGHT_FILE).write_text(record)
    summary = score(bundle_tiny, [str(inputs)], out, Options(threads=1), engine="local")
    assert summary["failed"] == 0 and summary["rows"] == 5 and not (out / INFLIGHT_FILE).exists()


KILLING_SCORE = """
import json, os, signal, sys
from pni_ray.orchestration import score
decode = score.decode_chunk
def killing(row, **kwargs):
    if any(p.endswith("img_3.png") for p in json.loads(row["meta"])["paths"]):
        os.kill(os.getpid(), signal.SIGKILL)  # as a decoder's segfault or the OOM killer: no cleanup at all
    return decode(row, **kwargs)
score.decode_chunk = killing
from pni_ray.cli import main
main()
"""


def test_a_real_sigkill_on_one_image_costs_that_image_only(bundle_tiny, inputs, tmp_path):
    """The command as its own process, killed outright by one image each time it takes it: four runs end with
    every other image scored and that image's error row (exit 1)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", KILLING_SCORE, "-q", "score", str(bundle_tiny), str(inputs), "--out", str(out),
           "--engine", "local", "--chunk-size", "2", "--threads", "1", "--no-progress"]
    codes = [subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                            timeout=300).returncode for _ in range(4)]
    assert codes == [-signal.SIGKILL] * 3 + [1], codes
    rows = _rows(out)
    assert sorted(rows) == [f"img_{i}.png" for i in range(5)]
    assert [name for name, r in rows.items() if r["error"]] == ["img_3.png"]
    assert not (out / INFLIGHT_FILE).exists()
