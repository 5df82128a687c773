"""`pni-ray export BUNDLE --out DIR [--trt] [--fp16] [--int8 mlp --calibration DIR] [--max-batch N] [--opset K]`.

Imported by `pni-ray` at start-up, so nothing heavy at module level.
"""

from __future__ import annotations

from pathlib import Path

import click

from pni_ray.config import SCORE_MODES

# pni_ray.export.quantize loads onnx and onnxruntime only inside its functions
from pni_ray.export.quantize import (ACTIVATIONS, DEFAULT_CALIBRATION_IMAGES, DEFAULT_FP32_CONVS, DEFAULT_WEIGHT_BITS,
                             QUANTIZABLE, WEIGHT_BITS)


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
              help="Coresets as scorer-graph constants or as inputs the runtime feeds from the Arrow tables (for "
                   "runtimes that must load the tables themselves). The same scores, but 3.5-5x slower on bottle in "
                   "onnxruntime on CPU: the position prior goes in as a dense positions x entries input.")
@click.option("--mode", type=click.Choice(SCORE_MODES), default=None, help="Scoring mode (default: the bundle's).")
@click.option("--chunk", type=int, default=64, show_default=True, help="Grid positions per scorer chunk.")
@click.option("--force", is_flag=True, help="Replace an existing export directory (never a directory of anything else).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads while tracing (default: $PNI_RAY_THREADS, else all cores).")
@click.option("--int8", "int8", multiple=True, type=click.Choice(QUANTIZABLE),
              help="Quantise this graph to INT8 (static QDQ; repeat for both). With uint8 activations both kept bottle's "
                   "and transistor's pixel AUROC within 3e-4 and AUPRO within 0.0015 of FP32 (7-bit weights on an "
                   "AVX2 CPU; 8-bit on an AVX-512 VNNI one); symmetric int8 (--trt) was not measured with them: "
                   "measure it on your data.")
@click.option("--calibration", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of good images the INT8 activation ranges are measured on: the category's train/good, "
                   "where the export also finds the bundle's held-out images and takes its threshold from its INT8 "
                   "graphs' scores of them (other folders: no threshold).")
@click.option("--calibration-images", type=click.IntRange(min=1), default=None,
              help=f"Calibration images used, evenly spaced over the folder's sorted listing (default: "
                   f"{DEFAULT_CALIBRATION_IMAGES}).")
@click.option("--int8-activations", type=click.Choice(list(ACTIVATIONS)), default=None,
              help="uint8 (asymmetric: onnxruntime's fast CPU form) or int8 (symmetric: what TensorRT takes). "
                   "Default: int8 with --trt, else uint8.")
@click.option("--int8-fp32-convs", type=click.IntRange(min=0), default=None,
              help=f"The backbone's first N convolutions stay FP32 (raw pixels, highest resolutions). "
                   f"Default: {DEFAULT_FP32_CONVS}.")
@click.option("--int8-weight-bits", type=click.Choice([str(b) for b in WEIGHT_BITS]), default=None,
              help=f"Range of the int8 weights (default: {DEFAULT_WEIGHT_BITS}, also with --trt). 7 runs right on every "
                   "CPU. 8 only where every runtime is a VNNI CPU (AVX-512 VNNI, AVX-VNNI) or TensorRT: on other x86 "
                   "CPUs onnxruntime's u8 x s8 products saturate int16.")
def export_cmd(bundle: Path, out: Path, trt: bool, fp16: bool, max_batch: int, opset: int, coresets: str,
               mode: str | None, chunk: int, force: bool, threads: int | None, int8: tuple[str, ...],
               calibration: Path | None, calibration_images: int | None, int8_activations: str | None,
               int8_fp32_convs: int | None, int8_weight_bits: str | None) -> None:
    """Export BUNDLE for edge deployment: ONNX graphs + Arrow tables (+ TensorRT engines with --trt)."""
    from pni_ray.export import opcheck, tables
    from pni_ray.export.onnx_export import ExportOptions, export_bundle
    from pni_ray.bundle import BundleError
    from pni_ray.options import set_threads

    if not int8 and (int8_activations, int8_fp32_convs, int8_weight_bits, calibration,
                     calibration_images) != (None,) * 5:
        raise click.UsageError("--calibration / --calibration-images / --int8-activations / --int8-fp32-convs / "
                               "--int8-weight-bits shape INT8 graphs: add --int8 mlp and/or --int8 backbone")
    if fp16 and not trt:
        raise click.UsageError("--fp16 applies to TensorRT engines: add --trt (the ONNX graphs are FP32)")
    if int8_fp32_convs is not None and "backbone" not in int8:
        raise click.UsageError("--int8-fp32-convs applies to the backbone: add --int8 backbone")
    if trt and int8 and int8_activations == "uint8":
        raise click.UsageError("--trt with --int8-activations uint8: TensorRT takes symmetric int8 Q/DQ only "
                               "(drop --int8-activations, or give int8)")
    set_threads(threads)
    options = ExportOptions(opset=opset, max_batch=max_batch, coresets=coresets, chunk=chunk, mode=mode,
                            int8=tuple(dict.fromkeys(int8)), calibration=calibration,
                            calibration_images=calibration_images or DEFAULT_CALIBRATION_IMAGES,
                            int8_activations=int8_activations or ("int8" if trt else "uint8"),
                            int8_fp32_convs=DEFAULT_FP32_CONVS if int8_fp32_convs is None else int8_fp32_convs,
                            int8_weight_bits=int(int8_weight_bits or DEFAULT_WEIGHT_BITS))
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
    int8_record = manifest.get("int8") or {}
    ort_only = set(int8_record.get("graphs", ())) if int8_record and not int8_record["tensorrt"] else set()
    for report in result.reports:
        if report.graph in ort_only and not report.ok and opcheck.without_asymmetric_qdq(report).ok:
            click.echo(f"  op check: {report.graph}: onnxruntime only (uint8 INT8 activations; TensorRT needs "
                       "--int8-activations int8)")
        else:
            click.echo(f"  op check: {report.summary()}")
    if manifest.get("int8"):
        click.echo(f"  int8: {', '.join(manifest['int8']['graphs'])} ({manifest['int8']['activations']} activations, "
                   f"{manifest['int8'].get('weight_bits', 8)}-bit weight range) calibrated on "
                   f"{len(manifest['int8']['calibration_images'])} images of {manifest['int8']['calibration_dir']}")
        held = manifest["int8"].get("threshold") or {}
        if held.get("recalibrated"):
            click.echo(f"  threshold: {manifest['threshold']:.4f} from the INT8 graphs' scores of the bundle's "
                       f"{held['held_out_images']} held-out images (its FP32 threshold: {held['fp32_threshold']:.4f})")
        elif held:
            click.echo(f"  threshold: none (is_anomalous null): {held['reason']}")
    if trt:
        from pni_ray.export.trt import TensorRTUnavailable, build_engines

        try:
            info = build_engines(out, max_batch=max_batch, fp16=fp16)
        except TensorRTUnavailable as exc:
            raise click.ClickException(str(exc)) from exc
        for name, record in info["engines"].items():
            click.echo(f"  {record['file']:<14} TensorRT {info['tensorrt_version']} (fp16={record['fp16']}, int8={record.get('int8', False)}, batch 1..{record['max_batch']})")
