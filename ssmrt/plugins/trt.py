"""TensorRT plugins for the ssmrt ops, with NVIDIA's `tensorrt.plugin` (TensorRT >= 10.9): each part of a plugin
is a small function keyed by the op's id, as in TensorRT's quickly-deployable-plugins sample, and the kernels
know nothing of TensorRT.

Per op (ssmrt::CausalConv1d, ssmrt::SelectiveScan, ssmrt::SSDScan, and the six chain ops of a TensorRT export's
prefill graph, whose functions are made from their contracts: see "the chain ops" below):
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
from ..ops.spec import ALL_OPS, CHAIN_OPS, DOMAIN
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


# --------------------------------------------------------------------------------------------- the chain ops
#
# A prefill graph (ssmrt export --target tensorrt) carries each scan as three nodes of one kernel each. Their
# plugin functions are made from the chain ops' contracts (CHAIN_OPS): each takes the op's inputs, then its
# attributes, in the contract's order, with the parameters tensorrt.plugin reads through inspect.signature.

_TORCH_OF = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16"}
_CHAIN_MODULE = {"SSD": "ssd_chunked", "Selective": "selective_chunked"}
_WRAPPER_OUT = {"y": "out", "present_ssm_state": "state_out"}  # a wrapper's keyword for each given output


def _chain_module(op: str):
    import importlib

    family = "SSD" if op.startswith("SSD") else "Selective"
    return importlib.import_module(f"ssmrt.kernels.{_CHAIN_MODULE[family]}")


def _dims(op: str, descs, attrs: dict) -> dict:
    """Each dimension the contract names, as the first input having it gives it (a shape expression), plus
    chunk_size (the attribute) and nchunks = cdiv(seqlen, chunk_size) where no input has it."""
    import tensorrt.plugin as trtp

    dims = {}
    for t, d in zip(CHAIN_OPS[op].inputs, descs, strict=True):
        for axis, name in enumerate(t.shape):
            dims.setdefault(name, d.shape_expr[axis])
    dims["chunk_size"] = int(attrs["chunk_size"])
    if "nchunks" not in dims:
        dims["nchunks"] = trtp.cdiv(dims["seqlen"], dims["chunk_size"])
    return dims


def chain_outputs(op: str, descs, attrs: dict) -> tuple:
    """register: each output like the input of the same contract shape and type (y like x, the new state like the
    state, the entering states like the chunk states), else float32 of the contract's shape."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    spec = CHAIN_OPS[op]
    dims = _dims(op, descs, attrs)
    out = []
    for o in spec.outputs:
        like = next((d for t, d in zip(spec.inputs, descs, strict=True) if (t.shape, t.fp32) == (o.shape, o.fp32)),
                    None)
        out.append(like.like() if like is not None else
                   trtp.from_shape_expr(tuple(dims[n] for n in o.shape), dtype=trt.float32))
    return tuple(out)


def chain_constexprs(op: str, static, attrs: dict, act: str, D_rank: int = 1) -> dict:
    """The chain kernel's compile-time constants for a node: static(name) gives a dimension the kernel is
    specialised on, act the activations' torch dtype name. The exporter supplies every input (zeros where a model
    lacks D or a bias), so only the attributes and D's layout vary. The same function the wrappers use
    (ssd_chunked / selective_chunked.constexprs) makes them."""
    import torch

    kernel = CHAIN_OPS[op].function
    chunk = int(attrs["chunk_size"])
    module = _chain_module(op)
    if op.startswith("SSD"):
        dt_limit = None
        if "dt_min" in attrs:
            hi = float(attrs["dt_max"])
            dt_limit = (float(attrs["dt_min"]), hi if math.isfinite(hi) else math.inf)
        extra = {"dt_softplus": bool(attrs["dt_softplus"]), "dt_limit": dt_limit} if dt_limit else {}
        return module.constexprs(static("headdim"), static("dstate"), getattr(torch, act), chunk, has_D=True,
                                 D_has_hdim=D_rank == 2, has_dt_bias=True, **extra)[kernel]
    extra = {"delta_softplus": bool(attrs["delta_softplus"])} if "delta_softplus" in attrs else {}
    return module.constexprs(static("dim"), static("dstate"), has_D=True, has_z=True, has_delta_bias=True,
                             chunk=chunk, **extra)[kernel]


def chain_aot(op: str, descs, attrs: dict):
    """aot_impl: the node's kernel compiled for the build GPU, its launch from ssmrt.plugins.launch."""
    spec = CHAIN_OPS[op]
    named = dict(zip((t.name for t in spec.inputs), descs, strict=True))
    if "ssm_state" in named:
        _float32_state(named["ssm_state"], op)
    axes = {}
    for t, d in zip(spec.inputs, descs, strict=True):
        for axis, name in enumerate(t.shape):
            axes.setdefault(name, (d, axis, t.name))

    def static(name):
        d, axis, tensor = axes[name]
        return _static(d, axis, op, tensor)

    act_desc = next((d for t, d in zip(spec.inputs, descs, strict=True) if not t.fp32), descs[0])
    meta = chain_constexprs(op, static, attrs, _TORCH_OF[act_desc.dtype.name],
                            len(named["D"].shape) if "D" in named else 1)
    k = KERNELS[spec.function]
    return _aot(spec.function, dict(zip((p.name for p in k.inputs), descs, strict=True)), act_desc, meta)


