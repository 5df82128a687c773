"""TensorRT engines from an export directory, and a runtime that runs them.

    python -m pni_ray.export.trt EXPORT_DIR [--max-batch N] [--fp16]      # on the target: builds *.engine
    python -m pni_ray.export.trt EXPORT_DIR --register [--max-batch N] [--fp16]   # records engines trtexec built
    model = TRTModel(EXPORT_DIR); maps, scores = model.predict(images)

One engine per graph, built with the TensorRT Python API (10.x): explicit-batch network from the
ONNX parser, one optimisation profile with batch 1 (min), max (opt) and max (max) for every input
with a batch axis (images or tiles, features, logits, fill_index), FP16 when asked for every graph
except the softmax and the scorer. Those stay FP32: the probabilities compared with tau ~ 1 / |C_emb|
lie in FP16's subnormal range (an FP16 softmax flips mask entries), squared distances of
~100-dimensional features pass FP16's 65504, and the mask comparison G >= T (exact float32
thresholds) and the chosen entry's distance, recomputed as |x - C[j]|, are the exactness the
export promises. The FP16 MLP hands its logits across the engine boundary as FP32 tensors. The
scorer's choices are int32 (TensorRT's index type). Graphs exported with --int8 and symmetric
activations (`--int8-activations int8`, what `export --trt` picks) carry int8 Q/DQ nodes
(pni_ray.export.quantize): they are built as strongly typed networks, whose precision is the graph's own,
so no precision flag (FP16 or INT8) is set for them. An export with uint8 activations (onnxruntime's
CPU form) is refused before any build, with what to re-export. TensorRT's ArgMin need not take the first of
exactly tied entries as torch and onnxruntime do; ties only arise where the distance expansion
cancels (near zero distance), and the recomputed distances of tied entries differ by that
rounding only.

Import-safe everywhere: `tensorrt` and `cuda-python` are imported only when an engine is built
or run. Where they or a CUDA device are missing, `TensorRTUnavailable` names what is missing
and gives the commands that build the same engines on the target (this module with its
--max-batch / --fp16, or trtexec, one line per graph, then --register, since TRTModel runs only
engines the manifest records and checksums). No torch here either: the target may
only have TensorRT, onnx(runtime) and numpy.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pni_ray.export import tables
from pni_ray.export.runtime import StagePipeline
from pni_ray.fileio import atomic_write_bytes
from pni_ray.geometry import Geometry

FP32_GRAPHS = ("softmax", "scorer")  # never FP16: see the module doc
DEFAULT_WORKSPACE_GB = 4.0
TRT_MAJOR = 10


def int8_graphs(manifest: dict[str, Any]) -> set[str]:
    """Graphs the export quantised (Q/DQ nodes): built strongly typed, with no precision flag."""
    return set((manifest.get("int8") or {}).get("graphs", ()))


def require_tensorrt_graphs(folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse an export whose INT8 graphs use uint8 activations (onnxruntime only): TensorRT's
    explicit quantization takes symmetric int8 Q/DQ only."""
    int8 = manifest.get("int8") or {}
    if int8 and not int8.get("tensorrt", True):
        raise ValueError(f"{folder}: its INT8 graphs ({', '.join(int8['graphs'])}) have {int8.get('activations')} "
                         "activations, which onnxruntime runs and TensorRT does not; re-export with "
                         "--int8-activations int8 (symmetric) to build TensorRT engines")


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA device is missing here; the message says what and how to build on the target."""


# ---------------------------------------------------------------------------- requirements


def _cuda_device_problem() -> str | None:
    """None when the driver reports at least one CUDA device, else what is wrong."""
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda")]
    lib = None
    for name in filter(None, names):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return "a CUDA device: no NVIDIA driver found (libcuda.so.1 cannot be loaded)"
    rc = lib.cuInit(0)
    if rc != 0:
        return f"a CUDA device: cuInit failed with CUDA error {rc} (100 = no device)"
    count = ctypes.c_int(0)
    rc = lib.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0 or count.value < 1:
        return "a CUDA device: the NVIDIA driver reports none"
    return None


def missing_requirements() -> list[str]:
    """What building engines here lacks, in words; empty when TensorRT and a GPU are present."""
    missing = []
    try:
        import tensorrt as trt  # noqa: F401

        major = int(str(getattr(trt, "__version__", "0")).split(".")[0] or 0)
        if major != TRT_MAJOR:  # 11 removed the FP16 builder flag --fp16 sets; engines of 10 are what was checked
            missing.append(f"TensorRT {TRT_MAJOR}.x (found tensorrt {trt.__version__}: `pip install 'tensorrt>=10,<11'`)")
    except ImportError:
        missing.append(f"the TensorRT Python package (tensorrt {TRT_MAJOR}.x: `pip install 'pni-ray[trt]'` or "
                       "`pip install tensorrt`; on Jetson it comes with JetPack)")
    problem = _cuda_device_problem()
    if problem:
        missing.append(problem)
    return missing


# ---------------------------------------------------------------------------- shapes and commands


def profile_shapes(signature: dict[str, Any], max_batch: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) for one graph input: batch 1..max_batch, every other axis as exported."""
    dims = signature["shape"]
    if dims and not isinstance(dims[0], int):
        rest = tuple(int(d) for d in dims[1:])
        return (1, *rest), (max_batch, *rest), (max_batch, *rest)
    fixed = tuple(int(d) for d in dims)  # coresets fed as inputs: static tables
    return fixed, fixed, fixed


