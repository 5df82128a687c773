"""The scoring graph, written op by op with onnx.helper (numpy + onnx, no torch).

features (B, D, h, w) [+ probabilities (B, h, w, K), the softmax graph's channels-last output]
[+ fill_index (B, h * w), letterbox / tiling] -> patch_scores (B, h, w), maps (B, H, W), scores (B,). Every op is in TensorRT 10's ONNX parser
and every shape is static but the batch. The dense masked minimum of the torch scorer's
`exact_dense=True` path, per chunk of c grid positions (P = B * c patches):

  distances  MatMul([x, 1], [-2 C^T ; |c|^2])      (P, M) = |c|^2 - 2 x.c; no cdist. |x|^2 is not
             Max(., -|x|^2)                         added (it shifts a row, not its argmin); the
                                                    Max is torch's clamp at 0, which makes entries
                                                    tie (first index wins) where rounding cancels
  mask       Gather(p^T, e2d, axis=0)               (M, B, c): p(c_dist[e2d[m]] | N), whole rows
             Less(., T^T) -> Transpose              refused entries; T = exact float32 thresholds
                                                    (pni_ray.export.tables), so the mask equals torch's
                                                    float32 rule bit for bit (pni: both priors
                                                    > tau, or their mean > tau)
  choice     ArgMin(d + Cast(refused) * 1e30)       allowed entries keep d exactly; a patch with
             Where(refused everything, fallback, .) nothing allowed takes the fallback: pni the
                                                    nearest entry its position allows, the other
                                                    masks the plain nearest entry
  position   ArgMin(d + F)                          F: 0 where p(c|x) > tau, 1e30 elsewhere, 0 on
                                                    rows that allow nothing (the plain minimum
                                                    built in): mode position, pni_split's second
                                                    half, pni's fallback
  score      Sqrt(ReduceSumSquare(x - Gather(C, j)))  the chosen entry's distance recomputed as a
                                                    difference, like torch's exact_sq_distances:
                                                    the GEMM expansion cancels near zero distance
                                                    (pni_split: the mean of its two scores)
  map        MatMul(L_y, MatMul(S, L_x^T))           bilinear upsampling and the separable Gaussian
                                                    blur with edge padding folded into two constant
                                                    matrices (H, h) and (w, W)
  scores     ReduceMax(map)                         the map maximum (PatchCore, PNIDetector.forward);
                                                    the runtime's image score is
                                                    Geometry.image_score (content only, averaged
                                                    over image_window^2 patches)

C for the Gather is the distance weight's -2 C^T scaled back by -0.5 (exact: powers of two) and
transposed, a constant subgraph folded at session start, so the file holds the coreset once.

Why this form (bottle, 1 thread, batch 4; `benchmarks/bench_onnx.py --variants` times each
alternative round-robin): onnxruntime's Gather copies single elements one by one but whole rows
with memcpy (gathering on the last axis was 40% of the graph's time), its Where is ~2x slower
than Cast + Mul + Add, a bool Transpose moves a quarter of the bytes of a float one, Gemm's bias
input is an extra pass over the (P, M) output that the ones column avoids (Gemm: +16%), and
chunks of 64 positions keep the (P, M) intermediates in cache (no chunking: +46%). Together
2.05x faster than the plain Gather / GreaterOrEqual / Where / ReduceMin graph (2.64 s vs
5.41 s per batch), with bit-identical maps. (Timed with the masked ReduceMin the graph had before
the pni fallback and the exact distances; those cost two to three more passes over (P, M): the
clamp, and the position's ArgMin next to the mask's: ~+30% for mode pni at M = 8192, D = 256.)

Coresets as constants (default) or as graph inputs (`coresets="input"`): with constants
onnxruntime pre-packs the MatMul weights at session start, TensorRT bakes them into the engine,
and any ONNX runner (polygraphy, trtexec) runs the graph with nothing but the features; the
position-dependent thresholds and the position mask are stored sparse and expanded per chunk by
constant folding. As
inputs (Gemm with bias), the runtime builds the same values from the Arrow tables
(pni_ray.export.tables.scorer_table_values) and feeds them every call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pni_ray.export.tables import PENALTY, MaskSpec

BATCH = "batch"
INF = np.float32(np.inf)
BIG = PENALTY  # additive penalty of refused entries: far above any squared distance, far below overflow
# the candidate graph's per-chunk gathered coreset rows are constants that onnxruntime folds at
# session start: hw * k * (D + 1) floats (bottle, 320 px: 178 MB); above this the dense graph is used
MAX_CANDIDATE_BYTES = 256 * 2**20
# per-chunk intermediates of the candidate search ((c, B, D + 1) rows, (c, B, k) distances and
# mask) at the export's max batch stay under this: as few chunks as that allows, each a dozen nodes
CANDIDATE_CHUNK_BYTES = 64 * 2**20


def folded_candidate_bytes(candidates: np.ndarray, feature_dim: int) -> int:
    """Bytes of the coreset rows the candidate graph gathers per position, once folded."""
    hw, k = candidates.shape
    return int(hw) * int(k) * (int(feature_dim) + 1) * 4


def gaussian_kernel1d(sigma: float) -> np.ndarray:
    """pni_ray.models.anomaly_map.gaussian_kernel1d in numpy (float32 like the torch one)."""
    radius = max(1, int(math.ceil(4.0 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(np.float32(-0.5) * (x / np.float32(sigma)) ** 2).astype(np.float32)
    return (k / k.sum(dtype=np.float32)).astype(np.float32)


def upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of torch's bilinear interpolation, align_corners=False."""
    scale = n_in / n_out
    out = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        src = max(scale * (i + 0.5) - 0.5, 0.0)
        i0 = min(int(src), n_in - 1)
        i1 = i0 + (1 if i0 < n_in - 1 else 0)
        l1 = src - i0
        out[i, i0] += 1.0 - l1
        out[i, i1] += l1
    return out


def blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) Gaussian blur with replicate padding, the AnomalyMapper's conv as a matrix."""
    if sigma <= 0:
        return np.eye(n)
    k = gaussian_kernel1d(sigma).astype(np.float64)
    r = len(k) // 2
    out = np.zeros((n, n), np.float64)
    for i in range(n):
        for t in range(-r, r + 1):
            out[i, min(max(i + t, 0), n - 1)] += k[t + r]
    return out


def map_matrices(grid: tuple[int, int], size: tuple[int, int], sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """L_y (H, h) and L_x^T (w, W): maps = L_y @ S @ L_x^T."""
    (h, w), (hh, ww) = grid, size
    ly = blur_matrix(hh, sigma) @ upsample_matrix(h, hh)
    lx = blur_matrix(ww, sigma) @ upsample_matrix(w, ww)
    return ly.astype(np.float32), np.ascontiguousarray(lx.T).astype(np.float32)


@dataclass
class ScorerSpec:
    """Everything the scorer graph is built from."""

    mode: str
    memory: np.ndarray  # (M, D) float32
    emb_to_dist: np.ndarray | None  # (M,)
    masks: MaskSpec
    grid: tuple[int, int]
    image_size: tuple[int, int]
    blur_sigma: float
    n_dist: int  # K: classes of the neighbourhood MLP
    coresets: str = "constant"  # or "input"
    chunk: int = 64  # grid positions per chunk
    # The variants below exist for the benchmark's ablation; the defaults are what exports use.
    # layout "fast": mask built entry-major (Gather of whole rows, Less against T^T, then a bool
    # Transpose) and applied as an additive penalty; "naive": Gather on the last axis, Where(+inf).
    layout: str = "fast"
    # distance "augmented": one MatMul of [x, 1] with [-2 C^T; |c|^2] (constant coresets);
    # "gemm": Gemm with the bias input, which onnxruntime applies as an extra pass over the output
    distance: str = "augmented"
    # mask "threshold": exact float32 thresholds; "arithmetic": torch's Mul / Add / Mul / Greater
    # chain (mode pni, constant coresets, naive layout)
    mask: str = "threshold"
    inv_cluster: np.ndarray | None = None  # for mask="arithmetic"
    prior_dense: np.ndarray | None = None  # (hw, M) p(c|x), for mask="arithmetic"
    tau: float = 0.0  # for mask="arithmetic"
    tau_n: float | None = None  # p(c|N)'s cut for mask="arithmetic" (combine "both"); None: tau
    fill: bool = False  # input fill_index (B, h * w): patch scores of padded cells taken from content cells
    # modes position / pni ("both"): search each position's allowed entries only, like the torch
    # scorer when it `uses_candidates` (constant coresets, the default layout); None: all of C_emb
    candidates: np.ndarray | None = None  # (hw, k) int64, pni_ray.export.tables.candidate_table
    empty_positions: np.ndarray | None = None  # positions that allow nothing: searched densely
    max_batch: int = 16  # the batch the candidate search's chunks are planned for (the export's --max-batch)

    def candidate_chunk(self) -> int:
        """Grid positions per chunk of the candidate search: as many as CANDIDATE_CHUNK_BYTES allows
        at max_batch, never fewer than `chunk`. Its work per position is small (k entries), so
        onnxruntime's fixed cost per node dominated: one chunk of a 40 x 40 grid instead of 25 of 64
        positions took the bottle scorer (1% bank) from 28 to 17 ms per batch of 4."""
        hw, k = self.candidates.shape
        row_width = self.memory.shape[1] + 1  # [x, 1] against [-2 C^T; |c|^2]
        per_position = max(1, int(self.max_batch)) * (row_width + 2 * k) * 4
        return max(1, min(int(hw), max(int(self.chunk), CANDIDATE_CHUNK_BYTES // per_position)))

    def by_candidates(self) -> bool:
        """Whether the graph searches candidates; refuses them outside their rule and variant."""
        if self.candidates is None:
            return False
        if self.mode not in ("position", "pni") or (self.mode == "pni" and self.masks.combine != "both"):
            raise ValueError(f"candidate search is the rule of modes position and pni (both), not {self.mode!r}")
        if (self.coresets, self.layout, self.distance, self.mask) != ("constant", "fast", "augmented", "threshold"):
            raise ValueError("candidate search is built with the default variant (constant coresets) only")
        return True

    @property
    def needs_probs(self) -> bool:
        return self.mode in ("neighbourhood", "pni", "pni_split")

    @property
    def has_threshold(self) -> bool:
        return self.mode in ("neighbourhood", "pni", "pni_split")

    @property
    def has_position_mask(self) -> bool:
        """The static p(c|x) mask: the mask of position and pni_split's second half, pni's fallback."""
        return self.mode in ("position", "pni", "pni_split")


class _Builder:
    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.counter = 0
        self.shared: dict[str, str] = {}

    def name(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}_{self.counter}"

    def const(self, value: np.ndarray, hint: str) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, n_out: int = 1, **attrs) -> str:
        outs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), **attrs))
        return outs[0]

    def i64(self, values, hint: str = "c") -> str:
        return self.const(np.asarray(values, np.int64), hint)

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int = 0, hint: str | None = None) -> str:
        """Reduce ops take axes as an attribute before opset 18 and as an (initializer) input after."""
        if self.opset >= 18 or op_type == "ReduceSum":
            return self.op(op_type, [x, self.i64(axes, "axes")], hint, keepdims=keepdims)
        return self.op(op_type, [x], hint, axes=axes, keepdims=keepdims)

    def slice(self, x: str, start: int, end: int, axis: int, hint: str) -> str:
        return self.op("Slice", [x, self.i64([start]), self.i64([end]), self.i64([axis])], hint)


