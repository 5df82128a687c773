"""Passes over ONNX graphs (onnx + numpy, no torch): traced graphs made static except the batch axis, and more.

torch's tracer records `x.shape` reads as Shape ops: TensorFlow-style "same" padding
(timm's Conv2dSame) and `F.interpolate(size=other.shape[-2:])` come out as small shape
subgraphs feeding Pad / Resize. With a fixed image size every such value is a constant except
the batch size, so this pass

1. replaces Shape ops whose requested dims are all static by constants (after shape inference),
2. evaluates nodes whose inputs are all constants (small tensors only) with onnx's reference
   evaluator, and
3. turns Resize with a computed `sizes` = (batch, C, H', W') into Resize with constant scales
   (1, 1, H'/H, W'/W) where floor(H * scale) == H' holds exactly, so shape inference (and
   TensorRT) see static output shapes.

Whatever stays dynamic is reported by `pni_ray.export.opcheck`, which the exporter runs on every graph.

The other passes over ONNX graphs live here too: `prune` (drop what no output needs), `bypass_qdq`
(remove a QuantizeLinear -> DequantizeLinear round trip: the INT8 MLP's float logits, pni_ray.export.quantize)
and `integer_matmul_to_float` (onnxruntime's own form of an INT8 MatMul + bias, applied by the
runtime to the graphs it loads, never to the files).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference
from onnx.reference import ReferenceEvaluator

MAX_FOLD_ELEMENTS = 1 << 16  # only shape-sized tensors; big constant math stays as exported
NO_FOLD = {"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Multinomial", "Bernoulli"}


def _static_dims(vi: onnx.ValueInfoProto) -> list[int | None] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    g = model.graph
    out: dict[str, list[int | None]] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = _static_dims(vi)
        if dims is not None:
            out[vi.name] = dims
    return out


def _evaluate(node: onnx.NodeProto, values: dict[str, np.ndarray], opset: int) -> list[np.ndarray] | None:
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(values[n].dtype), values[n].shape)
              for n in node.input if n]
    outputs = [helper.make_empty_tensor_value_info(n) for n in node.output]
    graph = helper.make_graph([node], "fold", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        result = ReferenceEvaluator(model).run(None, {n: values[n] for n in node.input if n})
    except Exception:  # noqa: BLE001 - anything the reference evaluator cannot do stays in the graph
        return None
    return [np.asarray(r) for r in result]


def _resize_scales(sizes_src: list, in_dims: list[int | None]) -> np.ndarray | None:
    """Constant scales equivalent to sizes (batch, C, H', W'), or None when not exact."""
    scales = []
    for axis, (want, have) in enumerate(zip(sizes_src, in_dims)):
        if want == ("dim", axis):
            scales.append(1.0)
            continue
        if not isinstance(want, int) or have is None:
            return None
        s = np.float32(want / have)
        if int(np.floor(np.float32(have) * s)) != want or int(np.floor(have * float(s))) != want:
            return None
        scales.append(float(s))
    return np.asarray(scales, np.float32)


def _symbolic(name: str, producers: dict[str, onnx.NodeProto], consts: dict[str, np.ndarray],
              source: str, rank: int) -> list | None:
    """Value of a 1-D int tensor as a list of ints and ("dim", axis) of `source`, if derivable."""
    if name in consts:
        v = consts[name]
        return [int(x) for x in v.reshape(-1)] if v.ndim <= 1 else None
    node = producers.get(name)
    if node is None:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Shape" and node.input[0] == source:
        start, end = attrs.get("start", 0), attrs.get("end")
        dims = [("dim", i) for i in range(rank)]
        return dims[start:end] if end is not None else dims[start:]
    if node.op_type == "Concat":
        out: list = []
        for i in node.input:
            part = _symbolic(i, producers, consts, source, rank)
            if part is None:
                return None
            out += part
        return out
    if node.op_type in ("Cast", "Identity"):
        return _symbolic(node.input[0], producers, consts, source, rank)
    if node.op_type == "Slice":
        data = _symbolic(node.input[0], producers, consts, source, rank)
        if data is None or any(i not in consts for i in node.input[1:] if i):
            return None
        starts, ends = consts[node.input[1]].tolist(), consts[node.input[2]].tolist()
        if len(node.input) > 4 and node.input[4] and consts[node.input[4]].tolist() != [1]:
            return None
        return data[starts[0]:ends[0]]
    return None


def _partial_value(node: onnx.NodeProto, shapes: dict, consts: dict, partial: dict) -> tuple[list, tuple] | None:
    """Shape-like int tensors as lists with None for the dynamic (batch) entries, and their shape."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def vec(name: str) -> list | None:
        if name in partial:
            return partial[name]
        if name in consts and consts[name].ndim <= 1 and consts[name].dtype.kind == "i":
            return [int(v) for v in consts[name].reshape(-1)]
        return None

    if node.op_type == "Shape":
        dims = shapes.get(node.input[0])
        if dims is None:
            return None
        start, end = attrs.get("start", 0), attrs.get("end", len(dims))
        picked = dims[start:end]
        return picked, (len(picked),)
    if node.op_type in ("Cast", "Identity") and node.input[0] in partial:
        to = attrs.get("to", onnx.TensorProto.INT64)
        if node.op_type == "Cast" and to not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            return None
        return partial[node.input[0]], (len(partial[node.input[0]]),)
    if node.op_type == "Gather" and node.input[0] in partial and node.input[1] in consts and attrs.get("axis", 0) == 0:
        data, idx = partial[node.input[0]], consts[node.input[1]]
        return [data[int(i)] for i in idx.reshape(-1)], idx.shape
    if node.op_type == "Slice" and node.input[0] in partial and all(i in consts for i in node.input[1:] if i):
        data = partial[node.input[0]]
        starts, ends = int(consts[node.input[1]][0]), int(consts[node.input[2]][0])
        axes = consts[node.input[3]].tolist() if len(node.input) > 3 and node.input[3] else [0]
        steps = consts[node.input[4]].tolist() if len(node.input) > 4 and node.input[4] else [1]
        if axes not in ([0], [-1]) or steps != [1]:
            return None
        picked = data[max(starts, -len(data)) : ends]
        return picked, (len(picked),)
    if node.op_type == "Concat" and any(i in partial for i in node.input):
        parts = [vec(i) for i in node.input]
        if any(p is None for p in parts):
            return None
        out = [v for p in parts for v in p]
        return out, (len(out),)
    return None


