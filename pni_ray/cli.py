"""`pni-ray` command line: train, evaluate, demo, data tools; heavy commands live in their modules."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

import click

from pni_ray.allocator import keep_freed_memory
from pni_ray.config import DEFECT_KINDS, REFINER_SOURCES, SCORE_MODES
from pni_ray.options import (backbone_option_error, backbone_options, build_config, category_name, check_force_out,
                             check_output_file, load_config_file, on_terminal, print_table, progress_bars, set_threads,
                             train_options, training_threads, write_output_file)

log = logging.getLogger("pni_ray")


OWN_LOGGERS = ("pni_ray",)  # this project's package: its INFO lines say what the command does


def setup_logging(verbose: int) -> None:
    """This project's loggers at INFO, other libraries' from WARNING up (onnxruntime's quantiser logs
    dozens of INFO lines per INT8 export on the root logger). -q: warnings only; -v: this project's
    DEBUG and the others' INFO; -vv: everything at DEBUG."""
    own = logging.WARNING if verbose < 0 else logging.INFO if verbose == 0 else logging.DEBUG
    others = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=others, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(own)


def _input_errors() -> tuple[type[Exception], ...]:
    """Errors whose message names the file and what is wrong with it (images, data layout, geometry,
    bundles, exports, an output another save got to first, a full disk): a user's to fix, shown as one line, not a
    traceback."""
    from pni_ray.export.tables import ExportError
    from pni_ray.bundle import BundleError
    from pni_ray.data.images import ImageError
    from pni_ray.data.mvtec import LayoutError
    from pni_ray.geometry import GeometryError
    from pni_ray.fileio import OutputWriteError
    from pni_ray.models.backbones import WeightsError

    return (ImageError, LayoutError, GeometryError, BundleError, ExportError, WeightsError, FileExistsError,
            OutputWriteError)


# commands whose every output is saved whole (staged and renamed into place, or written once at the end): a stopped
# one leaves nothing half-written. The batch commands (score, train-all, nightly) say what they keep themselves.
WHOLE_OUTPUTS = ("train", "evaluate", "export", "refine", "ensemble", "report", "backbones", "make-defects")
RESUMING = ("score", "train-all", "nightly")  # stopped outside their own handling, a rerun still resumes


class Commands(click.Group):
    """The command group. An input error raised anywhere in a command reaches the user as `Error: ...`; Ctrl-C and
    SIGTERM (a scheduler's stop) stop every command alike: one line saying what stopped it and what is left,
    exit status 3, never click's "Aborted!" with exit 1 (a failure) or SIGTERM's silent death."""

    def invoke(self, ctx: click.Context) -> Any:
        from pni_ray.options import RunFailed
        from pni_ray.orchestration.stopping import interrupted_message, terminate_as_interrupt

        try:
            with terminate_as_interrupt():
                return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit):  # Exit (ctx.exit) is a RuntimeError: not an input error
            raise
        except KeyboardInterrupt as exc:
            name = ctx.invoked_subcommand
            if name in RESUMING:
                raise RunFailed(interrupted_message(exc, "what it committed so far is kept")) from None
            raise RunFailed(interrupted_message(
                exc, "nothing is left half-written (its outputs are saved whole or not at all)" if name in WHOLE_OUTPUTS
                else "what it wrote so far may be incomplete", "start over")) from None
        except Exception as exc:  # noqa: BLE001 - anything else keeps its traceback
            if isinstance(exc, _input_errors()):
                raise click.ClickException(str(exc)) from None
            from pni_ray.options import out_of_memory_message

            message = out_of_memory_message(exc)
            if message:
                raise click.ClickException(message) from None
            raise


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-v", "--verbose", count=True,
              help="More log output: -v this project's debug lines and other libraries' info, -vv all debug.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.version_option(package_name="pni-ray")
