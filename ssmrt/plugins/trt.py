"""TensorRT plugins for the ssmrt ops, with NVIDIA's `tensorrt.plugin` (TensorRT >= 10.9): each part of a plugin
is a small function keyed by the op's id, as in TensorRT's quickly-deployable-plugins sample, and the kernels
know nothing of TensorRT.

Per op (ssmrt::CausalConv1d, ssmrt::SelectiveScan, ssmrt::SSDScan):
- register: the outputs' shapes and types (y like the activations; the SSM state float32, the conv state like
  the activations), from ssmrt.ops.spec;
- aot_impl: the op's one-launch kernel (the recurrence, for any sequence length) compiled for the build GPU:
  its entry name, PTX, launch parameters and int32 extra arguments, all from ssmrt.plugins.launch /
  launcher.launch_spec. An engine built with it needs neither Python nor a plugin library to run;
- impl (JIT): the Triton wrappers on TensorRT's stream (Python at run time);
- autotune: activations float32, float16 or bfloat16; A, D, biases and the SSM state float32.

`register()` imports TensorRT only when called and is idempotent; with both implementations registered the
builder needs to be told which one to take (the PREFER_AOT_PYTHON_PLUGINS / PREFER_JIT_PYTHON_PLUGINS network
flags, or an `aot` node attribute). Attributes arrive as TensorRT reads them from the ONNX node: ints as int32,
floats as float32.

The functions below are plain Python, importable without TensorRT: their annotations name TensorRT's types as
strings, resolved when `register()` hands them to tensorrt.plugin (which reads annotations as types, so this
module must not use `from __future__ import annotations`). tests/test_contract.py checks their parameters
against the op contracts.
"""

import importlib.util
import math
from typing import TYPE_CHECKING

from ..errors import SsmrtError
from ..ops.spec import DOMAIN, OPS
from .launch import KERNELS

if TYPE_CHECKING:  # the names the string annotations below use; register() resolves them at run time
    from tensorrt.plugin import AutoTuneCombination, KernelLaunchParams, SymIntExprs, Tensor, TensorDesc  # noqa: F401

MIN_TENSORRT = (10, 9)
PLUGIN_TYPES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16"}
# TensorRT DataType names -> the Triton types the kernels are compiled for
TRITON_OF = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16"}

_registered = False


# --------------------------------------------------------------------------------------------- CausalConv1d


def conv_register(x: "TensorDesc", weight: "TensorDesc", bias: "TensorDesc", conv_state: "TensorDesc",
                  activation: str) -> "tuple[TensorDesc, TensorDesc]":
    return x.like(), conv_state.like()


def conv_aot_impl(x: "TensorDesc", weight: "TensorDesc", bias: "TensorDesc", conv_state: "TensorDesc",
                  activation: str, outputs: "tuple[TensorDesc, TensorDesc]", tactic: int
                  ) -> "tuple[str | bytes, str | bytes, KernelLaunchParams, SymIntExprs]":
    from ..kernels import causal_conv1d

    width = _static(weight, 1, "CausalConv1d", "weight")
    dim = _static(weight, 0, "CausalConv1d", "weight")
    meta = causal_conv1d.constexprs(dim, width, has_bias=True, activation=_text(activation))
    return _aot("causal_conv1d", {"x": x, "w": weight}, x, meta)


def conv_impl(x: "Tensor", weight: "Tensor", bias: "Tensor", conv_state: "Tensor", activation: str,
              outputs: "tuple[Tensor, Tensor]", stream: int) -> None:
    from ..kernels.causal_conv1d import causal_conv1d

    t = _torch(x, weight, bias, conv_state, *outputs)
    with _on(stream):
        causal_conv1d(*t[:4], activation=_text(activation), out=t[4], state_out=t[5])


def conv_autotune(x: "TensorDesc", weight: "TensorDesc", bias: "TensorDesc", conv_state: "TensorDesc",
                  activation: str, outputs: "tuple[TensorDesc, TensorDesc]") -> "list[AutoTuneCombination]":
    return _combinations("CausalConv1d")


# -------------------------------------------------------------------------------------------- SelectiveScan


