"""The TensorRT plugins (ssmrt/plugins/trt.py) as far as they can be proven without TensorRT.

On the CPU: each plugin's functions take exactly the op contract's tensors and attributes in tensorrt.plugin's
order (register: tensors then attributes; aot_impl: + outputs, tactic; impl: + outputs, stream; autotune: +
outputs), with the contract's attribute types; the autotune types follow the spec's float32 tensors; the
string annotations resolve to the types tensorrt.plugin checks; register() refuses in one line where TensorRT is
missing or too old; and every aot_impl, called with stand-in descriptors and stand-ins for TensorRT's launch
types (a fake `tensorrt.plugin`, not TensorRT), returns the kernel's entry, its PTX for the build GPU, a grid and
int32 extra arguments that are expressions of the input shapes in the kernel's order. None of this runs
TensorRT: registration with TensorRT and an engine per op are the `trt` tests, skipped here."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest

from ssmrt.errors import SsmrtError
from ssmrt.ops.spec import CHAIN_OPS, OPS
from ssmrt.plugins import trt

TYPES = {int: "int", float: "float", str: "str"}


@pytest.mark.parametrize("op", list(OPS))
def test_each_plugin_takes_the_contract(op):
    spec = OPS[op]
    desc, aot_impl, impl, autotune = trt.PLUGINS[op]
    base = [t.name for t in spec.inputs] + list(spec.attributes)
    assert list(inspect.signature(desc).parameters) == base
    assert list(inspect.signature(aot_impl).parameters) == [*base, "outputs", "tactic"]
    assert list(inspect.signature(impl).parameters) == [*base, "outputs", "stream"]
    assert list(inspect.signature(autotune).parameters) == [*base, "outputs"]
    for fn in (desc, aot_impl, impl, autotune):
        ann = fn.__annotations__
        for name, kind in spec.attributes.items():
            assert ann[name] is kind, (fn.__name__, name)
        for t in spec.inputs:
            assert ann[t.name] in ("TensorDesc", "Tensor"), (fn.__name__, t.name)
        n_out = len(spec.outputs)
        if "outputs" in ann:
            assert ann["outputs"].count(",") == n_out - 1


ACT = "FP32|FP16|BF16"
AUTOTUNE = {  # by hand: A, D, biases and the SSM state float32; everything else the activations' type
    "CausalConv1d": [ACT, ACT, ACT, ACT, ACT, ACT],
    "SelectiveScan": [ACT, ACT, "FP32", ACT, ACT, "FP32", ACT, "FP32", "FP32", ACT, "FP32"],
    "SSDScan": [ACT, ACT, "FP32", ACT, ACT, "FP32", "FP32", "FP32", ACT, "FP32"],
}


@pytest.mark.parametrize("op", list(OPS))
def test_autotune_types(op):
    assert [p.strip() for p in trt.autotune_types(op).split(",")] == AUTOTUNE[op]


class _Types:
    """Stand-ins for tensorrt.plugin's classes, to build the chain plugins' signatures without TensorRT."""

    class TensorDesc: ...

    class Tensor: ...

    class KernelLaunchParams: ...

    class SymIntExprs: ...

    class AutoTuneCombination: ...

    all = {c.__name__: c for c in (TensorDesc, Tensor, KernelLaunchParams, SymIntExprs, AutoTuneCombination)}


@pytest.mark.parametrize("op", list(CHAIN_OPS))
def test_each_chain_plugin_takes_the_contract(op):
    """The chain plugins' functions are made from the contract: tensors then attributes, in its order, with its
    attribute types and TensorRT's tensor types; outputs as many as the contract has."""
    spec = CHAIN_OPS[op]
    t = _Types
    desc, aot_impl, impl, autotune = trt.chain_functions(op, t.all)
    base = [x.name for x in spec.inputs] + list(spec.attributes)
    sigs = {fn: inspect.signature(fn) for fn in (desc, aot_impl, impl, autotune)}
    assert list(sigs[desc].parameters) == base
    assert list(sigs[aot_impl].parameters) == [*base, "outputs", "tactic"]
    assert list(sigs[impl].parameters) == [*base, "outputs", "stream"]
    assert list(sigs[autotune].parameters) == [*base, "outputs"]
    n = len(spec.outputs)
    assert sigs[desc].return_annotation == (tuple[(t.TensorDesc,) * n] if n > 1 else t.TensorDesc)
    assert sigs[impl].parameters["outputs"].annotation == tuple[(t.Tensor,) * n]
    assert sigs[aot_impl].return_annotation == tuple[str | bytes, str | bytes, t.KernelLaunchParams, t.SymIntExprs]
    for sig, kind in ((sigs[desc], t.TensorDesc), (sigs[impl], t.Tensor)):
        assert [sig.parameters[x.name].annotation for x in spec.inputs] == [kind] * len(spec.inputs)
        assert [sig.parameters[a].annotation for a in spec.attributes] == list(spec.attributes.values())
    assert desc.__name__ == f"{spec.function}_register"


