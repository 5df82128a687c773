"""The export's backbone graph compiled by OpenVINO's CPU plugin (optional: `pip install 'pni-ray[openvino]'`).

Why: on CPUs with AMX or AVX-512 BF16, OpenVINO runs the backbone's convolutions on the bf16 and
int8 tiles that onnxruntime's CPU kernels leave idle (the INT8 backbone, batch 8, one thread, on an
AMX Xeon: 65 ms against onnxruntime's 107). The MLP, softmax and scorer stay in onnxruntime: OpenVINO
ran the MLP's 9 x 9 masked window 12x slower, and the scorer's exact masks want float32. So a model
with `backbone_runtime="openvino"` runs the backbone here and the rest as one fused onnxruntime graph.

Precision: "auto" is the plugin's own default (bf16 where the CPU has it natively, else f32),
"f32" keeps float32 arithmetic, "bf16" asks for bf16. Maps differ from onnxruntime's (INT8 export,
bottle and transistor: by up to 1.7-2.9% of their maximum in f32, 3.1-3.8% in bf16; up to 7.8% / 8.3% on
another bottle INT8 export), so accuracy is
measured, not assumed: `python benchmarks/bench_peers.py ... --engines onnxruntime-int8,onnxruntime-int8-ov`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

BACKBONE_RUNTIMES = ("onnxruntime", "openvino")
PRECISIONS = ("auto", "f32", "bf16")
INSTALL_HINT = "pip install 'pni-ray[openvino]' (or pip install openvino)"


class OpenVINOUnavailable(RuntimeError):
    """OpenVINO is not installed, or cannot compile the graph on this machine (says which and how to fix)."""


def compile_config(threads: int, precision: str) -> dict[str, object]:
    """The CPU plugin's properties: `threads` inference threads, latency mode, no core pinning.

    Pinning is off because `pni-ray score` runs one single-thread model per core: pinned, two such
    processes were placed on the same core and ran at one core's rate.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"OpenVINO precision must be one of {PRECISIONS}, got {precision!r}")
    config: dict[str, object] = {"INFERENCE_NUM_THREADS": max(1, int(threads)), "PERFORMANCE_HINT": "LATENCY",
                                 "ENABLE_CPU_PINNING": False}
    if precision != "auto":
        config["INFERENCE_PRECISION_HINT"] = precision
    return config


@functools.lru_cache(maxsize=None)
def shared_core() -> object:
    """One OpenVINO Core per process, kept to its end. Each Core's CPU plugin installs an alternate signal
    stack for the calling thread and puts the previous one back when the Core goes, and two Cores that
    go in the order they came (OpenVINO 2026.4) leave the main thread's alternate stack on freed memory:
    the next signal Python handles (Ctrl-C, SIGTERM) then crashed the process with a segmentation fault."""
    import openvino as ov

    return ov.Core()


class OpenVINOBackbone:
    """`run({"images": x}) -> {"features": f}` for one backbone graph file, as an onnxruntime session would.

    One infer request: not for concurrent calls from several threads (a scoring actor runs one batch at a time).
    """

    def __init__(self, graph: Path | str, threads: int, precision: str = "auto") -> None:
        config = compile_config(threads, precision)
        try:
            import openvino  # noqa: F401 - installed?
        except ImportError as exc:
            raise OpenVINOUnavailable(f"backbone runtime 'openvino' needs OpenVINO, which is not installed: "
                                      f"{INSTALL_HINT}, or use the default runtime 'onnxruntime'") from exc
        self.graph = Path(graph)
        try:
            compiled = shared_core().compile_model(str(self.graph), "CPU", config)
        except Exception as exc:  # noqa: BLE001 - any refusal names the graph and the fallback
            raise OpenVINOUnavailable(f"{self.graph}: OpenVINO could not compile the backbone for its CPU plugin "
                                      f"({exc.__class__.__name__}: {exc}); use the default runtime 'onnxruntime'") from exc
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")  # what the plugin chose ("auto": its default)
        self.precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        port = compiled.inputs[0]
        self.input_name = "images" if "images" in port.get_names() else port.get_any_name()
        # the graph's own output names (a port may carry several names; keep "features" where it is one)
        self.output_names = ["features" if "features" in o.get_names() else o.get_any_name() for o in compiled.outputs]
        self._request = compiled.create_infer_request()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self._request.infer({0: np.ascontiguousarray(feeds[self.input_name], np.float32)})
        # copies: the request reuses its output buffers on the next call
        return {name: np.array(result[i]) for i, name in enumerate(self.output_names)}
