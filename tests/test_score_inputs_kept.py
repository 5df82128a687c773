"""`pni-ray score` keeps every input: names that look like globs or are not UTF-8, symlinked and
unreadable folders, --retry-failed's scope, a crash's summary, bad options, failed writes."""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from nightly_cli import run_nightly
from pni_ray.orchestration import nightly
from pni_ray.orchestration import score as score_module
from pni_ray.orchestration.score import Options, ScoreError, score
from pni_ray.orchestration.score_inputs import expand_inputs
from pni_ray.results import path_of_row, row_path
from pni_ray.orchestration.score_output import remove_stale_temps
from pni_ray.fileio import atomic_write_bytes
from pni_ray.results import read_table


def _image(synthetic_root: Path) -> bytes:
    return sorted((synthetic_root / "washer" / "test" / "good").glob("*.png"))[0].read_bytes()


def _rows(out: Path) -> dict[str, str | None]:
    table = read_table(out, columns=["path", "error"]).to_pylist()
    paths = [r["path"] for r in table]
    assert len(paths) == len(set(paths)), "duplicate rows"
    return {r["path"]: r["error"] for r in table}


def test_an_existing_name_with_glob_characters_is_taken_literally(tmp_path):
    for name in ("a[1].png", "a1.png", "b?.png"):
        (tmp_path / name).write_bytes(b"x")
    t = str(tmp_path)
    assert expand_inputs([f"{t}/a[1].png"]).paths == [f"{t}/a[1].png"]  # not the glob's a1.png
    assert expand_inputs([f"{t}/b?.png"]).paths == [f"{t}/b?.png"]
    assert expand_inputs([f"{t}/a?.png"]).paths == [f"{t}/a1.png"]  # names no file: a glob
    lst = tmp_path / "in.lst"
    lst.write_text("a[1].png\n./#hash.png\n")
    got = expand_inputs([f"@{lst}"])
    assert got.paths == [f"{t}/#hash.png", f"{t}/a[1].png"]


def test_walk_follows_symlinked_folders_once_and_reports_unreadable_ones(tmp_path, monkeypatch, caplog):
    root = tmp_path / "line"
    for rel in ("cam1/1.png", "cam2/locked/2.png", "elsewhere/3.png", "elsewhere/sub/4.png", "cam1/.x.png"):
        (tmp_path / rel if rel.startswith("elsewhere") else root / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel if rel.startswith("elsewhere") else root / rel).write_bytes(b"x")
    os.symlink(tmp_path / "elsewhere", root / "linked")  # a folder outside the tree: walked
    os.symlink(tmp_path / "elsewhere", root / "cam2" / "linked_too")  # the same folder again: once
    os.symlink(root / "cam1", root / "a_again")  # sorts before cam1: cam1 still walked under its own name
    os.symlink(tmp_path, root / "cam1" / "up")  # holds the whole tree: a loop, skipped
    # inside the linked folder, a link back to its own sub-folder's ancestor chain: a loop outside the tree
    os.symlink(tmp_path / "elsewhere" / "sub", tmp_path / "elsewhere" / "sub" / "up")
    # a link to a sub-folder of the linked folder, met before it ("b" < "linked"): its images once, under this name
    os.symlink(tmp_path / "elsewhere" / "sub", root / "b_sub")
    real_scandir = os.scandir
    locked = str(root / "cam2" / "locked")

    def scandir(path="."):  # root bypasses chmod 000: refuse the listing as a locked folder would
        if os.fspath(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.INFO, logger="pni_ray.orchestration.score_inputs"):
        got = expand_inputs([str(root)])
    assert got.paths == sorted([f"{root}/cam1/1.png", f"{root}/linked/3.png", f"{root}/b_sub/4.png", locked])
    assert f"{root}: 1 hidden file(s) or folder(s) below it (names starting with '.') not scored" in caplog.messages
    assert "cannot list this directory" in got.preset_errors[locked] and "Permission denied" in got.preset_errors[locked]


