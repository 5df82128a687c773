"""What the `pni-ray` commands share with the code they drive: thread policy, config overrides.

Below both pni_ray.cli and pni_ray.orchestration (and pni_ray.export, demo), so nothing here imports
the CLI module: `train` and `train-all` build their TrainConfig and pick their torch threads
with the same functions, which is what makes their bundles byte-identical.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from pni_ray.export.openvino_backbone import BACKBONE_RUNTIMES, PRECISIONS
from pni_ray.config import GEOMETRY_POLICIES, MLP_PRECISIONS, PRESETS, TrainConfig, threads_from_env
from pni_ray.fileio import inside, special_file

# Training threads: the thread count changes torch's float reductions (and so the bundle bytes),
# so training never defaults to "all cores" (machine-dependent) but to one fixed count, the same
# for `train` and for each `train-all` task (one CPU per task by default). The manifest records it.
DEFAULT_TRAIN_THREADS = 1


def progress_bars(asked: bool | None = None) -> bool:
    """Whether a command draws progress bars: as asked (--progress / --no-progress), else where someone watches, on
    a terminal and not -q. In a job's log file a bar is one endless line of carriage returns; there the commands
    log what they do instead."""
    if asked is not None:
        return asked
    return on_terminal() and logging.getLogger("pni_ray").isEnabledFor(logging.INFO)


def on_terminal() -> bool:
    """Whether someone watches stderr (a terminal), not a job's log file."""
    return sys.stderr.isatty()


class RunFailed(click.ClickException):
    """A batch command that could not do its work (refused, failed, stopped, no cluster): exit 3, so
    exit 1 keeps its one meaning, "some inputs or pairs failed"."""

    exit_code = 3


def folder_name(name: str) -> str:
    """A category named as a folder: a shell's tab completion leaves `weave/` (or `./weave/` from inside DATA_ROOT),
    which is the category `weave` (recorded in the manifest and so in the model id: with the slash it would be another
    model)."""
    name = name.strip()
    while name.startswith(("./", ".\\")):
        name = name[2:]
    return name.rstrip("/\\") or name


def out_of_memory_message(exc: BaseException) -> str | None:
    """One line for running out of memory (numpy's and Python's MemoryError, torch's CPU allocator refusing: "can't
    allocate memory"), saying what to lower; None for any other error."""
    if not (isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))):
        return None
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return (f"out of memory ({first}): this machine has too little RAM for the work asked. train: a smaller "
            "--image-size or --coreset-ratio, --tile for large images, or batch_size in a --config file; evaluate "
            "and score: a smaller --batch-size (score: also fewer --workers)")


def category_name(ctx: Any, param: Any, value: str | None) -> str | None:
    """-c's click callback: `folder_name`."""
    return folder_name(value) if value else value


def set_threads(threads: int | None) -> int:
    """Pin torch's intra-op threads for inference-side commands (default: all cores).

    Oversubscribed cores run 5-7x slower than pinned ones. Returns the count set.
    """
    import torch

    if threads is not None and threads < 1:
        raise click.UsageError(f"--threads must be at least 1, not {threads} (leave it out for all cores)")
    try:
        n = threads or threads_from_env() or max(1, (os.cpu_count() or 1))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    torch.set_num_threads(n)
    return n


def training_threads(threads: int | None) -> int:
    """torch threads for training: the explicit count, else DEFAULT_TRAIN_THREADS (never the core count)."""
    if threads is not None and threads < 1:
        raise click.UsageError(f"--threads must be at least 1, not {threads}")
    return int(threads or DEFAULT_TRAIN_THREADS)


