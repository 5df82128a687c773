"""pni-ray nightly (pni_ray/orchestration/nightly.py): config, date partitions, run summary, report, resume, exit codes."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from nightly_cli import run_nightly
from pni_ray.orchestration import nightly


def write_toml(path: Path, **values) -> Path:
    lines = []
    for k, v in values.items():
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            lines.append(f"{k} = {v}")
        elif isinstance(v, list):
            lines.append(f"{k} = [{', '.join(json.dumps(x) for x in v)}]")
        else:
            lines.append(f"{k} = {json.dumps(v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_config_parsing_and_validation(tmp_path):
    cfg = nightly.load_config(write_toml(tmp_path / "n.toml", model="models/washer", inputs="img/{date}",
                                         output_root="results", map_format="float16"))
    assert cfg["model"] == str(tmp_path / "models" / "washer") and cfg["inputs"] == [str(tmp_path / "img" / "{date}")]
    assert cfg["output_root"] == str(tmp_path / "results") and cfg["map_format"] == "float16" and cfg["top_n"] == 20
    cfg = nightly.load_config(write_toml(tmp_path / "f.toml", model="m", inputs="i", output_root="o", max_pixels=5e7,
                                         batch_size=8.0, workers=0, threads=1))
    assert cfg["threads"] == 1 and nightly.load_config(write_toml(tmp_path / "t.toml", model="m", inputs="i",
                                                                  output_root="o"))["threads"] is None
    assert cfg["max_pixels"] == 50_000_000 and type(cfg["max_pixels"]) is int and cfg["batch_size"] == 8  # 5e7: a float
    (tmp_path / "n.json").write_text(json.dumps({"model": "/m", "inputs": ["@lists/{date}.txt", "/abs/*.png"],
                                                 "output_root": "/r", "engine": "local"}))
    cfg = nightly.load_config(tmp_path / "n.json")
    assert cfg["inputs"] == [f"@{tmp_path}/lists/{{date}}.txt", "/abs/*.png"] and cfg["engine"] == "local"
    for bad, match in (({"model": "/m", "inputs": "/i"}, "missing required"),
                       ({"model": "/m", "inputs": "/i", "output_root": "/o", "map_fromat": "uint8"}, "unknown keys"),
                       ({"model": "/m", "inputs": "/i", "output_root": "/o", "map_format": "png"}, "map_format"),
                       ({"model": "/m", "inputs": [1], "output_root": "/o"}, "inputs"),
                       ({"model": "/m", "inputs": "/i", "output_root": "/o", "backbone_runtime": "trt"}, "backbone_runtime"),
                       ({"model": "/m", "inputs": "/i", "output_root": "/o", "backbone_precision": "fp16"},
                        "backbone_precision"),
                       ({"model": "/m", "inputs": "/i", "output_root": "/o", "backbone_precision": "f32"},
                        "backbone_precision 'f32' applies to backbone_runtime \"openvino\" only"),
                       ({"model": "/m", "inputs": "/i", "output_root": "/o", "batch_size": "eight"},
                        "batch_size must be a whole number >= 1, not 'eight'"),
                       ({"model": "/m", "inputs": "/i", "output_root": "/o", "chunk_size": 0}, "chunk_size must be"),
                       ({"model": "/m", "inputs": "/i", "output_root": "/o", "workers": -1}, "workers must be"),
                       ({"model": "/m", "inputs": "/i", "output_root": "/o", "threads": 0}, "threads must be"),
                       ({"model": "/m", "inputs": "/i", "output_root": "/o", "top_n": 2.5}, "top_n must be"),
                       ({"model": "/m", "inputs": "/i", "output_root": "/o", "gpus_per_worker": "1"}, "gpus_per_worker"),
                       ({"model": "/m", "inputs": "/i", "output_root": "/o", "cpus_per_worker": 0}, "cpus_per_worker"),
                       ({"model": "/m", "inputs": "/i", "output_root": "/o", "report": "yes"}, "report must be true"),
                       ({"model": "/m", "inputs": "/i", "output_root": "/o", "retry_failed": 1}, "retry_failed must be"),
                       ({"model": "/m", "inputs": "/i", "output_root": "/o", "address": 6379}, "address must be"),
                       ({"model": "/m", "inputs": [], "output_root": "/o"}, "inputs is empty: name the files"),
                       ({"model": "/m", "inputs": ["/i", " "], "output_root": "/o"}, "inputs holds an empty entry"),
                       # checked when read, though a --date may override it tonight
                       ({"model": "/m", "inputs": "/i", "output_root": "/o", "date": "tomorrow"},
                        "date must be today, yesterday or YYYY-MM-DD, not 'tomorrow'")):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(nightly.ConfigError, match=match):
            nightly.load_config(tmp_path / "bad.json")
    (tmp_path / "broken.toml").write_text("model = \n")
    with pytest.raises(nightly.ConfigError, match="TOML"):
        nightly.load_config(tmp_path / "broken.toml")
    cfg = nightly.load_config(write_toml(tmp_path / "up.toml", model="m", inputs="i", output_root="sub/../results",
                                         map_format="float32"))
    assert cfg["output_root"] == str(tmp_path / "results") and cfg["map_format"] == "float32"  # every MAP_FORMATS
    assert run_nightly(["--config", str(tmp_path / "up.toml")]) == nightly.EXIT_CONFIG  # no model there: exit 2
    assert not (tmp_path / "results").exists()


def test_dates_placeholders_partitions():
    today = dt.date(2024, 3, 1)
    assert nightly.resolve_date("yesterday", today) == dt.date(2024, 2, 29)
    assert nightly.resolve_date("today", today) == today
    assert nightly.resolve_date("2023-12-31", today) == dt.date(2023, 12, 31)
    with pytest.raises(nightly.ConfigError):
        nightly.resolve_date("last tuesday", today)
    assert nightly.expand_placeholders(["/d/{yyyy}/{mm}/{dd}/*.png", "/l/{date}.txt", "x{yyyymmdd}"], today) == [
        "/d/2024/03/01/*.png", "/l/2024-03-01.txt", "x20240301"]
    with pytest.raises(nightly.ConfigError, match="placeholder.*literal brace"):
        nightly.expand_placeholders(["/d/{day}"], today)
    assert nightly.expand_placeholders(["/d/{{raw}}/{date}"], today) == ["/d/{raw}/2024-03-01"]
    assert nightly.partition("/r", today) == Path("/r/dt=2024-03-01")


def test_nightly_run_writes_partition_summary_report_and_resumes(tmp_path, synthetic_root, bundle_tiny, capsys):
    day = "2024-05-01"
    images = tmp_path / "line" / day
    shutil.copytree(synthetic_root / "washer" / "test", images)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    config = write_toml(tmp_path / "nightly.toml", model=str(bundle_tiny), inputs=["line/{date}"],
                        output_root="results", engine="local", top_n=3, chunk_size=8, date="yesterday")
    code = run_nightly(["--config", str(config), "--date", day])
    assert code == nightly.EXIT_FAILED_INPUTS  # one bad input, fail_on_errors defaults to true
    assert f"FAILED  {images / 'broken.png'}: " in capsys.readouterr().err  # the cron log says what to fix
    part = tmp_path / "results" / f"dt={day}"
    record = json.loads((part / "_nightly.json").read_text())
    n_images = len(list(images.rglob("*.png")))
    assert record["date"] == day and record["exit_code"] == 1 and record["out"] == str(part)
    assert record["counts"]["inputs"] == record["counts"]["rows"] == n_images
    assert record["counts"]["failed"] == 1 and record["failures"][0]["path"] == str(images / "broken.png")
    assert len(record["top"]) == 3 and record["top"][0]["image_score"] >= record["top"][-1]["image_score"]
    assert record["anomaly_rate"] == record["counts"]["anomalous"] / record["counts"]["scored"]
    assert (part / "_summary.json").is_file() and (part / "_report.html").read_text().startswith("<!doctype html>")
    # the partitioned table: readable as a hive dataset, the dt column from the directory name
    table = pads.dataset(tmp_path / "results", format="parquet", partitioning="hive").to_table()
    assert table.num_rows == n_images and set(table.column("dt").to_pylist()) == {day}
    from pni_ray.report import build_report

    with pytest.raises(ValueError, match=rf"holds the nightly job's partitions \(dt={day} .. dt={day}\): report one"):
        build_report(tmp_path / "results")  # the root, not a day
    # a rerun the same day resumes: nothing scheduled, nothing duplicated
    write_toml(config, model=str(bundle_tiny), inputs=["line/{date}"], output_root="results", engine="local",
               top_n=3, chunk_size=8, fail_on_errors=False)
    code, record = nightly.run(config, date=day)
    assert code == nightly.EXIT_OK and record["run"]["scheduled"] == 0 and record["counts"]["rows"] == n_images
    # the file written again since: --retry-failed scores its error row again, and only it
    shutil.copy(next(p for p in sorted(images.rglob("*.png")) if p.name != "broken.png"), images / "broken.png")
    assert run_nightly(["--config", str(config), "--date", day, "--retry-failed"]) == nightly.EXIT_OK
    record = json.loads((part / "_nightly.json").read_text())
    assert record["run"]["scheduled"] == 1 and record["counts"]["failed"] == 0
    assert record["counts"]["rows"] == record["counts"]["scored"] == n_images
    # a run that writes no report leaves none of an earlier run's beside its record
    write_toml(config, model=str(bundle_tiny), inputs=["line/{date}"], output_root="results", engine="local",
               top_n=3, chunk_size=8, fail_on_errors=False, report=False)
    code, record = nightly.run(config, date=day)
    assert code == nightly.EXIT_OK and record["report"] is None and not (part / "_report.html").exists()
    # a nightly refused while a `pni-ray score` of the same OUT runs leaves the finished run's record, not "running"
    from pni_ray.orchestration.score_output import locked

    finished = (part / "_nightly.json").read_bytes()
    with locked(part):
        code, refused = nightly.run(config, date=day)
    assert code == nightly.EXIT_RUN and refused["status"] == "refused" and "another pni-ray run (score or nightly)" in refused["error"]
    assert (part / "_nightly.json").read_bytes() == finished


def test_output_root_inside_the_model_is_refused(tmp_path, bundle_tiny):
    """Results under the model directory would go with its next `train --force` or `export --force`."""
    model = tmp_path / "model"
    shutil.copytree(bundle_tiny, model)
    (tmp_path / "link").symlink_to(model)
    for root in ("model/results", "link/results"):
        config = write_toml(tmp_path / "n.toml", model="model", inputs=["in"], output_root=root, engine="local")
        assert run_nightly(["--config", str(config), "--date", "2024-01-02"]) == nightly.EXIT_CONFIG
    assert not (model / "results").exists()
    from pni_ray.orchestration.score import ScoreError, score

    with pytest.raises(ScoreError, match="is inside the model"):
        score(model, [str(tmp_path)], tmp_path / "link" / "scores", engine="local")
    assert not (model / "scores").exists()


def test_nightly_exit_codes_for_bad_config_and_bad_model(tmp_path):
    assert run_nightly(["--config", str(tmp_path / "nope.toml")]) == nightly.EXIT_CONFIG
    (tmp_path / "m").mkdir()
    config = write_toml(tmp_path / "n.toml", model="m", inputs=["in"], output_root="out", engine="local")
    assert run_nightly(["--config", str(config), "--date", "2024-01-02"]) == nightly.EXIT_RUN
    record = json.loads((tmp_path / "out" / "dt=2024-01-02" / "_nightly.json").read_text())
    assert "manifest.json" in record["error"]


def test_nightly_backbone_runtime_reaches_score(tmp_path, bundle_tiny):
    """The config's backbone_runtime is score's: OpenVINO for a torch bundle is refused before scoring."""
    config = write_toml(tmp_path / "n.toml", model=str(bundle_tiny), inputs=["in"], output_root="out", engine="local",
                        backbone_runtime="openvino")
    assert run_nightly(["--config", str(config), "--date", "2024-01-02"]) == nightly.EXIT_RUN
    record = json.loads((tmp_path / "out" / "dt=2024-01-02" / "_nightly.json").read_text())
    assert "export directories only" in record["error"] and record["config"]["backbone_runtime"] == "openvino"


def test_the_console_command_exits_with_the_documented_status(tmp_path):
    """What cron, `ray job submit` and a RayJob read: the process's own exit status, 2 for a config that cannot be
    read (missing, a directory), 3 for a model folder that holds no model; the moved module itself says where the
    job is now instead of exiting 0 without a run."""
    def status(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pni_ray", "nightly", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)

    missing = status("--config", str(tmp_path / "nope.toml"), "-q")
    assert missing.returncode == nightly.EXIT_CONFIG and "config error" in missing.stderr, missing.stderr
    folder = status("--config", str(tmp_path))
    assert folder.returncode == nightly.EXIT_CONFIG and "config error" in folder.stderr, folder.stderr
    (tmp_path / "empty_model").mkdir()
    config = write_toml(tmp_path / "n.toml", model="empty_model", inputs=["in"], output_root="out", engine="local")
    refused = status("--config", str(config), "--date", "2024-01-02")
    assert refused.returncode == nightly.EXIT_RUN and "refused: " in refused.stderr, refused.stderr
    old = subprocess.run([sys.executable, "-m", "pni_ray.orchestration.nightly", "--config", str(config)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert old.returncode != 0 and "pni-ray nightly --config FILE" in old.stderr


def test_entrypoint_runs_as_a_module_beside_a_users_own_export_and_jobs(tmp_path):
    """`python -m pni_ray nightly` from a folder holding modules named like pni-ray's former top-level packages
    (`export`, `jobs`): the working directory comes first on sys.path (Ray puts the driver's there on every
    worker too), and a user's `export.py` once broke Ray scoring."""
    for name in ("export.py", "jobs.py"):
        (tmp_path / name).write_text(f"raise SystemExit('the user\\'s {name} was imported')\n")
    for args in (["nightly", "--help"], ["export", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "pni_ray", *args], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0 and "Usage: pni-ray " in proc.stdout, proc.stderr
    probe = "import pni_ray.options, pni_ray.export.runtime, pni_ray.orchestration.score_model"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_example_config_is_valid_names_every_key_and_ships_with_the_command(tmp_path, capsys):
    """The annotated example is what a wheel user gets from `pni-ray nightly --example-config` (no checkout needed)
    and what jobs/nightly.example.toml links to: it must load as it is, and with its commented-out keys switched on
    (a key renamed or a value rule changed would otherwise leave the example wrong), and name every key there is."""
    text = nightly.example_config()
    repo_copy = Path(__file__).resolve().parents[1] / "jobs" / "nightly.example.toml"
    assert repo_copy.read_text() == text
    assert nightly.load_config(repo_copy)["date"] == "yesterday"
    switched_on = re.sub(r"(?m)^# (\w+ = )", r"\1", text)
    assert switched_on != text
    (tmp_path / "all.toml").write_text(switched_on)
    named = {m for m in re.findall(r"(?m)^(\w+) = ", switched_on)}
    assert named == set(nightly.DEFAULTS) | set(nightly.REQUIRED)
    loaded = nightly.load_config(tmp_path / "all.toml")
    assert loaded["backbone_runtime"] == "openvino" and loaded["workers"] == 4 and loaded["address"] == "auto"

    assert run_nightly(["--example-config"]) == 0  # no --config asked: the flag answers first
    assert capsys.readouterr().out == text


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_an_interrupted_nightly_records_it_and_resumes(tmp_path, synthetic_root, bundle_tiny, monkeypatch, capsys,
                                                       sigterm_guard, stop):
    """Ctrl-C, or SIGTERM (a Kubernetes deadline, which main turns into the same), after one part:
    _nightly.json says failed and why, exit 3 without a traceback; the rerun scores only what is missing."""
    import os
    import signal
    import time

    from pni_ray.orchestration import score as score_module

    day = "2024-05-02"
    images = tmp_path / "line" / day
    shutil.copytree(synthetic_root / "washer" / "test" / "good", images)
    config = write_toml(tmp_path / "nightly.toml", model=str(bundle_tiny), inputs=["line/{date}"],
                        output_root="results", engine="local", chunk_size=2)
    run_local = score_module.ENGINES["local"]

    def interrupted_after_one_chunk(rows, info, opts):
        yield next(run_local(rows, info, opts))
        if stop == "SIGTERM":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # main's handler raises at once
        raise KeyboardInterrupt

    monkeypatch.setitem(score_module.ENGINES, "local", interrupted_after_one_chunk)
    assert run_nightly(["--config", str(config), "--date", day]) == nightly.EXIT_RUN
    record = json.loads((tmp_path / "results" / f"dt={day}" / "_nightly.json").read_text())
    assert record["status"] == "failed" and record["error"].startswith(f"interrupted ({stop})")
    err = capsys.readouterr().err
    assert f"interrupted ({stop})" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard
    monkeypatch.setitem(score_module.ENGINES, "local", run_local)
    code, record = nightly.run(config, date=day)
    n_images = len(list(images.glob("*.png")))
    assert code == nightly.EXIT_OK and record["run"]["already_done"] == 2 and record["counts"]["rows"] == n_images


def test_a_cluster_the_nightly_cannot_join_is_refused_in_one_message(tmp_path, bundle_tiny, monkeypatch, capsys):
    """No token, a wrong address: _nightly.json says refused with join_ray's message, which names the
    config's key (the job has no --address flag); exit 3 and no traceback."""
    from pni_ray.orchestration import ray_session

    def refuse(address, *, named_by, **kwargs):
        target, source = ray_session.resolve_address(address, named_by)
        raise ray_session.RayJoinError(ray_session.join_error_message(target, source, ConnectionError("refused")))

    monkeypatch.setattr(ray_session, "join_ray", refuse)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"not scored")
    config = write_toml(tmp_path / "n.toml", model=str(bundle_tiny), inputs=["in"], output_root="out",
                        address="127.0.0.1:6999")
    assert run_nightly(["--config", str(config), "--date", "2024-01-02"]) == nightly.EXIT_RUN
    record = json.loads((tmp_path / "out" / "dt=2024-01-02" / "_nightly.json").read_text())
    assert record["status"] == "refused"
    assert record["error"].startswith(f"cannot join the Ray cluster at 127.0.0.1:6999 (from address in {config}): ")
    assert "set RAY_AUTH_MODE=token" in record["error"]
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cannot join the Ray cluster" in err


