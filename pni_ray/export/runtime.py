"""Score images from an export directory with onnxruntime, onnx, numpy and pyarrow -- no torch.

    model = load_exported("exports/bottle")          # verifies every file's sha256
    maps, scores = model.predict_images(images)      # uint8 (H, W, 3) photos of any size
    anomalous = scores > model.threshold

Images are prepared with the bundle's geometry by `pni_ray.geometry` (numpy + PIL), the module
`evaluate` and `pni-ray score` use, and maps come back at each image's own size through its
`resize_map`, so an export reproduces the evaluated bundle.

An edge box may have no torch at all, so this module (and pni_ray.export.tables and pni_ray.geometry,
the project modules it imports) must never import it; a test runs it in a fresh interpreter and checks
`"torch" not in sys.modules`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pni_ray.export import tables
from pni_ray.config import float_from_json, threads_from_env
from pni_ray.data.images import to_float
from pni_ray.geometry import Geometry, Prepared

__all__ = ["ExportedModel", "StagePipeline", "load_exported", "whole_canvas"]

log = logging.getLogger(__name__)


def _session_options(threads: int | None, optimization: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    n = threads or threads_from_env() or (os.cpu_count() or 1)
    so.intra_op_num_threads = int(n)
    so.inter_op_num_threads = 1
    # no spinning for work: with stage-by-stage sessions, one's idle threads competed with the next
    # one's (bottle, 2 threads: 304 -> 199 ms per batch of 4 without); with the one fused session,
    # spinning gains 10% on an idle machine but loses 17% beside one busy process (other Ray workers)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    so.log_severity_level = 3
    return so


class StagePipeline:
    """The export's stages chained on prepared images: backbone (per tile when tiling, stitched) ->
    mlp (logits) -> softmax (FP32) -> scorer (padded cells filled) -> refiner; image scores are maxima
    over each image's content, maps are restored to each image's size by `pni_ray.geometry`.

    Subclasses run one stage: `run_stage(name, feeds) -> {output name: array}` and name its inputs
    (`stage_inputs`): TensorRT engines in pni_ray.export.trt; onnxruntime here, which also overrides
    `run_stages` to run the chain as one fused graph. They set manifest, geometry, max_batch, `stages`.
    """

    manifest: dict[str, Any]
    geometry: Geometry
    max_batch: int
    stages: tuple[str, ...]

    def run_stage(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def stage_inputs(self, name: str) -> tuple[str, ...]:
        """Input names of stage `name` (what `run_stages` feeds it from the names known so far)."""
        raise NotImplementedError

    def run_stages(self, names: Sequence[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run `names` in order, wired by tensor name: each stage reads its inputs from `feeds` or
        from an earlier stage's outputs (`stage_inputs` leaves out tables a runtime holds itself).
        Returns at least the chain's last output (`maps`, `refined_maps` after a refiner); a runtime
        that runs the chain as one graph returns only that."""
        env = dict(feeds)
        for name in names:
            env.update(self.run_stage(name, _pick(env, self.stage_inputs(name), f"stage {name}")))
        return env

    @staticmethod
    def chain_output(chain: Sequence[str]) -> str:
        """The map a chain of stages ends with: the refiner's when it has one, else the scorer's."""
        return "refined_maps" if "refiner" in chain else "maps"

    def _batched(self, name: str, key: str, x: np.ndarray, out: str) -> np.ndarray:
        return np.concatenate([self.run_stage(name, {key: x[i : i + self.max_batch]})[out]
                               for i in range(0, len(x), self.max_batch)])

    def canvas_maps(self, prepared: Sequence[Prepared], images: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Canvas maps (B, Hc, Wc) float32 and image scores (B,) (max over each image's content).

        `images` (B, 3, Hc, Wc) float32 replaces the canvases' own pixels (untiled geometries only).
        """
        maps_out, scores_out = [], []
        chain = self.chained_stages()
        for i in range(0, len(prepared), self.max_batch):
            batch = list(prepared[i : i + self.max_batch])
            for p in batch:
                self.geometry.check(p)
            feeds = dict(getattr(self, "table_feeds", {}))
            if not self.geometry.tiled or "refiner" in self.stages:  # only these read the canvases' pixels
                feeds["images"] = to_float(np.stack([p.canvas for p in batch])) if images is None else images[i : i + self.max_batch]
            if self.geometry.tiled:  # the backbone per tile, stitched into one grid; the rest chained
                feeds["features"] = np.stack([self.geometry.stitch_tiles(
                    self._batched("backbone", "images", self.geometry.tile_stack(p), "features"), p) for p in batch])
            elif self.backbone_apart():  # a backbone in a runtime of its own (pni_ray.export.openvino_backbone)
                feeds["features"] = self.run_stage("backbone", {"images": feeds["images"]})["features"]
            if self.manifest["scorer"].get("fill_index"):
                feeds["fill_index"] = np.stack([p.fill_index() for p in batch])
            maps = self.run_stages(chain, feeds)[self.chain_output(chain)]
            maps_out.append(np.asarray(maps, np.float32))
            scores_out.extend(self.geometry.image_score(m, p) for m, p in zip(maps, batch))
        if not maps_out:
            return np.zeros((0, *self.geometry.canvas_hw()), np.float32), np.zeros(0, np.float32)
        return np.concatenate(maps_out), np.asarray(scores_out, np.float32)

    def backbone_apart(self) -> bool:
        """Whether the backbone runs on its own before the chain: per tile when tiled (the tiles are
        stitched before the rest), or in another runtime."""
        return self.geometry.tiled

    def chained_stages(self) -> tuple[str, ...]:
        """The stages run per batch on whole canvases: all of them, but a backbone that runs apart."""
        return tuple(s for s in self.stages if not (s == "backbone" and self.backbone_apart()))

    def predict_images(self, images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        """uint8 (H, W, 3) images of any size -> maps at each image's own size and image scores."""
        prepared = [self.geometry.prepare(rgb) for rgb in images]
        maps, scores = self.canvas_maps(prepared)
        return [self.geometry.restore(m, p) for m, p in zip(maps, prepared)], scores

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model inputs (B, 3, Hc, Wc) float32 in [0, 1], whole canvases of content -> canvas maps, scores."""
        images = np.asarray(images)
        hw = self.geometry.canvas_hw()
        if images.dtype != np.float32:
            raise TypeError(f"images must be float32 in [0, 1] model inputs (B, 3, {hw[0]}, {hw[1]}), got {images.dtype}: "
                            "for decoded photos (uint8 H x W x 3, any size) use predict_images")
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != hw:
            raise ValueError(f"images must be (B, 3, {hw[0]}, {hw[1]}), got {images.shape}")
        if self.geometry.tiled:
            raise ValueError("a tiled model scores photos (predict_images), not model inputs")
        prepared = [whole_canvas(hw)] * len(images)
        return self.canvas_maps(prepared, np.ascontiguousarray(images))


def whole_canvas(hw: tuple[int, int]) -> Prepared:
    """A Prepared image that is all content, for model inputs given as arrays (its pixels are unused)."""
    blank = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (*hw, 3))
    return Prepared(blank, hw, (0, 0, *hw))


class ExportedModel(StagePipeline):
    """The export's ONNX graphs run by onnxruntime: the stages chained per batch as one fused graph
    (pni_ray.export.fused; `fuse=False`: one session per stage, as TensorRT runs them).

    `backbone_runtime="openvino"` compiles the backbone graph with OpenVINO instead (at
    `backbone_precision`; pni_ray.export.openvino_backbone) and chains the other stages as before.
    """

    def __init__(self, path: Path | str, threads: int | None = None, providers: Sequence[str] | None = None,
                 verify: bool = True, optimization: str = "all", refine: bool = True, fuse: bool = True,
                 backbone_runtime: str = "onnxruntime", backbone_precision: str = "auto") -> None:
        from pni_ray.export.openvino_backbone import BACKBONE_RUNTIMES

        if backbone_runtime not in BACKBONE_RUNTIMES:
            raise ValueError(f"backbone runtime must be one of {BACKBONE_RUNTIMES}, got {backbone_runtime!r}")
        if backbone_runtime == "onnxruntime" and backbone_precision != "auto":
            raise ValueError(f"backbone precision {backbone_precision!r} applies to the openvino backbone runtime only")
        self.path = Path(path)
        self.manifest: dict[str, Any] = tables.verify_export(self.path) if verify else tables.read_manifest(self.path)
        m = self.manifest
        self.geometry = Geometry.from_manifest(m)
        self.image_size: tuple[int, int] = tuple(m["image_size"])  # type: ignore[assignment]  # the canvas
        self.model_id: str = tables.export_id(self.path)  # what scored: this export, not just its bundle
        self.source_model_id: str = m["model_id"]  # the bundle it was exported from
        self.mode: str = m["mode"]
        self.max_batch: int = int(m.get("max_batch", 16))
        self.normalisation = tables.read_normalisation(self.path / m["tables"]["normalisation"])
        if not _same_float(self.normalisation["threshold"], float_from_json("threshold", m["threshold"])):
            raise tables.ExportError(f"{self.path}: threshold in {tables.NORMALISATION} "
                                     f"({self.normalisation['threshold']}) differs from the manifest ({m['threshold']})")
        self.threshold: float = float(self.normalisation["threshold"])
        self._options = _session_options(threads, optimization)
        self._providers = list(providers or ["CPUExecutionProvider"])
        # the INT8 graphs whose products onnxruntime's CPU contrib kernels run (MatMulIntegerToFloat); other
        # providers (CUDA has no such kernel) get the files' standard graphs, and so do FP32 graphs
        cpu_kernels = self._providers[0] == "CPUExecutionProvider"
        self._integer_graphs = set((m.get("int8") or {}).get("graphs", ())) if cpu_kernels else set()
        self.stages = tuple(name for name in m["pipeline"] if refine or name != "refiner")
        self.backbone_runtime = backbone_runtime
        self._openvino = None  # pni_ray.export.openvino_backbone.OpenVINOBackbone when the backbone runs there
        if backbone_runtime == "openvino":
            from pni_ray.export.openvino_backbone import OpenVINOBackbone

            self._openvino = OpenVINOBackbone(self._graph_file("backbone"), threads=self._options.intra_op_num_threads,
                                              precision=backbone_precision)
        # graph structure without external weights: input names, and what fuse_stages needs (it
        # refuses stages with external data, which then run from their files one by one)
        graphs = {name: _load_graph(self._graph_file(name)) for name in self.stages}
        self._inputs = {name: _graph_inputs(g) for name, g in graphs.items()}
        self._sessions: dict[str, Any] = {}  # per stage, made when first run (the backbone per tile)
        self.table_feeds: dict[str, np.ndarray] = {}
        if m["scorer"]["coresets"] == "input":  # only what the graph takes (exports before pni's fallback: no position)
            self.table_feeds = {k: v for k, v in scorer_table_feeds(self.path, m).items() if k in self._inputs["scorer"]}
        chain = self.chained_stages()
        # (chain, its one session, the session's input names): pni_ray.export.fused; None: stage by stage
        self.fused: tuple[tuple[str, ...], Any, tuple[str, ...]] | None = None
        if fuse and len(chain) > 1:
            self.fused = self._fuse(chain, graphs)
        del graphs
        for name in self.stages:  # the rest now, so a broken graph fails at load, not mid-run
            if (self.fused is None or name not in chain) and not (name == "backbone" and self._openvino is not None):
                self._sessions[name] = self._stage_session(name)

    def _graph_file(self, name: str) -> Path:
        return self.path / self.manifest["graphs"][name]["file"]

    def _fuse(self, chain: tuple[str, ...], graphs: dict[str, Any]) -> tuple[tuple[str, ...], Any, tuple[str, ...]] | None:
        """The chain as one session, or None (logged) where the graphs cannot be fused or onnxruntime
        refuses the fused graph: the stages then run one by one, as before fusion existed."""
        from pni_ray.export.fused import FusionError

        try:
            session = self._session(self._fused_proto(chain, graphs).SerializeToString())
            return chain, session, tuple(i.name for i in session.get_inputs())
        except FusionError as exc:
            log.warning("%s: running the stages one by one (%s)", self.path, exc)
        except Exception as exc:  # noqa: BLE001 - any refusal of the fused graph leaves the stages, which load on their own
            log.warning("%s: onnxruntime refused the fused graph, running the stages one by one (%s: %s)",
                        self.path, exc.__class__.__name__, exc)
        return None

    def _fused_proto(self, chain: tuple[str, ...], graphs: dict[str, Any]) -> Any:
        from pni_ray.export.fused import fuse_stages
        from pni_ray.export.graph_passes import integer_matmul_to_float

        for name in self._integer_graphs.intersection(chain):  # onnxruntime's form of INT8 products; files stay standard
            integer_matmul_to_float(graphs[name])
        return fuse_stages([(name, graphs[name]) for name in chain], [self.chain_output(chain)])

    def fused_graph(self) -> Any:
        """The ONNX graph the fused session runs, rebuilt from the stage files (to profile or inspect it);
        None when the stages run one by one."""
        if self.fused is None:
            return None
        chain = self.fused[0]
        return self._fused_proto(chain, {name: _load_graph(self._graph_file(name)) for name in chain})

    def _session(self, model: bytes | str):
        import onnxruntime as ort

        return ort.InferenceSession(model, self._options, providers=self._providers)

    def _stage_session(self, name: str):
        """One stage's session: from its file, or, on the CPU provider where the graph has INT8 products with a
        bias (the INT8 MLP's classifier), from the graph in onnxruntime's form
        (pni_ray.export.graph_passes.integer_matmul_to_float)."""
        from pni_ray.export.graph_passes import integer_matmul_to_float

        file = self._graph_file(name)
        if name not in self._integer_graphs or self.manifest["graphs"][name].get("external_data"):
            return self._session(str(file))
        graph = _load_graph(file)
        if not integer_matmul_to_float(graph):
            return self._session(str(file))
        return self._session(graph.SerializeToString())

    @property
    def has_refiner(self) -> bool:
        return "refiner" in self.stages

    def stage_inputs(self, name: str) -> tuple[str, ...]:
        return self._inputs[name]

    def backbone_apart(self) -> bool:
        return self.geometry.tiled or self._openvino is not None

    @property
    def backbone_label(self) -> str:
        """Where the backbone runs: "onnxruntime", or "openvino-" and the precision OpenVINO chose."""
        return "onnxruntime" if self._openvino is None else f"openvino-{self._openvino.precision}"

    def run_stage(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One stage's own graph (profiling, tiles); sessions of fused stages are made on first use."""
        if name == "backbone" and self._openvino is not None:
            return self._openvino.run(feeds)
        if name not in self._sessions:
            self._sessions[name] = self._stage_session(name)
        session = self._sessions[name]
        return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))

    def run_stages(self, names: Sequence[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.fused is None or tuple(names) != self.fused[0]:
            return super().run_stages(names, feeds)
        _, session, inputs = self.fused
        out = self.chain_output(names)
        return {out: session.run([out], _pick(feeds, inputs, f"{self.path}: the fused stages"))[0]}

    def normalise(self, maps: np.ndarray) -> np.ndarray:
        """Maps on the held-out scale: (map - pixel_mean) / pixel_std."""
        n = self.normalisation
        return (maps - np.float32(n["pixel_mean"])) / np.float32(n["pixel_std"])


def scorer_table_feeds(path: Path, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """Coresets fed as scorer inputs, built from the Arrow tables exactly as the exporter builds them."""
    return tables.scorer_table_values(manifest["mode"], tables.ScoringTables.read(path), float(manifest["tau"]),
                                      tables.combine_rule(manifest), tables.neighbourhood_tau(manifest))


def _pick(env: dict[str, np.ndarray], wanted: Sequence[str], who: str) -> dict[str, np.ndarray]:
    """The feeds `who` takes, or an error naming those that nothing gave."""
    missing = [k for k in wanted if k not in env]
    if missing:
        raise ValueError(f"{who} needs {missing}, given neither in the feeds nor by an earlier stage")
    return {k: env[k] for k in wanted}


def _load_graph(path: Path) -> Any:
    import onnx  # only at load: the runtime reads the graphs' structure and fuses them

    return onnx.load(str(path), load_external_data=False)


def _graph_inputs(model: Any) -> tuple[str, ...]:
    initialisers = {t.name for t in model.graph.initializer}
    return tuple(i.name for i in model.graph.input if i.name not in initialisers)


def _same_float(a: float, b: float) -> bool:
    return a == b or (np.isnan(a) and np.isnan(b)) or bool(np.isclose(a, b, rtol=1e-12, atol=0))


def load_exported(path: Path | str, threads: int | None = None, providers: Sequence[str] | None = None,
                  verify: bool = True, optimization: str = "all", refine: bool = True, fuse: bool = True,
                  backbone_runtime: str = "onnxruntime", backbone_precision: str = "auto") -> ExportedModel:
    """Verify the export directory's checksums and open its graphs with onnxruntime (the backbone's
    with OpenVINO when `backbone_runtime="openvino"`)."""
    return ExportedModel(path, threads=threads, providers=providers, verify=verify, optimization=optimization,
                         refine=refine, fuse=fuse, backbone_runtime=backbone_runtime,
                         backbone_precision=backbone_precision)