def build_config(
    backbone: str | None = None,
    weights: str | None = None,
    image_size: int | None = None,
    coreset_ratio: float | None = None,
    seed: int | None = None,
    mode: str | None = None,
    dist_size: int | None = None,
    epochs: int | None = None,
    mlp_precision: str | None = None,
    refine: bool | None = None,
    base: TrainConfig | None = None,
    geometry: str | None = None,
    tile: bool | None = None,
    tile_size: int | None = None,
    tile_overlap: int | None = None,
    tile_scale: float | None = None,
    coreset_candidates: int | None = None,
    preset: str | None = None,
    white_level: int | None = None,
) -> TrainConfig:
    """TrainConfig defaults (or a preset's, or a --config file's) with the CLI's overrides; None keeps the default."""
    if preset is not None and base is not None:
        raise click.UsageError("--preset and --config both give the base config: use one")
    if preset is not None and preset not in PRESETS:
        raise click.UsageError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = base or PRESETS[preset or "default"]()
    try:  # a flag out of range (--epochs 0) fails the config's own check: a usage error, not a traceback
        features = dataclasses.replace(
            cfg.features,
            **{k: v for k, v in {"backbone": backbone, "weights": weights, "image_size": image_size}.items() if v is not None},
        )
        coreset = dataclasses.replace(
            cfg.coreset,
            **{k: v for k, v in {"ratio": coreset_ratio, "max_candidates": coreset_candidates}.items() if v is not None},
        )
        geometry_cfg = dataclasses.replace(
            cfg.geometry,
            **{k: v for k, v in {"policy": geometry, "tile": tile, "tile_size": tile_size, "tile_overlap": tile_overlap,
                                 "tile_scale": tile_scale, "white_level": white_level}.items() if v is not None},
        )
        neighbourhood = dataclasses.replace(
            cfg.neighbourhood,
            **{k: v for k, v in {"dist_size": dist_size, "epochs": epochs, "train_precision": mlp_precision}.items()
               if v is not None},
        )
        refiner = dataclasses.replace(cfg.refiner, enabled=cfg.refiner.enabled if refine is None else refine)
        changes: dict[str, Any] = {"features": features, "coreset": coreset, "neighbourhood": neighbourhood, "refiner": refiner,
                                   "geometry": geometry_cfg}
        if seed is not None:
            changes["seed"] = seed
        if mode is not None:
            changes["mode"] = mode
        cfg = cfg.replace(**changes)
        cfg.check_trainable()
        check_model_names(cfg)
        from pni_ray.geometry import Geometry

        Geometry.from_config(cfg)  # a tile size or image size the geometry cannot take, before any image is read
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    cfg = absolute_weights(cfg)
    if cfg.features.weights and not Path(cfg.features.weights).is_file():
        raise click.UsageError(f"features.weights: {cfg.features.weights} is not a file")
    return cfg


def absolute_weights(cfg: TrainConfig, relative_to: Path | None = None) -> TrainConfig:
    """cfg with features.weights (--weights, a config file's) as an absolute, normalised path, links kept
    as every path the project records is (a Hugging Face cache's link names a suffix-less blob): the
    bundle records it and loads the backbone from it, so it loads from any directory and has one model
    id however the path was typed. A relative path is taken from `relative_to` (a config file's folder),
    else the working directory."""
    weights = cfg.features.weights
    if not weights:
        return cfg
    path = Path(weights) if relative_to is None else Path(relative_to) / weights
    return cfg.replace(features=dataclasses.replace(cfg.features, weights=os.path.normpath(os.path.abspath(path))))


def check_model_names(cfg: TrainConfig) -> None:
    """An unknown backbone or refiner encoder (a --config file's typo) refused before any image is read."""
    from pni_ray.models.backbones import get_spec

    get_spec(cfg.features.backbone)
    if cfg.refiner.enabled:
        try:
            get_spec(cfg.refiner.encoder)
        except ValueError as exc:
            raise ValueError(f"refiner.encoder: {exc}") from None


def load_config_file(path: Path | None) -> TrainConfig | None:
    """A TrainConfig JSON file, or a bundle's manifest.json (its `config`), as the base of the options."""
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"{path}: not a readable JSON file ({exc})", param_hint="--config") from exc
    build = TrainConfig.from_dict
    if isinstance(data, dict) and "config" in data and "format" in data:  # a bundle manifest: its own scoring rule
        data, build = data["config"], TrainConfig.from_manifest
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path}: expected a JSON object (a TrainConfig)", param_hint="--config")
    try:
        return absolute_weights(build(data), Path(path).parent)  # its weights file: beside the config, as written
    except (TypeError, ValueError, KeyError) as exc:
        raise click.BadParameter(f"{path}: not a TrainConfig ({type(exc).__name__}: {exc})", param_hint="--config") from exc


