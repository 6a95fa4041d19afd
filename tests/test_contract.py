"""One contract per op: every place that restates an ssmrt op (its Python implementations, the exporter's nodes,
the fallback bodies, the kernels' AOT signatures, the native ONNX Runtime ops) agrees with ssmrt/ops/spec.py.

A new place that restates an op (the TensorRT plugins' registrations) adds its check here."""

from __future__ import annotations

import ctypes
import inspect

import onnx
import pytest

from ssmrt.ops import dispatch
from ssmrt.ops.spec import DOMAIN, OPS, OPSET_VERSION, OpSpec

SPECS = list(OPS.values())
ATTR_TYPES = {int: onnx.AttributeProto.INT, float: onnx.AttributeProto.FLOAT, str: onnx.AttributeProto.STRING}
PLUGIN_ATTRS = {"plugin_namespace", "plugin_version"}


def params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def by_id(spec: OpSpec) -> str:
    return spec.name


@pytest.mark.parametrize("spec", SPECS, ids=by_id)
def test_the_python_parameters_are_the_inputs_and_attributes(spec):
    inputs = [t.name for t in spec.inputs]
    attrs = {spec.attribute_params.get(a, a) for a in spec.attributes}
    assert set(spec.params) == set(inputs) | attrs and len(spec.params) == len(set(spec.params))
    # the inputs keep the spec's order among the parameters
    assert [p for p in spec.params if p in inputs] == inputs
    assert set(spec.attribute_params) <= set(spec.attributes)


@pytest.mark.parametrize("spec", SPECS, ids=by_id)
def test_references_and_dispatch_take_the_contract(spec):
    import ssmrt.ops as ops

    ref = getattr(ops, f"{spec.function}_ref")
    assert params(ref) == list(spec.params)
    assert params(getattr(dispatch, spec.function)) == list(spec.params)
    assert dispatch.REFERENCES[spec.function] is ref


@pytest.mark.parametrize("spec", SPECS, ids=by_id)
def test_the_kernel_wrappers_and_routes_take_the_contract(spec):
    pytest.importorskip("triton")
    import importlib

    from ssmrt.kernels.dispatch import _routes

    module = importlib.import_module(f"ssmrt.kernels.{spec.function}")
    wrappers = [getattr(module, name) for name in dir(module)
                if name.startswith(spec.function) and callable(getattr(module, name)) and not name.endswith("kernel")]
    if spec.function != "causal_conv1d":
        chained = importlib.import_module(f"ssmrt.kernels.{spec.function.split('_')[0]}_chunked")
        wrappers.append(getattr(chained, f"{spec.function}_chunked"))
    assert wrappers
    for fn in wrappers:
        got = params(fn)
        assert got[: len(spec.params)] == list(spec.params), fn.__name__
        assert set(got[len(spec.params):]) <= {"out", "state_out", "chunk"}, fn.__name__
    assert params(_routes(False, False)[spec.function]) == list(spec.params)