CHAIN_AUTOTUNE = {  # by hand: the chain's intermediates, A, D, biases and the SSM state float32
    "SSDChunkState": [ACT, ACT, "FP32", ACT, "FP32", "FP32", "FP32", "FP32"],
    "SSDStatePassing": ["FP32"] * 5,
    "SSDChunkScan": [ACT, ACT, ACT, "FP32", "FP32", "FP32", "FP32", ACT],
    "SelectiveChunkState": [ACT, ACT, "FP32", ACT, "FP32", "FP32", "FP32"],
    "SelectiveStatePassing": ["FP32"] * 6,
    "SelectiveChunkScan": [ACT, ACT, "FP32", ACT, ACT, "FP32", ACT, "FP32", "FP32", ACT],
}


@pytest.mark.parametrize("op", list(CHAIN_OPS))
def test_chain_autotune_types(op):
    assert [p.strip() for p in trt.autotune_types(op).split(",")] == CHAIN_AUTOTUNE[op]


def test_chain_register_gives_the_references_output_shapes(monkeypatch):
    """register's output descriptors, on concrete sizes (ints stand in for TensorRT's shape expressions), have the
    shapes and types of the reference's outputs for the same inputs: nchunks = cdiv(seqlen, chunk_size) where
    no input has it, a partial last chunk included."""
    import sys
    import types

    import torch
    from test_ops import selective_inputs, ssd_inputs

    from ssmrt.ops import chains
    from ssmrt.plugins.launch import cdiv

    class Desc:
        def __init__(self, t: torch.Tensor):
            self.shape_expr = tuple(t.shape)
            self.dtype = t.dtype

        def like(self):
            return (self.shape_expr, self.dtype)

    plugin = types.ModuleType("tensorrt.plugin")
    plugin.cdiv = cdiv
    plugin.from_shape_expr = lambda shape, dtype: (tuple(shape), dtype)
    tensorrt = types.ModuleType("tensorrt")
    tensorrt.plugin, tensorrt.float32 = plugin, torch.float32
    monkeypatch.setitem(sys.modules, "tensorrt", tensorrt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", plugin)

    Q = 16
    ssd = ssd_inputs(2, 37, 6, 5, 7, ngroups=3, dtype=torch.float16)
    sel = selective_inputs(2, 37, 12, 5, ngroups=3, dtype=torch.float16)
    dt_out, dA, S = chains.ssd_chunk_state_ref(ssd["x"], ssd["dt"], ssd["A"], ssd["B"], ssd["dt_bias"], True,
                                               (0.0, float("inf")), Q)
    H, present = chains.ssd_state_passing_ref(S, dA, ssd["ssm_state"], Q)
    y = chains.ssd_chunk_scan_ref(ssd["x"], ssd["B"], ssd["C"], ssd["D"], dt_out, dA, H, Q)
    sS, dsum = chains.selective_chunk_state_ref(sel["u"], sel["delta"], sel["A"], sel["B"], sel["delta_bias"], True, Q)
    sH, spresent = chains.selective_state_passing_ref(sS, dsum, sel["A"], sel["ssm_state"], Q)
    sy = chains.selective_chunk_scan_ref(sel["u"], sel["delta"], sel["A"], sel["B"], sel["C"], sel["D"], sel["z"],
                                         sel["delta_bias"], sH, True, Q)
    values = {**ssd, "dt_out": dt_out, "dA_cumsum": dA, "chunk_states": S, "entering_states": H}
    sel_values = {**sel, "chunk_states": sS, "delta_sum": dsum, "entering_states": sH}
    outputs = {"SSDChunkState": (dt_out, dA, S), "SSDStatePassing": (H, present), "SSDChunkScan": (y,),
               "SelectiveChunkState": (sS, dsum), "SelectiveStatePassing": (sH, spresent),
               "SelectiveChunkScan": (sy,)}
    for op, spec in CHAIN_OPS.items():
        v = values if op.startswith("SSD") else sel_values
        descs = [Desc(v[t.name]) for t in spec.inputs]
        got = trt.chain_outputs(op, descs, {"chunk_size": Q})
        want = [(tuple(o.shape), o.dtype) for o in outputs[op]]
        assert list(got) == want, op


@pytest.mark.triton
@pytest.mark.parametrize("op", list(CHAIN_OPS))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_chain_plugin_launches_what_the_wrapper_launches(op, dtype):
    """For one node, the plugin's compile-time constants (from its attributes and static dimensions) are those the
    kernel wrapper launches with, and its grid and int32 arguments, from the node's input shapes, those the
    wrapper's launch has: the plugin and the torch backend run the same kernel the same way."""
    import torch
    from test_ops import selective_inputs, ssd_inputs

    from ssmrt.kernels import selective_chunked, ssd_chunked
    from ssmrt.ops import chains
    from ssmrt.plugins.launch import KERNELS, use_launcher

    spec = CHAIN_OPS[op]
    Q = 16
    act = getattr(torch, dtype)
    if op.startswith("SSD"):
        kw = ssd_inputs(2, 37, 4, 24, 16, ngroups=2, D_per_channel=True, dt_limit=(0.01, 0.4), dtype=act)
        dt_out, dA, S = chains.ssd_chunk_state_ref(kw["x"], kw["dt"], kw["A"], kw["B"], kw["dt_bias"], True,
                                                   (0.01, 0.4), Q)
        H, _ = chains.ssd_state_passing_ref(S, dA, kw["ssm_state"], Q)
        values = {**kw, "dt_out": dt_out.float(), "dA_cumsum": dA.float(), "chunk_states": S.float(),
                  "entering_states": H.float()}
        attrs = {"chunk_size": Q, "dt_softplus": 1, "dt_min": 0.01, "dt_max": 0.4}
        module = ssd_chunked
    else:
        kw = selective_inputs(2, 37, 20, 7, ngroups=2, dtype=act)
        S, dsum = chains.selective_chunk_state_ref(kw["u"], kw["delta"], kw["A"], kw["B"], kw["delta_bias"], True,
                                                   Q)
        H, _ = chains.selective_state_passing_ref(S, dsum, kw["A"], kw["ssm_state"], Q)
        values = {**kw, "chunk_states": S.float(), "delta_sum": dsum.float(), "entering_states": H.float()}
        attrs = {"chunk_size": Q, "delta_softplus": 1}
        module = selective_chunked
    attrs = {a: attrs[a] for a in spec.attributes}
    seen = []
    with use_launcher(lambda name, tensors, meta: seen.append((name, {n: tuple(t.shape) for n, t in tensors.items()},
                                                               dict(meta)))):
        args = [values[p] if p in values else (attrs["dt_min"], attrs["dt_max"]) if p == "dt_limit"
                else attrs[p] for p in spec.params]
        getattr(module, spec.function)(*args)
    ((kernel, shapes, meta),) = seen
    assert kernel == spec.function
    dims = {}
    for t in spec.inputs:
        for axis, name in enumerate(t.shape):
            dims.setdefault(name, values[t.name].shape[axis])
    plugin_meta = trt.chain_constexprs(op, dims.__getitem__, attrs, dtype, values["D"].dim() if "D" in values else 1)
    assert plugin_meta == meta
    k = KERNELS[kernel]
    by_param = {p.name: tuple(values[t.name].shape) for p, t in zip(k.inputs, spec.inputs, strict=True)}
    plugin_sizes = k.resolve(by_param)
    wrapper_sizes = k.resolve(shapes)
    assert [plugin_sizes[n] for n in k.scalars] == [wrapper_sizes[n] for n in k.scalars]
    assert k.grid(plugin_sizes, plugin_meta) == k.grid(wrapper_sizes, meta)


def test_annotations_resolve_to_the_plugin_types():
    class TensorDesc: ...

    class Tensor: ...

    class KernelLaunchParams: ...

    class SymIntExprs: ...

    class AutoTuneCombination: ...

    types = {c.__name__: c for c in (TensorDesc, Tensor, KernelLaunchParams, SymIntExprs, AutoTuneCombination)}
    fn = trt._resolved(trt.ssd_aot_impl, types)
    sig = inspect.signature(fn)
    assert sig.parameters["x"].annotation is TensorDesc and sig.parameters["dt_min"].annotation is float
    assert sig.parameters["outputs"].annotation == tuple[TensorDesc, TensorDesc]
    assert sig.return_annotation == tuple[str | bytes, str | bytes, KernelLaunchParams, SymIntExprs]
    assert inspect.signature(trt.ssd_aot_impl).parameters["x"].annotation == "TensorDesc"  # the original is intact
    impl = trt._resolved(trt.conv_impl, types)
    assert inspect.signature(impl).parameters["stream"].annotation is int


def test_register_refuses_without_tensorrt(monkeypatch):
    monkeypatch.setattr(trt, "_registered", False)
    monkeypatch.setattr(trt, "tensorrt_version", lambda: None)
    with pytest.raises(SsmrtError, match=r"TensorRT is not installed \(pip install tensorrt\); the plugins need "
                                         r"TensorRT >= 10.9"):
        trt.register()
    monkeypatch.setattr(trt, "tensorrt_version", lambda: (10, 3))
    with pytest.raises(SsmrtError, match="TensorRT 10.3 has no tensorrt.plugin AOT support.*--plugins none"):
        trt.register()

    def broken():
        raise OSError("libnvinfer.so.11: cannot open shared object file")

    monkeypatch.setattr(trt, "tensorrt_version", broken)
    with pytest.raises(SsmrtError, match="TensorRT is installed but cannot be loaded \\(libnvinfer"):
        trt.register()


AOT_SCRIPT = r"""
import json, sys, types

# Stand-ins for tensorrt.plugin's launch types (this is not TensorRT: it records what aot_impl builds).
class Sym:
    def __init__(self, text): self.text = text
    def _op(self, o, s): return Sym(f"({self.text} {s} {o.text if isinstance(o, Sym) else o})")
    def __add__(self, o): return self._op(o, "+")
    def __sub__(self, o): return self._op(o, "-")
    def __mul__(self, o): return self._op(o, "*")
    def __floordiv__(self, o): return self._op(o, "//")
class KernelLaunchParams:
    def __init__(self, **kw): self.kw = kw
class SymIntExprs(list):
    def __init__(self, n): super().__init__([None] * n)
plugin = types.ModuleType("tensorrt.plugin")
plugin.KernelLaunchParams, plugin.SymIntExprs = KernelLaunchParams, SymIntExprs
trt_module = types.ModuleType("tensorrt"); trt_module.plugin = plugin
sys.modules.update({"tensorrt": trt_module, "tensorrt.plugin": plugin})

from ssmrt.ops.spec import ALL_OPS, CHAIN_OPS
from ssmrt.plugins import trt
trt._build_sm = lambda: 90

class DType:
    def __init__(self, name): self.name = name
class Desc:
    def __init__(self, name, shape, dtype="HALF"):
        self.shape = shape
        self.shape_expr = [Sym(f"{name}[{i}]") for i in range(len(shape))]
        self.dtype = DType(dtype)

shapes = {
    "CausalConv1d": {"x": (-1, -1, 1792), "weight": (1792, 4), "bias": (1792,), "conv_state": (-1, 1792, 3)},
    "SelectiveScan": {"u": (-1, -1, 1536), "delta": (-1, -1, 1536), "A": (1536, 16), "B": (-1, -1, 1, 16),
                      "C": (-1, -1, 1, 16), "D": (1536,), "z": (-1, -1, 1536), "delta_bias": (1536,),
                      "ssm_state": (-1, 1536, 16)},
    "SSDScan": {"x": (-1, -1, 24, 64), "dt": (-1, -1, 24), "A": (24,), "B": (-1, -1, 1, 128), "C": (-1, -1, 1, 128),
                "D": (24,), "dt_bias": (24,), "ssm_state": (-1, 24, 64, 128)},
}
ssd_chain = {"x": (-1, -1, 24, 64), "dt": (-1, -1, 24), "A": (24,), "B": (-1, -1, 1, 128), "C": (-1, -1, 1, 128),
             "D": (24,), "dt_bias": (24,), "ssm_state": (-1, 24, 64, 128), "dt_out": (-1, 24, -1, 256),
             "dA_cumsum": (-1, 24, -1, 256), "chunk_states": (-1, -1, 24, 64, 128),
             "entering_states": (-1, -1, 24, 64, 128)}
sel_chain = {**shapes["SelectiveScan"], "chunk_states": (-1, -1, 1536, 16), "delta_sum": (-1, -1, 1536),
             "entering_states": (-1, -1, 1536, 16)}
for op in CHAIN_OPS:
    shapes[op] = ssd_chain if op.startswith("SSD") else sel_chain
attrs = {"CausalConv1d": ["silu\0"], "SelectiveScan": [1], "SSDScan": [256, 1, 0.0, float("inf")],
         "SSDChunkState": [256, 1, 0.0, float("inf")], "SSDStatePassing": [256], "SSDChunkScan": [256],
         "SelectiveChunkState": [256, 1], "SelectiveStatePassing": [256], "SelectiveChunkScan": [256, 1]}
types = {"TensorDesc": object, "Tensor": object, "KernelLaunchParams": KernelLaunchParams,
         "SymIntExprs": SymIntExprs, "AutoTuneCombination": object}
aots = {op: fns[1] for op, fns in trt.PLUGINS.items()}
aots |= {op: trt.chain_functions(op, types)[1] for op in CHAIN_OPS}
out = {}
for op, aot_impl in aots.items():
    spec = ALL_OPS[op]
    descs = [Desc(t.name, shapes[op][t.name], "FLOAT" if t.fp32 else "HALF") for t in spec.inputs]
    entry, ptx, params, extra = aot_impl(*descs, *attrs[op], outputs=(None,) * len(spec.outputs), tactic=0)
    out[op] = {"entry": entry, "ptx_target": ".target sm_90" in ptx, "ptx_entry": f".entry {entry}(" in ptx,
               "grid": [g.text if isinstance(g, Sym) else g for g in
                        (params.kw["grid_x"], params.kw["grid_y"], params.kw["grid_z"])],
               "block": params.kw["block_x"], "shared": params.kw["shared_mem"],
               "extra": [e.text for e in extra]}
print(json.dumps(out))
"""


@pytest.mark.triton
def test_aot_impl_returns_the_kernel_and_its_launch():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps(got, indent=1))
    for op, r in got.items():
        assert r["ptx_target"] and r["ptx_entry"] and r["block"] % 32 == 0, op
    assert got["SSDScan"]["entry"] == "_ssd_scan_kernel"
    # the int32 arguments: seqlen, nheads, headdim, dstate, ngroups from the input shapes
    assert got["SSDScan"]["extra"] == ["x[1]", "x[2]", "x[3]", "B[3]", "B[2]"]
    assert got["SSDScan"]["grid"] == ["(((x[3] + 16) - 1) // 16)", "(x[0] * x[2])", 1]
    assert got["SelectiveScan"]["extra"] == ["u[1]", "u[2]", "B[3]", "B[2]"]
    assert got["CausalConv1d"]["extra"] == ["x[1]", "x[2]", "weight[1]"]
    assert got["CausalConv1d"]["grid"] == ["(((x[2] + 64) - 1) // 64)", "(((x[1] + 32) - 1) // 32)", "x[0]"]
    # the chain kernels: the Mamba-2 chain reads its sizes from x and B, the passing from the states
    assert got["SSDChunkState"]["entry"] == "_ssd_chunk_state_kernel"
    assert got["SSDChunkState"]["extra"] == got["SSDChunkScan"]["extra"] == ["x[1]", "x[2]", "x[3]", "B[3]", "B[2]"]
    assert got["SSDChunkState"]["grid"] == ["((((x[3] + 64) - 1) // 64) * (((B[3] + 64) - 1) // 64))",
                                            "((x[0] * (((x[1] + 256) - 1) // 256)) * x[2])", 1]
    assert got["SSDStatePassing"]["extra"] == ["chunk_states[1]", "ssm_state[1]", "ssm_state[2]", "ssm_state[3]"]
    assert got["SSDStatePassing"]["grid"] == ["((((ssm_state[2] * ssm_state[3]) + 1024) - 1) // 1024)",
                                              "(ssm_state[0] * ssm_state[1])", 1]
    assert got["SelectiveChunkScan"]["extra"] == ["u[1]", "u[2]", "B[3]", "B[2]"]
    assert got["SelectiveStatePassing"]["extra"] == ["chunk_states[1]", "ssm_state[1]", "ssm_state[2]"]
    assert len(got) == 9


