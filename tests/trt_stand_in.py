"""A stand-in `tensorrt` module recording what pni_ray.export.trt.build_engines asks of TensorRT 10's API."""

from __future__ import annotations

import sys
import types
from pathlib import Path

STRONGLY_TYPED = 1  # NetworkDefinitionCreationFlag.STRONGLY_TYPED's value in TensorRT 10 (build_engines shifts by it)


class _Obj:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def install(monkeypatch) -> dict[str, dict]:
    """Put the stand-in in sys.modules; returns {onnx file name: {"network_flags", "flags", "workspace",
    "profile"}}, filled as engines are built."""
    calls: dict[str, dict] = {}

    class Builder:
        def __init__(self, logger):
            self.current: dict = {}

        def create_network(self, flags):
            self.current["network_flags"] = flags
            return _Obj()

        def create_builder_config(self):
            cur = self.current
            cur["flags"] = []
            return _Obj(set_memory_pool_limit=lambda pool, size: cur.__setitem__("workspace", size),
                        set_flag=lambda f: cur["flags"].append(f),
                        add_optimization_profile=lambda p: cur.__setitem__("profile", p.shapes))

        def create_optimization_profile(self):
            shapes: dict = {}
            return _Obj(shapes=shapes, set_shape=lambda name, lo, opt, hi: shapes.__setitem__(name, (lo, opt, hi)))

        def build_serialized_network(self, network, config):
            self.current["file"] = Parser.last
            calls[Parser.last] = self.current
            return b"engine:" + Parser.last.encode()

    class Parser:
        last = ""

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            Parser.last = Path(path).name
            return True

    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.3.0"
    fake.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=None: None})
    fake.MemoryPoolType = _Obj(WORKSPACE="workspace")
    fake.BuilderFlag = _Obj(FP16="fp16")
    fake.NetworkDefinitionCreationFlag = _Obj(STRONGLY_TYPED=STRONGLY_TYPED)
    fake.Builder = Builder
    fake.OnnxParser = Parser
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return calls
