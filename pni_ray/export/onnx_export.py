"""Bundle -> export directory: ONNX graphs, Arrow tables and a checksummed manifest.

    backbone.onnx   images (B, 3, H, W) in [0, 1] -> features (B, D, h, w)   normalisation, the two
                    backbone stages and the p x p aggregation, traced from the torch extractor;
                    (H, W) is the bundle's canvas (resize, letterbox, short-side) or one tile
    mlp.onnx        features -> logits / T (B, h, w, K), channels last, the   FP16-able
                    temperature folded into the classifier
    softmax.onnx    logits / T -> probabilities over C_dist                   always FP32 (tau is
                    ~1 / |C_emb|, in FP16's subnormal range)
    scorer.onnx     features [+ probabilities] [+ fill_index] -> patch_scores (B, h, w), maps
                    (B, H, W), scores (B,); written op by op (export/scorer_graph.py); fill_index
                    (letterbox, tiling) sends padded cells to their nearest content cell
    refiner.onnx    images, maps -> refined_maps, scores                     when the bundle has one

The runtime (pni_ray.export.runtime) prepares images with the bundle's geometry (pni_ray.geometry), runs
the backbone per tile and stitches when tiling, takes image scores over the content only and
restores maps to each image's size with the same resize `evaluate` uses.
    c_emb.arrow, c_dist.arrow, emb_to_dist.arrow, position_prior.arrow, normalisation.arrow
    manifest.json   config, graph signatures, op-check reports, versions, sha256 of every file

Every graph has a dynamic batch axis and otherwise static shapes, passes `pni_ray.export.opcheck` for
TensorRT 10 (the export refuses to finish otherwise) and is stored with external data once it
passes 2 GB. The directory is written beside its final name and renamed into place, so a crash
never leaves a half-written export under that name.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from pni_ray.export import graph_passes, opcheck, quantize, recalibrate, scorer_graph, tables
from pni_ray.config import float_from_json
from pni_ray.bundle import versions as bundle_versions
from pni_ray.bundle_manifest import position_check_outcome, trained_on
from pni_ray.fileio import staged_dir
from pni_ray.geometry import STRIDE
from pni_ray.predict import detector_geometry

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
DEFAULT_MAX_BATCH = 16
DEFAULT_CHUNK = 64
EXTERNAL_DATA_BYTES = 2_000_000_000  # protobuf's hard limit is 2 GiB; stay clear of it
GRAPH_FILES = {"backbone": "backbone.onnx", "mlp": "mlp.onnx", "softmax": "softmax.onnx", "scorer": "scorer.onnx",
               "refiner": "refiner.onnx"}
PIPELINE = ("backbone", "mlp", "softmax", "scorer", "refiner")
EXPORTER = "torch.onnx TorchScript exporter (dynamo=False) + pni-ray static-shape folding; scorer via onnx.helper"


@dataclass
class ExportOptions:
    opset: int = DEFAULT_OPSET
    max_batch: int = DEFAULT_MAX_BATCH
    coresets: str = "constant"  # "constant": graph initializers; "input": fed by the runtime from Arrow
    chunk: int = DEFAULT_CHUNK  # grid positions per scorer chunk
    mode: str | None = None  # scoring mode; None = the bundle's
    external_data_bytes: int = EXTERNAL_DATA_BYTES
    target: str = opcheck.DEFAULT_TARGET
    int8: tuple[str, ...] = ()  # graphs to quantise (pni_ray.export.quantize.QUANTIZABLE); () = all FP32
    calibration: Path | None = None  # folder of good images the INT8 ranges are measured on
    calibration_images: int = quantize.DEFAULT_CALIBRATION_IMAGES
    int8_activations: str = quantize.DEFAULT_ACTIVATIONS  # "uint8": onnxruntime CPU; "int8": TensorRT too
    int8_fp32_convs: int = quantize.DEFAULT_FP32_CONVS  # the backbone's first convolutions kept FP32
    int8_weight_bits: int = quantize.DEFAULT_WEIGHT_BITS  # 7: no int16 saturation on CPUs without VNNI

    def validate(self) -> None:
        lo, hi = 13, opcheck.TARGETS[self.target]["max_opset"]
        if not lo <= self.opset <= hi:
            raise ValueError(f"--opset {self.opset}: choose {lo}..{hi} (TensorRT {self.target} parses up to opset {hi})")
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.coresets not in ("constant", "input"):
            raise ValueError(f"coresets must be 'constant' or 'input', got {self.coresets!r}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")
        unknown = sorted(set(self.int8) - set(quantize.QUANTIZABLE))
        if unknown:
            raise ValueError(f"--int8 {','.join(unknown)}: choose from {', '.join(quantize.QUANTIZABLE)} "
                             "(the softmax and the scorer stay FP32)")
        if self.int8_activations not in quantize.ACTIVATIONS:
            raise ValueError(f"--int8-activations {self.int8_activations!r}: choose from {', '.join(quantize.ACTIVATIONS)}")
        if self.int8_fp32_convs < 0:
            raise ValueError(f"--int8-fp32-convs must be >= 0, got {self.int8_fp32_convs}")
        if self.int8_weight_bits not in quantize.WEIGHT_BITS:
            raise ValueError(f"--int8-weight-bits {self.int8_weight_bits}: choose from "
                             f"{', '.join(map(str, quantize.WEIGHT_BITS))}")
        if self.int8 and self.calibration is None:
            raise ValueError("--int8 needs --calibration DIR: a folder of good images (e.g. the category's "
                             "train/good) to measure activation ranges on")


@dataclass
class ExportResult:
    path: Path
    manifest: dict[str, Any]
    reports: list[opcheck.OpCheckReport] = field(default_factory=list)


# ---------------------------------------------------------------------------- torch graphs


class _Backbone(nn.Module):
    """The extractor; a fixed channel-averaging 1x1 conv stands in for adaptive_avg_pool1d."""

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = copy.deepcopy(extractor).eval()
        proj = getattr(self.extractor, "projection_dim", None)
        self.projection = None
        if proj:
            d = sum(self.extractor.stage_channels)
            eye = torch.eye(d).unsqueeze(0)  # (1, d, d): adaptive pooling of each basis vector
            weight = F.adaptive_avg_pool1d(eye.permute(0, 2, 1).reshape(d, 1, d), proj).reshape(d, proj).T
            self.projection = nn.Conv2d(d, proj, 1, bias=False)
            self.projection.weight.data.copy_(weight.reshape(proj, d, 1, 1))
            self.extractor.projection_dim = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.extractor(images)
        return self.projection(features) if self.projection is not None else features


class _MLP(nn.Module):
    """NeighbourhoodMLP logits divided by the temperature, channels last: (B, h, w, K), with a
    static validity channel.

    The temperature is folded into the classifier (weight and bias / T) instead of a Div over the
    (B, h, w, K) logits, the softmax graph's largest cost after INT8 (10% of the fused graph's
    time, bottle at 1%). At the default T = 2 the fold is exact: scaling by a power of two
    commutes with every float rounding of the sum, so the logits equal torch's (W x + b) / T bit
    for bit, and INT8 calibration sees the same range halved. The softmax that follows is its own
    graph (`softmax_graph`), built FP32 even in an FP16 TensorRT build: the probabilities compared
    with tau ~ 1 / |C_emb| lie in FP16's subnormal range, where an FP16 softmax would flip mask
    entries. Channels last because a softmax over axis 1 of an NCHW tensor is 15x slower in
    onnxruntime than over the contiguous last axis, and the scorer wants one row of K
    probabilities per patch anyway.
    The classifier is a MatMul over the channels-last hidden layer plus its bias (not a 1 x 1 Conv
    followed by a Transpose of the logits): the Transpose moves 128 channels instead of K, and INT8
    graphs get the classifier as the MatMul whose output `pni_ray.export.quantize.float_logits` keeps float
    (onnxruntime runs it as MatMulIntegerToFloat with the bias fused: `pni_ray.export.runtime`).
    `torch.ones_like` exports as ConstantOfShape(Shape(x)), a shape computed at run time; x * 0 + 1
    is the same ones for finite x with shapes the parser sees at build time.
    """

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = copy.deepcopy(mlp).eval()
        t = float(mlp.temperature)
        with torch.no_grad():
            self.mlp.classifier.bias.div_(t)
        # (hidden, K) / T: the MatMul's constant as stored, not a Flatten + Transpose of the Conv weight
        self.register_buffer("classifier_weight", (self.mlp.classifier.weight.detach().flatten(1).T / t).contiguous())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        reduced = F.relu(mlp.reduce(features))
        valid = reduced[:, :1] * 0.0 + 1.0
        hidden = mlp.hidden(mlp.window(torch.cat([reduced, valid], dim=1))).permute(0, 2, 3, 1)
        return torch.matmul(hidden, self.classifier_weight) + mlp.classifier.bias  # MatMul + Add


def softmax_graph(grid: tuple[int, int], n_classes: int, opset: int) -> onnx.ModelProto:
    """logits / T (B, h, w, K) -> probabilities = softmax over K, in FP32 (see _MLP)."""
    h, w = grid
    shape = [scorer_graph.BATCH, h, w, n_classes]
    nodes = [onnx.helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1, name="softmax")]
    graph = onnx.helper.make_graph(nodes, "pni_softmax",
                                   [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, shape)],
                                   [onnx.helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, shape)])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], producer_name="pni-ray")
    model.ir_version = min(model.ir_version, 9)
    return model


class _Refiner(nn.Module):
    """refiner(images, maps) -> (maps, image scores = max of the refined map)."""

    def __init__(self, refiner: nn.Module) -> None:
        super().__init__()
        self.refiner = copy.deepcopy(refiner).eval()

    def forward(self, images: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        refined = self.refiner(images, maps)
        return refined, refined.amax(dim=(1, 2))


def trace_to_onnx(module: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str],
                  output_names: list[str], opset: int) -> onnx.ModelProto:
    """TorchScript-based export with a dynamic batch axis, then static-shape folding.

    The dynamo exporter takes ~20x longer on these graphs and records the same Shape subgraphs.
    """
    dynamic = {n: {0: scorer_graph.BATCH} for n in input_names + output_names}
    with tempfile.TemporaryDirectory(prefix="pni-ray-trace-") as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "graph.onnx"
        with contextlib.redirect_stdout(sys.stderr):
            torch.onnx.export(module.eval(), args, str(path), input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True, dynamo=False)
        model = onnx.load(str(path))  # pulls external data (graphs > 2 GB) into memory
    return graph_passes.fold_static_shapes(model)


def save_graph(model: onnx.ModelProto, folder: Path, name: str, external_data_bytes: int) -> dict[str, Any]:
    """Write `name`.onnx; initializers go to `name`.onnx.data when the graph passes the limit."""
    file = GRAPH_FILES.get(name, f"{name}.onnx")
    weights = sum(_tensor_bytes(t) for t in model.graph.initializer)
    record: dict[str, Any] = {"file": file, "external_data": []}
    if weights > external_data_bytes:
        data = f"{file}.data"
        onnx.save_model(model, str(folder / file), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        record["external_data"] = [data]
    else:
        onnx.save_model(model, str(folder / file))
    record["inputs"] = [_signature(v) for v in model.graph.input]
    record["outputs"] = [_signature(v) for v in model.graph.output]
    return record


def _tensor_bytes(t: onnx.TensorProto) -> int:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return int(next((e.value for e in t.external_data if e.key == "length"), 0))
    return len(t.raw_data) or int(np.prod(t.dims, dtype=np.int64)) * 4


def _signature(vi: onnx.ValueInfoProto) -> dict[str, Any]:
    t = vi.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
    return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}


# ---------------------------------------------------------------------------- the export


def load_source(bundle: Path | str):
    """(detector, manifest, model_id) of one bundle, from a single verified read: everything the export writes
    comes from these, never from the folder again (a bundle replaced meanwhile cannot mix into the export)."""
    from pni_ray.inference import load_detector_and_id
    from pni_ray.models.pni import PNIDetector

    detector, manifest, found_id = load_detector_and_id(bundle)
    if not isinstance(detector, PNIDetector):
        raise ValueError(f"{bundle}: ensembles export one member bundle at a time (pni-ray export MEMBER --out DIR)")
    return detector.eval(), manifest, found_id


def scoring_tables(detector) -> tables.ScoringTables:
    """The scorer's data as the runtime reads it back, taken from the loaded detector's buffers. The position
    prior is the sparse table the bundle stored: its non-zero entries in row-major order, as training wrote them."""
    sc = detector.scorer
    memory = sc.memory.detach().cpu().numpy().astype(np.float32)
    e2d = sc.emb_to_dist.cpu().numpy().astype(np.int64) if sc.emb_to_dist is not None else None
    inv = sc.inv_cluster.cpu().numpy().astype(np.float32) if sc.inv_cluster is not None else None
    grid = (0, 0)
    pos = ent = prob = None
    if sc.position_prior is not None:
        dense = sc.position_prior.detach().cpu()
        grid = sc.grid if sc.grid is not None else (0, 0)
        position, entry = dense.nonzero(as_tuple=True)
        pos, ent = position.numpy().astype(np.int64), entry.numpy().astype(np.int64)
        prob = dense[position, entry].numpy().astype(np.float32)
    return tables.ScoringTables(memory, e2d, inv, grid, pos, ent, prob)


def export_bundle(bundle: Path | str, out: Path | str, options: ExportOptions | None = None,
                  force: bool = False) -> ExportResult:
    """Write the export directory for `bundle` atomically; returns its path, manifest and op checks."""
    options = options or ExportOptions()
    options.validate()
    bundle, out = Path(bundle), Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    detector, bmanifest, source_id = load_source(bundle)
    mode = options.mode or detector.mode
    needs_probs = mode in ("neighbourhood", "pni", "pni_split")
    if mode != "patchcore" and detector.mlp is None:
        raise ValueError(f"{bundle} is a PatchCore-only bundle: it exports in mode 'patchcore' only")
    if mode != detector.mode:  # its threshold bounds held-out scores of the bundle's own mode, not of this one
        if mode == "patchcore":
            how = "train --mode patchcore"
        elif position_check_outcome(bmanifest) == "dropped":
            how = ('its position check dropped p(c|x): retrain with a --config file holding '
                   '{"position": {"check_defects": 0}} to keep it')
        else:
            how = "scoring.mode in a train --config file"
        log.warning("%s: its threshold was calibrated on %s-mode scores; the export scores in mode %s, so it has no "
                    "threshold (is_anomalous null; scores and maps as usual): for one, export a bundle trained to "
                    "score in mode %s (%s)", bundle, detector.mode, mode, mode, how)
        bmanifest = {**bmanifest, "threshold": None, "normalisation": {**bmanifest["normalisation"], "threshold": None}}
    geometry = detector_geometry(detector)
    canvas, model_input, grid = export_shapes(detector, geometry, bundle)
    calibration = None
    if options.int8:  # refused before any graph is traced
        quantize.check_graphs(options.int8, ["backbone", "mlp"] if needs_probs else ["backbone"])
        calibration = quantize.calibration_paths(options.calibration, options.calibration_images)
    with staged_dir(out, tables.FORMAT, "export", force) as tmp:
        graphs: dict[str, dict[str, Any]] = {}
        models: dict[str, onnx.ModelProto] = {}
        gen = torch.Generator().manual_seed(0)
        example = torch.rand(2, 3, *model_input, generator=gen)
        models["backbone"] = trace_to_onnx(_Backbone(detector.extractor), (example,), ["images"], ["features"], options.opset)
        d = int(detector.scorer.memory.shape[1])
        h, w = grid
        if needs_probs:
            features = torch.rand(2, d, h, w, generator=gen)
            models["mlp"] = trace_to_onnx(_MLP(detector.mlp), (features,), ["features"], ["logits"], options.opset)
            models["softmax"] = softmax_graph(grid, int(detector.mlp.n_classes), options.opset)
        st = scoring_tables(detector)
        if st.grid == (0, 0):
            st.grid = (h, w)
        if st.grid != (h, w):
            raise ValueError(f"{bundle}: position prior grid {st.grid} differs from the bundle's feature grid {(h, w)}")
        tau, tau_n = float(detector.scorer.tau), float(detector.scorer.tau_neighbourhood)
        combine = str(detector.scorer.combine)
        masks = tables.mask_spec(mode, st, tau, combine, tau_n)
        candidates = empty = None
        if detector.scorer.uses_candidates(mode) and options.coresets == "constant":  # torch's rule, same table
            table, empty_rows = tables.candidate_table(masks)
            if scorer_graph.folded_candidate_bytes(table, d) <= scorer_graph.MAX_CANDIDATE_BYTES:
                candidates, empty = table, empty_rows  # else the dense graph: the same choices
        spec = scorer_graph.ScorerSpec(
            mode=mode, memory=st.memory, emb_to_dist=st.emb_to_dist, masks=masks, grid=(h, w), image_size=canvas,
            blur_sigma=float(detector.mapper.sigma), n_dist=int(detector.mlp.n_classes) if detector.mlp is not None else 0,
            coresets=options.coresets, chunk=options.chunk, fill=geometry.pads, candidates=candidates,
            empty_positions=empty, max_batch=options.max_batch,
        )
        models["scorer"] = scorer_graph.build_scorer_graph(spec, options.opset)
        if detector.refiner is not None:
            images = torch.rand(2, 3, *canvas, generator=gen)
            maps = torch.rand(2, *canvas, generator=torch.Generator().manual_seed(1))
            models["refiner"] = trace_to_onnx(_Refiner(detector.refiner), (images, maps), ["images", "maps"],
                                              ["refined_maps", "scores"], options.opset)
        int8 = None
        if calibration:
            log.info("quantising %s to INT8 on %d images of %s", ", ".join(options.int8), len(calibration),
                     options.calibration)
            int8 = quantize.quantize_models(models, detector, geometry, options.int8, calibration,
                                           options.int8_activations, options.int8_fp32_convs,
                                           options.int8_weight_bits)
        reports = [opcheck.check_model(m, options.target, name) for name, m in models.items()]
        ort_only = set(int8["graphs"]) if int8 and not int8["tensorrt"] else set()  # uint8 activations
        if ort_only:
            log.info("INT8 graphs %s use uint8 activations: onnxruntime runs them, TensorRT would not "
                     "(export with --int8-activations int8 for TensorRT)", ", ".join(sorted(ort_only)))
        opcheck.require_ok([opcheck.without_asymmetric_qdq(r) if r.graph in ort_only else r for r in reports])
        for name, model in models.items():
            graphs[name] = save_graph(model, tmp, name, options.external_data_bytes)
        table_files = _write_tables(tmp, st, detector, bmanifest)
        manifest = {
            "format": tables.FORMAT,
            "format_version": (tables.FORMAT_VERSION if geometry.cfg.white_level is not None
                               or geometry.content_extent is not None else 1),
            "model_id": source_id,  # of the manifest whose checked files were loaded
            "source_bundle": {"path": str(bundle.resolve()), "format_version": bmanifest.get("format_version"),
                              "files": bmanifest["files"]},
            "category": bmanifest["category"],
            "trained_on": trained_on(bmanifest),  # "grey" / "colour" / null: scoring says when its inputs are not alike
            "mode": mode,
            "config": detector.config.to_dict(),  # as it trained (load_bundle filled in the legacy fields)
            "backbone": bmanifest["backbone"],
            "image_size": list(canvas),  # the model-input canvas every image is prepared to
            "model_input": list(model_input),  # what the backbone graph takes: the canvas, or one tile
            "geometry": {"description": geometry.describe(), "fill_index": geometry.pads, "tiled": geometry.tiled},
            "grid": [h, w],
            # letterbox: the content sizes training saw (Geometry.check_content refuses others, as the bundle does)
            **({} if geometry.content_extent is None else {"content_extent": [list(e) for e in geometry.content_extent]}),
            "feature_dim": int(d),
            "n_memory": int(st.memory.shape[0]),
            "dist_size": int(bmanifest["dist_size"]),
            "tau": tau,
            "tau_neighbourhood": tau_n,  # p(c|N)'s cut (tables.neighbourhood_tau), the bundle's chosen multiple of tau
            "combine": combine,  # mode pni's rule (tables.combine_rule), from the bundle's config.scoring
            "normalisation": bmanifest["normalisation"],
            "threshold": bmanifest["threshold"],
            "pipeline": [n for n in PIPELINE if n in graphs],
            "graphs": graphs,
            "tables": table_files,
            "scorer": {"coresets": options.coresets, "chunk": options.chunk, "mask": "exact float32 thresholds",
                       "fill_index": geometry.pads,
                       "layout": spec.layout, "distance": spec.distance if options.coresets == "constant" else "gemm",
                       "threshold_rows": scorer_graph.threshold_rows(spec) if spec.has_threshold else 0,
                       "n_threshold_entries": int(len(masks.threshold_index)) if masks.threshold_index is not None else 0,
                       "candidates_per_position": int(candidates.shape[1]) if candidates is not None else None,
                       "candidate_chunk": spec.candidate_chunk() if candidates is not None else None},
            "opset": options.opset,
            "int8": int8,  # None: every graph FP32
            "max_batch": options.max_batch,
            "opcheck": {"target": f"TensorRT {options.target}", "reports": [r.to_dict() for r in reports]},
            "tensorrt": {"engines": {}, "status": "not built"},
            "exporter": EXPORTER,
            "versions": export_versions(),
        }
        manifest["files"] = tables.file_records(tmp)
        tables.write_json(tmp / tables.MANIFEST, manifest)
        if int8 is not None and math.isfinite(float_from_json("threshold", manifest["threshold"])):  # from its graphs
            manifest = recalibrate.recalibrate_int8(tmp, manifest, bundle, bmanifest, detector, geometry,
                                                    options.calibration, torch.get_num_threads())
    return ExportResult(out, manifest, reports)


def export_shapes(detector, geometry, bundle: Path) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(canvas, backbone input, feature grid) of a bundle's geometry, checked against the backbone.

    Refuses here, at export time, what the graphs could not score the way the bundle was trained.
    """
    if geometry.grid is None:
        raise ValueError(f"{bundle}: the bundle records no feature grid; its geometry cannot be exported")
    canvas, model_input, grid = geometry.canvas_hw(), geometry.model_input_hw(), tuple(geometry.grid)
    with torch.no_grad():
        probe = detector.extractor(torch.zeros(1, 3, *model_input))
    want = (model_input[0] // STRIDE, model_input[1] // STRIDE)
    if tuple(probe.shape[-2:]) != want:
        raise ValueError(f"{bundle}: the backbone gives a {tuple(probe.shape[-2:])} grid for a {model_input} input, "
                         f"not {want}: its stride is not {STRIDE}, so the geometry '{geometry.describe()}' cannot be exported")
    if not geometry.tiled and want != grid:
        raise ValueError(f"{bundle}: the {canvas} canvas of '{geometry.describe()}' gives a {want} feature grid, but the "
                         f"bundle was trained on {grid}; the bundle is inconsistent and cannot be exported")
    if geometry.tiled and (canvas[0] < model_input[0] or canvas[1] < model_input[1]):
        raise ValueError(f"{bundle}: the trained {canvas} canvas is smaller than one {model_input} tile")
    return canvas, model_input, grid


def _write_tables(folder: Path, st: tables.ScoringTables, detector, bmanifest: dict[str, Any]) -> dict[str, str]:
    written = {"c_emb": tables.C_EMB, "normalisation": tables.NORMALISATION}
    tables.write_arrow(folder / tables.C_EMB, tables.c_emb_table(st.memory))
    dist_size = int(bmanifest["dist_size"])
    if st.emb_to_dist is not None and dist_size > 0:
        tables.write_arrow(folder / tables.C_DIST, tables.c_dist_table(dist_size))
        tables.write_arrow(folder / tables.EMB_TO_DIST, tables.emb_to_dist_table(st.emb_to_dist))
        written.update(c_dist=tables.C_DIST, emb_to_dist=tables.EMB_TO_DIST)
    if st.prior_prob is not None:
        tables.write_arrow(folder / tables.PRIOR, tables.prior_table(st.grid, st.memory.shape[0], st.prior_position,
                                                                     st.prior_entry, st.prior_prob))
        written["position_prior"] = tables.PRIOR
    tables.write_arrow(folder / tables.NORMALISATION, tables.normalisation_table(bmanifest["normalisation"]))
    return written


def export_versions() -> dict[str, str]:
    import onnxruntime

    out = dict(bundle_versions())
    out.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    return out




# ---------------------------------------------------------------------------- parity with torch


def torch_reference(detector, images: np.ndarray, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's own torch scoring (default top-k path) for `images` (N, 3, S, S) float32: maps,
    and image scores as `evaluate` takes them (Geometry.image_score: averaged over image_window^2 patches)."""
    from pni_ray.export.runtime import whole_canvas

    geometry = detector_geometry(detector)
    content = whole_canvas(tuple(images.shape[-2:]))
    maps = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            maps.append(detector(torch.from_numpy(np.ascontiguousarray(images[i : i + batch])))[0].numpy())
    maps_all = np.concatenate(maps)
    return maps_all, np.array([geometry.image_score(m, content) for m in maps_all], np.float32)


def parity_figures(ref_maps: np.ndarray, ref_scores: np.ndarray, maps: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """Max absolute and relative map error and whether the image ranking is identical."""
    diff = np.abs(maps.astype(np.float64) - ref_maps.astype(np.float64))
    scale = np.abs(ref_maps).astype(np.float64)
    rel = diff / np.maximum(scale, 1e-12)
    per_image = diff.reshape(len(diff), -1).max(1) / np.maximum(scale.reshape(len(scale), -1).max(1), 1e-12)
    return {
        "n_images": int(len(maps)),
        "max_abs_error": float(diff.max()),
        "max_rel_error": float(rel.max()),
        "max_rel_error_per_image_max": float(per_image.max()),
        "max_abs_score_error": float(np.abs(scores.astype(np.float64) - ref_scores).max()),
        "ranking_identical": bool(np.array_equal(np.argsort(-ref_scores, kind="stable"), np.argsort(-scores, kind="stable"))),
    }


def asdict_options(options: ExportOptions) -> dict[str, Any]:
    return asdict(options)