def fold_static_shapes(model: onnx.ModelProto, rounds: int = 8) -> onnx.ModelProto:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    for _ in range(rounds):
        model = shape_inference.infer_shapes(model, data_prop=True)
        shapes = _shapes(model)
        g = model.graph
        consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        producers = {o: n for n in g.node for o in n.output}
        partial: dict[str, list[int | None]] = {}  # 1-D int tensors known up to the batch entries
        changed = False
        keep: list[onnx.NodeProto] = []
        new_inits: list[onnx.TensorProto] = []

        def add_const(name: str, value: np.ndarray) -> None:
            consts[name] = value
            new_inits.append(numpy_helper.from_array(value, name))

        for node in g.node:
            if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
                add_const(node.output[0], numpy_helper.to_array(node.attribute[0].t))
                changed = True
                continue
            if node.op_type == "If" and node.input[0] in consts:  # condition folded: inline the branch taken
                branch = next(a.g for a in node.attribute
                              if a.name == ("then_branch" if bool(consts[node.input[0]].reshape(-1)[0]) else "else_branch"))
                keep.extend(branch.node)
                new_inits.extend(branch.initializer)
                for inner, outer in zip(branch.output, node.output):
                    keep.append(helper.make_node("Identity", [inner.name], [outer], name=f"{node.name}_{outer}_taken"))
                changed = True
                continue
            value = _partial_value(node, shapes, consts, partial)
            if value is not None:
                if all(v is not None for v in value[0]):
                    add_const(node.output[0], np.asarray(value[0], np.int64).reshape(value[1]))
                    changed = True
                    continue
                partial[node.output[0]] = value[0]
            inputs = [i for i in node.input if i]
            if (inputs and node.op_type not in NO_FOLD and not node.domain and all(i in consts for i in inputs)
                    and all(consts[i].size <= MAX_FOLD_ELEMENTS for i in inputs)):
                result = _evaluate(node, consts, opset)
                if result is not None and all(r.size <= MAX_FOLD_ELEMENTS for r in result):
                    for name, value in zip(node.output, result):
                        add_const(name, value)
                    changed = True
                    continue
            if node.op_type == "Resize" and len(node.input) >= 4 and node.input[3] and node.input[3] not in consts:
                src = node.input[0]
                dims = shapes.get(src)
                sym = _symbolic(node.input[3], producers, consts, src, len(dims)) if dims is not None else None
                scales = _resize_scales(sym, dims) if (sym is not None and dims is not None and len(sym) == len(dims)) else None
                if scales is not None:
                    scales_name = node.input[3] + "_as_scales"
                    add_const(scales_name, scales)
                    roi = node.input[1]
                    new = helper.make_node("Resize", [src, roi, scales_name], list(node.output), name=node.name)
                    new.attribute.extend(node.attribute)
                    keep.append(new)
                    changed = True
                    continue
            keep.append(node)
        if not changed:
            break
        del g.node[:]
        g.node.extend(keep)
        g.initializer.extend(new_inits)
        model = prune(model)
    return shape_inference.infer_shapes(model, data_prop=True)


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If / Loop / Scan bodies) read from the enclosing scope."""
    names: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for sub in graphs:
            local = {t.name for t in sub.initializer} | {i.name for i in sub.input}
            for n in sub.node:
                names.update(i for i in n.input if i and i not in local)
                names.update(_subgraph_reads(n))
                local.update(n.output)
    return names


def prune(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes and initializers nothing downstream of the outputs uses."""
    g = model.graph
    needed = {o.name for o in g.output}
    live: list[onnx.NodeProto] = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
            needed.update(_subgraph_reads(node))
    live.reverse()
    del g.node[:]
    g.node.extend(live)
    inits = [t for t in g.initializer if t.name in needed]
    seen: set[str] = set()
    unique = []
    for t in inits:
        if t.name not in seen:
            seen.add(t.name)
            unique.append(t)
    del g.initializer[:]
    g.initializer.extend(unique)
    vis = [v for v in g.value_info if v.name in needed]
    del g.value_info[:]
    g.value_info.extend(vis)
    return model