def main(verbose: int, quiet: bool) -> None:
    """PNI anomaly detection: train from good images, score every image, export for edge GPUs.

    Exit status: 0 done; 1 an error (the message names the file and what to fix), or for score, train-all and
    nightly some inputs failed; 2 a usage error (train-all: also storage its workers do not share); 3 stopped by
    Ctrl-C or SIGTERM (the message says what is kept), or a batch run that could not complete.
    """
    setup_logging(-1 if quiet else verbose)
    if on_terminal():  # log lines above the progress bars (tqdm.write), not through them; entered after setup_logging,
        from tqdm.contrib.logging import logging_redirect_tqdm  # whose handler's format it copies

        click.get_current_context().with_resource(logging_redirect_tqdm())
    try:
        keep_freed_memory()  # glibc keeps freed memory for reuse (pni_ray.allocator)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def require_category(data_root: Path, category: str, given: bool, train_only: bool = False) -> None:
    """A usage error (exit 2) naming what DATA_ROOT should hold, when DATA_ROOT/CATEGORY is no folder.

    given: the user typed -c (else the category is the bundle's). train_only: the command reads
    train/good only (refine), which must then exist.
    """
    from pni_ray.data.mvtec import list_categories, missing_category_message

    message = missing_category_message(data_root, category)
    if message is not None:
        if not given:
            message = (f"the bundle's category is {category!r}, and there is {message}\n"
                       "Give -c NAME to read a category folder of another name.")
        # the category name is wrong when DATA_ROOT holds categories; else DATA_ROOT is
        wrong_name = given and bool(list_categories(data_root)) and not (data_root / "train").is_dir()
        raise click.BadParameter(message, param_hint="'-c' / '--category'" if wrong_name else "'DATA_ROOT'")
    good = data_root / category / "train" / "good"
    if train_only and not good.is_dir():
        raise click.ClickException(f"{good} is missing: this command reads the good images of train/good/")


def load_category_checked(data_root: Path, category: str, given: bool, need_test: bool = False, **kwargs: Any):
    """load_category after the folder check (its layout problems reach the user as one line, `Commands`);
    need_test: test images too."""
    from pni_ray.data.mvtec import load_category

    require_category(data_root, category, given)
    cat = load_category(data_root, category, **kwargs)
    if need_test and not cat.test:
        raise click.ClickException(
            f"{cat.root}: no test images to evaluate on. evaluate reads {cat.root / 'test'}/<type>/ (test/good/ and "
            "a folder per defect type, each defect image with a mask in ground_truth/<type>/<name>_mask.png); "
            "train/good/ alone is enough for train, not for evaluate.")
    return cat


def warn_other_category(category: str | None, manifest: dict[str, Any], what: str) -> None:
    """Warn on stderr when -c names another category than the one `what` was trained on (not refused:
    the folder may only have been renamed)."""
    recorded = manifest.get("category")
    if category is not None and recorded is not None and category != recorded:
        click.echo(f"warning: {what} was trained on category {recorded!r}, but -c gives {category!r}: unless "
                   f"{category!r} is {recorded!r} under another name, the results describe a model of another "
                   "category", err=True)


