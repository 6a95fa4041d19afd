"""A stand-in for TensorRT's native module, so that NVIDIA's own pure-Python `tensorrt.plugin` sources (shipped in
the `tensorrt-cu13-bindings` wheel, whose native library needs libnvinfer) can run their decoration-time checks
on a machine without TensorRT.

What this proves, and no more: ssmrt's registrations pass the checks `tensorrt.plugin` makes when its decorators
run (ids, parameter schemas and their order, annotation types, return annotations, attribute types). It does not
run TensorRT: no parser, builder, engine or kernel is involved, and every native object here is inert.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path


class _Member:
    """An enum member or constant of the stand-in: named, hashable, comparable by name."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return self.name

    def __eq__(self, other):
        return isinstance(other, _Member) and other.name == self.name

    def __hash__(self):
        return hash(self.name)

    def __int__(self):
        return abs(hash(self.name)) % 1000


class _Inert(type):
    """Classes whose unknown class attributes are members (trt.DataType.FLOAT, trt.Logger.WARNING, ...)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        member = _Member(f"{cls.__name__}.{name}")
        setattr(cls, name, member)
        return member


def _inert_class(name: str):
    return _Inert(name, (), {"__init__": lambda self, *args, **kwargs: None,
                             "log": lambda self, *args, **kwargs: None})


class _Registry:
    def __init__(self):
        self.creators = {}

    def register_creator(self, creator, namespace):
        self.creators[(getattr(creator, "name", None), namespace)] = creator
        return True

    def get_creator(self, name, version, namespace):
        return self.creators.get((name, namespace))


def install() -> types.ModuleType:
    """Installs the stand-in as `tensorrt` and NVIDIA's plugin sources as `tensorrt.plugin`; returns the latter.
    Raises ModuleNotFoundError where the tensorrt-cu13-bindings wheel is not installed."""
    found = importlib.util.find_spec("tensorrt_bindings")  # finds the package without running its __init__
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError("tensorrt_bindings (pip install tensorrt-cu13-bindings)")
    plugin_dir = Path(list(found.submodule_search_locations)[0]) / "plugin"

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "11.4.0"
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None, is_package=True)
    trt.__path__ = []
    classes = {}

    def __getattr__(name):  # noqa: N807
        if name.startswith("__"):
            raise AttributeError(name)
        if name not in classes:
            classes[name] = _inert_class(name)
        return classes[name]

    trt.__getattr__ = __getattr__
    dims = _inert_class("Dims")
    dims.MAX_DIMS = 8
    trt.Dims = dims
    registry = _Registry()
    trt.get_plugin_registry = lambda: registry
    trt.float32, trt.float16, trt.bfloat16 = (getattr(__getattr__("DataType"), n) for n in ("FLOAT", "HALF", "BF16"))
    trt.nptype = lambda dtype: "float32"
    sys.modules["tensorrt"] = trt

    spec = importlib.util.spec_from_file_location("tensorrt.plugin", plugin_dir / "__init__.py",
                                                  submodule_search_locations=[str(plugin_dir)])
    plugin = importlib.util.module_from_spec(spec)
    sys.modules["tensorrt.plugin"] = plugin
    trt.plugin = plugin
    spec.loader.exec_module(plugin)
    return plugin