def selective_register(u: "TensorDesc", delta: "TensorDesc", A: "TensorDesc", B: "TensorDesc", C: "TensorDesc",
                       D: "TensorDesc", z: "TensorDesc", delta_bias: "TensorDesc", ssm_state: "TensorDesc",
                       delta_softplus: int) -> "tuple[TensorDesc, TensorDesc]":
    return u.like(), ssm_state.like()


def selective_aot_impl(u: "TensorDesc", delta: "TensorDesc", A: "TensorDesc", B: "TensorDesc", C: "TensorDesc",
                       D: "TensorDesc", z: "TensorDesc", delta_bias: "TensorDesc", ssm_state: "TensorDesc",
                       delta_softplus: int, outputs: "tuple[TensorDesc, TensorDesc]", tactic: int
                       ) -> "tuple[str | bytes, str | bytes, KernelLaunchParams, SymIntExprs]":
    from ..kernels import selective_scan

    _float32_state(ssm_state, "SelectiveScan")
    meta = selective_scan.constexprs(_static(A, 0, "SelectiveScan", "A"), _static(A, 1, "SelectiveScan", "A"),
                                     delta_softplus=bool(delta_softplus))
    return _aot("selective_scan", {"u": u, "B": B}, u, meta)


def selective_impl(u: "Tensor", delta: "Tensor", A: "Tensor", B: "Tensor", C: "Tensor", D: "Tensor", z: "Tensor",
                   delta_bias: "Tensor", ssm_state: "Tensor", delta_softplus: int, outputs: "tuple[Tensor, Tensor]",
                   stream: int) -> None:
    from ..kernels.selective_scan import selective_scan_recurrent

    t = _torch(u, delta, A, B, C, D, z, delta_bias, ssm_state, *outputs)
    with _on(stream):
        selective_scan_recurrent(*t[:8], delta_softplus=bool(delta_softplus), ssm_state=t[8], out=t[9],
                                 state_out=t[10])


def selective_autotune(u: "TensorDesc", delta: "TensorDesc", A: "TensorDesc", B: "TensorDesc", C: "TensorDesc",
                       D: "TensorDesc", z: "TensorDesc", delta_bias: "TensorDesc", ssm_state: "TensorDesc",
                       delta_softplus: int, outputs: "tuple[TensorDesc, TensorDesc]") -> "list[AutoTuneCombination]":
    return _combinations("SelectiveScan")


# ------------------------------------------------------------------------------------------------- SSDScan


def ssd_register(x: "TensorDesc", dt: "TensorDesc", A: "TensorDesc", B: "TensorDesc", C: "TensorDesc",
                 D: "TensorDesc", dt_bias: "TensorDesc", ssm_state: "TensorDesc", chunk_size: int, dt_softplus: int,
                 dt_min: float, dt_max: float) -> "tuple[TensorDesc, TensorDesc]":
    return x.like(), ssm_state.like()


def ssd_aot_impl(x: "TensorDesc", dt: "TensorDesc", A: "TensorDesc", B: "TensorDesc", C: "TensorDesc",
                 D: "TensorDesc", dt_bias: "TensorDesc", ssm_state: "TensorDesc", chunk_size: int, dt_softplus: int,
                 dt_min: float, dt_max: float, outputs: "tuple[TensorDesc, TensorDesc]", tactic: int
                 ) -> "tuple[str | bytes, str | bytes, KernelLaunchParams, SymIntExprs]":
    from ..kernels import ssd_scan

    _float32_state(ssm_state, "SSDScan")
    meta = ssd_scan.constexprs(_static(x, 3, "SSDScan", "x"), _static(B, 3, "SSDScan", "B"), has_D=True,
                               D_has_hdim=len(D.shape) == 2, has_dt_bias=True, dt_softplus=bool(dt_softplus),
                               dt_limit=(float(dt_min), float(dt_max) if math.isfinite(dt_max) else math.inf))
    return _aot("ssd_scan", {"x": x, "B": B}, x, meta)