def test_nightly_threads_reach_the_local_engine(tmp_path, bundle_tiny, monkeypatch):
    from pni_ray.orchestration import score as score_module

    seen = []

    def engine(rows, info, opts):
        seen.append(opts.threads)
        return score_module.run_local(rows, info, opts)

    monkeypatch.setitem(score_module.ENGINES, "local", engine)
    (tmp_path / "in").mkdir()
    Image = pytest.importorskip("PIL.Image")
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "in" / "a.png")
    config = write_toml(tmp_path / "n.toml", model=str(bundle_tiny), inputs=["in"], output_root="out", engine="local",
                        threads=1)
    assert run_nightly(["--config", str(config), "--date", "2024-01-02"]) == nightly.EXIT_OK and seen == [1]


def test_config_words_change_the_remedy_only(tmp_path, synthetic_root, bundle_tiny):
    """The config's keys stand where score names its options in a remedy; a path holding "--out" and another
    command's example keep their text."""
    (tmp_path / "in").mkdir()
    shutil.copy(next((synthetic_root / "washer" / "test" / "good").glob("*.png")), tmp_path / "in" / "a.png")
    config = write_toml(tmp_path / "n.toml", model=str(bundle_tiny), inputs=["in"], output_root="--out", engine="local")
    assert run_nightly(["--config", str(config), "--date", "2024-01-02"]) == nightly.EXIT_OK
    write_toml(config, model=str(bundle_tiny), inputs=["in"], output_root="--out", engine="local", map_format="float16")
    assert run_nightly(["--config", str(config), "--date", "2024-01-02"]) == nightly.EXIT_RUN
    error = json.loads((tmp_path / "--out" / "dt=2024-01-02" / "_nightly.json").read_text())["error"]
    assert error == (f"{tmp_path}/--out/dt=2024-01-02 holds maps in format 'uint8', not 'float16': use the same "
                     "map_format or another output_root")
    write_toml(config, model=str(bundle_tiny), inputs=["in"], output_root="--out", engine="local",
               backbone_runtime="openvino")
    assert run_nightly(["--config", str(config), "--date", "2024-01-03"]) == nightly.EXIT_RUN
    error = json.loads((tmp_path / "--out" / "dt=2024-01-03" / "_nightly.json").read_text())["error"]
    assert "(pni-ray export BUNDLE --out DIR, then score DIR)" in error


