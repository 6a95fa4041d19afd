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
from ssmrt.ops.spec import OPS
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

from ssmrt.ops.spec import OPS
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
attrs = {"CausalConv1d": ["silu\0"], "SelectiveScan": [1], "SSDScan": [256, 1, 0.0, float("inf")]}
out = {}
for op, (_, aot_impl, _, _) in trt.PLUGINS.items():
    spec = OPS[op]
    descs = [Desc(t.name, shapes[op][t.name], "FLOAT" if t.fp32 else "HALF") for t in spec.inputs]
    entry, ptx, params, extra = aot_impl(*descs, *attrs[op], outputs=(None, None), tactic=0)
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
    assert got["CausalConv1d"]["grid"] == ["(((x[2] + 128) - 1) // 128)", "x[0]", 1]


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
from ssmrt.ops.spec import OPS
from ssmrt.plugins import trt
trt.register()
trt.register()  # idempotent
for op in OPS:
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
from ssmrt.kernels import causal_conv1d, selective_scan, ssd_scan
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
bad = []
for kernel, act, meta in cases:
    s = launch_spec(kernel, 90, act, "fp32", meta)  # refuses a kernel that uses scratch memory
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
    """Each attribute combination an exported node can carry, in each activation type, compiles for sm_90 with
    TensorRT's parameters (input pointers, int32 scalars, output pointers) and no scratch memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", COMBINATIONS_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"cases": 36, "bad": []}
