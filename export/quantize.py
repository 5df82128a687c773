"""INT8 graphs for CPU and TensorRT INT8 deployments: static QDQ quantisation calibrated on good images.

Why static QDQ: weights become int8 per output channel and activations int8, both symmetric (zero
point 0), with ranges measured (MinMax) on calibration images prepared with the bundle's own
geometry, so the graph needs no data at run time. onnxruntime runs QuantizeLinear / Conv /
DequantizeLinear groups with int8 kernels (VNNI where the CPU has it), and symmetric int8 is the
only form TensorRT's explicit quantization takes, so the same file builds a strongly typed INT8
engine (export.trt). On bottle, the MLP ran as fast with symmetric int8 activations as with
uint8 ones, at the same metrics; the backbone did not (onnxruntime: ~34 ms per batch of 4 with
uint8 activations, ~90 with int8, ~60 in FP32), one more reason `--int8 backbone` is not the
CPU path.
Dynamic quantisation does not help here: it covers MatMul, and the MLP is convolutions (onnxruntime's
ConvInteger path measured 3x slower than FP32).

What may be quantised: the backbone and the neighbourhood MLP. The softmax and the scorer never are
(the probabilities are compared with tau ~ 1 / |C_emb|; distances feed the scores).

Measured (320 px, 2 threads, `benchmarks/bench_peers.py --int8 mlp`): the MLP in INT8 keeps bottle's
and transistor's image / pixel AUROC / AUPRO to four decimals, changes the pni score of 1-2 in
10,000 test patches (its logits leave the graph in int8 steps) and cuts its graph ~3x; an INT8
backbone costs accuracy (README, "INT8 export") and is for users who measure it on their data.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # onnx loads only when a graph is quantised: `pni-ray` imports this module at start-up
    import onnx

QUANTIZABLE = ("backbone", "mlp")
DEFAULT_CALIBRATION_IMAGES = 32
CALIBRATION_BATCH = 4
METHOD = "static QDQ, symmetric int8: weights per output channel, activations per tensor (MinMax)"


def calibration_paths(folder: Path | str, n: int = DEFAULT_CALIBRATION_IMAGES) -> list[Path]:
    """Up to `n` images of `folder`, evenly spaced over its sorted listing (deterministic)."""
    from pni_ray.data.images import list_images

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--calibration {folder}: not a directory (give a folder of good images, e.g. "
                         "<data root>/<category>/train/good)")
    if n < 1:
        raise ValueError(f"calibration images must be >= 1, got {n}")
    paths = list_images(folder)
    if not paths:
        raise ValueError(f"--calibration {folder}: no images in it (PNG, JPEG, BMP or TIFF)")
    step = len(paths) / min(n, len(paths))
    return [paths[int(i * step)] for i in range(min(n, len(paths)))]


def calibration_inputs(detector, geometry, paths: Sequence[Path], graphs: Sequence[str]) -> dict[str, list[np.ndarray]]:
    """Batches of each graph's input over the calibration images: backbone inputs (canvases, or tiles
    when tiling) and MLP inputs (features from the FP32 backbone, stitched when tiling)."""
    import torch

    from pni_ray.geometry import to_float
    from pni_ray.models.predict import features

    out: dict[str, list[np.ndarray]] = {g: [] for g in graphs}
    for i in range(0, len(paths), CALIBRATION_BATCH):
        prepared = []
        for path in paths[i : i + CALIBRATION_BATCH]:
            p = geometry.prepare(geometry.load(path))
            geometry.check(p, name=str(path))
            prepared.append(p)
        if "backbone" in out:
            if geometry.tiled:
                out["backbone"].extend(geometry.tile_stack(p) for p in prepared)
            else:
                out["backbone"].append(to_float(np.stack([p.canvas for p in prepared])))
        if "mlp" in out:
            with torch.no_grad():
                out["mlp"].append(features(detector.extractor, geometry, prepared).float().cpu().numpy())
    return out


def quantize_graph(model: onnx.ModelProto, input_name: str, batches: Sequence[np.ndarray]) -> onnx.ModelProto:
    """`model` with QDQ int8 nodes, activation ranges from `batches` of its input `input_name`."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            return None if batch is None else {input_name: np.ascontiguousarray(batch, np.float32)}

    with tempfile.TemporaryDirectory(prefix="pni-ray-int8-") as tmp:
        src, pre, dst = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save_model(model, str(src))
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        # biases stay float: TensorRT refuses a DequantizeLinear of int32 (onnx-tensorrt
                        # #850), and onnxruntime quantises float biases itself when it fuses the Conv
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})
        return onnx.load(str(dst))


def check_graphs(graphs: Sequence[str], exported: Sequence[str]) -> None:
    """Refuse quantising a graph the export does not have (mode patchcore has no MLP)."""
    missing = [g for g in graphs if g not in exported]
    if missing:
        raise ValueError(f"--int8 {','.join(missing)}: this export has no such graph (mode patchcore has no MLP)")


def quantize_models(models: dict[str, onnx.ModelProto], detector, geometry, graphs: Sequence[str],
                    paths: Sequence[Path]) -> dict:
    """Replace models[g] by its INT8 graph for each g in `graphs` (`check_graphs` passed), calibrated
    on `paths` (`calibration_paths`); returns the manifest record."""
    inputs = calibration_inputs(detector, geometry, paths, graphs)
    names = {"backbone": "images", "mlp": "features"}
    for g in graphs:
        models[g] = quantize_graph(models[g], names[g], inputs[g])
    return {"graphs": sorted(graphs), "method": METHOD, "calibration_dir": str(Path(paths[0]).parent.resolve()),
            "calibration_images": [p.name for p in paths]}
