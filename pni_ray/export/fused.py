"""Chain an export's stage graphs into one ONNX graph, so onnxruntime runs them as one session.

Four sessions back to back (backbone -> mlp -> softmax -> scorer) each wake their own thread
pool, copy their outputs back to Python and hand them to the next; one graph keeps every
intermediate inside onnxruntime (INT8 exports at a 1% bank, 2 threads, batches of 4, whole
`predict`: bottle ~92 -> ~98 images/s, transistor ~88 -> ~93, the same maps bit for bit;
`benchmarks/bench_onnx.py` times both). The stage files stay as they are (TensorRT builds one engine
per graph, with a precision per graph); the fused graph is made in memory when a model is loaded.

Wiring is by tensor name, as the stage pipeline wires them: a stage input takes the output of that
name of the latest earlier stage (mlp's and scorer's `features` = backbone's; refiner's `maps` =
scorer's), otherwise it becomes an input of the fused graph, shared by every stage that reads it
(`images` for backbone and refiner, the scorer's tables). Everything else a stage holds is
prefixed with its name, so no two stages' tensors or nodes clash.
"""

from __future__ import annotations

from typing import Sequence

import onnx
from onnx import helper


class FusionError(ValueError):
    """The graphs cannot be chained into one (different opsets, subgraphs, local functions,
    external data, mismatched tensor types)."""


MAX_FUSED_BYTES = 1_800_000_000  # a serialised ModelProto must stay under protobuf's 2 GB


def _kind(t: onnx.TypeProto) -> tuple[int, int]:
    """(element type, rank): what two ends of a wire must agree on (dimension names may differ)."""
    return t.tensor_type.elem_type, len(t.tensor_type.shape.dim)


def _opsets(stages: Sequence[tuple[str, onnx.ModelProto]]) -> dict[str, int]:
    versions: dict[str, int] = {}
    for name, model in stages:
        for op in model.opset_import:
            if versions.setdefault(op.domain, op.version) != op.version:
                raise FusionError(f"stage {name} imports {op.domain or 'ai.onnx'} opset {op.version}, "
                                  f"an earlier stage {versions[op.domain]}")
    return versions


def _check_flat(name: str, model: onnx.ModelProto) -> None:
    """Renaming is only sound for flat graphs: no subgraph may refer to outer names we rename; and
    the fused graph is handed to onnxruntime in memory, so every weight must be in the model."""
    if model.functions or model.graph.sparse_initializer:
        raise FusionError(f"stage {name} has local functions or sparse initializers")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise FusionError(f"stage {name} keeps weights in external data")
    for node in model.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise FusionError(f"stage {name} has a subgraph ({node.op_type} {node.name})")


def _renamed(proto, name: str):
    """A copy of an initializer or value info under another name."""
    copy = type(proto)()
    copy.CopyFrom(proto)
    copy.name = name
    return copy


def fuse_stages(stages: Sequence[tuple[str, onnx.ModelProto]], outputs: Sequence[str]) -> onnx.ModelProto:
    """One graph running `stages` (name, model) in order; `outputs` names stage outputs (the latest
    stage producing each) that become the fused graph's outputs, under the same names."""
    if not stages:
        raise FusionError("no stages to fuse")
    if len(set(outputs)) != len(outputs):
        raise FusionError(f"outputs named twice: {list(outputs)}")
    opsets = _opsets(stages)
    if sum(m.ByteSize() for _, m in stages) > MAX_FUSED_BYTES:
        raise FusionError("the stages together pass protobuf's 2 GB limit for one model")
    kinds: dict[str, tuple[int, int]] = {}  # fused tensor name -> (element type, rank) of stage outputs
    produced: dict[str, str] = {}  # stage output name -> its name in the fused graph
    graph_inputs: dict[str, onnx.ValueInfoProto] = {}
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    value_info: list[onnx.ValueInfoProto] = []
    for stage, model in stages:
        _check_flat(stage, model)
        g = model.graph
        prefix = f"{stage}/"
        init_names = {t.name for t in g.initializer}
        bound: dict[str, str] = {}
        for vi in g.input:
            if vi.name in init_names:
                continue
            if vi.name in produced:
                bound[vi.name] = produced[vi.name]
                if kinds[produced[vi.name]] != _kind(vi.type):
                    raise FusionError(f"stage {stage} reads {vi.name!r} as (type, rank) {_kind(vi.type)}, "
                                      f"an earlier stage writes {kinds[produced[vi.name]]}")
            else:
                seen = graph_inputs.setdefault(vi.name, vi)
                if _kind(seen.type) != _kind(vi.type):
                    raise FusionError(f"input {vi.name!r} of stage {stage} differs in type or rank from an earlier stage's")
                bound[vi.name] = vi.name

        def rename(tensor: str) -> str:
            return "" if tensor == "" else bound.get(tensor, prefix + tensor)  # "" = an omitted optional input

        inits.extend(_renamed(t, rename(t.name)) for t in g.initializer)
        value_info.extend(_renamed(vi, rename(vi.name)) for vi in g.value_info)
        for node in g.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = prefix + node.name if node.name else ""  # unnamed stays unnamed: no clashes
            copy.input[:] = [rename(i) for i in node.input]
            copy.output[:] = [rename(o) for o in node.output]
            nodes.append(copy)
        for out in g.output:
            produced[out.name] = rename(out.name)
            kinds[produced[out.name]] = _kind(out.type)
            value_info.append(helper.make_value_info(produced[out.name], out.type))
    value_info = list({vi.name: vi for vi in reversed(value_info)}.values())  # one per name (the first)
    missing = [o for o in outputs if o not in produced]
    if missing:
        raise FusionError(f"no stage produces {missing}")
    clash = [o for o in outputs if o in graph_inputs or produced[o] == o]
    if clash:
        raise FusionError(f"outputs {clash} are also inputs of the fused graph")
    out_info = []
    for name in outputs:  # an Identity gives each requested output its plain name
        nodes.append(helper.make_node("Identity", [produced[name]], [name], name=f"output/{name}"))
        vi = next(v for v in value_info if v.name == produced[name])
        out_info.append(helper.make_value_info(name, vi.type))
    graph = helper.make_graph(nodes, "pni_pipeline", list(graph_inputs.values()), out_info, inits, value_info=value_info)
    fused = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name="pni-ray")
    fused.ir_version = max(m.ir_version for _, m in stages)
    return fused