def train_options(fn: Any) -> Any:
    """Options shared by `train` and `train-all`."""
    options = [
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     default=None,
                     help="TrainConfig JSON as the base: any subset of its sections (features, coreset, neighbourhood, "
                          "position, scoring, refiner, geometry) and keys (mode, seed, batch_size), the rest default "
                          "(a bundle's manifest.json: its config). Other options override it; a relative "
                          "features.weights is taken from the file's folder."),
        click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
                     help="Base settings: default, or paper (the authors': 480 px, 1% coreset, 10 x 2048 MLP, "
                          "+-4 spread, mean of the priors, blur 8; for a GPU). Other options override it."),
        click.option("--image-size", type=int, default=None,
                     help="Model input size in pixels (default 320; --preset paper 480; a --config file's own)."),
        click.option("--coreset-ratio", type=float, default=None,
                     help="Fraction of patches kept in C_emb, in (0, 1] (default 0.05; --preset paper 0.01)."),
        click.option("--dist-size", type=int, default=None,
                     help="|C_dist|, a prefix of C_emb's greedy order (default 2048 as in the paper, capped by |C_emb|)."),
        click.option("--epochs", type=int, default=None,
                     help="Neighbourhood-MLP epochs at most (default 12; stops earlier when validation stops improving)."),
        click.option("--mlp-precision", type=click.Choice(list(MLP_PRECISIONS)), default=None,
                     help="Neighbourhood-MLP training steps: auto (the default config's: bfloat16 autocast where "
                          "the CPU has native bf16, AVX512-BF16 or AMX, the MLP 1.2-1.8x faster at the same "
                          "accuracy; else float32), float32 (the previous rounds' model) or bfloat16 (pni mode refuses "
                          "it on CPUs that would emulate it)."),
        click.option("--seed", type=int, default=None, help="Random seed (default 0)."),
        click.option("--mode", type=click.Choice(["pni", "patchcore"]), default=None,
                     help="pni: full model; patchcore: memory bank only."),
        click.option("--refine/--no-refine", default=None,
                     help="Also train the refinement network (default: the --config file's or preset's, else no)."),
        click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Backbone weights file (.safetensors or .pth) instead of the registry's source."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help=f"torch threads for training (train: {DEFAULT_TRAIN_THREADS}; train-all: --cpus-per-task, "
                          f"{DEFAULT_TRAIN_THREADS} by default). The count changes the floats, so it is never "
                          "'all cores' and the manifest records it."),
        click.option("--geometry", type=click.Choice(GEOMETRY_POLICIES), default=None,
                     help="Image geometry: resize (squash, default), letterbox (pad; scores the aspect ratios it "
                          "trained on, others are refused), short-side (keep aspect; one aspect ratio)."),
        click.option("--tile/--no-tile", default=None,
                     help="Cover each image with overlapping model-size tiles stitched into one feature grid."),
        click.option("--tile-size", type=int, default=None, help="Tile side in pixels (default: the image size)."),
        click.option("--tile-overlap", type=int, default=None, help="Overlap between tiles in pixels (default 64)."),
        click.option("--tile-scale", type=float, default=None, help="Scale images by this before tiling (default 1)."),
        click.option("--white-level", type=click.IntRange(1, 65535), default=None,
                     help="16- and 32-bit grey images: the value read as white (default 65535; 4095 for a 12-bit "
                          "camera's data written unshifted, 1023 for 10-bit). Recorded in the bundle: every command "
                          "reads its images on this scale and refuses brighter pixels."),
        click.option("--coreset-candidates", type=int, default=None,
                     help="Cap the coreset's candidate patch rows by a seeded subsample (keeps tiled training fast; "
                          "default: every row)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def backbone_options(fn: Any) -> Any:
    """--backbone-runtime and --backbone-precision, as `score` and `evaluate` take them (exports only)."""
    fn = click.option("--backbone-precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
                      help="OpenVINO's inference precision for --backbone-runtime openvino (auto: its CPU default, "
                           "bf16 where native).")(fn)
    return click.option("--backbone-runtime", type=click.Choice(BACKBONE_RUNTIMES), default="onnxruntime",
                        show_default=True, help="Exports only: run the backbone graph with OpenVINO (pip install "
                        "'pni-ray[openvino]'; measured faster on an AMX CPU), the rest with onnxruntime.")(fn)


def backbone_option_error(runtime: str, precision: str) -> str | None:
    """Why --backbone-runtime RUNTIME --backbone-precision PRECISION cannot run, or None."""
    if runtime not in BACKBONE_RUNTIMES or precision not in PRECISIONS:
        return (f"backbone runtime {runtime!r} at precision {precision!r}: choose a runtime from {BACKBONE_RUNTIMES} "
                f"and a precision from {PRECISIONS}")
    if runtime == "onnxruntime" and precision != "auto":
        return (f"--backbone-precision {precision} needs --backbone-runtime openvino: it applies to --backbone-runtime "
                "openvino only (onnxruntime runs the export's graphs as they are)")
    return None


def print_table(rows: dict[str, dict], keys: tuple[str, ...] = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "images_per_s")) -> None:
    """Metrics per scoring mode as an aligned table (evaluate, demo)."""
    width = max([len("mode")] + [len(k) for k in rows])
    cols = [max(12, len(k)) for k in keys]  # a header longer than its numbers widens its column
    click.echo(f"{'mode':<{width}}  " + "  ".join(f"{k:>{w}}" for k, w in zip(keys, cols)))
    for name, row in rows.items():
        cells = []
        for k, w in zip(keys, cols):
            v = row.get(k)
            cells.append(f"{'n/a':>{w}}" if v is None else f"{v:>{w}.4f}" if k != "images_per_s" else f"{v:>{w}.2f}")
        click.echo(f"{name:<{width}}  " + "  ".join(cells))


