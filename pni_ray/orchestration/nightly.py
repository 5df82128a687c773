"""Nightly scoring job (`pni-ray nightly --config FILE`): every image a line produced, scored into a date
partition, with a report. What it reads and writes is in `nightly_cmd`'s help (`pni-ray nightly --help`);
how to run it from cron, `ray job submit` or a KubeRay RayJob, in jobs/README.md.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import click

from pni_ray.orchestration.ray_session import RayJoinError
from pni_ray.orchestration.score_inputs import normalise_path
from pni_ray.orchestration.stopping import interrupted_message, terminate_as_interrupt

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "date": "today",
    "map_format": "uint8",
    "top_n": 20,
    "report": True,
    "report_top": 12,
    "fail_on_errors": True,
    "engine": "ray",
    "address": None,
    "batch_size": 8,
    "workers": None,
    "cpus_per_worker": 1.0,
    "gpus_per_worker": 0.0,
    "max_pixels": 50_000_000,
    "chunk_size": 64,
    "backbone_runtime": "onnxruntime",
    "backbone_precision": "auto",
    "retry_failed": False,
    "threads": None,
}
# each key's kind, checked when the config is read (a bad value is a config error, exit 2): whole numbers
# with their least value, numbers likewise, and true/false
WHOLE = {"top_n": 0, "report_top": 0, "batch_size": 1, "max_pixels": 1, "chunk_size": 1, "workers": 0, "threads": 1}
NUMBER = {"cpus_per_worker": 0.0, "gpus_per_worker": 0.0}
SWITCH = ("report", "fail_on_errors", "retry_failed")
REPORT_FILE = "_report.html"
REQUIRED = ("model", "inputs", "output_root")
EXIT_OK, EXIT_FAILED_INPUTS, EXIT_CONFIG, EXIT_RUN = 0, 1, 2, 3
EXAMPLE_CONFIG = "nightly.example.toml"  # package data beside this module
KEPT = "the parts committed so far are kept"  # what a stopped run leaves (interrupted_message)


class ConfigError(ValueError):
    pass


def load_config(path: Path | str) -> dict[str, Any]:
    """Parse and validate; relative paths become relative to the config file's directory."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc})") from exc
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib

            raw = tomllib.loads(text.decode("utf-8"))
    except Exception as exc:  # noqa: BLE001 - TOML and JSON errors alike
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'} ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a table/object")
    unknown = sorted(set(raw) - set(DEFAULTS) - set(REQUIRED))
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown} (known: {sorted(set(DEFAULTS) | set(REQUIRED))})")
    missing = [k for k in REQUIRED if k not in raw]  # present but empty: said as empty below
    if missing:
        raise ConfigError(f"{path}: missing required keys {missing}")
    empty = [k for k in REQUIRED if not raw[k]]
    if empty:
        raise ConfigError(f"{path}: {', '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty: "
                          + ("name the files, folders, globs or list files to score" if empty == ["inputs"]
                             else "each of model, inputs and output_root names something"))
    cfg = {**DEFAULTS, **raw}
    if isinstance(cfg["inputs"], str):
        cfg["inputs"] = [cfg["inputs"]]
    if not isinstance(cfg["inputs"], list) or not all(isinstance(i, str) for i in cfg["inputs"]):
        raise ConfigError(f"{path}: inputs must be a string or a list of strings")
    if any(not i.strip() for i in cfg["inputs"]):  # "" would name the config's own folder
        raise ConfigError(f"{path}: inputs holds an empty entry: each names a file, folder, glob or list file")
    try:  # checked even on a night whose --date overrides it, so a bad value is not found on the next night
        resolve_date(cfg["date"])
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    problem = value_problem(cfg)
    if problem:
        raise ConfigError(f"{path}: {problem}")
    from pni_ray.results import MAP_FORMATS

    if cfg["map_format"] not in MAP_FORMATS:
        raise ConfigError(f"{path}: map_format must be one of {', '.join(MAP_FORMATS)}, not {cfg['map_format']!r}")
    if cfg["engine"] not in ("ray", "local"):
        raise ConfigError(f"{path}: engine must be ray or local, not {cfg['engine']!r}")
    from pni_ray.export.openvino_backbone import BACKBONE_RUNTIMES, PRECISIONS

    if cfg["backbone_runtime"] not in BACKBONE_RUNTIMES:
        raise ConfigError(f"{path}: backbone_runtime must be one of {BACKBONE_RUNTIMES}, not {cfg['backbone_runtime']!r}")
    if cfg["backbone_precision"] not in PRECISIONS:
        raise ConfigError(f"{path}: backbone_precision must be one of {PRECISIONS}, not {cfg['backbone_precision']!r}")
    if cfg["backbone_precision"] != "auto" and cfg["backbone_runtime"] != "openvino":  # said in the config's words
        raise ConfigError(f"{path}: backbone_precision {cfg['backbone_precision']!r} applies to backbone_runtime "
                          "\"openvino\" only: set that too, or leave backbone_precision \"auto\"")
    base = path.resolve().parent

    def rel(p: str) -> str:  # joined, not normalised: score's inputs resolve "..", links included, as read
        if p.startswith("@"):
            return "@" + rel(p[1:])
        return os.path.join(base, os.path.expanduser(p))

    cfg["model"] = normalise_path(str(cfg["model"]), str(base))
    cfg["output_root"] = normalise_path(str(cfg["output_root"]), str(base))
    cfg["inputs"] = [rel(i) for i in cfg["inputs"]]
    cfg["_config_path"] = str(path.resolve())
    return cfg