def engine_file(name: str) -> str:
    return f"{name}.engine"


def engine_fp16(name: str, quantised: set[str], fp16: bool) -> bool:
    """Whether graph `name`'s engine gets FP16 kernels: asked for, and neither an FP32 graph (softmax,
    scorer) nor a Q/DQ graph (strongly typed: its precision is its own)."""
    return bool(fp16 and name not in FP32_GRAPHS and name not in quantised)


def profile_batch(folder: Path | str, manifest: dict[str, Any], max_batch: int | None) -> int:
    """The engines' largest batch: `max_batch`, or the export's own where None; below 1 refused (an engine
    recorded with it would make the runtime's batch loop score nothing)."""
    batch = manifest.get("max_batch", 16) if max_batch is None else max_batch
    if not tables.is_batch_size(batch):
        raise ValueError(f"{folder}: the largest batch must be a whole number >= 1, got {batch!r}")
    return batch


def trtexec_commands(folder: Path | str, manifest: dict[str, Any], max_batch: int, fp16: bool) -> list[str]:
    """One trtexec line per graph, equivalent to `build_engines`, with absolute paths (run from anywhere on
    this machine; after copying the export elsewhere, `python -m pni_ray.export.trt` there needs no editing)."""
    folder = Path(folder).absolute()
    lines = []
    quantised = int8_graphs(manifest)
    for name in manifest["pipeline"]:
        graph = manifest["graphs"][name]
        shapes: dict[str, list[str]] = {"min": [], "opt": [], "max": []}
        for sig in graph["inputs"]:
            for key, shape in zip(("min", "opt", "max"), profile_shapes(sig, max_batch)):
                shapes[key].append(f"{sig['name']}:{'x'.join(map(str, shape))}")
        parts = ["trtexec", f"--onnx={folder / graph['file']}", f"--saveEngine={folder / engine_file(name)}",
                 f"--minShapes={','.join(shapes['min'])}", f"--optShapes={','.join(shapes['opt'])}",
                 f"--maxShapes={','.join(shapes['max'])}"]
        if name in quantised:
            parts.append("--stronglyTyped")
        elif engine_fp16(name, quantised, fp16):
            parts.append("--fp16")
        lines.append(" ".join(shlex.quote(p) for p in parts))
    return lines


