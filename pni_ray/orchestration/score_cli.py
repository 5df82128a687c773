"""Click commands of batch scoring: `pni-ray score` and `pni-ray report`.

Only argument handling and the printed summary live here; the work is in score (the driver and its
Ray Data pipeline) and pni_ray.report.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from pni_ray.data.images import DEFAULT_MAX_PIXELS
from pni_ray.fileio import inside
from pni_ray.options import RunFailed, backbone_options, check_output_file, out_of_memory_message, progress_bars
from pni_ray.orchestration.ray_session import RayJoinError
from pni_ray.orchestration.score import ENGINES, Options, ScoreError, score
from pni_ray.orchestration.score_inputs import CHUNK_SIZE
from pni_ray.orchestration.score_output import SUMMARY_FILE
from pni_ray.orchestration.stopping import interrupted_message, terminate_as_interrupt
from pni_ray.results import MAP_FORMATS, DamagedPart

log = logging.getLogger(__name__)

VERDICT = {True: "ANOMALOUS", False: "ok       ", None: "-        "}  # None: no threshold
EXIT_OK, EXIT_FAILED_INPUTS = 0, 1  # click's usage errors exit 2; RunFailed 3


def echo_summary(summary: dict[str, Any], out: Path, top: int = 5) -> None:
    rate = summary["anomaly_rate"]
    run = summary.get("run", {})
    flagged = (f"{summary['anomalous']} anomalous (rate {'n/a' if rate is None else f'{rate:.1%}'})"
               if summary["anomalous"] is not None else
               "none decided anomalous or normal: the model has no threshold (trained without held-out images; "
               "is_anomalous is null, rank by image_score)")
    click.echo(
        f"{summary['inputs']} inputs: {summary['scored']} scored, {summary['failed']} failed, {flagged}; "
        f"{run.get('already_done', 0)} were already in {out}"
        + (f"; {run['images_per_s']:.1f} images/s" if run.get("images_per_s") and run.get("scored_this_run") else "")
    )
    if summary.get("other_rows"):
        others, failed = summary["other_rows"], summary.get("other_failed_rows", 0)
        click.echo(f"{out} also holds {others} row{'s' if others != 1 else ''} of inputs this run did not name (earlier "
                   "runs')" + (f", {failed} of them error rows (a path mistyped then?)" if failed else "")
                   + "; the counts above are this run's inputs (OUT keeps every row it was given: to hold only one "
                   "run's inputs, score into a new OUT)")
    if summary["missing"] or summary["duplicate_rows"]:
        click.echo(f"WARNING: {summary['missing']} inputs have no row, {summary['duplicate_rows']} duplicate rows",
                   err=True)
    shown = summary["top"][:top]
    if shown:
        click.echo(f"highest image scores ({len(shown)} of {summary['scored']} scored; the table has every row):")
    for row in shown:
        click.echo(f"  {row['image_score']:10.4f}  {VERDICT[row['is_anomalous']]}  {row['path']}")
    for f in summary["failures"][:10]:
        click.echo(f"  FAILED  {f['error']}", err=True)
    if summary["failed"] > 10:
        click.echo(f"  ... and {summary['failed'] - 10} more failures (see {out / SUMMARY_FILE})", err=True)
    kept = summary["failed"] - run.get("failed_this_run", 0)
    if kept > 0:  # error rows are final: a fix the message asks for (a file rewritten, --max-pixels) needs a retry
        click.echo(f"  {kept} of these error rows are an earlier run's, kept as they were: once the files or the "
                   "options they name are fixed, rerun with --retry-failed to score them again", err=True)
    click.echo(f"table: {out}/part-*.parquet  summary: {out / SUMMARY_FILE}")


@click.command("score")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory of Parquet part files (reruns resume).")
@click.option("--address", default=None,
              help="Ray cluster address (default: $RAY_ADDRESS, else embedded local Ray; 'local': embedded even with "
                   "$RAY_ADDRESS set).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Images per model forward pass.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Model actors (default or 0: CPUs / --cpus-per-worker); never more than the chunks to score.")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="CPUs per model actor (= its torch threads).")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=0.0, show_default=True, help="GPUs per model actor.")
@click.option("--map-format", type=click.Choice(MAP_FORMATS), default="uint8", show_default=True,
              help="How anomaly maps are stored.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Images above this many pixels are refused (decompression-bomb guard).")
@click.option("--chunk-size", type=click.IntRange(min=1), default=CHUNK_SIZE, show_default=True,
              help="Images per part file, and per worker task: a worker holds a chunk's maps at full resolution, about "
                   "4 bytes per image pixel (uint8 maps; 22 in float32): lower it for large images.")
@click.option("--engine", type=click.Choice(sorted(ENGINES)), default="ray", show_default=True,
              help="ray: Ray Data pipeline; local: the same stages in this process.")
@click.option("--stages", type=click.Choice(["auto", "fused", "split"]), default="auto", show_default=True,
              help="fused: model actors also decode and encode; split: separate decode/encode tasks "
                   "(auto: split with GPUs, fused on CPUs).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads for --engine local (default: $PNI_RAY_THREADS, else all cores).")
@backbone_options
@click.option("--top", "top_n", type=click.IntRange(min=0), default=20, show_default=True, help="Most anomalous images in the summary.")
@click.option("--retry-failed", is_flag=True,
              help="Try this run's inputs that hold only error rows in OUT again, their rows dropped when the run "
                   "first writes (also the rows of its folders, patterns and list files that held no image or could "
                   "not be read then).")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar (default: on a terminal, unless -q; elsewhere, as in a job's log, a log line a minute).")
def score_cmd(model: Path, inputs: tuple[str, ...], out: Path, address: str | None, batch_size: int,
              workers: int | None, cpus_per_worker: float, gpus_per_worker: float, map_format: str,
              max_pixels: int, chunk_size: int, engine: str, stages: str, threads: int | None,
              backbone_runtime: str, backbone_precision: str, top_n: int, retry_failed: bool, progress: bool | None) -> None:
    """Score every image of INPUT... with MODEL (a bundle, an ensemble or an export directory) into OUT.

    INPUT: files, directories (recursive), globs, or list files (@FILE, or a .txt/.lst file; one path
    per line). Exit status 0: every input scored; 1: some inputs have error rows; 2: usage error;
    3: the run was refused before it started (the message says what to change), failed or was stopped by
    Ctrl-C or SIGTERM (rerun to resume).
    """
    opts = Options(batch_size=batch_size, workers=workers, cpus_per_worker=cpus_per_worker,
                   gpus_per_worker=gpus_per_worker, map_format=map_format, max_pixels=max_pixels,
                   chunk_size=chunk_size, address=address, threads=threads, stages=stages,
                   backbone_runtime=backbone_runtime, backbone_precision=backbone_precision)
    try:
        with terminate_as_interrupt():
            summary = score(model, inputs, out, opts, engine=engine, top_n=top_n, progress=progress_bars(progress),
                            retry=retry_failed)
    except KeyboardInterrupt as exc:  # not click's "Aborted!" and exit 1, which says "some inputs failed"
        kept = f"the parts committed so far are kept in {out.resolve()} and no summary was written"
        raise RunFailed(interrupted_message(exc, kept)) from None
    except (ScoreError, DamagedPart) as exc:  # what to do is in the message: no traceback
        raise RunFailed(str(exc)) from None
    except RayJoinError as exc:  # nothing was scored: what to change, not a traceback and "rerun to resume"
        raise RunFailed(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - exit 1 means "some inputs failed", so a crash must not use it
        memory = out_of_memory_message(exc)
        if memory:  # in this process (the driver, or --engine local): what to lower, and that a rerun resumes
            raise RunFailed(f"{memory}; committed parts are kept, rerun to resume") from None
        log.exception("scoring run failed")
        raise RunFailed(f"scoring run failed ({exc.__class__.__name__}: {exc}); committed parts are kept, "
                        "rerun the same command to resume") from exc
    echo_summary(summary, out.resolve())
    if summary["failed"] or summary["missing"]:
        sys.exit(EXIT_FAILED_INPUTS)


def _is_html(path: Path) -> bool:
    """Whether the file starts as an HTML document does (a report this command wrote, or another page)."""
    with open(path, "rb") as fh:
        head = fh.read(512).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith((b"<!doctype html", b"<html")) or not head  # an empty file holds nothing to lose


@click.command("report")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--html", "html_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="HTML file to write (self-contained: opens offline).")
@click.option("--top", "top_n", type=click.IntRange(min=0), default=12, show_default=True, help="Most anomalous images shown.")
@click.option("--title", default=None, help="Report title (default: from the output directory).")
def report_cmd(out: Path, html_path: Path, top_n: int, title: str | None) -> None:
    """Self-contained HTML report of a `pni-ray score` output directory OUT."""
    from pni_ray.report import write_report

    check_output_file(html_path, "report", out, allowed_inside=(".html", ".htm"))
    if html_path.is_file() and not _is_html(html_path):  # `--html scores/top.png` replaced an image with a report
        raise click.UsageError(f"{html_path} exists and is not an HTML file: the report would replace it; give "
                               "another path (an earlier report is replaced)")
    target, root = Path(os.path.realpath(html_path)), Path(os.path.realpath(out))
    if inside(target, root) and not any(p.startswith(("_", ".")) for p in target.relative_to(root).parts):
        raise click.UsageError(f"{html_path}: inside OUT a report needs a name starting with _ (as the nightly job's "
                               "_report.html): Parquet readers take every other file there for data, and "
                               "pd.read_parquet(OUT) would fail on it")
    try:
        info = write_report(out, html_path, top_n=top_n, title=title)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"report of {info['rows']} rows ({info['failed']} failed) -> {html_path}")