def build_scorer_graph(spec: ScorerSpec, opset: int = 17) -> onnx.ModelProto:
    if opset < 13:
        raise ValueError("the scorer graph needs opset >= 13")
    if spec.layout not in ("fast", "naive") or spec.distance not in ("augmented", "gemm"):
        raise ValueError(f"unknown scorer variant layout={spec.layout!r} distance={spec.distance!r}")
    if spec.mask == "arithmetic" and spec.layout != "naive":
        raise ValueError("mask='arithmetic' is built with layout='naive' only")
    b = _Builder(opset)
    m, d = spec.memory.shape
    h, w = spec.grid
    hw = h * w
    masks = spec.masks
    if masks.hw != hw or masks.n_memory != m:
        raise ValueError(f"mask tables are for {masks.hw} positions x {masks.n_memory} entries, "
                         f"the scorer has {hw} x {m}")
    fast = spec.layout == "fast"
    by_candidates = spec.by_candidates()
    t_cols = threshold_rows(spec) if spec.has_threshold else 0

    def graph_input(name: str, dtype: int, shape: list) -> str:
        b.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    features = graph_input("features", TensorProto.FLOAT, [BATCH, d, h, w])
    probs = graph_input("probabilities", TensorProto.FLOAT, [BATCH, h, w, spec.n_dist]) if spec.needs_probs else None

    # coresets: constants, or inputs the runtime feeds from the Arrow tables (scorer_inputs())
    memory = spec.memory.astype(np.float32)
    threshold = position = None
    if spec.coresets == "constant":
        neg2t = np.ascontiguousarray(-2.0 * memory.T).astype(np.float32)
        sq = (memory * memory).sum(1, dtype=np.float32)
        if spec.distance == "augmented":
            weight, memory_sq = b.const(np.concatenate([neg2t, sq[None]], 0), "memory_augmented"), None  # (D + 1, M)
        else:
            weight, memory_sq = b.const(neg2t, "memory_neg2t"), b.const(sq, "memory_sq")
        # the candidate graph gathers e2d[cand] as its own constants
        e2d = b.const(spec.emb_to_dist.astype(np.int64), "emb_to_dist") if spec.needs_probs and not by_candidates else None
        if spec.has_threshold:
            threshold = None if (fast and t_cols > 1) else _threshold_const(b, masks, transposed=fast)
        position = None  # constant: built per chunk (_position_const)
    elif spec.coresets == "input":
        if not fast:
            raise ValueError("coresets='input' is built with layout='fast' only")
        for name, (dtype, shape) in scorer_inputs(spec).items():
            graph_input(name, dtype, shape)
        weight, memory_sq = "memory_neg2t", "memory_sq"
        e2d = "emb_to_dist" if spec.needs_probs else None
        threshold = "mask_threshold" if spec.has_threshold else None
        position = "position_penalty" if spec.has_position_mask else None
    else:
        raise ValueError(f"coresets must be 'constant' or 'input', got {spec.coresets!r}")

    rows = b.op("Reshape", [b.op("Transpose", [features], "features_nhwc", perm=[0, 2, 3, 1]), b.i64([-1, hw, d])], "rows")
    prob_rows = prob_cols = None
    if probs is not None:
        prob_rows = b.op("Reshape", [probs, b.i64([-1, hw, spec.n_dist])], "prob_rows")  # channels last already
        if fast and not by_candidates:
            prob_cols = b.op("Transpose", [prob_rows], "prob_cols", perm=[2, 0, 1])  # (K, B, hw)
    gemm_rows, gemm_d = rows, d
    if memory_sq is None:  # (B, hw, D + 1): a column of ones (x * 0 + 1, statically shaped) for |c|^2
        ones = b.op("Add", [b.op("Mul", [b.slice(rows, 0, 1, 2, "col0"), b.const(np.array(0.0, np.float32), "zero_")]),
                            b.const(np.array(1.0, np.float32), "one")], "ones")
        gemm_rows, gemm_d = b.op("Concat", [rows, ones], "rows_aug", axis=2), d + 1
    inf = None if fast else b.const(np.array(INF, np.float32), "inf")
    masking = spec.mode != "patchcore"
    big = b.const(np.array(BIG, np.float32), "big") if masking and fast else None
    half_big = b.const(np.array(BIG / 2, np.float32), "half_big") if masking else None
    neg_x_sq = b.op("Neg", [b.reduce("ReduceSumSquare", rows, [2], keepdims=1, hint="x_sq")], "neg_x_sq")  # (B, hw, 1)

    def masked(dist: str, mask: str) -> str:
        """Refused entries out of the minimum: + BIG (fast layout, exact for the allowed), or +inf."""
        return b.op("Add", [dist, mask], "masked") if fast else b.op("Where", [mask, dist, inf], "masked")

    def argmin(values: str) -> str:
        return _argmin32(b, values)

    def choose(dist: str, mask: str, fallback: str) -> str:
        """Index of the nearest allowed entry; `fallback` where the mask refuses every entry."""
        values = masked(dist, mask)
        j = argmin(values)
        none = b.op("Greater", [b.op("GatherElements", [values, j], "chosen_value", axis=2), half_big], "none_allowed")
        return b.op("Where", [none, fallback, j], "choice_or_fallback")

    chunk = max(1, min(int(spec.chunk), hw))
    choices: dict[str, list[str]] = {"a": [], "b": []}
    if by_candidates:
        choices["a"].append(_candidate_choices(b, spec, gemm_rows, neg_x_sq, prob_rows, weight, big, half_big,
                                               spec.candidate_chunk()))
    for start in range(0, hw, chunk) if not by_candidates else ():
        end = min(hw, start + chunk)
        c = end - start
        whole = c == hw
        x = gemm_rows if whole else b.slice(gemm_rows, start, end, 1, "rows_chunk")
        flat = b.op("Reshape", [x, b.i64([-1, gemm_d])], "rows_flat")
        if memory_sq is None:  # [x, 1] @ [-2 C^T; |c|^2] = |c|^2 - 2 x.c in one MatMul
            dist_flat = b.op("MatMul", [flat, weight], "dist_flat")
        else:
            dist_flat = b.op("Gemm", [flat, weight, memory_sq], "dist_flat")
        floor = neg_x_sq if whole else b.slice(neg_x_sq, start, end, 1, "neg_x_sq_chunk")
        dist = b.op("Max", [b.op("Reshape", [dist_flat, b.i64([-1, c, m])], "dist_raw"), floor], "dist")  # (B, c, M)
        if spec.mode == "patchcore":
            choices["a"].append(argmin(dist))
            continue
        near_position = None
        if spec.has_position_mask:  # 0 / BIG with the plain minimum built in: no fallback needed
            if position is None:
                pm = _position_const(b, masks, fast, start, end)
            else:
                pm = position if whole else b.slice(position, start, end, 0, "position_chunk")
            near_position = argmin(masked(dist, pm))
        if spec.mode == "position":
            choices["a"].append(near_position)
            continue
        if spec.mode == "pni_split":
            choices["b"].append(near_position)
        if fast:  # G >= T decided entry-major, where Gather copies whole rows
            pc = prob_cols if whole else b.slice(prob_cols, start, end, 2, "probs_chunk")
            g_cols = b.op("Gather", [pc, e2d], "p_entry", axis=0)  # (M, B, c): p(c_dist[e2d[m]] | N)
            if threshold is None:  # constant, position-dependent: this chunk's (M, 1, c) columns only
                t = _threshold_chunk_const(b, masks, start, end)
            else:
                t = threshold if (t_cols == 1 or whole) else b.slice(threshold, start, end, 2, "threshold_chunk")
            refused = b.op("Transpose", [b.op("Less", [g_cols, t], "refused_cols")], "refused", perm=[1, 2, 0])
            mask = b.op("Mul", [b.op("Cast", [refused], "refused_f", to=TensorProto.FLOAT), big], "penalty")
        else:
            pr = prob_rows if whole else b.slice(prob_rows, start, end, 1, "probs_chunk")
            g = b.op("Gather", [pr, e2d], "p_entry", axis=2)  # (B, c, M)
            if spec.mask == "arithmetic":
                mask = _arithmetic_mask(b, spec, g, start, end)
            else:
                t = threshold if (t_cols == 1 or whole) else b.slice(threshold, start, end, 0, "threshold_chunk")
                mask = b.op("GreaterOrEqual", [g, t], "allowed")
        choices["a"].append(choose(dist, mask, near_position if spec.mode == "pni" else argmin(dist)))

    # C (M, D) from the weight's -2 C^T: scaling by powers of two is exact, and folded at session start
    memory_t = b.op("Mul", [b.slice(weight, 0, d, 0, "neg2t"), b.const(np.array(-0.5, np.float32), "minus_half")], "memory_t")
    memory_rows = b.op("Transpose", [memory_t], "memory_rows", perm=[1, 0])

    def exact_score(parts: list[str]) -> str:
        """|x - C[j]| for the chosen j, as a difference (torch: exact_sq_distances), (B, hw)."""
        j = parts[0] if len(parts) == 1 else b.op("Concat", parts, "choice_all", axis=1)
        chosen = b.op("Gather", [memory_rows, b.op("Reshape", [j, b.i64([-1, hw])], "choice_flat")], "chosen", axis=0)
        diff = b.op("Sub", [rows, chosen], "diff")  # (B, hw, D)
        return b.op("Sqrt", [b.reduce("ReduceSumSquare", diff, [2], hint="exact_sq")], "exact")

    patch_flat = exact_score(choices["a"])
    if spec.mode == "pni_split":
        total = b.op("Add", [patch_flat, exact_score(choices["b"])], "split_sum")
        patch_flat = b.op("Mul", [total, b.const(np.array(0.5, np.float32), "half")], "patch_flat")
    if spec.fill:  # letterbox / tiling: each cell's score from its nearest content cell (itself when content)
        fill_index = graph_input("fill_index", TensorProto.INT64, [BATCH, hw])
        patch_flat = b.op("GatherElements", [patch_flat, fill_index], "patch_filled", axis=1)
    patch = b.op("Reshape", [patch_flat, b.i64([-1, h, w])], "patch")
    b.nodes.append(helper.make_node("Identity", [patch], ["patch_scores"], name="patch_scores_out"))

    ly, lxt = map_matrices(spec.grid, spec.image_size, spec.blur_sigma)
    wide = b.op("MatMul", [patch, b.const(lxt, "map_cols")], "map_rows")
    b.nodes.append(helper.make_node("MatMul", [b.const(ly, "map_rows_matrix"), wide], ["maps"], name="maps_out"))
    if opset >= 18:
        b.nodes.append(helper.make_node("ReduceMax", ["maps", b.i64([1, 2], "axes")], ["scores"], keepdims=0, name="scores_out"))
    else:
        b.nodes.append(helper.make_node("ReduceMax", ["maps"], ["scores"], axes=[1, 2], keepdims=0, name="scores_out"))

    hh, ww = spec.image_size
    outputs = [
        helper.make_tensor_value_info("patch_scores", TensorProto.FLOAT, [BATCH, h, w]),
        helper.make_tensor_value_info("maps", TensorProto.FLOAT, [BATCH, hh, ww]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, [BATCH]),
    ]
    graph = helper.make_graph(b.nodes, "pni_scorer", b.inputs, outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="pni-ray")
    model.ir_version = min(model.ir_version, 9)  # onnxruntime / TensorRT 10 read IR <= 9 (ONNX 1.15+)
    return model


