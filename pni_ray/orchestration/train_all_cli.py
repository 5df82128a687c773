"""Click commands of the Ray-side training: `pni-ray train-all` and `pni-ray ensemble`.

Only argument handling lives here; the work is in train_all (driver), train_plan and train_task.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from pni_ray.options import (RunFailed, build_config, check_force_out, check_output_file, folder_name, load_config_file,
                             set_threads, train_options)
from pni_ray.orchestration.ray_session import RayJoinError
from pni_ray.orchestration.shared_storage import SharedStorageError
from pni_ray.orchestration.stopping import interrupted_message, terminate_as_interrupt
from pni_ray.orchestration.train_all import FAILED, SKIPPED, TRAINED, format_table, mode_note, train_all


class NotShared(click.ClickException):
    """OUT or DATA_ROOT is not on storage every node sees: exit 2 as documented, without click's usage
    text, since the command line was right and the storage is what to change."""

    exit_code = 2


def _split(value: str | None, option: str, folder_of: Path | None = None) -> list[str] | None:
    """A comma-separated option's names, each as -c takes it (`folder_name`); None when not given. Given
    but naming nothing ("," or an unset shell variable's ""), it is refused: "all" is not what it says.
    folder_of: a value that is the name of a folder there is that one name, commas and all."""
    if value is None:
        return None
    if folder_of is not None and "," in value and (folder_of / folder_name(value)).is_dir():
        return [folder_name(value)]
    names = [folder_name(v) for v in value.split(",") if v.strip()]
    if not names:
        raise click.UsageError(f"{option} {value!r} names nothing: give names, or leave the option out for all")
    return names


@click.command("train-all")
@click.argument("data_root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Bundles go to OUT/<category>/<backbone>/, the summary to OUT/summary.{json,parquet}.")
@click.option("--categories", default=None,
              help="Comma-separated categories (default: every folder with train/); a folder whose name holds "
                   "commas is named whole, alone.")
@click.option("--backbones", default=None, help="Comma-separated backbones (default: the config's, efficientnet_lite2).")
@click.option("--address", default=None,
              help="Ray cluster to join (HOST:PORT of the head's GCS, or auto); default: $RAY_ADDRESS, else an "
                   "embedded local Ray (`local` forces it).")
@click.option("--cpus-per-task", type=click.IntRange(min=1), default=1, help="CPUs (and torch threads) per training task.")
@click.option("--gpus-per-task", type=click.FloatRange(min=0), default=0.0, help="GPUs per task (fractions share a GPU).")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None, help="CPUs of the embedded local Ray (default: all cores).")
@click.option("--max-retries", type=click.IntRange(min=-1), default=2,
              help="Retries after a system failure (dead worker; -1: no limit); errors are not retried.")
@click.option("--no-eval", is_flag=True, help="Skip evaluating on the test split after training (a later run "
              "without it evaluates the verified bundles that have no metrics, without retraining them).")
@click.option("--force", is_flag=True, help="Retrain pairs whose bundle already exists and verifies.")
@train_options
def train_all_cmd(data_root: Path, out: Path, categories: str | None, backbones: str | None, address: str | None,
                  cpus_per_task: int, gpus_per_task: float, num_cpus: int | None, max_retries: int, no_eval: bool,
                  config_file: Path | None, force: bool, threads: int | None, **overrides: Any) -> None:
    """Train every category x backbone of DATA_ROOT in parallel on Ray; resumable, fault-isolated.

    Exits with status 1 when any pair failed (the others still finish; a rerun trains only what
    is missing), 2 when OUT or DATA_ROOT is not shared by every node, 3 when the Ray cluster cannot be
    joined, a file cannot be read or written (a full OUT, permissions) or the run is stopped by Ctrl-C or SIGTERM (saved bundles are kept; a rerun trains the rest). --threads (torch threads per task) defaults to --cpus-per-task here; a pair gives
    the same bundle as `pni-ray train` with the same thread count (both default to 1).
    """
    set_threads(1)  # the driver only waits; the tasks set their own thread counts
    if not out.is_dir():
        check_output_file(out, "bundles")  # before Ray starts, not a traceback at its mkdir
    chosen = _split(categories, "--categories", data_root)
    named = _split(backbones, "--backbones")  # the config's backbone is checked only where no --backbones replaces it
    cfg = build_config(base=load_config_file(config_file), backbone=named[0] if named else None, **overrides)
    if cfg.features.weights and named and len(named) > 1:  # one file fits one network: refused before Ray starts
        raise click.UsageError(f"--weights (or features.weights) names one file, {cfg.features.weights}, but "
                               f"--backbones names {len(named)}: train each backbone with its own weights in its own run")
    try:
        with terminate_as_interrupt():
            result = train_all(
                data_root, out, cfg, categories=chosen, backbones=named, address=address,
                cpus_per_task=cpus_per_task, gpus_per_task=gpus_per_task, threads=threads, force=force,
                evaluate=not no_eval, max_retries=max_retries, num_cpus=num_cpus,
            )
    except KeyboardInterrupt as exc:
        raise RunFailed(interrupted_message(exc, "the bundles saved so far are kept", "train the rest")) from None
    except SharedStorageError as exc:
        raise NotShared(str(exc)) from exc
    except RayJoinError as exc:
        raise RunFailed(str(exc)) from exc
    except OSError as exc:  # OUT full or not writable (its probe, the summary), DATA_ROOT unreadable: not a traceback
        where = exc.filename or out
        raise RunFailed(f"{where}: {exc.strerror or exc} ({type(exc).__name__}); the bundles saved so far are kept: fix "
                        "this (space, permissions), then rerun to train the rest and write the summary") from exc
    click.echo(format_table(result.rows))
    note = mode_note(result.rows)
    if note:
        click.echo(note)
    for row in result.failed:
        click.echo(f"\nFAILED {row['category']}/{row['backbone']} ({row.get('stage')}): {row.get('error')}")
    c = result.counts
    click.echo(f"\n{c[TRAINED]} trained, {c[SKIPPED]} skipped, {c[FAILED]} failed in {result.wall_seconds:.1f} s; "
               f"summary: {result.summary_json}, {result.summary_parquet}")
    if not result.ok:
        sys.exit(1)


@click.command("ensemble")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path), help="Ensemble directory to write.")
@click.option("--force", is_flag=True, help="Replace an existing ensemble (never a directory of anything else).")
@click.option("--calibrate", "calibrate_root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="DATA_ROOT: set the threshold from the members' shared held-out train/good images "
                   "(default: from the members' stored statistics).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads (default: $PNI_RAY_THREADS, else all cores).")
def ensemble_cmd(bundles: tuple[Path, ...], out: Path, force: bool, calibrate_root: Path | None, threads: int | None) -> None:
    """Combine bundles of one category (e.g. one per backbone) into a self-contained ensemble.

    BUNDLE... are copied into OUT with a manifest pinning each one's model_id.

    Each member's maps are normalised with its own held-out statistics and averaged; the image
    score is the maximum of the averaged map after a mean over each window of 3 x 3 patches (the
    default's window; members with another need --calibrate, since their stored thresholds are of
    other scores). `pni-ray evaluate OUT DATA_ROOT` scores it.
    """
    from pni_ray.bundle import BundleError, model_id
    from pni_ray.bundle_manifest import member_path, read_manifest, scoring_mode
    from pni_ray.ensemble_bundle import FORMAT as ENSEMBLE_FORMAT
    from pni_ray.ensemble_bundle import save_ensemble, verify_ensemble

    set_threads(threads)
    check_force_out(out, force, ENSEMBLE_FORMAT, "ensemble")  # before the members are checked and calibrated
    check_output_file(out, "ensemble")  # a parent that is a file, or refuses new files: said now, not as errno text
    try:
        path = save_ensemble(bundles, out, overwrite=force, calibrate_root=calibrate_root)
    except (BundleError, ValueError, OSError) as exc:  # OSError: a full disk while copying the members
        raise click.ClickException(str(exc)) from exc
    manifest = verify_ensemble(path)
    for m in manifest["members"]:
        scored = scoring_mode(read_manifest(member_path(path, m["path"])))  # what the member scores in, not its training mode
        click.echo(f"member {m['path']}: {m['backbone']} ({scored} mode), model_id {m['model_id'][:12]}")
    threshold = manifest["threshold"]  # null: a member without held-out images has none, so the ensemble has none
    said = "none (a member has no held-out images)" if threshold is None else f"{threshold:.4f}"
    click.echo(f"ensemble of {len(manifest['members'])} ({manifest['category']}) -> {path}; threshold "
               f"{said} ({manifest['threshold_method']}); model_id {model_id(path)[:12]}")