def ssd_impl(x: "Tensor", dt: "Tensor", A: "Tensor", B: "Tensor", C: "Tensor", D: "Tensor", dt_bias: "Tensor",
             ssm_state: "Tensor", chunk_size: int, dt_softplus: int, dt_min: float, dt_max: float,
             outputs: "tuple[Tensor, Tensor]", stream: int) -> None:
    from ..kernels.ssd_scan import ssd_scan

    t = _torch(x, dt, A, B, C, D, dt_bias, ssm_state, *outputs)
    with _on(stream):
        ssd_scan(*t[:7], dt_softplus=bool(dt_softplus), dt_limit=(float(dt_min), float(dt_max)), ssm_state=t[7],
                 chunk_size=int(chunk_size), out=t[8], state_out=t[9])


def ssd_autotune(x: "TensorDesc", dt: "TensorDesc", A: "TensorDesc", B: "TensorDesc", C: "TensorDesc",
                 D: "TensorDesc", dt_bias: "TensorDesc", ssm_state: "TensorDesc", chunk_size: int, dt_softplus: int,
                 dt_min: float, dt_max: float, outputs: "tuple[TensorDesc, TensorDesc]") -> "list[AutoTuneCombination]":
    return _combinations("SSDScan")


# The plugins: op -> (register, aot_impl, impl, autotune).
PLUGINS = {
    "CausalConv1d": (conv_register, conv_aot_impl, conv_impl, conv_autotune),
    "SelectiveScan": (selective_register, selective_aot_impl, selective_impl, selective_autotune),
    "SSDScan": (ssd_register, ssd_aot_impl, ssd_impl, ssd_autotune),
}


# ------------------------------------------------------------------------------------------------- helpers


def autotune_types(op: str) -> str:
    """The AutoTuneCombination type string of an op: its inputs then outputs, "FP32|FP16|BF16" where a tensor
    follows the activations (dependent: all of them take the same type) and "FP32" where the spec keeps it
    float32."""
    spec = OPS[op]
    act = "|".join(PLUGIN_TYPES.values())
    return ", ".join("FP32" if t.fp32 else act for t in (*spec.inputs, *spec.outputs))


def _combinations(op: str):
    import tensorrt.plugin as trtp

    return [trtp.AutoTuneCombination(autotune_types(op), "LINEAR")]


def _text(value) -> str:
    """A string attribute as TensorRT hands it over (bytes with a trailing NUL, or str)."""
    if isinstance(value, bytes | bytearray | memoryview):
        value = bytes(value).decode()
    return str(value).rstrip("\0")


def _static(desc, axis: int, op: str, name: str) -> int:
    """A dimension the kernel is specialised on (channels, state size): it must be known when the engine is
    built."""
    size = int(desc.shape[axis])
    if size < 0:
        raise SsmrtError(f"ssmrt::{op}: input {name} needs a static dimension {axis} to build the kernel "
                         f"(got a dynamic one)")
    return size


def _float32_state(desc, op: str) -> None:
    """The plugins keep the SSM state float32, as the op contract does (an artifact exported with
    --state-dtype float16 / bfloat16 builds with --plugins none, on the fallback bodies)."""
    if desc.dtype.name != "FLOAT":
        raise SsmrtError(f"ssmrt::{op}: the plugin's SSM state must be float32, got {desc.dtype.name} (export with "
                         "--state-dtype float32, or build on the fallback bodies)")


def _build_sm() -> int:
    """The compute capability of the GPU the engine is built on, the current context's device (the builder's),
    else device 0: the PTX is compiled for it."""
    from cuda.bindings import driver

    from .launcher import _check

    _check(driver.cuInit(0), "cuInit")
    err, dev = driver.cuCtxGetDevice()
    if err != driver.CUresult.CUDA_SUCCESS:
        dev = _check(driver.cuDeviceGet(0), "cuDeviceGet")
    attr = driver.CUdevice_attribute
    major = _check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "attribute")
    minor = _check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "attribute")
    return major * 10 + minor