def _argmin32(b: _Builder, values: str) -> str:
    """Index on the last of 3 axes, kept: (., ., 1) int32, the first index on ties; int32 is
    TensorRT's own index type, so the Where / Gather on choices never depend on int64 support."""
    return b.op("Cast", [b.op("ArgMin", [values], "choice64", axis=2, keepdims=1)], "choice", to=TensorProto.INT32)


def _candidate_choices(b: _Builder, spec: ScorerSpec, rows: str, neg_x_sq: str, prob_rows: str | None,
                       weight: str, big: str, half_big: str, chunk: int) -> str:
    """(B, hw, 1) int32 chosen entries of mode position / pni ("both") from each position's k
    candidates, position-major per chunk of c positions:

      distances  MatMul([x, 1] (c, B, D + 1), Gather([-2 C^T; |c|^2]^T, cand) (c, D + 1, k))
                 the weight gathered per chunk is constant, folded at session start
      mask       Gather(p (B, hw * K), x * K + e2d[cand], axis=1) (B, c, k) -> Less(., T[cand])
                 -> Transpose: only the B * c * k probabilities used are read (transposing or
                 slicing the whole (B, hw, K) tensor cost more than the rest of the graph),
                 exact thresholds at the candidates (pni_ray.export.tables)
      choice     ArgMin(d + refused * BIG), the position's nearest where nothing passes;
                 Gather(cand) turns the local index into the C_emb entry
      empty      positions that allow nothing: ArgMin over all of C_emb, scattered in
    """
    from pni_ray.export.tables import candidate_thresholds

    cand = np.asarray(spec.candidates, np.int64)
    hw, k = cand.shape
    pni = spec.mode == "pni"
    weight_rows = b.op("Transpose", [weight], "weight_rows", perm=[1, 0])  # (M, D + 1), folded
    thresholds = candidate_thresholds(spec.masks, cand) if pni else None
    prob_flat = b.op("Reshape", [prob_rows, b.i64([-1, hw * spec.n_dist])], "prob_flat") if pni else None
    parts = []
    for start in range(0, hw, chunk):
        end = min(hw, start + chunk)
        c, cc = end - start, cand[start:end]
        x = b.op("Transpose", [b.slice(rows, start, end, 1, "rows_chunk")], "rows_pbd", perm=[1, 0, 2])
        wc = b.op("Transpose", [b.op("Gather", [weight_rows, b.i64(cc, "cand")], "cand_weight", axis=0)],
                  "cand_weight_t", perm=[0, 2, 1])  # (c, D + 1, k)
        floor = b.op("Transpose", [b.slice(neg_x_sq, start, end, 1, "neg_x_sq_chunk")], "floor_pb", perm=[1, 0, 2])
        dist = b.op("Max", [b.op("MatMul", [x, wc], "cand_dist_raw"), floor], "cand_dist")  # (c, B, k)
        nearest = _argmin32(b, dist)  # (c, B, 1) int32
        j = nearest
        if pni:
            at = np.arange(start, end)[:, None] * spec.n_dist + np.asarray(spec.emb_to_dist, np.int64)[cc]
            g = b.op("Gather", [prob_flat, b.i64(at, "cand_class")], "cand_p", axis=1)  # (B, c, k)
            t = b.const(thresholds[start:end], "cand_threshold")  # (c, k)
            refused = b.op("Transpose", [b.op("Less", [g, t], "cand_refused_bck")], "cand_refused", perm=[1, 0, 2])
            values = b.op("Add", [dist, b.op("Mul", [b.op("Cast", [refused], "cand_refused_f", to=TensorProto.FLOAT), big])])
            best = _argmin32(b, values)
            none = b.op("Greater", [b.op("GatherElements", [values, best], "cand_best_value", axis=2), half_big], "cand_none")
            j = b.op("Where", [none, nearest, best], "cand_choice")
        offset = b.const((np.arange(c) * k).reshape(c, 1, 1).astype(np.int32), "cand_offset")
        entry = b.op("Gather", [b.const(cc.reshape(-1).astype(np.int32), "cand_flat"), b.op("Add", [j, offset])],
                     "cand_entry", axis=0)  # (c, B, 1) int32
        parts.append(b.op("Transpose", [entry], "cand_entry_b", perm=[1, 0, 2]))
    out = parts[0] if len(parts) == 1 else b.op("Concat", parts, "cand_choices", axis=1)  # (B, hw, 1)
    empty = np.asarray(spec.empty_positions if spec.empty_positions is not None else [], np.int64)
    if empty.size:  # chunk positions at a time, like the dense graph: (B, c, M) at most
        found = []
        for start in range(0, empty.size, chunk):
            where = b.i64(empty[start : start + chunk], "empty_positions")
            d_e = b.op("Max", [b.op("MatMul", [b.op("Gather", [rows, where], "empty_rows", axis=1), weight], "empty_dist_raw"),
                               b.op("Gather", [neg_x_sq, where], "empty_floor", axis=1)], "empty_dist")
            found.append(_argmin32(b, d_e))
        j_e = found[0] if len(found) == 1 else b.op("Concat", found, "empty_choices", axis=1)
        index = b.op("Expand", [b.i64(empty.reshape(1, -1, 1), "empty_index"), b.op("Shape", [j_e], "empty_shape")])
        out = b.op("ScatterElements", [out, index, j_e], "choices_filled", axis=1)
    return out