def unavailable_message(folder: Path, manifest: dict[str, Any], missing: list[str], max_batch: int, fp16: bool) -> str:
    folder = Path(folder).absolute()
    lines = [
        "TensorRT engines were not built: this machine lacks " + "; and ".join(missing) + ".",
        f"The ONNX graphs and Arrow tables in {folder} are complete and verified (the ONNX runtime uses them as they are).",
        "On the target (NVIDIA GPU, TensorRT 10.x), copy the directory and build the engines with:",
        f"  python -m pni_ray.export.trt {shlex.quote(str(folder))} --max-batch {max_batch}" + (" --fp16" if fp16 else ""),
        "or with trtexec, one engine per graph:",
    ]
    lines += [f"  {c}" for c in trtexec_commands(folder, manifest, max_batch, fp16)]
    lines.append("then record those engines in the export's manifest (checksums, profile), which the runtime reads:")
    lines.append(f"  python -m pni_ray.export.trt {shlex.quote(str(folder))} --register --max-batch {max_batch}"
                 + (" --fp16" if fp16 else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- building


def build_engines(folder: Path | str, max_batch: int | None = None, fp16: bool = False,
                  workspace_gb: float = DEFAULT_WORKSPACE_GB) -> dict[str, Any]:
    """Build `<graph>.engine` for every graph of the export and record them in its manifest."""
    folder = Path(folder)
    manifest = tables.verify_export(folder)
    require_tensorrt_graphs(folder, manifest)
    max_batch = profile_batch(folder, manifest, max_batch)
    missing = missing_requirements()
    if missing:
        raise TensorRTUnavailable(unavailable_message(folder, manifest, missing, max_batch, fp16))
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    engines: dict[str, Any] = {}
    quantised = int8_graphs(manifest)
    for name in manifest["pipeline"]:
        graph = manifest["graphs"][name]
        int8 = name in quantised
        use_fp16 = engine_fp16(name, quantised, fp16)
        data = _build_one(trt, logger, folder / graph["file"], graph["inputs"], max_batch, use_fp16, workspace_gb,
                          strongly_typed=int8)
        atomic_write_bytes(folder / engine_file(name), data)
        engines[name] = {"file": engine_file(name), "fp16": use_fp16, "int8": int8, "max_batch": max_batch}
    return _record_engines(folder, manifest, engines, {"status": "built", "tensorrt_version": str(trt.__version__),
                                                       "device": _device_name(), "workspace_gb": workspace_gb})


def register_engines(folder: Path | str, max_batch: int | None = None, fp16: bool = False) -> dict[str, Any]:
    """Record `<graph>.engine` files built elsewhere (the trtexec lines of `unavailable_message`, with the
    same --max-batch and --fp16) in the export's manifest, as `build_engines` records its own: TRTModel
    loads only recorded, checksummed engines. Needs no TensorRT here; TensorRT checks each engine
    against its version and device when it deserialises it."""
    folder = Path(folder)
    manifest = tables.verify_export(folder)
    require_tensorrt_graphs(folder, manifest)
    max_batch = profile_batch(folder, manifest, max_batch)
    missing = [engine_file(name) for name in manifest["pipeline"] if not (folder / engine_file(name)).is_file()]
    if missing:
        raise tables.ExportError(f"{folder}: no engine file {', '.join(missing)}: build one per graph first (the "
                                 "trtexec lines `pni-ray export --trt` prints), then register them")
    quantised = int8_graphs(manifest)
    engines = {name: {"file": engine_file(name), "fp16": engine_fp16(name, quantised, fp16), "int8": name in quantised,
                      "max_batch": max_batch} for name in manifest["pipeline"]}
    return _record_engines(folder, manifest, engines, {"status": "registered", "tensorrt_version": None,
                                                       "device": None, "workspace_gb": None})


def _record_engines(folder: Path, manifest: dict[str, Any], engines: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    """The engines and how they were made into the manifest, each engine file checksummed like the graphs."""
    manifest["tensorrt"] = {**facts, "engines": engines}
    files = manifest["files"]
    for record in engines.values():
        path = folder / record["file"]
        files[record["file"]] = {"sha256": tables.sha256_file(path), "bytes": path.stat().st_size}
    tables.write_json(folder / tables.MANIFEST, manifest)
    return manifest["tensorrt"]


def _build_one(trt, logger, onnx_path: Path, inputs: list[dict], max_batch: int, fp16: bool, workspace_gb: float,
               strongly_typed: bool = False) -> bytes:
    builder = trt.Builder(logger)
    # TensorRT 10: networks are always explicit-batch; a Q/DQ graph is strongly typed (its own precisions)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"{onnx_path.name}: TensorRT's ONNX parser failed:\n  " + "\n  ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for sig in inputs:
        lo, opt, hi = profile_shapes(sig, max_batch)
        profile.set_shape(sig["name"], lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path.name}: TensorRT could not build an engine (see the log above)")
    return bytes(serialized)




def _device_name() -> str:
    try:
        cudart = _cudart()
        err, props = cudart.cudaGetDeviceProperties(0)
        name = props.name
        return name.decode(errors="replace").rstrip("\x00") if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


# ---------------------------------------------------------------------------- running


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
        except ImportError as exc:
            raise TensorRTUnavailable("running TensorRT engines needs cuda-python (`pip install cuda-python`)") from exc
    return cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA runtime error {err}")
    return rest[0] if len(rest) == 1 else rest


class _Engine:
    """One deserialised engine with device buffers for max_batch, bound once."""

    def __init__(self, trt, runtime, cudart, path: Path, table_feeds: dict[str, np.ndarray]) -> None:
        self.cudart, self.path = cudart, path
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{path}: TensorRT could not deserialise the engine (built by another TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.inputs, self.outputs, self.dtypes, self.buffers = [], [], {}, {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(name)
            self.dtypes[name] = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            if is_input:  # the max profile shape, so output shapes below are the largest
                self._set_shape(name, list(self.engine.get_tensor_profile_shape(name, 0)[2]))
        for name in self.outputs:  # output shapes at the max profile
            shape = list(self.context.get_tensor_shape(name))
            self._alloc(name, int(np.prod(shape)) * self.dtypes[name].itemsize)
        for name in self.inputs:
            shape = self.engine.get_tensor_profile_shape(name, 0)[2]
            self._alloc(name, int(np.prod(shape)) * self.dtypes[name].itemsize)
        self.stream = _check(cudart.cudaStreamCreate())
        self.tables = [name for name in table_feeds if name in self.inputs]
        for name in self.tables:  # static tables: copied to the device once
            self._upload(name, table_feeds[name])

    def _alloc(self, name: str, nbytes: int) -> None:
        ptr = _check(self.cudart.cudaMalloc(max(nbytes, 1)))
        self.buffers[name] = (ptr, nbytes)
        self.context.set_tensor_address(name, int(ptr))

    def _set_shape(self, name: str, shape: Any) -> None:
        """TensorRT 10 says a shape outside the optimisation profile by returning False, not by raising."""
        if not self.context.set_input_shape(name, tuple(shape)):
            raise RuntimeError(f"{self.path}: input {name!r} of shape {tuple(shape)} is outside the engine's optimisation "
                               "profile (rebuild it with a larger --max-batch)")

    def _upload(self, name: str, value: np.ndarray) -> None:
        arr = np.ascontiguousarray(value, dtype=self.dtypes[name])
        self._set_shape(name, arr.shape)
        _check(self.cudart.cudaMemcpy(self.buffers[name][0], arr.ctypes.data, arr.nbytes,
                                      self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, value in feeds.items():
            self._upload(name, value)
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError("TensorRT execution failed")
        out = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            host = np.empty(shape, self.dtypes[name])
            _check(self.cudart.cudaMemcpyAsync(host.ctypes.data, self.buffers[name][0], host.nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
            out[name] = host
        _check(self.cudart.cudaStreamSynchronize(self.stream))
        return out

    def close(self) -> None:
        for ptr, _ in self.buffers.values():
            self.cudart.cudaFree(ptr)
        self.buffers = {}


class TRTModel(StagePipeline):
    """The export's engines chained like runtime.ExportedModel (the same StagePipeline: geometry,
    tiles, fill_index, content scores, maps at each image's size)."""

    def __init__(self, path: Path | str, verify: bool = True) -> None:
        self.path = Path(path)
        self.manifest = tables.verify_export(self.path) if verify else tables.read_manifest(self.path)
        engines = self.manifest.get("tensorrt", {}).get("engines", {})
        if not engines:
            raise TensorRTUnavailable(f"{self.path}: no TensorRT engines built yet; run `python -m pni_ray.export.trt {self.path}` on the target")
        self.max_batch = min(profile_batch(self.path, self.manifest, r.get("max_batch")) for r in engines.values())
        missing = missing_requirements()
        if missing:
            raise TensorRTUnavailable("running TensorRT engines needs " + "; and ".join(missing))
        import tensorrt as trt

        from pni_ray.export.runtime import scorer_table_feeds  # numpy only

        cudart = _cudart()
        self.geometry = Geometry.from_manifest(self.manifest)
        self.image_size = tuple(self.manifest["image_size"])
        self.model_id = tables.export_id(self.path)
        self.source_model_id = self.manifest["model_id"]
        self.threshold = float(tables.read_normalisation(self.path / self.manifest["tables"]["normalisation"])["threshold"])
        feeds = scorer_table_feeds(self.path, self.manifest) if self.manifest["scorer"]["coresets"] == "input" else {}
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {name: _Engine(trt, runtime, cudart, self.path / engines[name]["file"], feeds)
                        for name in self.manifest["pipeline"]}
        self.stages = tuple(self.engines)

    def run_stage(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.engines[name].run(feeds)

    def stage_inputs(self, name: str) -> tuple[str, ...]:
        engine = self.engines[name]
        return tuple(n for n in engine.inputs if n not in engine.tables)  # tables: uploaded once, never fed

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()


def _at_least_one(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or value == math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pni_ray.export.trt", description="Build TensorRT engines for an export directory.")
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--max-batch", type=_at_least_one, default=None,
                        help="largest batch of the optimisation profile (default: the export's)")
    parser.add_argument("--fp16", action="store_true", help="FP16 kernels (all graphs but the softmax and the scorer)")
    parser.add_argument("--workspace-gb", type=_positive_float, default=DEFAULT_WORKSPACE_GB)
    parser.add_argument("--register", action="store_true",
                        help="record engines already built (e.g. by trtexec, with the same --max-batch and --fp16) "
                             "instead of building them")
    args = parser.parse_args(argv)
    try:
        if args.register:
            info = register_engines(args.export_dir, args.max_batch, args.fp16)
        else:
            info = build_engines(args.export_dir, args.max_batch, args.fp16, args.workspace_gb)
    except (TensorRTUnavailable, tables.ExportError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, record in info["engines"].items():
        print(f"{name}: {args.export_dir / record['file']} (fp16={record['fp16']}, int8={record.get('int8', False)}, max batch {record['max_batch']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
