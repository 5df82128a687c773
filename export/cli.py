"""`pni-ray export BUNDLE --out DIR [--trt] [--fp16] [--int8 mlp --calibration DIR] [--max-batch N] [--opset K]`.

Imported by `pni-ray` at start-up, so nothing heavy at module level.
"""

from __future__ import annotations

from pathlib import Path

import click

from pni_ray.config import SCORE_MODES

# export.quantize loads onnx and onnxruntime only inside its functions
from export.quantize import DEFAULT_CALIBRATION_IMAGES, QUANTIZABLE


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@click.command("export")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Export directory to write (ONNX graphs, Arrow tables, manifest).")
@click.option("--trt", is_flag=True, help="Also build TensorRT engines (needs TensorRT 10.x and a CUDA GPU here).")
@click.option("--fp16", is_flag=True, help="FP16 TensorRT engines (all graphs but the FP32 softmax and scorer).")
@click.option("--max-batch", type=int, default=16, show_default=True, help="Largest batch of the TensorRT profile and of runtime calls.")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (13..20 for TensorRT 10.0).")
@click.option("--coresets", type=click.Choice(["constant", "input"]), default="constant", show_default=True,
              help="Coresets as scorer-graph constants or as inputs the runtime feeds from the Arrow tables.")
@click.option("--mode", type=click.Choice(SCORE_MODES), default=None, help="Scoring mode (default: the bundle's).")
@click.option("--chunk", type=int, default=64, show_default=True, help="Grid positions per scorer chunk.")
@click.option("--force", is_flag=True, help="Replace an existing export directory.")
@click.option("--threads", type=int, default=None, help="torch threads while tracing (default: all cores).")
@click.option("--int8", "int8", multiple=True, type=click.Choice(QUANTIZABLE),
              help="Quantise this graph to INT8 (static QDQ; repeat for both). mlp keeps bottle's metrics to "
                   "four decimals; backbone costs accuracy: measure it on your data.")
@click.option("--calibration", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of good images the INT8 activation ranges are measured on (e.g. train/good).")
@click.option("--calibration-images", type=click.IntRange(min=1), default=DEFAULT_CALIBRATION_IMAGES,
              show_default=True, help="Calibration images used, evenly spaced over the folder's sorted listing.")
def export_cmd(bundle: Path, out: Path, trt: bool, fp16: bool, max_batch: int, opset: int, coresets: str,
               mode: str | None, chunk: int, force: bool, threads: int | None, int8: tuple[str, ...],
               calibration: Path | None, calibration_images: int) -> None:
    """Export BUNDLE for edge deployment: ONNX graphs + Arrow tables (+ TensorRT engines with --trt)."""
    from export import opcheck, tables
    from export.onnx_export import ExportOptions, export_bundle
    from pni_ray.bundle import BundleError
    from pni_ray.options import set_threads

    set_threads(threads)
    options = ExportOptions(opset=opset, max_batch=max_batch, coresets=coresets, chunk=chunk, mode=mode,
                            int8=tuple(dict.fromkeys(int8)), calibration=calibration,
                            calibration_images=calibration_images)
    try:
        result = export_bundle(bundle, out, options, force=force)
    except (FileExistsError, ValueError, BundleError, opcheck.OpCheckError, tables.ExportError) as exc:
        raise click.ClickException(str(exc)) from exc
    manifest = result.manifest
    total = sum(f["bytes"] for f in manifest["files"].values())
    click.echo(f"exported {manifest['category']} ({manifest['mode']}, {manifest['backbone']['name']}) -> {out}  "
               f"[{len(manifest['files'])} files, {_mib(total)}]")
    for name in manifest["pipeline"]:
        g = manifest["graphs"][name]
        sig = ", ".join(f"{s['name']}{tuple(s['shape'])}" for s in g["inputs"])
        click.echo(f"  {g['file']:<14} {_mib(manifest['files'][g['file']]['bytes']):>10}  {sig}")
    for report in result.reports:
        click.echo(f"  op check: {report.summary()}")
    if manifest.get("int8"):
        click.echo(f"  int8: {', '.join(manifest['int8']['graphs'])} calibrated on "
                   f"{len(manifest['int8']['calibration_images'])} images of {manifest['int8']['calibration_dir']}")
    if fp16 and not trt:
        click.echo("note: --fp16 only affects TensorRT engines (--trt); the ONNX graphs are FP32", err=True)
    if trt:
        from export.trt import TensorRTUnavailable, build_engines

        try:
            info = build_engines(out, max_batch=max_batch, fp16=fp16)
        except TensorRTUnavailable as exc:
            raise click.ClickException(str(exc)) from exc
        for name, record in info["engines"].items():
            click.echo(f"  {record['file']:<14} TensorRT {info['tensorrt_version']} (fp16={record['fp16']}, int8={record.get('int8', False)}, batch 1..{record['max_batch']})")