def scorer_inputs(spec: ScorerSpec) -> dict[str, tuple[int, list[int]]]:
    """The table inputs of a coresets-as-inputs scorer graph: name -> (ONNX dtype, static shape)."""
    m, d = spec.memory.shape
    hw = spec.grid[0] * spec.grid[1]
    out = {"memory_neg2t": (TensorProto.FLOAT, [d, m]), "memory_sq": (TensorProto.FLOAT, [m])}
    if spec.needs_probs:
        out["emb_to_dist"] = (TensorProto.INT64, [m])
    if spec.has_threshold:
        out["mask_threshold"] = (TensorProto.FLOAT, [m, 1, threshold_rows(spec)])
    if spec.has_position_mask:
        out["position_penalty"] = (TensorProto.FLOAT, [hw, m])
    return out


def _arithmetic_mask(b: _Builder, spec: ScorerSpec, g: str, start: int, end: int) -> str:
    """torch's mask spelled out as it computes it (benchmark baseline, mode pni): (p_n > tau_n) &
    (p_x > tau) for combine "both", (p_n + p_x) * 0.5 > tau for "mean"."""
    if spec.mode != "pni" or spec.coresets != "constant" or spec.inv_cluster is None or spec.prior_dense is None:
        raise ValueError("mask='arithmetic' is only built for mode pni with constant coresets")
    m = spec.masks.n_memory
    p_x = b.const(np.ascontiguousarray(spec.prior_dense[start:end], dtype=np.float32).reshape(end - start, m), "p_x")
    tau = b.const(np.array(spec.tau, np.float32), "tau")
    p_n = b.op("Mul", [g, b.const(spec.inv_cluster.astype(np.float32), "inv_cluster")], "p_n")
    if spec.masks.combine == "both":
        tau_n = tau if spec.tau_n is None else b.const(np.array(spec.tau_n, np.float32), "tau_n")
        return b.op("And", [b.op("Greater", [p_n, tau_n], "n_allowed"), b.op("Greater", [p_x, tau], "x_allowed")], "allowed")
    half = b.op("Mul", [b.op("Add", [p_n, p_x], "p_sum"), b.const(np.array(0.5, np.float32), "half")], "p_mean")
    return b.op("Greater", [half, tau], "allowed")