def test_a_low_precision_state_is_refused_in_one_line():
    class Desc:
        class dtype:  # noqa: N801
            name = "HALF"

    with pytest.raises(SsmrtError, match="ssmrt::SSDScan: the plugin's SSM state must be float32, got HALF"):
        trt._float32_state(Desc(), "SSDScan")


NVIDIA_CHECKS = r"""
import sys
sys.path.insert(0, sys.argv[1])
import trt_stub
trtp = trt_stub.install()
from ssmrt.ops.spec import ALL_OPS
from ssmrt.plugins import trt
trt.register()
trt.register()  # idempotent
for op in ALL_OPS:
    d = getattr(trtp.op.ssmrt, op)
    assert d.aot_impl_func is not None and d.impl_func is not None and d.autotune_func is not None, op
# the checks are live: a schema tensorrt.plugin must refuse is refused
import inspect
bad = trt._resolved(trt.ssd_aot_impl, {"TensorDesc": trtp.TensorDesc, "KernelLaunchParams": trtp.KernelLaunchParams,
                                        "SymIntExprs": trtp.SymIntExprs})
refused = []
def drop_tactic(*a, **k): pass
drop_tactic.__signature__ = inspect.signature(bad).replace(
    parameters=[p for p in inspect.signature(bad).parameters.values() if p.name != "tactic"])
for fn in (drop_tactic,):
    try:
        trtp.aot_impl("ssmrt::SSDScan")(fn)
    except Exception as e:
        refused.append(type(e).__name__)
print("ok", refused)
"""