def _aot(kernel: str, shaped: dict, act_desc, meta: dict):
    """aot_impl's return for one kernel: (entry, PTX, launch parameters, int32 extra arguments), the grid and
    the extra arguments as expressions of the input shapes (shaped: the kernel's tensors whose dimensions
    give its sizes)."""
    import tensorrt.plugin as trtp

    from .launcher import launch_spec

    k = KERNELS[kernel]
    act = TRITON_OF[act_desc.dtype.name]
    spec = launch_spec(kernel, _build_sm(), act, "fp32", meta)
    sizes = k.resolve({name: desc.shape_expr for name, desc in shaped.items()})
    gx, gy, gz = spec.grid(sizes)
    params = trtp.KernelLaunchParams(grid_x=gx, grid_y=gy, grid_z=gz, block_x=spec.block, shared_mem=spec.shared)
    extra = trtp.SymIntExprs(len(k.scalars))
    for i, name in enumerate(k.scalars):
        extra[i] = sizes[name]
    return spec.entry, spec.ptx, params, extra


class _Raw:
    """A device buffer as __cuda_array_interface__ (for bfloat16, which the interface cannot name: exposed as
    int16 and viewed back)."""

    def __init__(self, ptr: int, shape, typestr: str):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr, "data": (ptr, False),
                                         "version": 2, "strides": None}


def _torch(*tensors):
    """trtp.Tensor objects as torch tensors on the same memory (contiguous, as TensorRT's LINEAR format is)."""
    import torch

    out = []
    for t in tensors:
        if t.dtype.name == "BF16":
            out.append(torch.as_tensor(_Raw(t.data_ptr, t.shape, "<i2"), device="cuda").view(torch.bfloat16))
        else:
            out.append(torch.as_tensor(t, device="cuda"))
    return out


def _on(stream: int):
    import torch

    return torch.cuda.stream(torch.cuda.ExternalStream(stream))


def tensorrt_version() -> tuple[int, ...] | None:
    """The installed TensorRT's version, None where it is not installed (found without importing it)."""
    if importlib.util.find_spec("tensorrt") is None:
        return None
    import tensorrt

    return tuple(int(p) for p in tensorrt.__version__.split(".")[:2])


def register() -> None:
    """Registers the ssmrt plugins with TensorRT (once a process). SsmrtError, in one line, where TensorRT is
    missing, cannot be loaded or is older than MIN_TENSORRT."""
    global _registered
    if _registered:
        return
    try:
        version = tensorrt_version()
    except Exception as e:  # a TensorRT wheel without its libraries fails on import with an OSError or worse
        raise SsmrtError(f"TensorRT is installed but cannot be loaded ({str(e).splitlines()[0]})") from None
    if version is None:
        raise SsmrtError("TensorRT is not installed (pip install tensorrt); the plugins need TensorRT >= "
                         f"{'.'.join(map(str, MIN_TENSORRT))}")
    if version < MIN_TENSORRT:
        raise SsmrtError(f"TensorRT {'.'.join(map(str, version))} has no tensorrt.plugin AOT support; the plugins "
                         f"need >= {'.'.join(map(str, MIN_TENSORRT))} (build with --plugins none: the fallback "
                         "bodies)")
    import tensorrt.plugin as trtp

    types = {"TensorDesc": trtp.TensorDesc, "Tensor": trtp.Tensor,
             "KernelLaunchParams": trtp.KernelLaunchParams, "SymIntExprs": trtp.SymIntExprs,
             "AutoTuneCombination": trtp.AutoTuneCombination}
    for op, (desc, aot_impl, impl, autotune) in PLUGINS.items():
        plugin_id = f"{DOMAIN}::{op}"
        trtp.register(plugin_id)(_resolved(desc, types))
        trtp.aot_impl(plugin_id)(_resolved(aot_impl, types))
        trtp.impl(plugin_id)(_resolved(impl, types))
        trtp.autotune(plugin_id)(_resolved(autotune, types))
    _registered = True


def _resolved(fn, types: dict):
    """A copy of fn whose string annotations are evaluated against TensorRT's plugin types (tensorrt.plugin reads
    the annotations through inspect.signature, as types)."""
    import types as pytypes

    names = {**types, "tuple": tuple, "list": list, "str": str, "bytes": bytes, "int": int, "float": float}
    copy = pytypes.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__annotations__ = {k: eval(v, {"__builtins__": {}}, names) if isinstance(v, str) else v  # noqa: S307
                            for k, v in fn.__annotations__.items()}
    copy.__doc__, copy.__qualname__, copy.__module__ = fn.__doc__, fn.__qualname__, fn.__module__
    return copy
