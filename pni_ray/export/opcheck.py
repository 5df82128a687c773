"""Will TensorRT's ONNX parser take this graph? Operators, their restrictions, static shapes.

Runs on every machine (onnx only, no TensorRT needed), so an export made on a CPU box is known
to parse on the edge GPU before anyone copies it there.

The operator list is TensorRT 10.x's ONNX parser support matrix (onnx-tensorrt
docs/operators.md of the 10.x releases): the operators marked supported, with the restrictions
that can be checked statically. TensorRT 10.0 reads opsets 9 to 20, so that is the range the
"10.0" target accepts (later 10.x releases read up to opset 24; the exporter defaults to 17).
Left out to stay within what every 10.x parser takes: the operators later 10.x releases added
(Attention, RotaryEmbedding, RMSNormalization, TensorScatter) and IsInf (unsupported in the 8.x
parsers; the scorer compares with Equal(x, +inf) instead).

Shapes: graph inputs and outputs have the dynamic batch axis `batch` first and every other axis
static (inputs holding model tables are fully static). Inside the graph every tensor's shape must
be inferable with at most one symbolic axis: with only the batch dynamic at the inputs, that axis
is the batch (moved by a Transpose or merged with static axes by a Reshape); operators whose
output shape depends on data (NonZero, Unique, ...) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import helper, numpy_helper, shape_inference

TARGETS = {"10.0": {"min_opset": 9, "max_opset": 20}}
DEFAULT_TARGET = "10.0"
BATCH = "batch"

# Supported by the TensorRT 10.x ONNX parser (onnx-tensorrt 10.x operator matrix), FP32/FP16 paths.
TRT10_OPS: frozenset[str] = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos
    Cosh CumSum DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten
    Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
    GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish
    Hardmax Identity If ImageScaler InstanceNormalization IsNaN LayerNormalization LeakyRelu Less
    LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN
    RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign
    Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
    ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)

# Inputs that must be build-time constants (initializers or Constant nodes), by operator.
CONSTANT_INPUTS: dict[str, tuple[int, ...]] = {
    **{op: (1,) for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                           "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
    "TopK": (1,),
    "CumSum": (1,),
    "OneHot": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
}
DATA_DEPENDENT_SHAPES = {"NonZero", "Unique", "Compress", "NonMaxSuppression", "StringSplit"}
RESIZE_COORDINATE_MODES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
RESIZE_MODES = {"nearest", "linear"}
ASYMMETRIC_QDQ = "TensorRT takes symmetric int8 only (export with --int8-activations int8)"
# what TensorRT's DequantizeLinear takes as a constant input (weights); activations are float
QUANTIZED_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.INT4}
UNSUPPORTED_TYPES = {onnx.TensorProto.STRING, onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128,
                     onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}


@dataclass
class OpCheckReport:
    graph: str
    target: str
    ops: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = f"{self.graph}: {'OK' if self.ok else 'FAILED'} for TensorRT {self.target} ({sum(self.ops.values())} nodes, {len(self.ops)} op types)"
        return "\n".join([head] + [f"  - {p}" for p in self.problems])

    def to_dict(self) -> dict:
        return {"graph": self.graph, "target": self.target, "ok": self.ok, "ops": self.ops, "problems": self.problems}


class OpCheckError(ValueError):
    """A graph TensorRT's parser would reject; the message lists every problem."""


def _dims(vi: onnx.ValueInfoProto) -> list | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]