def test_a_refusal_speaks_in_the_configs_keys(tmp_path, synthetic_root, bundle_tiny, capsys):
    """score words its refusals for its command line (--map-format, --out); the nightly user edits map_format and
    output_root, and the console line says "refused" as the record does. A bad --date is named as the flag's."""
    images = tmp_path / "in"
    images.mkdir()
    shutil.copy(next((synthetic_root / "washer" / "test" / "good").glob("*.png")), images / "a.png")
    config = write_toml(tmp_path / "n.toml", model=str(bundle_tiny), inputs=["in"], output_root="out", engine="local")
    assert run_nightly(["--config", str(config), "--date", "2024-01-02"]) == nightly.EXIT_OK
    write_toml(config, model=str(bundle_tiny), inputs=["in"], output_root="out", engine="local", map_format="float16")
    capsys.readouterr()
    assert run_nightly(["--config", str(config), "--date", "2024-01-02"]) == nightly.EXIT_RUN
    record = json.loads((tmp_path / "out" / "dt=2024-01-02" / "_nightly.json").read_text())
    assert record["status"] == "refused" and "use the same map_format or another output_root" in record["error"]
    assert "nightly 2024-01-02 refused: " in capsys.readouterr().err
    assert run_nightly(["--config", str(config), "--date", "2024-13-01"]) == nightly.EXIT_CONFIG
    assert "config error: --date: date must be" in capsys.readouterr().err
    assert run_nightly(["--config", str(config), "--date", ""]) == nightly.EXIT_CONFIG  # a cron $(...) gone empty
    assert "--date is empty" in capsys.readouterr().err


def test_a_date_is_a_day_in_the_one_form_the_message_names():
    with pytest.raises(nightly.ConfigError, match="not a date and time"):
        nightly.resolve_date(dt.datetime(2024, 1, 3, 10))  # TOML's 2024-01-03T10:00:00
    for text in ("20240103", "2024-W01-3", "2024-1-3"):
        with pytest.raises(nightly.ConfigError, match="YYYY-MM-DD"):
            nightly.resolve_date(text)
    assert nightly.resolve_date(" 2024-01-03 ") == dt.date(2024, 1, 3)