@main.command()
@click.argument("data_root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--category", "-c", required=True, callback=category_name, help="Category folder under DATA_ROOT.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--backbone", default=None, help="Backbone name (pni-ray backbones lists them).")
@click.option("--force", is_flag=True, help="Replace an existing bundle (never a directory of anything else).")
@train_options
def train(data_root: Path, category: str, out: Path, backbone: str | None, force: bool, threads: int | None,
          config_file: Path | None, **overrides: Any) -> None:
    """Train one CATEGORY of an MVTec-layout DATA_ROOT from its train/good images.

    Gives the same bundle as `train-all` for the same config and --threads (both default to 1).
    """
    from pni_ray.bundle import FORMAT, save_bundle
    from pni_ray.fit import fit_category

    n_threads = training_threads(threads)
    check_force_out(out, force, FORMAT, "bundle")
    check_output_file(out, "bundle")  # before the fit, not after it
    cfg = build_config(backbone=backbone, base=load_config_file(config_file), **overrides)
    if cfg.mode == "pni":  # this machine trains it: a precision its CPU would emulate is refused before the features
        from pni_ray.training import training_precision

        try:
            training_precision(cfg.neighbourhood.train_precision)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
    require_category(data_root, category, given=True)
    trained = fit_category(data_root, category, cfg, n_threads, progress=progress_bars())  # the files checked first
    save_bundle(trained, out, overwrite=force)  # something at OUT by now: one Error: line (Commands)
    secs = trained.report["seconds"]
    scored = trained.config.scoring.mode if cfg.mode == "pni" else "patchcore"  # what evaluate, export and score run
    why = ("by scoring.mode" if scored == cfg.scoring.mode or cfg.mode != "pni"
           else "as the position prior lost on held-out synthetic defects, see the log")
    mode = cfg.mode if scored == cfg.mode else f"{cfg.mode} model scored in {scored} mode {why}"
    click.echo(f"trained {category} ({mode}, {cfg.features.backbone}) in {secs['total']:.1f} s -> {out}")


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("data_root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--category", "-c", default=None, callback=category_name,
              help="Category folder (default: the bundle's category).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Refiner epochs (default: the config's).")
@click.option("--samples", type=click.IntRange(min=2), default=None, help="Synthetic defect images (default: the config's).")
@click.option("--source", type=click.Choice(REFINER_SOURCES), default=None,
              help="Images the defects are drawn on (default: the config's). Bundles trained before 'all' became "
                   "the default keep 'holdout' and 240 samples: give --source all --samples 480 for today's defaults.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at OUT (never a directory of anything else).")
@click.option("--threads", type=int, default=None,
              help="torch threads (default 1, as `train --refine`: the count changes the refiner's floats).")
def refine(bundle: Path, data_root: Path, out: Path, category: str | None, epochs: int | None,
           samples: int | None, source: str | None, force: bool, threads: int | None) -> None:
    """Add a refinement network to a trained BUNDLE (train/good of DATA_ROOT only) -> OUT.

    Trains the refiner `pni-ray train --refine` would with the bundle's recorded config (same seed,
    same synthetic defects), without retraining the PNI model; --epochs, --samples and --source
    override that config.
    """
    import torch

    from pni_ray.bundle import FORMAT, load_bundle, save_bundle
    from pni_ray.fit import record_threads
    from pni_ray.refine_training import good_images, held_out_names, split_refiner_images, train_refiner

    n_threads = training_threads(threads)
    torch.set_num_threads(n_threads)
    if out.exists() and out.resolve() == bundle.resolve():
        raise click.ClickException(f"{out}: write the refined bundle to a new directory, not over its source")
    check_force_out(out, force, FORMAT, "bundle")
    check_output_file(out, "refined bundle", bundle)
    trained, manifest = load_bundle(bundle)  # a tampered or incomplete bundle: one line naming the file (Commands)
    require_category(data_root, category or manifest["category"], given=category is not None, train_only=True)
    warn_other_category(category, manifest, str(bundle))
    rcfg = trained.config.refiner
    changes = {k: v for k, v in (("epochs", epochs), ("n_samples", samples), ("source", source)) if v is not None}
    trained.config = trained.config.replace(refiner=dataclasses.replace(rcfg, enabled=True, **changes))
    try:  # a bundle trained with a seed or refiner setting the refiner cannot take: said now, not after minutes
        trained.config.check_trainable()
    except ValueError as exc:
        raise click.ClickException(f"{bundle}: {exc}") from None
    try:  # before any work: train/good must still hold the images the bundle held out
        split_refiner_images(good_images(data_root, category or manifest["category"]), trained.config,
                             held_out_names(trained))
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    train_refiner(trained, data_root, category or manifest["category"], progress=progress_bars())
    record_threads(trained, n_threads, "refiner")  # the PNI model's own count stays as trained
    save_bundle(trained, out, overwrite=force)  # something at OUT by now: one Error: line (Commands)
    click.echo(f"refined {manifest['category']} in {trained.report['seconds']['refiner']:.1f} s -> {out}")


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("data_root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--category", "-c", default=None, callback=category_name,
              help="Category folder (default: the bundle's category).")