def check_model(model: onnx.ModelProto | str | Path, target: str = DEFAULT_TARGET, name: str | None = None) -> OpCheckReport:
    if target not in TARGETS:
        raise ValueError(f"unknown TensorRT target {target!r}; known: {sorted(TARGETS)}")
    if not isinstance(model, onnx.ModelProto):
        name = name or Path(model).name
        model = onnx.load(str(model), load_external_data=False)
    report = OpCheckReport(graph=name or model.graph.name, target=target)
    limits = TARGETS[target]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not limits["min_opset"] <= opset <= limits["max_opset"]:
        report.problems.append(f"opset {opset} is outside TensorRT {target}'s range "
                               f"{limits['min_opset']}..{limits['max_opset']} (export with --opset in that range)")
    g = model.graph
    consts = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}

    def walk(graph: onnx.GraphProto, where: str) -> None:
        for node in graph.node:
            label = f"{node.op_type} node {node.name or node.output[0]!r}{where}"
            report.ops[node.op_type] = report.ops.get(node.op_type, 0) + 1
            if node.domain not in ("", "ai.onnx"):
                report.problems.append(f"{label}: custom domain {node.domain!r} needs a TensorRT plugin")
            elif node.op_type not in TRT10_OPS:
                report.problems.append(f"{label}: operator {node.op_type} is not supported by TensorRT {target}'s ONNX parser")
            for idx in CONSTANT_INPUTS.get(node.op_type, ()):
                if len(node.input) > idx and node.input[idx] and node.input[idx] not in consts:
                    report.problems.append(f"{label}: input {idx} ({node.input[idx]!r}) must be a build-time constant")
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Resize":
                ctm = attrs.get("coordinate_transformation_mode", b"half_pixel")
                mode = attrs.get("mode", b"nearest")
                ctm, mode = (v.decode() if isinstance(v, bytes) else v for v in (ctm, mode))
                if ctm not in RESIZE_COORDINATE_MODES:
                    report.problems.append(f"{label}: coordinate_transformation_mode {ctm!r} unsupported")
                if mode not in RESIZE_MODES:
                    report.problems.append(f"{label}: mode {mode!r} unsupported")
                if attrs.get("antialias", 0):
                    report.problems.append(f"{label}: antialiasing unsupported")
            if node.op_type == "DequantizeLinear" and node.input[0] in init_types \
                    and init_types[node.input[0]] not in QUANTIZED_TYPES:
                report.problems.append(f"{label}: dequantises a {onnx.TensorProto.DataType.Name(init_types[node.input[0]])} "
                                       "constant; TensorRT takes int8 / fp8 / int4 Q/DQ only (an int32 bias: quantise "
                                       "without QuantizeBias)")
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 \
                    and node.input[2] in init_types:
                zero_type = init_types[node.input[2]]
                zero = init_values.get(node.input[2])
                if zero_type == onnx.TensorProto.UINT8 or (zero is not None and zero.any()):
                    report.problems.append(f"{label}: {onnx.TensorProto.DataType.Name(zero_type)} Q/DQ (uint8 or a "
                                           f"nonzero zero point); {ASYMMETRIC_QDQ}")
            if node.op_type == "ScatterND" and attrs.get("reduction", b"none") not in (b"none", "none"):
                report.problems.append(f"{label}: ScatterND reduction other than 'none' unsupported")
            if node.op_type == "TopK" and len(node.input) > 1 and node.input[1] in init_values:
                k = int(init_values[node.input[1]].reshape(-1)[0])
                if k >= 3840:
                    report.problems.append(f"{label}: K = {k} must be less than 3840")
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g, f" (in a subgraph of {node.op_type})")

    init_values = {t.name: numpy_helper.to_array(t) for t in g.initializer if t.data_location != onnx.TensorProto.EXTERNAL
                   and len(t.dims) <= 1}
    init_types = {t.name: t.data_type for t in g.initializer}
    walk(g, "")
    _check_shapes(model, report)
    return report


def _check_shapes(model: onnx.ModelProto, report: OpCheckReport) -> None:
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # noqa: BLE001
        report.problems.append(f"shape inference failed: {exc}")
        return
    g = inferred.graph
    for io, kind in ((g.input, "input"), (g.output, "output")):
        for vi in io:
            dims = _dims(vi)
            if dims is None:
                report.problems.append(f"graph {kind} {vi.name!r} has no shape")
                continue
            table_input = kind == "input" and _is_table_input(vi)  # coresets fed as inputs: static, no batch
            if not table_input and (not dims or dims[0] != BATCH):
                report.problems.append(f"graph {kind} {vi.name!r} {dims}: axis 0 must be the dynamic batch axis {BATCH!r}")
            bad = [i for i, d in enumerate(dims) if i > 0 and not isinstance(d, int)]
            if bad:
                report.problems.append(f"graph {kind} {vi.name!r} {dims}: dynamic non-batch axis {bad}")
    consts = {t.name for t in g.initializer}
    known = {vi.name: vi for vi in list(g.value_info) + list(g.input) + list(g.output)}
    for node in g.node:
        for out in node.output:
            if not out or out in consts:
                continue
            vi = known.get(out)
            dims = _dims(vi) if vi is not None else None
            if dims is None:
                report.problems.append(f"{node.op_type} output {out!r}: shape could not be inferred statically")
                continue
            symbolic = [i for i, d in enumerate(dims) if not isinstance(d, int)]
            if len(symbolic) > 1:
                report.problems.append(f"{node.op_type} output {out!r} {dims}: dynamic non-batch axis {symbolic[1:]} "
                                       "(only the batch axis may be dynamic)")
            if node.op_type in DATA_DEPENDENT_SHAPES:
                report.problems.append(f"{node.op_type} output {out!r}: data-dependent shape")
            if vi.type.tensor_type.elem_type in UNSUPPORTED_TYPES:
                report.problems.append(f"{node.op_type} output {out!r}: element type unsupported by TensorRT")


def _is_table_input(vi: onnx.ValueInfoProto) -> bool:
    """Graph inputs that hold model tables (coresets fed as inputs) are fully static, no batch."""
    dims = _dims(vi)
    return dims is not None and all(isinstance(d, int) for d in dims)


def check_files(paths: dict[str, Path], target: str = DEFAULT_TARGET) -> list[OpCheckReport]:
    return [check_model(p, target, name) for name, p in paths.items()]


def without_asymmetric_qdq(report: OpCheckReport) -> OpCheckReport:
    """The report less its asymmetric-Q/DQ problems: what matters for graphs meant for onnxruntime only."""
    return OpCheckReport(report.graph, report.target, dict(report.ops),
                         [p for p in report.problems if ASYMMETRIC_QDQ not in p])


def require_ok(reports: list[OpCheckReport]) -> None:
    failed = [r for r in reports if not r.ok]
    if failed:
        raise OpCheckError("graphs TensorRT's ONNX parser would reject:\n" + "\n".join(r.summary() for r in failed))