def bypass_qdq(graph: onnx.GraphProto, tensor: str) -> bool:
    """Drop a QuantizeLinear -> DequantizeLinear round trip after `tensor` (its only reader): what read
    the round trip's output reads `tensor`. False where `tensor` has no such round trip."""
    readers = [n for n in graph.node if tensor in n.input]
    if len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
        return False
    quant = readers[0]
    dequants = [n for n in graph.node if quant.output[0] in n.input]
    outputs = {o.name for o in graph.output}
    if len(dequants) != 1 or dequants[0].op_type != "DequantizeLinear" or dequants[0].output[0] in outputs:
        return False
    for node in (quant, dequants[0]):
        graph.node.remove(node)
    for node in graph.node:
        node.input[:] = [tensor if i == dequants[0].output[0] else i for i in node.input]
    return True


def _unsigned_activation(graph: onnx.GraphProto, dequant: onnx.NodeProto, producer: dict[str, onnx.NodeProto],
                         consts: dict[str, onnx.TensorProto], twins: dict[str, tuple[str, str]]) -> tuple[str, str] | None:
    """(uint8 tensor, its zero point) holding what `dequant` dequantises: the QuantizeLinear's own output
    where it is uint8, else a uint8 twin beside it (zero point + 128, the same scale: q + 128 exactly, for
    round-half-to-even and saturation alike, so q - z is unchanged), made once per QuantizeLinear (`twins`).
    onnxruntime's MatMulIntegerToFloat runs u8 x s8 on its fast kernels and int8 x int8 ~5x slower (INT8
    MLP, batch 8, 1 thread: 189 against 38 ms); its own Q/DQ fusions make the same swap. None unless the
    QuantizeLinear and `dequant` share one constant scalar scale and zero point."""
    quant = producer.get(dequant.input[0])
    if quant is None or quant.op_type != "QuantizeLinear" or quant.domain not in ("", "ai.onnx") \
            or len(quant.input) < 3 or len(dequant.input) < 3 or list(quant.input[1:3]) != list(dequant.input[1:3]):
        return None
    scale, zero = quant.input[1], quant.input[2]
    if scale not in consts or zero not in consts or consts[scale].dims or consts[zero].dims:
        return None
    value = numpy_helper.to_array(consts[zero])
    if value.dtype == np.uint8:
        return quant.output[0], zero
    if value.dtype != np.int8:
        return None
    if quant.output[0] not in twins:
        twin_zero = numpy_helper.from_array((value.astype(np.int16) + 128).astype(np.uint8), f"{quant.output[0]}_zero_uint8")
        graph.initializer.append(twin_zero)
        twin = helper.make_node("QuantizeLinear", [quant.input[0], scale, twin_zero.name], [f"{quant.output[0]}_uint8"],
                                name=f"{quant.name or quant.output[0]}_uint8")
        graph.node.insert(list(graph.node).index(quant) + 1, twin)
        twins[quant.output[0]] = (twin.output[0], twin_zero.name)
    return twins[quant.output[0]]