@click.option("--mode", type=click.Choice(SCORE_MODES), default=None, help="Scoring mode (default: the bundle's).")
@click.option("--ablation", is_flag=True, help="Score in the ablation's four modes: patchcore, neighbourhood, position, pni "
                   "(pni_split: --mode pni_split).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the metrics as JSON here.")
@click.option("--image-only", is_flag=True,
              help="Defect images need no masks: image AUROC and F1 only, the pixel metrics n/a.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, help="Images per forward pass.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads (default: $PNI_RAY_THREADS, else all cores).")
@backbone_options
def evaluate(bundle: Path, data_root: Path, category: str | None, mode: str | None, ablation: bool,
             json_path: Path | None, image_only: bool, batch_size: int, threads: int | None, backbone_runtime: str,
             backbone_precision: str) -> None:
    """Metrics of BUNDLE (a bundle, an ensemble or an export directory) on the test split of DATA_ROOT/CATEGORY.

    An export directory is scored as `pni-ray score` runs it (onnxruntime, or its backbone in OpenVINO
    with --backbone-runtime openvino), in the one mode it was exported in.
    """
    from pni_ray.bundle import atomic_write_json
    from pni_ray.config import float_from_json
    from pni_ray.evaluate import (ABLATION_MODES, DIAGNOSTIC_KEYS, attach_diagnostics, evaluate_category,
                                  prior_diagnostics, threshold_line)
    from pni_ray.inference import load_detector
    from pni_ray.predict import default_name, detector_geometry
    from pni_ray.orchestration.model_loader import model_kind

    set_threads(threads)
    if json_path:
        check_output_file(json_path, "metrics", bundle)
    try:
        kind = model_kind(bundle)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if mode and ablation:
        raise click.UsageError("--mode and --ablation are alternatives: --ablation scores every mode")
    if kind == "export":
        if mode or ablation:
            raise click.UsageError(f"{bundle} is an export directory, scored in the one mode it was exported in: "
                                   "--mode and --ablation apply to bundles")
        error = backbone_option_error(backbone_runtime, backbone_precision)
        if error:
            raise click.UsageError(error)
        return evaluate_export(bundle, data_root, category, json_path, batch_size, threads, backbone_runtime,
                               backbone_precision, image_only)
    if backbone_runtime != "onnxruntime" or backbone_precision != "auto":
        raise click.UsageError(f"{bundle} is a {kind}, scored by torch: --backbone-runtime and --backbone-precision "
                               "apply to export directories (pni-ray export BUNDLE --out DIR, then evaluate DIR)")
    detector, manifest = load_detector(bundle)  # a tampered or incomplete bundle: one line naming the file (Commands)
    cat = load_category_checked(data_root, category or manifest["category"], category is not None, need_test=True,
                                **detector_geometry(detector).read_options(), with_masks=not image_only, with_train=False)
    warn_other_category(category, manifest, str(bundle))
    refine_modes: tuple[str, ...] = ()
    asked = "--ablation" if ablation else f"--mode {mode}" if mode and mode != "patchcore" else None
    members = list(getattr(detector, "members", None) or [detector])
    if asked and any(getattr(m, "mlp", None) is None for m in members):  # no neighbourhood MLP, no position prior
        if kind == "ensemble":
            raise click.ClickException(f"{bundle} has a PatchCore-only member: {asked} needs PNI members only")
        raise click.ClickException(f"{bundle} is a PatchCore-only bundle: {asked} needs a PNI bundle "
                                   "(patchcore is the one mode it scores)")
    if ablation:
        modes = ABLATION_MODES
        refine_modes = (detector.mode,) if getattr(detector, "refiner", None) is not None else ()  # as deployed
    else:
        modes = (mode or detector.mode,)
        deployed = default_name(detector, modes[0])  # what `score` and the exports run: "+refine" with a refiner
        refine_modes = modes if deployed.endswith("+refine") else ()
    t0 = time.perf_counter()
    own = default_name(detector)  # the mode `score` runs, whose threshold decides is_anomalous
    results = evaluate_category(detector, cat, modes=modes, refine_modes=refine_modes, batch_size=batch_size,
                                progress=progress_bars(),
                                decision=(own, float_from_json("threshold", manifest.get("threshold"))))
    log.info("evaluated %d images in %.1f s", len(cat.test), time.perf_counter() - t0)
    print_table(results)
    decided = threshold_line(own, results.get(own, {}))
    if decided:
        click.echo(decided)
    if ablation:
        t0 = time.perf_counter()
        log.info("prior diagnostics: scoring the %d images again in each mode, patch by patch", len(cat.test))
        attach_diagnostics(results, prior_diagnostics(detector, cat, modes, batch_size, progress_bars()), manifest)
        log.info("prior diagnostics in %.1f s", time.perf_counter() - t0)
        measured = {m: row for m, row in results.items() if any(row.get(k) is not None for k in DIAGNOSTIC_KEYS)}
        if measured:  # rows with nothing measured (a refined mode, every mode of an ensemble) left out
            print_table(measured, DIAGNOSTIC_KEYS)
        else:
            click.echo("prior diagnostics: none measured for this model (an ensemble: run --ablation on a member)")
    if json_path:
        payload: dict[str, Any] = {"category": cat.name, "bundle": str(bundle), "n_test_images": len(cat.test)}
        if ablation:
            payload["modes"] = results
        else:
            payload.update(results[deployed])
            payload["mode"] = deployed
        write_output_file(json_path, "metrics", lambda p: atomic_write_json(p, payload))
        click.echo(f"wrote {json_path}")


def evaluate_export(path: Path, data_root: Path, category: str | None, json_path: Path | None, batch_size: int,
                    threads: int | None, backbone_runtime: str, backbone_precision: str, image_only: bool = False) -> None:
    """`evaluate` of an export directory: the deployment's own runtime, maps and image scores."""
    from pni_ray.bundle import atomic_write_json
    from pni_ray.evaluate import evaluate_model, threshold_line
    from pni_ray.orchestration.model_loader import load_scoring_model

    try:
        model = load_scoring_model(path, threads=threads, backbone_runtime=backbone_runtime,
                                   backbone_precision=backbone_precision)
    except (RuntimeError, ValueError) as exc:  # a missing or refusing OpenVINO, a bad export: say which
        raise click.ClickException(str(exc)) from exc
    manifest = model.manifest
    cat = load_category_checked(data_root, category or manifest["category"], category is not None, need_test=True,
                                **model.geometry.read_options(), with_masks=not image_only, with_train=False)
    warn_other_category(category, manifest, str(path))
    name = manifest["mode"] + ("+refine" if "refiner" in model.runtime.stages else "")
    t0 = time.perf_counter()
    results = evaluate_model(model, cat, name, batch_size=batch_size, progress=progress_bars())
    log.info("evaluated %d images in %.1f s (backbone in %s)", len(cat.test), time.perf_counter() - t0,
             model.runtime.backbone_label)
    print_table(results)
    decided = threshold_line(name, results[name])
    if decided:
        click.echo(decided)
    if json_path:
        payload: dict[str, Any] = {"category": cat.name, "export": str(path), "n_test_images": len(cat.test),
                                   **results[name], "mode": name, "backbone_runtime": model.runtime.backbone_label}
        write_output_file(json_path, "metrics", lambda p: atomic_write_json(p, payload))
        click.echo(f"wrote {json_path}")


@main.command("make-synthetic")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, help="Seed of the generated images (same seed, same data set).")
@click.option("--size", type=int, default=256, help="Image side in pixels.")
@click.option("--categories", default=None, help="Comma-separated subset of the synthetic categories.")
def make_synthetic_cmd(out: Path, seed: int, size: int, categories: str | None) -> None:
    """Write synthetic MVTec-layout categories (textures, objects, logical defects) to OUT."""
    from pni_ray.data.synthetic import make_synthetic

    cats = categories.split(",") if categories else None
    try:
        paths = make_synthetic(out, seed=seed, size=size, categories=cats)
    except ValueError as exc:  # an unknown category or size: the user's to fix
        raise click.UsageError(str(exc)) from None
    for path in paths:
        click.echo(str(path))


