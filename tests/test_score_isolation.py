"""`pni-ray score` when workers fail: a chunk Ray Data drops after its retries is scored one image at a time,
an image that fails alone gets its own error row (the run neither hangs nor loses it), workers failing on
every image stop the run without error rows, and a model replaced mid-run stops it."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq
import pytest

from pni_ray.orchestration import score as score_mod
from pni_ray.orchestration.score import Options, ScoreError, score
from pni_ray.results import part_files


def _dropping(poisoned: Any) -> Any:
    """An engine that scores as `local` does but drops each chunk holding a path `poisoned` says, as Ray Data
    drops a chunk whose worker died on every try (DataContext.max_errored_blocks)."""
    def engine(rows: list[dict[str, Any]], info: Any, opts: Options) -> Iterator[dict[str, Any]]:
        import json

        kept = [r for r in rows if not any(poisoned(p) for p in json.loads(r["meta"])["paths"])]
        engine.chunks.append(len(rows))
        yield from score_mod.run_local(kept, info, opts)
    engine.chunks = []
    return engine


@pytest.fixture
def inputs(synthetic_root, tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for i, src in enumerate(sorted((synthetic_root / "washer" / "test" / "good").glob("*.png"))[:4]):
        shutil.copy(src, folder / f"good_{i}.png")
    shutil.copy(folder / "good_0.png", folder / "bad.png")
    return folder


def _rows(out: Path) -> dict[str, dict[str, Any]]:
    rows = [r for part in part_files(out) for r in pq.read_table(part).to_pylist()]
    assert len(rows) == len({r["path"] for r in rows})  # one row per input
    return {Path(r["path"]).name: r for r in rows}


def test_a_failing_chunk_is_isolated_and_only_its_bad_image_gets_an_error_row(bundle_tiny, inputs, tmp_path, monkeypatch):
    engine = _dropping(lambda p: p.endswith("bad.png"))
    monkeypatch.setitem(score_mod.ENGINES, "dropping", engine)
    out = tmp_path / "out"
    summary = score(bundle_tiny, [str(inputs)], out, Options(threads=1, chunk_size=4), engine="dropping")
    # two chunks, an image scored before (the workers still score), the lost chunk's four images (bad.png first)
    # one at a time, and the image scored before again (they still do: bad.png's failure is its own)
    assert engine.chunks == [2, 1, 4, 1]
    rows = _rows(out)
    assert sorted(rows) == ["bad.png", "good_0.png", "good_1.png", "good_2.png", "good_3.png"]
    assert all(rows[f"good_{i}.png"]["error"] is None for i in range(4))
    assert rows["bad.png"]["image_score"] is None
    assert "bad.png: not scored: scoring failed on it in its chunk and again on it alone" in rows["bad.png"]["error"]
    assert summary["missing"] == 0 and summary["failed"] == 1 and summary["run"]["rows_this_run"] == 5
    again = score(bundle_tiny, [str(inputs)], out, Options(threads=1, chunk_size=4), engine="dropping")
    assert again["run"]["scheduled"] == 0  # the error row is final: the rerun does not meet the image again


def test_a_retry_holding_only_bad_images_writes_their_rows_again(bundle_tiny, inputs, tmp_path, monkeypatch):
    """--retry-failed (or a resume) whose remaining inputs are all bad is no failure of the workers: it stopped
    with no error rows, after the retry had removed the old ones, and every rerun stopped again."""
    shutil.copy(inputs / "bad.png", inputs / "bad2.png")
    monkeypatch.setitem(score_mod.ENGINES, "dropping", _dropping(lambda p: Path(p).name.startswith("bad")))
    out = tmp_path / "out"
    assert score(bundle_tiny, [str(inputs)], out, Options(threads=1, chunk_size=4), engine="dropping")["failed"] == 2
    again = score(bundle_tiny, [str(inputs)], out, Options(threads=1), engine="dropping", retry=True)
    assert again["run"]["error_rows_retried"] == 2 and again["failed"] == 2 and again["missing"] == 0


def test_workers_that_fail_on_every_image_stop_the_run_without_error_rows(bundle_tiny, inputs, tmp_path, monkeypatch):
    monkeypatch.setitem(score_mod.ENGINES, "dropping", _dropping(lambda p: True))
    out = tmp_path / "out"
    with pytest.raises(ScoreError, match="the scoring workers failed on each of 5 inputs, also one at a time"):
        score(bundle_tiny, [str(inputs)], out, Options(threads=1), engine="dropping")
    assert not part_files(out)  # nothing claims those images are bad: a rerun scores them
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(inputs / "bad.png", single)
    summary = score(bundle_tiny, [str(single)], tmp_path / "out1", Options(threads=1), engine="dropping")
    assert summary["failed"] == 1  # one input that fails alone is the image's fault: its row says so


def test_workers_that_break_mid_run_write_no_error_rows_for_the_rest(bundle_tiny, inputs, tmp_path, monkeypatch):
    """A GPU or model that fails after the first chunks (every later chunk lost, also image by image) wrote a final
    "failed alone" row for every image left, which a rerun, the nightly's automatic retry, never scored again. An
    image the workers scored before is asked first: failing too, the run stops (exit 3) with no rows for the rest."""
    calls = []

    def breaking(rows, info, opts):  # the first chunk of the run scores; nothing after it does
        calls.append(len(rows))
        yield from score_mod.run_local(rows[:1] if len(calls) == 1 else [], info, opts)

    monkeypatch.setitem(score_mod.ENGINES, "breaking", breaking)
    out = tmp_path / "out"
    with pytest.raises(ScoreError, match=r"failed on 3 input\(s\) in chunks they could not score, and now fail "
                                         r"on .*bad.png, which they scored before"):
        score(bundle_tiny, [str(inputs)], out, Options(threads=1, chunk_size=2), engine="breaking")
    # the image scored before is asked first: no image left is tried alone, none gets a row
    assert calls == [3, 1] and sorted(_rows(out)) == ["bad.png", "good_0.png"]
    done = score(bundle_tiny, [str(inputs)], out, Options(threads=1, chunk_size=2), engine="local")
    assert done["failed"] == 0 and done["missing"] == 0 and done["run"]["scheduled"] == 3


def test_a_model_that_fails_on_every_image_writes_no_error_rows(bundle_tiny, inputs, tmp_path, monkeypatch):
    """A model that raises on every image (a CUDA or ONNX Runtime error) gave each image a final "scoring failed"
    row and exit 1: a rerun scored nothing. An image it raises on still gets its own row, also alone in its chunk."""
    real = score_mod.ScoreWorker._predict

    def broken(self, prepared):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(score_mod.ScoreWorker, "_predict", broken)
    out = tmp_path / "out"
    with pytest.raises(ScoreError, match=r"the scoring workers failed on each of 5 inputs, also one at a time"):
        score(bundle_tiny, [str(inputs)], out, Options(threads=1, chunk_size=2), engine="local")
    assert not part_files(out)

    def one_bad(self, prepared):  # refuses the batch holding an image whose canvas is all zeros, and it alone
        if any(not p.canvas.any() for p in prepared):
            raise RuntimeError("bad input")
        return real(self, prepared)

    (inputs / "bad.png").unlink()
    import PIL.Image
    PIL.Image.new("RGB", (64, 64)).save(inputs / "black.png")  # in a chunk with good images
    PIL.Image.new("RGB", (64, 64)).save(inputs / "zz_black.png")  # alone in the last chunk: nothing of it scores
    monkeypatch.setattr(score_mod.ScoreWorker, "_predict", one_bad)
    summary = score(bundle_tiny, [str(inputs)], out, Options(threads=1, chunk_size=5), engine="local")
    rows = _rows(out)
    assert summary["failed"] == 2 and summary["missing"] == 0
    assert "black.png: scoring failed (RuntimeError: bad input)" in rows["black.png"]["error"]
    # lost with its chunk; an image scored before still scores, before and after it is tried alone: its own row
    assert "zz_black.png: not scored: scoring failed on it in its chunk and again on it alone" in \
        rows["zz_black.png"]["error"]


def test_a_model_that_breaks_while_lost_images_are_tried_alone_writes_no_rows(bundle_tiny, inputs, tmp_path,
                                                                             monkeypatch):
    """The image scored before is asked again after the images are tried alone: a model that worked for the first
    ask and broke after it would otherwise give every image left a final row. An image scored before that is now
    an error row of its own (rewritten since) says nothing of the model: the next one is asked."""
    real = score_mod.ScoreWorker._predict
    calls = []

    def broken(self, prepared):
        raise RuntimeError("CUDA error: device lost")

    def flaky(rows, info, opts):  # only the first ask scores
        calls.append(len(rows))
        monkeypatch.setattr(score_mod.ScoreWorker, "_predict", real if len(calls) == 2 else broken)
        yield from score_mod.run_local(rows, info, opts)

    monkeypatch.setitem(score_mod.ENGINES, "flaky", flaky)
    out = tmp_path / "out"
    assert score(bundle_tiny, [str(inputs / "good_0.png"), str(inputs / "good_1.png")], out, Options(threads=1),
                 engine="local")["scored"] == 2
    with pytest.raises(ScoreError, match=r"failed on 3 input\(s\), also one at a time, and now fail on .*good_0.png"):
        score(bundle_tiny, [str(inputs)], out, Options(threads=1, chunk_size=2), engine="flaky")
    assert calls == [2, 1, 3, 1] and sorted(_rows(out)) == ["good_0.png", "good_1.png"]  # no rows for the rest

    (inputs / "good_0.png").write_bytes(b"not an image any more")
    monkeypatch.setattr(score_mod.ScoreWorker, "_predict", broken)
    with pytest.raises(ScoreError, match=r"failed on 3 input\(s\) in chunks they could not score, and now fail on "
                                         r".*good_1.png"):
        score(bundle_tiny, [str(inputs)], out, Options(threads=1, chunk_size=2), engine="local")
    assert sorted(_rows(out)) == ["good_0.png", "good_1.png"]


def test_a_model_replaced_during_the_run_stops_it(bundle_tiny, inputs, tmp_path, monkeypatch):
    """The driver read one model; the workers load what the path holds when they (re)start: a `train --force`
    in between would put another model's scores under the first one's id and threshold."""
    real = score_mod.describe_model
    monkeypatch.setattr(score_mod, "describe_model",
                        lambda *a, **k: dataclasses.replace(real(*a, **k), model_id="f" * 64))
    out = tmp_path / "out"
    with pytest.raises(ScoreError, match=r"the model changed during the run \(now model [0-9a-f]{12}, the run started "
                                         r"with ffffffffffff\)"):
        score(bundle_tiny, [str(inputs)], out, Options(threads=1), engine="local")
    assert not part_files(out)


def test_an_out_removed_during_the_run_stops_it(bundle_tiny, inputs, tmp_path, monkeypatch):
    """OUT deleted and made again mid-run: the run wrote on without its lock or identity, and the folder could never
    be resumed ("part files but no _dataset.json"); a second run could lock it meanwhile."""
    out = tmp_path / "out"

    def engine(rows, info, opts):
        results = score_mod.run_local(rows, info, opts)
        yield next(results)
        shutil.rmtree(out)
        out.mkdir()
        yield from results

    monkeypatch.setitem(score_mod.ENGINES, "removing", engine)
    with pytest.raises(ScoreError, match=r"out was removed or replaced during the run \(its _lock is not this run's\)"):
        score(bundle_tiny, [str(inputs)], out, Options(threads=1, chunk_size=2), engine="removing")
    assert not list(out.iterdir())  # nothing written into the new folder: a rerun scores it from the start
    assert score(bundle_tiny, [str(inputs)], out, Options(threads=1, chunk_size=2), engine="local")["missing"] == 0


KILLING_OPEN = '''
import os

if os.environ.get("PNI_RAY_TEST_KILL"):  # a decoder that crashes on one file: its worker process dies at once
    import PIL.Image as _image

    _open = _image.open

    def _killing_open(fp, *args, **kwargs):
        if os.environ["PNI_RAY_TEST_KILL"] in os.path.basename(str(fp)):
            os._exit(1)
        return _open(fp, *args, **kwargs)

    _image.open = _killing_open
'''


@pytest.mark.ray
@pytest.mark.skipif(not os.environ.get("PNI_RAY_SLOW_TESTS"),
                    reason="kills Ray workers on purpose, ~90 s of actor restarts: PNI_RAY_SLOW_TESTS=1 runs it")
def test_ray_isolates_an_image_that_kills_its_worker(bundle_tiny, inputs, tmp_path, monkeypatch):
    """Real Ray Data: the worker dies whenever it opens bad.png (a sitecustomize hook in the workers, as a decoder
    crash or an OOM kill). Its chunk is retried, dropped, its images scored alone, bad.png given an error row."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("needs an embedded Ray of its own, whose workers start with the hook")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(KILLING_OPEN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("PNI_RAY_TEST_KILL", "bad.png")
    out = tmp_path / "out"
    summary = score(bundle_tiny, [str(inputs)], out, Options(threads=1, workers=1, chunk_size=4), engine="ray")
    rows = _rows(out)
    assert sorted(rows) == ["bad.png", "good_0.png", "good_1.png", "good_2.png", "good_3.png"]
    assert all(rows[f"good_{i}.png"]["error"] is None for i in range(4))
    assert "bad.png: not scored: scoring failed on it in its chunk and again on it alone" in rows["bad.png"]["error"]
    assert summary["failed"] == 1 and summary["missing"] == 0