def check_force_out(out: Path, force: bool, formats: str | tuple[str, ...], kind: str) -> None:
    """Refuse an existing OUT without --force, and with it anything but a `kind` directory (or an empty one)."""
    from pni_ray.fileio import NotReplaceable, check_replaceable

    try:  # first: "use --force" is advice only where --force would then replace it (not a file, a link, a folder of other things)
        check_replaceable(out, formats, kind)
    except NotReplaceable as exc:
        raise click.ClickException(str(exc)) from None
    if out.exists() and not force:
        raise click.ClickException(f"{out} already exists; use --force to replace it")


def check_output_file(path: Path, what: str, source: Path | None = None, allowed_inside: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, an output (file or directory) a command could not write, or one inside its
    own input `source` (a checksummed model, a score output) other than of the `allowed_inside` suffixes:
    writing there would break the input the next command reads. Writability is tried, not inferred from
    permission bits, which say yes to root for /proc and /sys."""
    target = Path(os.path.realpath(path))  # links followed: a link into the input is the input
    kind = special_file(target)
    if kind is not None:  # a rename over it would replace /dev/null or a pipe with a regular file
        raise click.UsageError(f"{path}: cannot write the {what}: it is {kind}, not a file; give a file's path")
    if source is not None and inside(target, source) and target.suffix.lower() not in allowed_inside:
        allowed = f" (a {' or '.join(allowed_inside)} file may go there)" if allowed_inside else ""
        raise click.UsageError(f"{path}: the {what} would be written inside {source}, the command's own input; "
                               f"write it elsewhere{allowed}")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise click.UsageError(f"{path}: cannot write the {what}: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".pni-ray-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise click.UsageError(f"{path}: cannot write the {what}: {folder} refuses new files "
                               f"({exc.strerror or exc})") from None


def write_output_file(path: Path, what: str, write: Any) -> None:
    """`write(path)` (an atomic write, parents made), an OS refusal said in one line naming the file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot write the {what} ({exc.strerror or exc})") from None