def test_the_registrations_pass_nvidias_own_checks():
    """NVIDIA's tensorrt.plugin sources (the tensorrt-cu13-bindings wheel) run their decoration-time checks on
    ssmrt's registrations, over a stand-in for TensorRT's native module (tests/trt_stub.py says what that
    proves: the schemas, not TensorRT); and the same checks refuse a schema without `tactic`."""
    import importlib.util

    if importlib.util.find_spec("tensorrt_bindings") is None:
        pytest.skip("tensorrt-cu13-bindings (NVIDIA's tensorrt.plugin sources) is not installed")
    here = os.path.dirname(__file__)
    res = subprocess.run([sys.executable, "-c", NVIDIA_CHECKS, here], capture_output=True, text=True, timeout=300)
    print(res.stdout, res.stderr[-3000:])
    assert res.returncode == 0
    assert res.stdout.strip().splitlines()[-1] == "ok ['ValueError']"


COMBINATIONS_SCRIPT = r"""
import json
from itertools import product
import torch
from ssmrt.kernels import causal_conv1d, selective_chunked, selective_scan, ssd_chunked, ssd_scan
from ssmrt.ops.spec import NO_DT_LIMIT
from ssmrt.plugins.launch import KERNELS
from ssmrt.plugins.launcher import launch_spec

# Every specialisation the plugins can build from an exported node: the exporter supplies every input, so only
# the attributes and the D layout vary (and the activation type).
cases = []
for act in ("fp32", "fp16", "bf16"):
    for d_hdim, soft, clamp in product([False, True], repeat=3):
        cases.append(("ssd_scan", act, ssd_scan.constexprs(64, 128, D_has_hdim=d_hdim, dt_softplus=soft,
                                                           dt_limit=(0.0, 0.1) if clamp else NO_DT_LIMIT)))
    for soft in (False, True):
        cases.append(("selective_scan", act, selective_scan.constexprs(1536, 16, delta_softplus=soft)))
    for activation in ("silu", "none"):
        cases.append(("causal_conv1d", act, causal_conv1d.constexprs(1792, 4, activation=activation)))
    # the chains (a TensorRT export's prefill graph), at the chunk every Mamba-2 model uses
    torch_act = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[act]
    for soft, clamp in product([False, True], repeat=2):
        meta = ssd_chunked.constexprs(64, 128, torch_act, 256, dt_softplus=soft,
                                      dt_limit=(0.0, 0.1) if clamp else NO_DT_LIMIT)
        cases.append(("ssd_chunk_state", act, meta["ssd_chunk_state"]))
    for d_hdim in (False, True):
        cases.append(("ssd_chunk_scan", act, ssd_chunked.constexprs(64, 128, torch_act, 256,
                                                                    D_has_hdim=d_hdim)["ssd_chunk_scan"]))
    for soft in (False, True):
        meta = selective_chunked.constexprs(1536, 16, delta_softplus=soft)
        cases += [("selective_chunk_state", act, meta["selective_chunk_state"]),
                  ("selective_chunk_scan", act, meta["selective_chunk_scan"])]
cases.append(("ssd_state_passing", "fp32", ssd_chunked.constexprs(64, 128, torch.float32, 256)["ssd_state_passing"]))
cases.append(("selective_state_passing", "fp32", selective_chunked.constexprs(1536, 16)["selective_state_passing"]))
bad = []
for i, (kernel, act, meta) in enumerate(cases):
    sm = (90, 80, 87)[i % 3]  # every target over the cases (a kernel's parameters do not depend on it)
    s = launch_spec(kernel, sm, act, "fp32", meta)  # refuses a kernel that uses scratch memory
    entry = s.ptx[s.ptx.index(".entry"):s.ptx.index(")", s.ptx.index(".entry"))]
    kinds = ["u64" if ".u64" in line else "u32" for line in entry.splitlines() if ".param" in line]
    k = KERNELS[kernel]
    if kinds != ["u64"] * len(k.inputs) + ["u32"] * len(k.scalars) + ["u64"] * len(k.outputs):
        bad.append([kernel, act, str(meta), kinds])
print(json.dumps({"cases": len(cases), "bad": bad}))
"""


@pytest.mark.slow
@pytest.mark.triton
def test_every_plugin_specialisation_compiles_with_tensorrts_parameters():
    """Each attribute combination an exported node can carry (the one-node ops' and the chains'), in each
    activation type, compiles with TensorRT's parameters (input pointers, int32 scalars, output pointers) and no
    scratch memory, for sm_90, sm_80 and sm_87 in turn."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", COMBINATIONS_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"cases": 36 + 3 * (4 + 2 + 2 * 2) + 2, "bad": []}