@main.command("make-defects")
@click.argument("image_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--kind", "kinds", multiple=True, type=click.Choice(DEFECT_KINDS),
              help="Defect family (repeatable; default: all).")
@click.option("-n", "--n-per-kind", type=click.IntRange(min=1), default=4, help="Examples of each kind.")
@click.option("--seed", type=int, default=0, help="Seed of the defects drawn (same seed, same examples).")
def make_defects_cmd(image_dir: Path, out: Path, kinds: tuple[str, ...], n_per_kind: int, seed: int) -> None:
    """Write examples of each synthetic defect family (the refiner's training data) to OUT.

    OUT is a new folder, or one this command wrote before (replaced whole); nothing is left there
    when an image cannot be read."""
    from pni_ray.data.defects import write_defect_examples

    try:
        written = write_defect_examples(image_dir, out, kinds=list(kinds) or None, n_per_kind=n_per_kind, seed=seed)
    except ValueError as exc:  # no images in IMAGE_DIR, an OUT of something else (a bad image: an ImageError naming it)
        raise click.ClickException(str(exc)) from None
    except OSError as exc:  # an unreadable IMAGE_DIR, an unwritable OUT: the path the system refused
        where = exc.filename if exc.filename and not Path(exc.filename).name.startswith(f".{out.name}.") else out
        raise click.ClickException(f"{where}: {exc.strerror or exc}") from None
    click.echo(f"wrote {len(written)} files; overview: {out / 'overview.png'}")