def integer_matmul_to_float(model: onnx.ModelProto) -> int:
    """Rewrite, in place, DequantizeLinear(a) x DequantizeLinear(w) -> MatMul -> Add(constant bias) as
    onnxruntime's MatMulIntegerToFloat (com.microsoft) with the bias fused; returns how many were rewritten.

    For onnxruntime's CPU kernels only (the runtime applies it to the graphs it loads for the CPU provider;
    the files stay standard ONNX, which TensorRT parses). onnxruntime fuses DequantizeLinear -> MatMul into
    that operator itself but leaves the bias as a separate Add, a second pass over the output: for the
    INT8 MLP's (B, h, w, 2,048) logits that Add costs as much as the products (MLP graph alone, bottle,
    batch 8, 1 thread: 38 ms against 22 ms with the bias fused), and the standard MatMulInteger -> Cast ->
    Mul -> Add form its own bias fusion looks for is constant-folded before that fusion runs. Matched:
    `a` an activation quantised per tensor (QuantizeLinear -> DequantizeLinear with one constant scale and
    zero point; int8 ones are requantised to uint8, `_unsigned_activation`), `w` a constant 2-D int8 or
    uint8 weight with one scale (and zero point) per output column (axis 1), a float32 bias of one value per
    column as the Add's second input, and a MatMul output that is not a graph output. Anything else stays.
    """
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consts = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def dims(name: str) -> list[int] | None:
        return list(consts[name].dims) if name in consts else None

    def dtype(name: str) -> int | None:
        return consts[name].data_type if name in consts else None

    standard = ("", "ai.onnx")
    twins: dict[str, tuple[str, str]] = {}
    rewritten = 0
    for matmul in [n for n in g.node if n.op_type == "MatMul" and n.domain in standard]:
        dq_a, dq_w = producer.get(matmul.input[0]), producer.get(matmul.input[1])
        adds = readers.get(matmul.output[0], [])
        if not (dq_a and dq_w and dq_a.op_type == dq_w.op_type == "DequantizeLinear" and dq_a.domain in standard
                and dq_w.domain in standard and len(adds) == 1 and adds[0].op_type == "Add" and adds[0].domain in standard
                and adds[0].input[0] == matmul.output[0] and matmul.output[0] not in outputs):
            continue
        add, w = adds[0], dims(dq_w.input[0])
        axis = next((a.i for a in dq_w.attribute if a.name == "axis"), 1)
        scale_w, zero_w = dq_w.input[1], dq_w.input[2] if len(dq_w.input) > 2 else ""
        if (w is None or len(w) != 2 or axis not in (1, -1) or dims(scale_w) != [w[1]]
                or dtype(dq_w.input[0]) not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
                or (zero_w and dims(zero_w) != [w[1]]) or dims(add.input[1]) != [w[1]]
                or dtype(add.input[1]) != onnx.TensorProto.FLOAT):
            continue
        activation = _unsigned_activation(g, dq_a, producer, consts, twins)
        if activation is None:
            continue
        a, zero_a = activation
        fused = helper.make_node("MatMulIntegerToFloat",
                                 [a, dq_w.input[0], dq_a.input[1], scale_w, zero_a, zero_w, add.input[1]],
                                 [add.output[0]], name=f"{matmul.name or matmul.output[0]}_MatMulIntegerToFloat",
                                 domain="com.microsoft")
        g.node.insert(list(g.node).index(matmul), fused)
        g.node.remove(matmul)
        g.node.remove(add)
        rewritten += 1
    if rewritten:
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        prune(model)  # the DequantizeLinear nodes only the MatMuls read
    return rewritten