def threshold_rows(spec: ScorerSpec) -> int:
    return spec.masks.hw if spec.masks.threshold_index is not None else 1


def _threshold_const(b: _Builder, masks: MaskSpec, transposed: bool) -> str:
    """T as (1, M) / (hw, M), or transposed (M, 1, 1) / (M, 1, hw) for the entry-major layout.

    Per-entry base values expanded and the sparse entries scattered in: the Expand + ScatterND
    subgraph is all constants, folded by onnxruntime at session start and by TensorRT at build
    time, while the file holds only the sparse entries.
    """
    m, hw = masks.n_memory, masks.hw
    base = masks.threshold_base.astype(np.float32)
    if masks.threshold_index is None:
        return b.const(base.reshape(m, 1, 1) if transposed else base.reshape(1, m), "threshold")
    if transposed:
        pos, ent = np.divmod(masks.threshold_index, m)
        index, shape, base_shape = ent * hw + pos, [m, 1, hw], (m, 1)
    else:
        index, shape, base_shape = masks.threshold_index, [hw, m], (1, m)
    full = b.op("Expand", [b.const(base.reshape(base_shape), "threshold_base"), b.i64([shape[0], shape[-1]])])
    flat = b.op("Reshape", [full, b.i64([-1])], "threshold_flat")
    scattered = b.op("ScatterND", [flat, b.i64(np.asarray(index).reshape(-1, 1), "threshold_index"),
                                   b.const(masks.threshold_value.astype(np.float32), "threshold_value")])
    return b.op("Reshape", [scattered, b.i64(shape)], "threshold")


