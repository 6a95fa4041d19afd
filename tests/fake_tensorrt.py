"""A recording stand-in for the parts of TensorRT's Python API that `ssmrt build` calls, so the build logic
(flags, what the parser is given, profiles, config, error paths, the output directory) runs on a machine
without TensorRT.

What this proves, and no more: ssmrt calls the API as TensorRT's documentation describes it, with the
values intended. It parses nothing, builds nothing and runs nothing: the engine bytes it returns are a
record of the calls. TensorRT itself is what the `trt` tests exercise.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import time
import types

CALLS: list = []


class ILogger:
    ERROR, INTERNAL_ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, *args):
        pass


class Logger(ILogger):
    pass


class NetworkDefinitionCreationFlag:
    STRONGLY_TYPED = 5
    PREFER_AOT_PYTHON_PLUGINS = 6
    PREFER_JIT_PYTHON_PLUGINS = 7


class MemoryPoolType:
    WORKSPACE = "WORKSPACE"


class _Network:
    def __init__(self, flags):
        self.flags = flags
        self.num_layers = 0


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.logger = network, logger
        self.num_errors = 0

    def parse(self, model: bytes, path: str | None = None) -> bool:
        import onnx

        m = onnx.ModelProto()
        m.ParseFromString(model)
        self.network.num_layers = len(m.graph.node)
        self.network.parsed = {"path": path, "plugin_attrs": sorted(
            {a.name for n in m.graph.node if n.domain == "ssmrt" for a in n.attribute if a.name.startswith("plugin_")}),
            "ops": sorted({n.op_type for n in m.graph.node if n.domain == "ssmrt"})}
        if BEHAVIOUR.get("parse_error"):
            self.logger.log(ILogger.ERROR, BEHAVIOUR["parse_error"])
            self.num_errors = 1
            return False
        return True

    def get_error(self, i):
        return BEHAVIOUR["parse_error"]


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class _TimingCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self):
        return self.data + b"+"


class _Config:
    def __init__(self):
        self.profiles, self.pools, self.cache = [], {}, None

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def add_optimization_profile(self, profile):
        self.profiles.append(profile.shapes)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes):
        return _TimingCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class Builder:
    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags):
        return _Network(flags)

    def create_builder_config(self):
        return _Config()

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        if BEHAVIOUR.get("sleep"):
            print("building", flush=True)
            time.sleep(BEHAVIOUR["sleep"])
        if BEHAVIOUR.get("build_error"):
            self.logger.log(ILogger.ERROR, BEHAVIOUR["build_error"])
            return None
        record = {"flags": network.flags, "parsed": network.parsed, "profiles": config.profiles,
                  "pools": config.pools}
        CALLS.append(record)
        return json.dumps(record).encode()


BEHAVIOUR: dict = {}


def install(version: str = "10.13.0", **behaviour):
    """Puts the stand-in in sys.modules as `tensorrt` (and `tensorrt_rtx`); returns the module."""
    module = types.ModuleType("tensorrt")
    for name, value in dict(globals()).items():
        if not name.startswith("__") and name not in ("install", "json", "sys", "time", "types", "importlib"):
            setattr(module, name, value)
    module.__version__ = version
    module.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    BEHAVIOUR.clear()
    BEHAVIOUR.update(behaviour)
    CALLS.clear()
    sys.modules["tensorrt"] = module
    rtx = types.ModuleType("tensorrt_rtx")
    rtx.__dict__.update({k: v for k, v in module.__dict__.items() if not k.startswith("__")})
    rtx.__version__ = "1.2.0"
    rtx.__spec__ = importlib.machinery.ModuleSpec("tensorrt_rtx", None)
    sys.modules["tensorrt_rtx"] = rtx
    return module