def test_a_recursive_glob_ends_in_link_loops_and_otherwise_matches_as_globs_do(tmp_path, monkeypatch):
    """Python's `**` follows every link to a folder: a link to a folder it was inside ran until the path grew too
    long (a hung nightly, no row written). `**` now ends in loops and otherwise gives what glob and a walk of each
    folder it matched gave: links followed, each image once per path, each matched folder's images once."""
    import glob as glob_module

    for rel in ("loop/a/b/x.png", "two/A/1.png", "two/B/2.png", "dup/2024/y.png", "outside/z.png", "dup/.cache/h.png",
                "dup/.k.png", "cam1/d/1.png", "cam2/d/2.png", "cam2/d/notes.txt", "arch/x/cam1/a.png", "arch/old/b.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    os.symlink("..", tmp_path / "loop" / "a" / "b" / "up")
    os.symlink(tmp_path / "loop", tmp_path / "loop" / "a" / "b" / "root")
    os.symlink("../B", tmp_path / "two" / "A" / "to_b")  # a loop of two links
    os.symlink("../A", tmp_path / "two" / "B" / "to_a")
    os.symlink("2024", tmp_path / "dup" / "latest")  # into the tree: followed, as glob follows it
    os.symlink(tmp_path / "outside", tmp_path / "dup" / "ext")
    os.symlink(tmp_path / "arch" / "old", tmp_path / "arch" / "x" / "cam1" / "latest")  # in a matched folder
    real_glob = glob_module.glob

    def no_recursion(pattern, *args, recursive=False, **kwargs):  # the loop would run until the path is too long
        assert not recursive, "Python's recursive glob follows link loops"
        return real_glob(pattern, *args, **kwargs)

    monkeypatch.setattr(glob_module, "glob", no_recursion)
    t = str(tmp_path)
    assert expand_inputs([f"{t}/loop/**/*.png"]).paths == [f"{t}/loop/a/b/x.png"]
    assert expand_inputs([f"{t}/two/**/*.png"]).paths == [f"{t}/two/A/1.png", f"{t}/two/A/to_b/2.png",
                                                          f"{t}/two/B/2.png", f"{t}/two/B/to_a/1.png"]
    dup = [f"{t}/dup/2024/y.png", f"{t}/dup/ext/z.png", f"{t}/dup/latest/y.png"]
    assert expand_inputs([f"{t}/dup/**/*.png"]).paths == dup
    assert expand_inputs([f"{t}/dup/**/.*.png"]).paths == [f"{t}/dup/.k.png"]  # hidden only when asked for
    assert expand_inputs([f"{t}/dup/**/.cache/*.png"]).paths == [f"{t}/dup/.cache/h.png"]  # a hidden folder named
    # folders it matches give their images once: each was walked again on its own and counted twice
    whole = expand_inputs([f"{t}/dup/**"])
    assert whole.paths == dup and whole.duplicates == 0
    assert expand_inputs([f"{t}/arch/**/cam1"]).paths == [f"{t}/arch/x/cam1/a.png", f"{t}/arch/x/cam1/latest/b.png"]
    assert expand_inputs([f"{t}/cam*/**/*.png"]).paths == [f"{t}/cam1/d/1.png", f"{t}/cam2/d/2.png"]
    # as glob's: every file the pattern names (the text file too, to its error row), the folders walked for images
    assert expand_inputs([f"{t}/cam*/**"]).paths == [f"{t}/cam1/d/1.png", f"{t}/cam2/d/2.png", f"{t}/cam2/d/notes.txt"]
    assert expand_inputs([f"{t}/**/2.png"]).paths == [f"{t}/cam2/d/2.png", f"{t}/two/A/to_b/2.png", f"{t}/two/B/2.png"]
    assert expand_inputs([f"{t}/cam9/**/*.png"]).preset_errors == {f"{t}/cam9/**/*.png": f"{t}/cam9/**/*.png: no "
                                                                    "file matches this pattern"}


def test_a_relative_glob_under_a_folder_named_like_a_pattern_matches(tmp_path, monkeypatch):
    """Under a working directory (or a list file's folder) named run[1], a relative glob matched nothing: the
    folder's brackets were read as a pattern."""
    cwd = tmp_path / "run[1]"
    for rel in ("s/a.png", "s/sub/b.png"):
        (cwd / rel).parent.mkdir(parents=True, exist_ok=True)
        (cwd / rel).write_bytes(b"x")
    (cwd / "in.lst").write_text("s/*.png\n")
    monkeypatch.chdir(cwd)
    c = str(cwd)
    assert expand_inputs(["s/*.png"]).paths == [f"{c}/s/a.png"]
    assert expand_inputs(["**/*.png"]).paths == [f"{c}/s/a.png", f"{c}/s/sub/b.png"]
    assert expand_inputs(["@in.lst"]).paths == [f"{c}/s/a.png"]


def test_a_list_files_line_that_names_nothing_is_named_in_its_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    lst = tmp_path / "inputs.txt"
    lst.write_text("# tonight's rescans\na.png\nnot an input.png\ncam9/*.png\n")
    got = expand_inputs([f"@{lst}"])
    missing, pattern = str(tmp_path / "not an input.png"), str(tmp_path / "cam9" / "*.png")
    assert got.paths == sorted([str(tmp_path / "a.png"), missing, pattern])
    assert got.preset_errors[missing] == f"{missing}: file not found (line 3 of {lst})"
    assert got.preset_errors[pattern] == f"{pattern}: no file matches this pattern (line 4 of {lst})"
    assert str(tmp_path / "a.png") not in got.preset_errors  # an existing file is decoded, not preset
    assert expand_inputs([missing]).preset_errors == {}  # named on the command line: decoded as "file not found"


def test_a_name_that_is_not_utf8_is_scored_once_and_resumed(bundle_tiny, synthetic_root, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    data = _image(synthetic_root)
    for name in (b"a.png", b"bad\xff.png", b"c.png"):
        with open(os.path.join(os.fsencode(folder), name), "wb") as fh:
            fh.write(data)
    out = tmp_path / "out"
    first = score(bundle_tiny, [str(folder)], out, Options(chunk_size=2, threads=1), engine="local")
    assert first["scored"] == 3 and first["failed"] == 0 and first["missing"] == 0
    assert _rows(out).keys() == {f"{folder}/a.png", f"{folder}/bad\\xff.png", f"{folder}/c.png"}
    again = score(bundle_tiny, [str(folder)], out, Options(chunk_size=2, threads=1), engine="local")
    assert again["run"]["scheduled"] == 0 and again["rows"] == 3 and again["duplicate_rows"] == 0
    assert row_path("plain/ü.png") == "plain/ü.png"

    # the UTF-8 name the bytes used to be written as is another file: its own row, on a rerun too
    (folder / "bad\\xff.png").write_bytes(data)
    third = score(bundle_tiny, [str(folder)], out, Options(chunk_size=2, threads=1), engine="local")
    assert third["run"]["scheduled"] == 1 and third["rows"] == 4 and third["missing"] == 0
    assert _rows(out).keys() == {f"{folder}/a.png", f"{folder}/bad\\xff.png", f"{folder}/bad\\\\xff.png",
                                 f"{folder}/c.png"}
    fresh = score(bundle_tiny, [str(folder)], tmp_path / "fresh", Options(chunk_size=8, threads=1), engine="local")
    assert fresh["rows"] == 4 and fresh["duplicate_rows"] == 0 and len(_rows(tmp_path / "fresh")) == 4


def test_row_path_and_path_of_row_are_inverse_and_one_to_one():
    names = [b"plain.png", "ü.png".encode(), b"bad\xffname.png", b"bad\\xffname.png", b"a\\b.png", b"a\\\xff.png",
             b"\\\\x41.png", b"\xc3.png", b"x\\", b"\\"]
    texts = [row_path(os.fsdecode(b"/d/" + n)) for n in names]
    assert len(set(texts)) == len(names)
    assert [path_of_row(t) for t in texts] == [os.fsdecode(b"/d/" + n) for n in names]
    assert texts[:2] == ["/d/plain.png", "/d/ü.png"]  # names without a backslash, in UTF-8: as they are


def test_an_output_of_the_earlier_path_text_resumes_only_where_its_rows_read_alike(
        bundle_tiny, synthetic_root, tmp_path):
    """Outputs written before path_text: without a row holding a backslash both forms read them alike, and
    they are marked as the current form; with one, a row could stand for two files: refused. A newer
    form than this pni-ray writes is refused too."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(_image(synthetic_root))
    out = tmp_path / "out"

    def as_written_before(form=None):
        identity = json.loads((out / "_dataset.json").read_text())
        identity.pop("path_text", None)
        if form is not None:
            identity["path_text"] = form
        (out / "_dataset.json").write_text(json.dumps(identity))

    score(bundle_tiny, [str(folder)], out, Options(threads=1), engine="local")
    as_written_before()
    assert score(bundle_tiny, [str(folder)], out, Options(threads=1), engine="local")["run"]["scheduled"] == 0
    assert json.loads((out / "_dataset.json").read_text())["path_text"] == 2  # marked as read alike
    (folder / "back\\slash.png").write_bytes(_image(synthetic_root))
    assert score(bundle_tiny, [str(folder)], out, Options(threads=1), engine="local")["run"]["scheduled"] == 1
    as_written_before()
    with pytest.raises(ScoreError, match="older pni-ray.*back.*slash.png.*another --out"):
        score(bundle_tiny, [str(folder)], out, Options(threads=1), engine="local")
    as_written_before(form=3)
    with pytest.raises(ScoreError, match="newer pni-ray"):
        score(bundle_tiny, [str(folder)], out, Options(threads=1), engine="local")
    assert len(_rows(out)) == 2


def test_retry_failed_retries_only_this_runs_inputs(bundle_tiny, synthetic_root, tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "junk.png").write_bytes(b"not an image")
    (tmp_path / "b" / "junk.png").write_bytes(b"not an image either")
    (tmp_path / "b" / "good.png").write_bytes(_image(synthetic_root))
    out = tmp_path / "out"
    opts = Options(chunk_size=4, threads=1)
    assert score(bundle_tiny, [str(tmp_path / "a"), str(tmp_path / "b")], out, opts, engine="local")["failed"] == 2
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def refused(rows, info, opts):  # the Ray cluster refused the join, the model failed to load: nothing scored
        raise ScoreError("cannot join the Ray cluster")
        yield

    monkeypatch.setitem(score_module.ENGINES, "refused", refused)
    with pytest.raises(ScoreError, match="cannot join"):
        score(bundle_tiny, [str(tmp_path / "b")], out, opts, engine="refused", retry=True)
    # the error rows and the summary were removed before the engine started: a refused run changes nothing
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")} == before
    retried = score(bundle_tiny, [str(tmp_path / "b")], out, opts, engine="local", retry=True)
    assert retried["run"]["error_rows_retried"] == 1 and retried["failed"] == 1
    assert retried["rows"] == 2 and retried["other_rows"] == 1  # a/junk.png: in OUT, not this run's input
    rows = _rows(out)
    assert len(rows) == 3 and rows[str(tmp_path / "a" / "junk.png")] is not None  # not this run's: kept


def test_retry_failed_scores_again_only_paths_whose_rows_are_all_errors(monkeypatch, tmp_path):
    """A path holding a scored row beside an error row (an OUT written twice over) keeps its scored row: scoring
    it again would give it a second one."""
    import pyarrow as pa

    from pni_ray.orchestration import score_output

    table = pa.table({"path": ["a", "a", "b", "c"], "error": ["a: bad", None, "b: bad", None]})
    monkeypatch.setattr(score_output, "read_table", lambda out, columns=None: table)
    assert score_output.error_paths(tmp_path, {"a", "b", "c"}) == {"b"}
    assert score_output.error_paths(tmp_path, {"a", "c"}) == set()


def test_retry_failed_drops_the_stand_in_row_of_a_pattern_or_folder_that_now_holds_images(bundle_tiny, synthetic_root,
                                                                                          tmp_path):
    """Last night's camera folder was empty and its glob matched nothing: stand-in error rows under the folder's
    and the pattern's names. Tonight's --retry-failed scores the images that arrived and leaves no stale failure
    (the partition's own count of error rows is what a query over it reports); a spec still empty keeps its row."""
    (tmp_path / "cam1").mkdir()
    (tmp_path / "cam2").mkdir()
    (tmp_path / "cam3").mkdir()
    specs = [str(tmp_path / "cam1"), str(tmp_path / "cam2" / "*.png"), str(tmp_path / "cam3")]
    out = tmp_path / "out"
    opts = Options(chunk_size=4, threads=1)
    assert score(bundle_tiny, specs, out, opts, engine="local")["failed"] == 3
    for cam in ("cam1", "cam2"):
        (tmp_path / cam / "0.png").write_bytes(_image(synthetic_root))
    plain = score(bundle_tiny, specs, out, opts, engine="local")
    assert plain["scored"] == 2 and plain["failed"] == 1 and plain["other_rows"] == 2  # a plain rerun keeps rows
    retried = score(bundle_tiny, specs, out, opts, engine="local", retry=True)
    assert retried["run"]["error_rows_retried"] == 3 and retried["scored"] == 2 and retried["failed"] == 1
    rows = _rows(out)
    assert sorted(rows) == sorted([str(tmp_path / "cam1" / "0.png"), str(tmp_path / "cam2" / "0.png"),
                                   str(tmp_path / "cam3")])
    assert "no image files" in rows[str(tmp_path / "cam3")]


def test_stand_in_names_are_the_folders_a_run_walks_and_the_specs_it_was_given(tmp_path):
    """A folder a glob matches and every folder a walk enters may carry an "unlistable" row of an earlier run;
    hidden folders and links back into the tree are never walked, so their names (another spec's rows) are not."""
    (tmp_path / "cams" / "c1" / "sub").mkdir(parents=True)
    (tmp_path / "cams" / ".hidden").mkdir()
    (tmp_path / "cams" / "loop").symlink_to(tmp_path / "cams" / "c1")
    pattern = str(tmp_path / "cams" / "c*")
    assert expand_inputs([pattern]).stand_ins == {pattern, str(tmp_path / "cams" / "c1"),
                                                  str(tmp_path / "cams" / "c1" / "sub")}
    got = expand_inputs([str(tmp_path / "cams")])
    assert {str(tmp_path / "cams"), str(tmp_path / "cams" / "c1"), str(tmp_path / "cams" / "c1" / "sub")} <= got.stand_ins
    assert str(tmp_path / "cams" / ".hidden") not in got.stand_ins and str(tmp_path / "cams" / "loop") not in got.stand_ins


def test_a_run_removes_the_last_summary_until_it_finishes(bundle_tiny, synthetic_root, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(_image(synthetic_root))
    out = tmp_path / "out"
    opts = Options(chunk_size=2, threads=1)
    score(bundle_tiny, [str(folder / "0.png")], out, opts, engine="local")
    assert json.loads((out / "_summary.json").read_text())["inputs"] == 1
    run_local = score_module.ENGINES["local"]

    def crash_after_one_chunk(rows, info, opts):
        stream = run_local(rows, info, opts)
        yield next(stream)
        raise RuntimeError("killed")

    monkeypatch.setitem(score_module.ENGINES, "local", crash_after_one_chunk)
    with pytest.raises(RuntimeError, match="killed"):
        score(bundle_tiny, [str(folder)], out, opts, engine="local")
    assert not (out / "_summary.json").exists()  # no longer "1 input, complete"
    monkeypatch.setitem(score_module.ENGINES, "local", run_local)
    done = score(bundle_tiny, [str(folder)], out, opts, engine="local")
    assert done["rows"] == 4 and done["run"]["scheduled"] == 1 and (out / "_summary.json").is_file()


def test_rows_that_cannot_be_stored_become_error_rows(bundle_tiny, synthetic_root, tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(_image(synthetic_root))
    real = score_module.rows_to_table
    calls = []

    def refuse_once(rows, schema):
        calls.append(len(rows))
        if len(calls) == 1:
            raise ValueError("a value Arrow refuses")
        return real(rows, schema)

    monkeypatch.setattr(score_module, "rows_to_table", refuse_once)
    summary = score(bundle_tiny, [str(tmp_path / "in")], tmp_path / "out", Options(threads=1), engine="local")
    assert summary["failed"] == 1 and summary["missing"] == 0
    assert "could not be stored (ValueError: a value Arrow refuses)" in summary["failures"][0]["error"]


def test_bad_options_and_unwritable_out_are_refused_before_anything_is_written(bundle_tiny, tmp_path):
    from pni_ray.cli import main

    for bad in (Options(chunk_size=0), Options(batch_size=0), Options(max_pixels=0), Options(workers=-1),
                Options(cpus_per_worker=0)):
        with pytest.raises(ScoreError, match="must be"):
            score(bundle_tiny, [str(tmp_path)], tmp_path / "out", bad, engine="local")
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(main, ["score", str(bundle_tiny), str(tmp_path), "--out", str(tmp_path / "o"),
                                       "--chunk-size", "0"])
    assert result.exit_code == 2 and "--chunk-size" in result.output and not (tmp_path / "o").exists()
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(ScoreError, match="cannot write the output directory"):
        score(bundle_tiny, [str(tmp_path)], tmp_path / "file" / "out", Options(threads=1), engine="local")


def test_a_failed_write_names_its_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "_summary.json"

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left on device") as err:
        atomic_write_bytes(target, b"{}")
    assert str(target) in str(err.value) and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    (tmp_path / "._summary.json.0123abcd.tmp").write_bytes(b"{")  # a kill between write and rename
    (tmp_path / ".part-x.parquet.0123abcd.tmp").write_bytes(b"P")
    assert remove_stale_temps(tmp_path) == 2 and list(tmp_path.iterdir()) == []


def test_nightly_record_says_running_until_the_run_ends(bundle_tiny, tmp_path, monkeypatch):
    from pni_ray.orchestration import score as score_mod

    config = tmp_path / "n.json"
    config.write_text(json.dumps({"model": str(bundle_tiny), "inputs": ["in"], "output_root": "out", "engine": "local"}))
    record_path = tmp_path / "out" / "dt=2024-01-02" / "_nightly.json"
    seen = []

    def crash(*args, **kwargs):
        seen.append(json.loads(record_path.read_text())["status"])
        raise RuntimeError("node lost")

    monkeypatch.setattr(score_mod, "score", crash)
    assert run_nightly(["--config", str(config), "--date", "2024-01-02"]) == nightly.EXIT_RUN
    record = json.loads(record_path.read_text())
    assert seen == ["running"] and record["status"] == "failed" and "node lost" in record["error"]
    monkeypatch.undo()
    (tmp_path / "in").mkdir()
    code, record = nightly.run(config, date="2024-01-02")
    assert record["status"] == "finished" and code == nightly.EXIT_FAILED_INPUTS  # an empty folder is a failed input


def test_nightly_record_after_a_failed_report_and_beside_a_live_run(bundle_tiny, synthetic_root, tmp_path, monkeypatch):
    from pni_ray import report
    from pni_ray.orchestration.score_output import locked

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(_image(synthetic_root))
    config = tmp_path / "n.json"
    config.write_text(json.dumps({"model": str(bundle_tiny), "inputs": ["in"], "output_root": "out", "engine": "local"}))
    out = tmp_path / "out" / "dt=2024-01-02"
    monkeypatch.setattr(report, "write_report", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError):
        nightly.run(config, date="2024-01-02")
    record = json.loads((out / "_nightly.json").read_text())
    assert record["status"] == "failed" and "No space left" in record["error"]  # not "running" forever
    live = {"status": "running", "started_at": "a live run's"}
    (out / "_nightly.json").write_text(json.dumps(live))
    with locked(out):  # that live run holds OUT
        code, refused = nightly.run(config, date="2024-01-02")
    assert code == nightly.EXIT_RUN and refused["status"] == "refused" and "another pni-ray run (score or nightly)" in refused["error"]
    assert json.loads((out / "_nightly.json").read_text()) == live  # its record is left to it


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_a_stopped_run_says_so_exits_3_and_resumes(bundle_tiny, synthetic_root, tmp_path, monkeypatch, stop,
                                                  sigterm_guard):
    """Ctrl-C or a scheduler's SIGTERM after one committed part: exit 3 with what is kept and what to do
    (click alone said "Aborted!" with exit 1, the status of "some inputs failed"); the rerun completes."""
    import signal

    from pni_ray.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(_image(synthetic_root))
    run_local = score_module.ENGINES["local"]

    def stopped_after_one_chunk(rows, info, opts):
        stream = run_local(rows, info, opts)
        yield next(stream)
        if stop == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt  # Ctrl-C; after SIGTERM never reached: its handler raises first

    monkeypatch.setitem(score_module.ENGINES, "local", stopped_after_one_chunk)
    out = tmp_path / "out"
    args = ["score", str(bundle_tiny), str(folder), "--out", str(out), "--engine", "local", "--chunk-size", "2",
            "--threads", "1", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard  # the handler is the run's alone
    assert result.exit_code == 3, result.output
    assert f"interrupted ({stop})" in result.output and "rerun the same command to resume" in result.output
    assert len(_rows(out)) == 2 and not (out / "_summary.json").exists()
    monkeypatch.setitem(score_module.ENGINES, "local", run_local)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert len(_rows(out)) == 4 and "2 were already in" in result.output


@pytest.mark.parametrize("when", ["after", "during"])
def test_joining_ray_keeps_the_callers_sigterm_handler(monkeypatch, when, sigterm_guard):
    """ray.init installs its own SIGTERM handler (sys.exit) before it starts or joins, which can take a
    minute: join_ray puts terminate_as_interrupt's back, and a SIGTERM during ray.init is raised as that
    handler would have raised it (KeyboardInterrupt), not as Ray's SystemExit(15)."""
    import signal
    import sys

    import ray

    from pni_ray.orchestration.ray_session import join_ray
    from pni_ray.orchestration.stopping import terminate_as_interrupt

    def init_like_ray(**kwargs):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        if when == "during":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init_like_ray)
    with terminate_as_interrupt():
        ours = signal.getsignal(signal.SIGTERM)
        if when == "during":
            with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
                join_ray(None)
        else:
            join_ray(None)
        assert signal.getsignal(signal.SIGTERM) is ours
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises at once; without it this would sleep, then fail
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard


def test_a_sigterm_ray_reraises_bare_is_still_named(sigterm_guard):
    """Ray's blocking calls (ray.wait) run Python's signal handlers inside their own check and raise a bare
    KeyboardInterrupt in place of the handler's: the stop is still reported as SIGTERM, and a Ctrl-C in a
    later run as SIGINT."""
    import signal

    from pni_ray.orchestration.stopping import stop_signal_name, terminate_as_interrupt

    with terminate_as_interrupt():
        try:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except KeyboardInterrupt:
                raise KeyboardInterrupt from None  # what Ray's wait raises instead
        except KeyboardInterrupt as bare:
            assert not bare.args and stop_signal_name(bare) == "SIGTERM"
    with terminate_as_interrupt():
        assert stop_signal_name(KeyboardInterrupt()) == "SIGINT"


def test_dot_dot_after_a_link_names_the_file_the_os_opens(tmp_path, monkeypatch):
    """top/lnk/../target.png is real/target.png when lnk links to real/sub (the OS's answer); a lexical
    normpath made it top/target.png: "file not found", or another file scored under the named one."""
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "top").mkdir()
    (tmp_path / "top" / "lnk").symlink_to(tmp_path / "real" / "sub")
    (tmp_path / "real" / "target.png").write_bytes(b"x")
    (tmp_path / "top" / "target.png").write_bytes(b"another file")
    monkeypatch.chdir(tmp_path)
    got = expand_inputs(["top/lnk/../target.png", str(tmp_path / "top" / "lnk" / "." / "x.png")])
    assert got.paths[0] == str(tmp_path / "real" / "target.png")  # what open() reads
    assert got.paths[1] == str(tmp_path / "top" / "lnk" / "x.png")  # no "..": the link kept as written
    assert os.path.samefile(got.paths[0], "top/lnk/../target.png")
    # a glob through such a link: the target's name is no pattern (run[1] is a folder, not a class)
    (tmp_path / "run[1]" / "sub").mkdir(parents=True)
    (tmp_path / "run[1]" / "a.png").write_bytes(b"x")
    (tmp_path / "top" / "lnk2").symlink_to(tmp_path / "run[1]" / "sub")
    assert expand_inputs(["top/lnk2/../*.png"]).paths == [str(tmp_path / "run[1]" / "a.png")]
    # the nightly job's config paths: "..", as the OS reads it, also there
    (tmp_path / "n.json").write_text(json.dumps({"model": "top/lnk/../m", "inputs": ["top/lnk/../target.png"],
                                                 "output_root": "top/lnk/../out"}))
    cfg = nightly.load_config(tmp_path / "n.json")
    assert cfg["model"] == str(tmp_path / "real" / "m") and cfg["output_root"] == str(tmp_path / "real" / "out")
    assert expand_inputs(cfg["inputs"]).paths == [str(tmp_path / "real" / "target.png")]