def _threshold_chunk_const(b: _Builder, masks: MaskSpec, start: int, end: int) -> str:
    """T^T columns start..end (M, 1, c): the per-entry base expanded, this chunk's sparse entries in.

    Built per chunk so constant folding never materialises the whole (M, hw) table (64 MiB for
    bottle): folding it in one piece took onnxruntime ~10x longer at session start.
    """
    m, c = masks.n_memory, end - start
    pos, ent = np.divmod(masks.threshold_index, m)
    keep = (pos >= start) & (pos < end)
    base = b.const(masks.threshold_base.astype(np.float32).reshape(m, 1), "threshold_base") \
        if "threshold_base" not in b.shared else b.shared["threshold_base"]
    b.shared["threshold_base"] = base
    flat = b.op("Reshape", [b.op("Expand", [base, b.i64([m, c])]), b.i64([-1])], "threshold_flat")
    index = (ent[keep] * c + (pos[keep] - start)).reshape(-1, 1)
    scattered = b.op("ScatterND", [flat, b.i64(index, "threshold_index"),
                                   b.const(masks.threshold_value[keep].astype(np.float32), "threshold_value")])
    return b.op("Reshape", [scattered, b.i64([m, 1, c])], "threshold_chunk")


def _position_const(b: _Builder, masks: MaskSpec, penalty: bool, start: int, end: int) -> str:
    """Rows start..end (c, M) of the static p(c|x) > tau mask: bool, or the additive penalty 0 / BIG.

    A row whose position allows nothing allows everything (the plain minimum, torch's last
    fallback). Built per chunk, like the thresholds, so constant folding never holds the whole table.
    """
    m, c = masks.n_memory, end - start
    fill, hit = (BIG, 0.0) if penalty else (0.0, 1.0)
    pos, ent = np.divmod(masks.position_index, m)
    keep = (pos >= start) & (pos < end)
    full = b.op("Expand", [b.const(np.array([fill], np.float32), "position_fill"), b.i64([c * m])], "position_flat")
    values = b.const(np.full(int(keep.sum()), hit, np.float32), "position_values")
    index = ((pos[keep] - start) * m + ent[keep]).reshape(-1, 1)
    out = b.op("Reshape", [b.op("ScatterND", [full, b.i64(index, "position_index"), values]), b.i64([c, m])], "position")
    empty = masks.position_rows_empty()[start:end].reshape(c, 1)
    if empty.any():  # penalty * 0 on those rows; flags raised to 1
        row = (~empty).astype(np.float32) if penalty else empty.astype(np.float32)
        out = b.op("Mul" if penalty else "Max", [out, b.const(row, "position_empty_rows")], "position_full")
    if not penalty:
        out = b.op("Greater", [out, b.const(np.array(0.5, np.float32), "half")], "position_flag")
    return out