@main.command()
def backbones() -> None:
    """List registered backbones and where their weights come from."""
    from pni_ray.models.backbones import REGISTRY

    for name, spec in REGISTRY.items():
        source = f"offline ({spec.weight_package})" if spec.weight_package else "timm pretrained=True or --weights FILE"
        click.echo(f"{name:<22} {spec.timm_name:<24} {source}")


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-output"),
              help="Where data, bundles and reports go.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads (default: $PNI_RAY_THREADS, else all cores).")
def demo(workdir: Path, threads: int | None) -> None:
    """Synthetic data -> train-all -> ablation -> export -> scoring to Parquet -> reports."""
    from pni_ray.demo import run_demo

    set_threads(threads)
    run_demo(workdir)


def _register_commands() -> None:
    """Commands that live beside the code they drive (Ray orchestration, export)."""
    from pni_ray.export.cli import export_cmd
    from pni_ray.orchestration.nightly import nightly_cmd
    from pni_ray.orchestration.score_cli import report_cmd, score_cmd
    from pni_ray.orchestration.train_all_cli import ensemble_cmd, train_all_cmd

    for command in (train_all_cmd, ensemble_cmd, score_cmd, report_cmd, nightly_cmd, export_cmd):
        main.add_command(command)


if __name__ == "__main__":  # `python -m pni_ray.cli`: run the importable module, not this copy
    from pni_ray.cli import main as packaged_main

    packaged_main()
else:
    _register_commands()