def chain_impl(op: str, tensors, attrs: dict, outputs, stream: int) -> None:
    """impl (JIT): the node's kernel wrapper on TensorRT's stream, writing into TensorRT's outputs."""
    spec = CHAIN_OPS[op]
    fn = getattr(_chain_module(op), spec.function)
    t = _torch(*tensors, *outputs)
    given = dict(zip((x.name for x in spec.inputs), t, strict=False))
    args = []
    for name in spec.params:
        if name in given:
            args.append(given[name])
        elif name == "dt_limit":
            args.append((float(attrs["dt_min"]), float(attrs["dt_max"])))
        elif spec.attributes[name] is int and name != "chunk_size":
            args.append(bool(attrs[name]))
        else:
            args.append(spec.attributes[name](attrs[name]))
    outs = {_WRAPPER_OUT.get(o.name, o.name): x for o, x in zip(spec.outputs, t[len(spec.inputs):], strict=True)}
    with _on(stream):
        fn(*args, **outs)


def chain_functions(op: str, types: dict) -> tuple:
    """(register, aot_impl, impl, autotune) for chain op `op`, their signatures from its contract with TensorRT's
    types (types: name -> class, as register() resolves them)."""
    import inspect

    spec = CHAIN_OPS[op]
    desc, tensor = types["TensorDesc"], types["Tensor"]
    n_out = len(spec.outputs)

    def params(kind):
        P = inspect.Parameter  # noqa: N806
        return ([P(t.name, P.POSITIONAL_OR_KEYWORD, annotation=kind) for t in spec.inputs]
                + [P(n, P.POSITIONAL_OR_KEYWORD, annotation=a) for n, a in spec.attributes.items()])

    def split(sig, args, kwargs):
        bound = sig.bind(*args, **kwargs).arguments
        return [bound[t.name] for t in spec.inputs], {n: bound[n] for n in spec.attributes}, bound

    P = inspect.Parameter  # noqa: N806
    out_descs, out_tensors = tuple[(desc,) * n_out], tuple[(tensor,) * n_out]
    reg_sig = inspect.Signature(params(desc), return_annotation=out_descs if n_out > 1 else desc)
    aot_sig = inspect.Signature(
        params(desc) + [P("outputs", P.POSITIONAL_OR_KEYWORD, annotation=out_descs),
                        P("tactic", P.POSITIONAL_OR_KEYWORD, annotation=int)],
        return_annotation=tuple[str | bytes, str | bytes, types["KernelLaunchParams"], types["SymIntExprs"]])
    impl_sig = inspect.Signature(
        params(tensor) + [P("outputs", P.POSITIONAL_OR_KEYWORD, annotation=out_tensors),
                          P("stream", P.POSITIONAL_OR_KEYWORD, annotation=int)], return_annotation=None)
    tune_sig = inspect.Signature(params(desc) + [P("outputs", P.POSITIONAL_OR_KEYWORD, annotation=out_descs)],
                                 return_annotation=list[types["AutoTuneCombination"]])

    def register_fn(*args, **kwargs):
        descs, attrs, _ = split(reg_sig, args, kwargs)
        out = chain_outputs(op, descs, attrs)
        return out if n_out > 1 else out[0]

    def aot_impl_fn(*args, **kwargs):
        descs, attrs, _ = split(aot_sig, args, kwargs)
        return chain_aot(op, descs, attrs)

    def impl_fn(*args, **kwargs):
        tensors, attrs, bound = split(impl_sig, args, kwargs)
        chain_impl(op, tensors, attrs, bound["outputs"], bound["stream"])

    def autotune_fn(*args, **kwargs):
        return _combinations(op)

    fns = []
    for fn, sig, part in ((register_fn, reg_sig, "register"), (aot_impl_fn, aot_sig, "aot_impl"),
                          (impl_fn, impl_sig, "impl"), (autotune_fn, tune_sig, "autotune")):
        fn.__signature__ = sig
        fn.__name__ = fn.__qualname__ = f"{spec.function}_{part}"
        fns.append(fn)
    return tuple(fns)


# ------------------------------------------------------------------------------------------------- helpers


def autotune_types(op: str) -> str:
    """The AutoTuneCombination type string of an op: its inputs then outputs, "FP32|FP16|BF16" where a tensor
    follows the activations (dependent: all of them take the same type) and "FP32" where the spec keeps it
    float32."""
    spec = ALL_OPS[op]
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
    # TensorRT's buffers are 16-byte aligned (it allocates them 256-byte aligned), and a model dimension known at
    # build time is compiled in as a multiple of 16 where it is one: the tiles' loads become vector loads
    static = k.resolve({name: tuple(desc.shape) for name, desc in shaped.items()})
    known = {n for n, v in static.items() if int(v) >= 0}
    spec = launch_spec(kernel, _build_sm(), act, "fp32", meta,
                       k.divisible(static, aligned=True, static=known.__contains__))
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
    functions = {op: tuple(_resolved(fn, types) for fn in fns) for op, fns in PLUGINS.items()}
    functions |= {op: chain_functions(op, types) for op in CHAIN_OPS}
    for op, (desc, aot_impl, impl, autotune) in functions.items():
        plugin_id = f"{DOMAIN}::{op}"
        trtp.register(plugin_id)(desc)
        trtp.aot_impl(plugin_id)(aot_impl)
        trtp.impl(plugin_id)(impl)
        trtp.autotune(plugin_id)(autotune)
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