@pytest.mark.parametrize("spec", SPECS, ids=by_id)
def test_the_exporters_emitters_take_the_contract(spec):
    from ssmrt.exporter.torch_to_onnx import _SymbolicOps

    assert params(getattr(_SymbolicOps, spec.function)) == list(spec.params)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Both families exported: the nodes and functions the exporter really writes."""
    import torch

    from ssmrt.exporter import export_model
    from ssmrt.models import MambaLM, SSMConfig

    protos = {}
    for arch in ("mamba1", "mamba2"):
        cfg = SSMConfig(arch=arch, d_model=32, n_layer=1, vocab_size=64, d_state=8, headdim=16, ngroups=1,
                        chunk_size=4)
        torch.manual_seed(0)
        art = export_model(MambaLM(cfg).eval(), tmp_path_factory.mktemp(arch) / "art")
        protos[arch] = onnx.load(str(art / "model.onnx"))
    return protos


def test_the_exported_nodes_follow_the_contract(exported):
    seen = set()
    for model in exported.values():
        assert any(o.domain == DOMAIN and o.version == OPSET_VERSION for o in model.opset_import)
        for node in (n for n in model.graph.node if n.domain == DOMAIN):
            spec = OPS[node.op_type]
            seen.add(node.op_type)
            assert len(node.input) == len(spec.inputs) and all(node.input), node.name  # every input supplied
            assert len(node.output) == len(spec.outputs), node.name
            attrs = {a.name: a for a in node.attribute}
            assert set(attrs) == set(spec.attributes) | PLUGIN_ATTRS, node.name
            for name, kind in spec.attributes.items():
                assert attrs[name].type == ATTR_TYPES[kind], (node.name, name)
            assert attrs["plugin_namespace"].s.decode() == DOMAIN
            assert attrs["plugin_version"].s.decode() == str(OPSET_VERSION)
    assert seen == set(OPS)


def test_the_fallback_bodies_follow_the_contract(exported):
    from ssmrt.exporter.functions import all_functions

    unspecialised = {f.name: f for f in all_functions(21, None)}
    for functions in (unspecialised, *({f.name: f for f in m.functions} for m in exported.values())):
        for name, fn in functions.items():
            spec = OPS[name]
            assert fn.domain == DOMAIN
            assert list(fn.input) == [t.name for t in spec.inputs], name
            assert len(fn.output) == len(spec.outputs), name
            assert set(fn.attribute) | {a.name for a in fn.attribute_proto} == set(spec.attributes) | PLUGIN_ATTRS
    assert set(unspecialised) == set(OPS)


@pytest.mark.parametrize("spec", SPECS, ids=by_id)
@pytest.mark.parametrize("act", ["fp16", "bf16", "fp32"])
def test_the_aot_signatures_follow_the_contract(spec, act):
    """The one-launch kernel of each op takes, as TensorRT's AOT runtime passes them, a pointer per input in the
    spec's order, then int32 dimensions, then a pointer per output: float32 exactly where the spec keeps a
    tensor float32, the activations' type elsewhere."""
    pytest.importorskip("triton")
    from ssmrt.kernels.aot import _table
    from ssmrt.plugins.launch import KERNELS

    fn, signature, _ = _table(act)[spec.function]
    kinds = list(signature.values())
    n_in, n_out = len(spec.inputs), len(spec.outputs)
    assert all(v.startswith("*") for v in kinds[:n_in] + kinds[len(kinds) - n_out:])
    assert all(v == "i32" for v in kinds[n_in: len(kinds) - n_out])
    for kind, t in zip(kinds[:n_in] + kinds[len(kinds) - n_out:], [*spec.inputs, *spec.outputs], strict=True):
        assert kind == ("*fp32" if t.fp32 else f"*{act}"), (spec.name, t.name)
    assert list(signature) == params(fn)[: len(signature)] == KERNELS[spec.function].parameters


def test_the_native_ops_register_the_contract():
    """What ONNX Runtime is told about each op (asked through the library's own registration structs)."""
    from ssmrt import ort_ops

    try:
        path = ort_ops.library_path()
    except ort_ops.NativeOpsUnavailable as e:
        pytest.skip(f"the native ops cannot be built here: {e}")
    lib = ctypes.CDLL(str(path))
    lib.SsmrtOpTable.restype = ctypes.c_char_p
    got = [entry.split() for entry in lib.SsmrtOpTable().decode().strip(";").split(";")]
    # each op twice: float32 activations, then float16 ones with the contract's float32 tensors kept float32
    want = [[name, str(len(OPS[name].inputs)), str(len(OPS[name].outputs)),
             "".join("1" if t.optional else "0" for t in OPS[name].inputs),
             "".join("f" if t.fp32 else act for t in OPS[name].inputs),
             "".join("f" if t.fp32 else act for t in OPS[name].outputs)]
            for act in ("f", "h") for name in ort_ops.OPS]
    assert got == want
    assert "kSoftplusThreshold" in ort_ops.contract_header()