def value_problem(cfg: dict[str, Any]) -> str | None:
    """What is wrong with the config's numeric and true/false values, or None (whole floats such as 5e7
    become ints in `cfg`)."""
    for key, least in WHOLE.items():
        value = cfg[key]
        if key in ("workers", "threads") and value is None:
            continue
        if isinstance(value, float) and value.is_integer():  # 5e7 in TOML is a float
            value = cfg[key] = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            return f"{key} must be a whole number >= {least}, not {value!r}"
    for key, least in NUMBER.items():
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not least <= value < float("inf"):
            return f"{key} must be a number >= {least:g}, not {value!r}"
    if cfg["cpus_per_worker"] == 0:
        return "cpus_per_worker must be > 0, not 0"
    for key in SWITCH:
        if not isinstance(cfg[key], bool):
            return f"{key} must be true or false, not {cfg[key]!r}"
    if cfg["address"] is not None and not isinstance(cfg["address"], str):
        return f"address must be a string, not {cfg['address']!r}"
    return None


def resolve_date(value: str | dt.date, today: dt.date | None = None) -> dt.date:
    today = today or dt.date.today()
    if isinstance(value, dt.datetime):  # TOML's 2024-01-03T10:00:00: a partition is a day
        raise ConfigError(f"date must be today, yesterday or YYYY-MM-DD, not a date and time ({value.isoformat()})")
    if isinstance(value, dt.date):
        return value
    text = str(value).strip().lower()
    if text == "today":
        return today
    if text == "yesterday":
        return today - dt.timedelta(days=1)
    try:  # the one form the message names (Python 3.11 also takes 20240103 and week dates)
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return dt.date.fromisoformat(text)
    except ValueError:
        pass
    raise ConfigError(f"date must be today, yesterday or YYYY-MM-DD, not {value!r}")


def expand_placeholders(inputs: list[str], day: dt.date) -> list[str]:
    values = {"date": day.isoformat(), "yyyy": f"{day.year:04d}", "mm": f"{day.month:02d}",
              "dd": f"{day.day:02d}", "yyyymmdd": day.strftime("%Y%m%d")}
    out = []
    for spec in inputs:
        try:
            out.append(spec.format_map(values))
        except (KeyError, ValueError, IndexError) as exc:
            raise ConfigError(f"input {spec!r}: unknown placeholder ({exc}); use {sorted(values)}, and {{{{ / }}}} "
                              "for a literal brace") from exc
    return out


