"""INT8 graphs for CPU and TensorRT INT8 deployments: static QDQ quantisation calibrated on good images.

Why static QDQ: weights become int8 per output channel and activations 8-bit per tensor, with
ranges measured (MinMax) on calibration images prepared with the bundle's own geometry, so the
graph needs no data at run time. Two activation types, because the two runtimes want different ones:

- `uint8` (asymmetric, the default for onnxruntime): the U8S8 form onnxruntime's CPU kernels are
  built for. The backbone's activations follow ReLU6, so an asymmetric range also spends all 256
  steps on values that occur. Bottle, 2 threads: backbone ~34-40 ms per batch of 4 against ~60 in FP32.
- `int8` (symmetric, zero point 0): the only form TensorRT's explicit quantization takes (a
  strongly typed INT8 engine, pni_ray.export.trt). onnxruntime runs the backbone slower this way than in
  FP32 (~90 ms), so it is the TensorRT choice, not a CPU one.

Weights keep to a 7-bit range by default ([-64, 64]: onnxruntime's `reduce_range`, which also
narrows the constant operands of element-wise ops, here the scalars 0 and 1, still exact; the
activation ranges are not narrowed). x86 CPUs without VNNI (AVX2 only, AVX-512 without VNNI)
multiply u8 x s8 with VPMADDUBSW, which adds each pair of products into int16 and saturates:
255 x 127 x 2 does not fit, 255 x 64 x 2 does. Measured on an AVX2-only CPU, 8-bit weights made the
symmetric-int8 MLP of the test bundle agree with FP32's argmax on 77% of patches (7 bits: 95%).
The `--trt` form keeps 7 bits too: its graphs are also what onnxruntime runs where no engine is
built. `weight_bits=8` is for deployments only on VNNI CPUs or TensorRT. (onnxruntime's session
option `session.x64quantprecision` is meant to keep 8-bit weights exact on AVX2 at a cost in
speed; not tried here.)

The first `fp32_convs` convolutions of the backbone stay FP32 (default 6: on EfficientNet-Lite the
stem and the first two blocks). They see raw pixels at the highest resolutions; quantised they
cost transistor 0.003 AUPRO at a 1% bank; kept in FP32, pixel AUROC stays within 3e-4 and AUPRO
within 0.0015 of FP32's on bottle and transistor (uint8 activations; 8-bit weights on an AVX-512
VNNI CPU, 7-bit on an AVX2 one; symmetric int8 with them not measured).
Dynamic quantisation does not help here: it covers MatMul, and the MLP is convolutions but for its
classifier (onnxruntime's ConvInteger path measured 3x slower than FP32).

What may be quantised: the backbone and the neighbourhood MLP. The softmax and the scorer never are
(the probabilities are compared with tau ~ 1 / |C_emb|; distances feed the scores), and neither are the
MLP's logits: its classifier reads 8-bit inputs and weights and writes float (`float_logits`).

Measured (320 px, 2 threads, `benchmarks/bench_peers.py --int8 mlp,backbone`): docs/results.md (the INT8 rows).
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
DEFAULT_FP32_CONVS = 6
CALIBRATION_BATCH = 4
# activation type -> (onnxruntime QuantType name, symmetric)
ACTIVATIONS = {"uint8": ("QUInt8", False), "int8": ("QInt8", True)}
DEFAULT_ACTIVATIONS = "uint8"
# 7: weights in [-64, 64] (onnxruntime's reduce_range), so a u8 x s8 pair sum fits int16 on every x86 CPU
WEIGHT_BITS = (7, 8)
DEFAULT_WEIGHT_BITS = 7
METHOD = ("static QDQ: int8 weights per output channel (symmetric, {bits}-bit range), {act} activations "
          "per tensor (MinMax)")
LOGITS = "; the MLP's classifier bias and logits float"


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

    from pni_ray.data.images import to_float
    from pni_ray.models.threads import one_thread
    from pni_ray.predict import features

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
            with one_thread(), torch.no_grad():  # torch's conv floats follow its thread count: one count, one export
                out["mlp"].append(features(detector.extractor, geometry, prepared).float().cpu().numpy())
    return out


def leading_convs(model: onnx.ModelProto, n: int) -> list[str]:
    """Names of the first `n` Conv nodes of `model` in graph (topological) order."""
    return [node.name for node in model.graph.node if node.op_type == "Conv"][:max(n, 0)]


def classifier_nodes(model: onnx.ModelProto) -> tuple[onnx.NodeProto, onnx.NodeProto]:
    """(MatMul, Add) that end the MLP graph: the classifier and its bias, producing the only output."""
    producer = {o: n for n in model.graph.node for o in n.output}
    add = producer.get(model.graph.output[0].name)
    matmul = producer.get(add.input[0]) if add is not None and add.op_type == "Add" else None
    if matmul is None or matmul.op_type != "MatMul":
        raise ValueError("the MLP graph does not end in its classifier's MatMul + Add")
    return matmul, add


def float_logits(model: onnx.ModelProto, classifier: tuple[str, str]) -> onnx.ModelProto:
    """The quantised MLP with its logits left float: the classifier's MatMul (8-bit inputs and weights)
    feeds the bias Add directly, with no QuantizeLinear -> DequantizeLinear round trip between them; the
    Add itself was kept out of quantisation, so the bias and the logits stay float. `classifier`: the
    names of that MatMul and Add (`classifier_nodes` of the graph before quantisation).

    Why: 8-bit logits cost accuracy (2,048 classes, a softmax compared with tau ~ 1 / |C_emb| after it)
    and time: the DequantizeLinear of the (B, h, w, K) logits was one of the fused graph's largest kernels
    (6.4 of 44 ms per batch of 8 on a quiet machine, 13 of 58 ms on a busy one; transistor at 1%, one
    thread). The file stays standard Q/DQ (TensorRT runs DequantizeLinear -> MatMul -> Add in int8 with a
    float output); onnxruntime gets the classifier as one MatMulIntegerToFloat with the bias fused when the
    runtime loads the graph (`pni_ray.export.graph_passes.integer_matmul_to_float`).
    """
    from pni_ray.export.graph_passes import bypass_qdq, prune

    matmul, add = (next((n for n in model.graph.node if n.name == name), None) for name in classifier)
    if matmul is None or add is None:
        raise ValueError(f"the quantised MLP graph lost its classifier nodes {classifier}")
    bypass_qdq(model.graph, matmul.output[0])
    readers = [n for n in model.graph.node if matmul.output[0] in n.input]
    if readers != [add]:
        raise ValueError(f"the MLP's classifier output is read by {[n.op_type for n in readers]}, not only its bias Add")
    return prune(model)  # the round trip's scale and zero point


def quantize_graph(model: onnx.ModelProto, input_name: str, batches: Sequence[np.ndarray],
                   activations: str = DEFAULT_ACTIVATIONS, fp32_convs: int = 0,
                   weight_bits: int = DEFAULT_WEIGHT_BITS, logits: bool = False) -> tuple[onnx.ModelProto, list[str]]:
    """`model` with QDQ nodes (int8 weights in a `weight_bits` range, `activations` activations),
    activation ranges from `batches` of its input `input_name`, and the names of its first
    `fp32_convs` convolutions, left FP32. `logits`: the graph is the MLP, whose classifier output stays
    float (`float_logits`)."""
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
        qtype, symmetric = ACTIVATIONS[activations]
        prepared = onnx.load(str(pre))
        fp32_nodes = leading_convs(prepared, fp32_convs)  # names after pre-processing
        classifier = tuple(n.name for n in classifier_nodes(prepared)) if logits else ()
        bias = list(classifier[1:])  # the bias stays a float Add
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=getattr(QuantType, qtype), weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=list(fp32_nodes) + bias,
                        reduce_range=weight_bits == 7,
                        # biases stay float: TensorRT refuses a DequantizeLinear of int32 (onnx-tensorrt
                        # #850), and onnxruntime quantises float biases itself when it fuses the Conv
                        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True,
                                       "QuantizeBias": False})
        quantized = onnx.load(str(dst))
        return (float_logits(quantized, classifier) if logits else quantized), fp32_nodes


def check_graphs(graphs: Sequence[str], exported: Sequence[str]) -> None:
    """Refuse quantising a graph the export does not have (mode patchcore has no MLP)."""
    missing = [g for g in graphs if g not in exported]
    if missing:
        raise ValueError(f"--int8 {','.join(missing)}: this export has no such graph (mode patchcore has no MLP)")


def quantize_models(models: dict[str, onnx.ModelProto], detector, geometry, graphs: Sequence[str],
                    paths: Sequence[Path], activations: str = DEFAULT_ACTIVATIONS,
                    fp32_convs: int = DEFAULT_FP32_CONVS, weight_bits: int = DEFAULT_WEIGHT_BITS) -> dict:
    """Replace models[g] by its INT8 graph for each g in `graphs` (`check_graphs` passed), calibrated
    on `paths` (`calibration_paths`), the backbone's first `fp32_convs` convolutions left FP32,
    weights in a `weight_bits` range; returns the manifest record."""
    inputs = calibration_inputs(detector, geometry, paths, graphs)
    names = {"backbone": "images", "mlp": "features"}
    kept: dict[str, list[str]] = {}
    for g in graphs:
        models[g], kept[g] = quantize_graph(models[g], names[g], inputs[g], activations,
                                            fp32_convs if g == "backbone" else 0, weight_bits, logits=g == "mlp")
    method = METHOD.format(act=activations, bits=weight_bits) + (LOGITS if "mlp" in graphs else "")
    return {"graphs": sorted(graphs), "activations": activations, "tensorrt": ACTIVATIONS[activations][1],
            "weight_bits": weight_bits, "method": method, "fp32_nodes": kept,
            "calibration_dir": str(Path(paths[0]).parent.resolve()), "calibration_images": [p.name for p in paths]}