# `score`'s options as its refusals name them -> the config keys a nightly user changes instead
CONFIG_WORDS = {"--map-format": "map_format", "--out": "output_root", "--backbone-runtime": "backbone_runtime",
                "--backbone-precision": "backbone_precision"}


def _record_status(out: Path) -> str | None:
    """The status of OUT's last run record (None: none, or unreadable)."""
    try:
        return json.loads((out / "_nightly.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def partition(output_root: str | Path, day: dt.date) -> Path:
    return Path(output_root) / f"dt={day.isoformat()}"


def run(config_path: Path | str, date: str | None = None, progress: bool = False,
        retry_failed: bool = False) -> tuple[int, dict[str, Any]]:
    """The whole nightly run; returns (exit code, run record written to _nightly.json). retry_failed (or the
    config's retry_failed): the partition's error rows are scored again, as `pni-ray score --retry-failed`."""
    from pni_ray.fileio import atomic_write_bytes, inside
    from pni_ray.orchestration.score import Options, ScoreError, score
    from pni_ray.orchestration.score_output import OutInUse
    from pni_ray.results import atomic_write_json, now_utc

    t0 = time.perf_counter()
    started = now_utc()
    cfg = load_config(config_path)
    if not Path(cfg["model"]).is_dir():  # a config naming no model is a config error (exit 2), not a failed run
        raise ConfigError(f"{cfg['_config_path']}: model {cfg['model']} is not a directory (a bundle, or an export: "
                          "`pni-ray export BUNDLE --out DIR`)")
    if inside(cfg["output_root"], cfg["model"]):  # retraining or re-exporting it with --force would delete them
        raise ConfigError(f"{cfg['_config_path']}: output_root {cfg['output_root']} is inside the model {cfg['model']}: "
                          "results go to a directory of their own")
    if date is not None and not date.strip():  # a cron line's $(...) that printed nothing: not "the config's day"
        raise ConfigError("--date is empty: give today, yesterday or YYYY-MM-DD, or leave it out for the config's date")
    try:
        day = resolve_date(date or cfg["date"])
    except ConfigError as exc:
        raise ConfigError(f"--date: {exc}") from None  # the config's own date was checked when it was read
    inputs = expand_placeholders(cfg["inputs"], day)
    out = partition(cfg["output_root"], day)
    record: dict[str, Any] = {"date": day.isoformat(), "config": {k: v for k, v in cfg.items() if not k.startswith("_")},
                              "config_path": cfg["_config_path"], "inputs": inputs, "out": str(out),
                              "started_at": started.isoformat()}
    opts = Options(batch_size=int(cfg["batch_size"]), workers=cfg["workers"], cpus_per_worker=float(cfg["cpus_per_worker"]),
                   gpus_per_worker=float(cfg["gpus_per_worker"]), map_format=cfg["map_format"],
                   max_pixels=int(cfg["max_pixels"]), chunk_size=int(cfg["chunk_size"]), address=cfg["address"],
                   address_named_by=f"address in {cfg['_config_path']}",
                   backbone_runtime=cfg["backbone_runtime"], backbone_precision=cfg["backbone_precision"],
                   threads=cfg["threads"], option_names=CONFIG_WORDS)
    log.info("nightly %s: %d input specs -> %s", day, len(inputs), out)
    # until this run ends, its record says so: a killed run leaves "running", not yesterday's counts (a
    # record already "running" is left alone: it may be a live run's, which holds OUT's lock)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "_nightly.json"
    previous = record_path.read_bytes() if record_path.is_file() else None  # put back if OUT turns out busy
    marked = _record_status(out) != "running"
    if marked:
        atomic_write_json(record_path, {**record, "status": "running"})
    try:
        summary = score(cfg["model"], inputs, out, opts, engine=cfg["engine"], top_n=int(cfg["top_n"]),
                        progress=progress, retry=retry_failed or cfg["retry_failed"])
        report_path = None
        (out / REPORT_FILE).unlink(missing_ok=True)  # an earlier run's (OUT is this run's now): not kept beside none
        if cfg["report"] and summary["rows"]:
            from pni_ray.report import write_report

            report_path = out / REPORT_FILE
            write_report(out, report_path, top_n=int(cfg["report_top"]),
                         title=f"pni-ray nightly {day.isoformat()}: {summary.get('category') or ''}")
    except OutInUse as exc:  # another run of this day is writing (a nightly, or a `score` of the same OUT): the
        if marked:  # record is the last finished run's, not one that never ran
            if previous is None:
                record_path.unlink(missing_ok=True)
            else:
                atomic_write_bytes(record_path, previous)
        return EXIT_RUN, {**record, "status": "refused", "exit_code": EXIT_RUN, "error": str(exc)}
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (main's terminate_as_interrupt): recorded, then
        record.update(status="failed", exit_code=EXIT_RUN,  # raised on, so a caller looping over dates stops too
                      error=interrupted_message(exc, KEPT))
        atomic_write_json(out / "_nightly.json", record)
        raise
    except Exception as exc:  # noqa: BLE001 - refused or crashed: the record says which, then the exit code
        refused = isinstance(exc, (ScoreError, RayJoinError))  # what to change, said in one message
        record.update(status="refused" if refused else "failed", exit_code=EXIT_RUN,
                      error=str(exc) if refused else f"{exc.__class__.__name__}: {exc}")
        atomic_write_json(out / "_nightly.json", record)
        if not refused:
            raise
        return EXIT_RUN, record
    failed = summary["failed"] + summary["missing"]
    code = EXIT_FAILED_INPUTS if failed and cfg["fail_on_errors"] else EXIT_OK
    record.update(
        status="finished",
        finished_at=now_utc().isoformat(),
        seconds=round(time.perf_counter() - t0, 3),
        exit_code=code,
        counts={k: summary[k] for k in ("inputs", "rows", "other_rows", "scored", "failed", "anomalous", "missing",
                                        "duplicates_ignored", "duplicate_rows")},
        anomaly_rate=summary["anomaly_rate"],
        threshold=summary["threshold"],
        model_id=summary["model_id"],
        top=summary["top"],
        failures=summary["failures"],
        summary=str(out / "_summary.json"),
        report=str(report_path) if report_path else None,
        table=str(out),
        run=summary.get("run"),
    )
    atomic_write_json(out / "_nightly.json", record)
    return code, record


def example_config() -> str:
    """The annotated example config shipped in the package (jobs/nightly.example.toml in the repository)."""
    from importlib.resources import files

    return files("pni_ray.orchestration").joinpath(EXAMPLE_CONFIG).read_text(encoding="utf-8")


def _print_example(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(example_config(), nl=False)
        ctx.exit(0)


@click.command("nightly")
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path),
              help="TOML or JSON config file (--example-config prints an annotated one).")
@click.option("--example-config", is_flag=True, expose_value=False, is_eager=True, callback=_print_example,
              help="Print an annotated example config and exit (`pni-ray nightly --example-config > nightly.toml`).")
@click.option("--date", default=None, help="today, yesterday or YYYY-MM-DD (overrides the config).")
@click.option("--retry-failed", is_flag=True,
              help="Score the date's error rows again (a file that was missing or half-written then).")
@click.option("--progress", is_flag=True, help="Show a progress bar.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors (as `pni-ray -q nightly`).")
def nightly_cmd(config_path: Path, date: str | None, retry_failed: bool, progress: bool, quiet: bool) -> None:
    """Nightly scoring job: every image a line produced, scored into a date partition, with a report.

    Run it anywhere Python runs; on a cluster through the Ray Jobs API:

    \b
        ray job submit --address http://HEAD:8265 -- pni-ray nightly --config /etc/pni-ray/nightly.toml

    Config (TOML or JSON; relative paths are relative to the config file; `--example-config` prints an
    annotated one):

    \b
        model        bundle, ensemble or export directory (required)
        inputs       list of files, directories, globs or list files (required); may use {date},
                     {yyyy}, {mm}, {dd}, {yyyymmdd} for the run date ({{ and }}: literal braces)
        output_root  results go to OUTPUT_ROOT/dt=YYYY-MM-DD/ (required)
        date         "today" (default), "yesterday" or YYYY-MM-DD (today's in this machine's time zone);
                     --date overrides
        map_format   uint8 (default) | float16 | float32 | none
        top_n        most anomalous images listed in the run summary (default 20)
        report       write dt=.../_report.html (default true); report_top: images shown in it (default 12)
        fail_on_errors  exit 1 when any input has an error row (default true)
        retry_failed score the date's error rows again when it is rerun (default false; --retry-failed)
        engine, address, batch_size, workers, cpus_per_worker, gpus_per_worker, max_pixels, chunk_size,
        backbone_runtime, backbone_precision:
                     as for `pni-ray score` (backbone_runtime "openvino": exports only, OpenVINO installed)
        threads      engine "local" only: torch / ONNX Runtime threads (default: $PNI_RAY_THREADS, else all cores), as `score --threads`

    Writes, inside the partition: part-*.parquet (the table), _summary.json (counts, failures,
    anomaly rate, top N), _report.html, and _nightly.json (this run: config, date, timings, exit code;
    its status is "running" from the start until the run is "finished", "refused" or "failed", so a
    killed run never leaves an earlier run's record behind).
    Rerunning for the same date resumes: only inputs without a row are scored; with --retry-failed (or
    retry_failed = true) the error rows too, e.g. once a file that was half-written has been written again.

    Exit status: 0 all scored; 1 some inputs failed (fail_on_errors); 2 bad config (or no model at `model`);
    3 the run was refused, failed or was stopped (Ctrl-C, SIGTERM: recorded as failed, "interrupted ...").
    """
    if quiet:
        logging.getLogger("pni_ray").setLevel(logging.WARNING)
    sys.exit(run_job(config_path, date, progress, retry_failed))  # SystemExit: the status cron and Ray Jobs read


def run_job(config_path: Path | str, date: str | None = None, progress: bool = False, retry_failed: bool = False) -> int:
    """One nightly run, said on stdout / stderr as a cron log shows it; its exit status."""
    try:
        with terminate_as_interrupt():
            code, record = run(config_path, date=date, progress=progress, retry_failed=retry_failed)
    except KeyboardInterrupt as exc:  # run() recorded it where it had begun its output
        print(f"nightly {interrupted_message(exc, KEPT)}", file=sys.stderr)
        return EXIT_RUN
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception:  # noqa: BLE001 - a nightly job reports, it does not dump and vanish
        traceback.print_exc()
        return EXIT_RUN
    if "counts" in record:
        c = record["counts"]
        rate = record["anomaly_rate"]
        print(f"nightly {record['date']}: {c['inputs']} inputs, {c['scored']} scored, {c['failed']} failed, "
              f"{'n/a (no threshold)' if c['anomalous'] is None else c['anomalous']} anomalous "
              f"({'n/a' if rate is None else f'{rate:.1%}'}) -> {record['out']}")
        for row in record["top"][:5]:
            print(f"  {row['image_score']:10.4f}  {row['path']}")
        for failure in record["failures"][:10]:  # what to fix, where a cron log shows it
            print(f"  FAILED  {failure['error']}", file=sys.stderr)
        if c["failed"] > 10:
            print(f"  ... and {c['failed'] - 10} more failures (see {record['summary']})", file=sys.stderr)
        if record.get("report"):
            print(f"report: {record['report']}")
    else:
        print(f"nightly {record['date']} {record.get('status', 'failed')}: {record.get('error')}", file=sys.stderr)
    return code


if __name__ == "__main__":  # `python -m pni_ray.orchestration.nightly` would otherwise do nothing and exit 0
    sys.exit("run the nightly job as `pni-ray nightly --config FILE` (or `python -m pni_ray nightly --config FILE`)")
