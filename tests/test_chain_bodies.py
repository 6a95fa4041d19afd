"""The chain ops' fallback bodies (ssmrt.exporter.functions, CHAIN_OPS): each alone in a one-node model on stock ONNX
Runtime against its float64 reference (ssmrt.ops.chains), and each chain's three nodes together against the
one-node op's reference."""

from __future__ import annotations

import math
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from test_ops import selective_inputs, ssd_inputs, to64

from ssmrt.closeness import assert_close
from ssmrt.exporter.functions import PLUGIN_ATTRS, Static, all_functions
from ssmrt.ops import chains, selective_scan_ref, ssd_scan_ref
from ssmrt.ops.spec import CHAIN_OPS, CHAINS, DOMAIN, OPS, SELECTIVE_SCAN, SSD_SCAN

OPSET = 21
ONNX_TYPE = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16}
DYNAMIC = {"batch", "seqlen", "nchunks"}  # the dimensions an export does not know
NO_LIMIT, LIMIT = (0.0, math.inf), (0.05, 0.5)


def known(spec, inputs: dict, attrs: dict) -> Static:
    """What an export knows of a node over `inputs` (torch tensors): each shape but the dimensions the spec names
    batch, seqlen or nchunks; the dtypes; the attributes."""
    spec_shapes = {t.name: t.shape for t in spec.inputs}

    def shape(t, tensor):
        names = spec_shapes[t]
        return tuple(None if i < len(names) and names[i] in DYNAMIC else d for i, d in enumerate(tensor.shape))

    return Static(shapes={k: shape(k, v) for k, v in inputs.items()},
                  dtypes={k: str(v.dtype).removeprefix("torch.") for k, v in inputs.items()}, attrs=dict(attrs))


def output_dtype(spec, out, inputs: dict) -> torch.dtype:
    """An output's type: float32 for an intermediate, the state input's for a present_ state, else the first
    input's (the activations')."""
    if out.name.startswith("present_"):
        return inputs[out.name.removeprefix("present_")].dtype
    return torch.float32 if out.fp32 else inputs[spec.inputs[0].name].dtype


def node_attrs(attrs: dict) -> dict:
    return {**attrs, "plugin_namespace": "ssmrt", "plugin_version": "1"}


def run_model(nodes, inputs: dict, outputs: dict, functions) -> dict:
    """A model of `nodes` over `inputs` (torch tensors) with `outputs` (name -> (dtype, rank)), run on ONNX Runtime's
    CPU."""
    vis = [helper.make_tensor_value_info(k, ONNX_TYPE[v.dtype], [f"{k}_{i}" for i in range(v.dim())])
           for k, v in inputs.items()]
    outs = [helper.make_tensor_value_info(k, ONNX_TYPE[dtype], [f"{k}_{i}" for i in range(rank)])
            for k, (dtype, rank) in outputs.items()]
    graph = helper.make_graph(nodes, "g", vis, outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
                              functions=functions)
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    res = sess.run(list(outputs), {k: v.numpy() for k, v in inputs.items()})
    return {k: torch.from_numpy(np.asarray(r)) for k, r in zip(outputs, res, strict=True)}


def run_node(spec, inputs: dict, attrs: dict, specialised: bool) -> dict:
    """One `spec` node over `inputs`, its body specialised to what an export knows or generic (Static())."""
    outputs = {o.name: (output_dtype(spec, o, inputs), len(o.shape)) for o in spec.outputs}
    node = helper.make_node(spec.name, [t.name for t in spec.inputs], list(outputs), domain=DOMAIN,
                            **node_attrs(attrs))
    static = {spec.name: known(spec, inputs, attrs) if specialised else Static()}
    got = run_model([node], inputs, outputs, all_functions(OPSET, static, ops=[spec.name]))
    for name, (dtype, _) in outputs.items():
        assert got[name].dtype == dtype, (spec.name, name)
    return got


def reference(spec, inputs: dict, attrs: dict) -> dict:
    """The node's reference (ssmrt.ops.chains) in float64 on the same inputs, by output name."""
    kw = {**to64(inputs), **{k: v for k, v in attrs.items() if k not in spec.attribute_params}}
    if "dt_limit" in spec.params:
        kw["dt_limit"] = (attrs["dt_min"], attrs["dt_max"])
    for flag in ("dt_softplus", "delta_softplus"):
        if flag in kw:
            kw[flag] = bool(kw[flag])
    got = getattr(chains, f"{spec.function}_ref")(**{p: kw[p] for p in spec.params})
    got = got if isinstance(got, tuple) else (got,)
    return {o.name: g for o, g in zip(spec.outputs, got, strict=True)}


def check_node(spec, inputs: dict, attrs: dict, specialised: bool, dtype: torch.dtype) -> None:
    got, want = run_node(spec, inputs, attrs, specialised), reference(spec, inputs, attrs)
    for name in want:
        assert_close(got[name], want[name], dtype=dtype, name=f"{spec.name} {name}")


def f32(t: torch.Tensor) -> torch.Tensor:
    """An intermediate as the next node is given it: float32."""
    return t.float()


# ---------------------------------------------------------------------------------------------------- SSD

# (seqlen, chunk): one token, inside one chunk, whole chunks, several with a partial last one
SSD_LENGTHS = [(1, 16), (7, 16), (32, 16), (45, 16)]
DTYPES = [torch.float32, torch.float16]
SSD_DT = [(1, NO_LIMIT), (1, LIMIT), (0, LIMIT), (0, NO_LIMIT)]  # (dt_softplus, dt_limit)


def ssd_kw(seqlen, chunk, dtype, D_per_channel=False, dt_softplus=1, dt_limit=NO_LIMIT, ngroups=3, batch=2):
    kw = ssd_inputs(batch, seqlen, 6, 5, 7, ngroups=ngroups, D_per_channel=D_per_channel, dt_limit=dt_limit,
                    dtype=dtype, chunk_size=chunk)
    if not dt_softplus:  # dt as a model without softplus gives it: >= 0
        kw["dt"], kw["dt_bias"] = (0.2 * kw["dt"].abs()).to(dtype), kw["dt_bias"].abs()
    kw["dt_softplus"] = bool(dt_softplus)
    return kw


def ssd_chain_nodes(kw):
    """Each SSD chain node's inputs, the intermediates from the float64 references of the nodes before it."""
    k64 = to64(kw)
    dt_out, dA_cumsum, states = chains.ssd_chunk_state_ref(
        k64["x"], k64["dt"], k64["A"], k64["B"], k64["dt_bias"], kw["dt_softplus"], kw["dt_limit"], kw["chunk_size"])
    entering, _ = chains.ssd_state_passing_ref(states, dA_cumsum, k64["ssm_state"], kw["chunk_size"])
    pick = lambda *names: {n: kw[n] for n in names}  # noqa: E731
    return (pick("x", "dt", "A", "B", "dt_bias"),
            {"chunk_states": f32(states), "dA_cumsum": f32(dA_cumsum), "ssm_state": kw["ssm_state"]},
            {**pick("x", "B", "C", "D"), "dt_out": f32(dt_out), "dA_cumsum": f32(dA_cumsum),
             "entering_states": f32(entering)})


def ssd_attrs(kw, op):
    attrs = {"chunk_size": kw["chunk_size"], "dt_softplus": int(kw["dt_softplus"]), "dt_min": kw["dt_limit"][0],
             "dt_max": kw["dt_limit"][1]}
    return {k: attrs[k] for k in CHAIN_OPS[op].attributes}


@pytest.mark.parametrize("seqlen,chunk", SSD_LENGTHS)
@pytest.mark.parametrize("dt_softplus,dt_limit", SSD_DT)
@pytest.mark.parametrize("ngroups", [3, 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("specialised", [True, False])
def test_ssd_chunk_state_body(seqlen, chunk, dt_softplus, dt_limit, ngroups, dtype, specialised):
    kw = ssd_kw(seqlen, chunk, dtype, dt_softplus=dt_softplus, dt_limit=dt_limit, ngroups=ngroups)
    check_node(CHAIN_OPS["SSDChunkState"], ssd_chain_nodes(kw)[0], ssd_attrs(kw, "SSDChunkState"), specialised, dtype)


@pytest.mark.parametrize("seqlen,chunk", SSD_LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("specialised", [True, False])
def test_ssd_state_passing_body(seqlen, chunk, dtype, specialised):
    kw = ssd_kw(seqlen, chunk, dtype, dt_limit=LIMIT)
    check_node(CHAIN_OPS["SSDStatePassing"], ssd_chain_nodes(kw)[1], ssd_attrs(kw, "SSDStatePassing"), specialised,
               dtype)


@pytest.mark.parametrize("seqlen,chunk", SSD_LENGTHS)
@pytest.mark.parametrize("D_per_channel,ngroups", [(False, 3), (True, 3), (True, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("specialised", [True, False])
def test_ssd_chunk_scan_body(seqlen, chunk, D_per_channel, ngroups, dtype, specialised):
    kw = ssd_kw(seqlen, chunk, dtype, D_per_channel=D_per_channel, ngroups=ngroups)
    check_node(CHAIN_OPS["SSDChunkScan"], ssd_chain_nodes(kw)[2], ssd_attrs(kw, "SSDChunkScan"), specialised, dtype)


@pytest.mark.parametrize("specialised", [True, False])
def test_ssd_state_passing_keeps_a_float16_state(specialised):
    """present_ssm_state takes the type of ssm_state; entering_states stays float32."""
    kw = ssd_kw(45, 16, torch.float32)
    inputs = ssd_chain_nodes(kw)[1]
    inputs["ssm_state"] = inputs["ssm_state"].half()
    got = run_node(CHAIN_OPS["SSDStatePassing"], inputs, {"chunk_size": 16}, specialised)
    assert got["present_ssm_state"].dtype == torch.float16 and got["entering_states"].dtype == torch.float32
    want = reference(CHAIN_OPS["SSDStatePassing"], inputs, {"chunk_size": 16})
    for name in want:
        assert_close(got[name], want[name], dtype=torch.float16, name=name)


# ---------------------------------------------------------------------------------------------- selective

# (seqlen, chunk): one token, inside one chunk, whole chunks, several with a partial last one; and a chunk of two
# unrolled blocks (SCAN_CHUNK = 16 positions each)
SEL_LENGTHS = [(1, 8), (5, 8), (16, 8), (45, 8), (70, 32)]
SEL_VARIANTS = [(1, 3), (0, 3), (1, 1)]  # (delta_softplus, ngroups)


def sel_kw(seqlen, dtype, delta_softplus=1, ngroups=3, batch=2):
    kw = selective_inputs(batch, seqlen, 12, 5, ngroups=ngroups, dtype=dtype)
    if not delta_softplus:  # delta as a model without softplus gives it: >= 0
        kw["delta"], kw["delta_bias"] = (0.2 * kw["delta"].abs()).to(dtype), kw["delta_bias"].abs()
    kw["delta_softplus"] = bool(delta_softplus)
    return kw


def sel_chain_nodes(kw, chunk):
    k64 = to64(kw)
    states, delta_sum = chains.selective_chunk_state_ref(k64["u"], k64["delta"], k64["A"], k64["B"],
                                                         k64["delta_bias"], kw["delta_softplus"], chunk)
    entering, _ = chains.selective_state_passing_ref(states, delta_sum, k64["A"], k64["ssm_state"], chunk)
    pick = lambda *names: {n: kw[n] for n in names}  # noqa: E731
    return (pick("u", "delta", "A", "B", "delta_bias"),
            {"chunk_states": f32(states), "delta_sum": f32(delta_sum), **pick("A", "ssm_state")},
            {**pick("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), "entering_states": f32(entering)})


def sel_attrs(kw, chunk, op):
    attrs = {"chunk_size": chunk, "delta_softplus": int(kw["delta_softplus"])}
    return {k: attrs[k] for k in CHAIN_OPS[op].attributes}


@pytest.mark.parametrize("seqlen,chunk", SEL_LENGTHS)
@pytest.mark.parametrize("delta_softplus,ngroups", SEL_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("specialised", [True, False])
def test_selective_chunk_state_body(seqlen, chunk, delta_softplus, ngroups, dtype, specialised):
    kw = sel_kw(seqlen, dtype, delta_softplus, ngroups)
    check_node(CHAIN_OPS["SelectiveChunkState"], sel_chain_nodes(kw, chunk)[0],
               sel_attrs(kw, chunk, "SelectiveChunkState"), specialised, dtype)


@pytest.mark.parametrize("seqlen,chunk", SEL_LENGTHS)
@pytest.mark.parametrize("specialised", [True, False])
def test_selective_state_passing_body(seqlen, chunk, specialised):
    kw = sel_kw(seqlen, torch.float32)
    check_node(CHAIN_OPS["SelectiveStatePassing"], sel_chain_nodes(kw, chunk)[1],
               sel_attrs(kw, chunk, "SelectiveStatePassing"), specialised, torch.float32)


@pytest.mark.parametrize("seqlen,chunk", SEL_LENGTHS)
@pytest.mark.parametrize("delta_softplus,ngroups", SEL_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("specialised", [True, False])
def test_selective_chunk_scan_body(seqlen, chunk, delta_softplus, ngroups, dtype, specialised):
    kw = sel_kw(seqlen, dtype, delta_softplus, ngroups)
    check_node(CHAIN_OPS["SelectiveChunkScan"], sel_chain_nodes(kw, chunk)[2],
               sel_attrs(kw, chunk, "SelectiveChunkScan"), specialised, dtype)


# ------------------------------------------------------------------------------------------ the chains


def run_chain(scan, kw: dict, attrs: dict, specialised: bool, nodes_inputs) -> dict:
    """The chain of one-node op `scan` as its three nodes, the intermediates flowing between them."""
    names = CHAINS[scan.name]
    inputs = {t.name: kw[t.name] for t in scan.inputs}
    nodes, static = [], {}
    for name, node_inputs in zip(names, nodes_inputs, strict=True):
        spec = CHAIN_OPS[name]
        node_attrs_ = {k: attrs[k] for k in spec.attributes}
        nodes.append(helper.make_node(name, [t.name for t in spec.inputs], [o.name for o in spec.outputs],
                                      domain=DOMAIN, **node_attrs(node_attrs_)))
        static[name] = known(spec, node_inputs, node_attrs_) if specialised else Static()
    outputs = {"y": (inputs[scan.inputs[0].name].dtype, len(scan.outputs[0].shape)),
               "present_ssm_state": (inputs["ssm_state"].dtype, len(scan.outputs[1].shape))}
    return run_model(nodes, inputs, outputs, all_functions(OPSET, static, ops=names))


@pytest.mark.parametrize("seqlen,chunk", [(1, 16), (45, 16)])
@pytest.mark.parametrize("ngroups", [3, 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("specialised", [True, False])
def test_the_ssd_chain_is_its_op(seqlen, chunk, ngroups, dtype, specialised):
    kw = ssd_kw(seqlen, chunk, dtype, D_per_channel=True, dt_limit=LIMIT, ngroups=ngroups)
    attrs = {"chunk_size": chunk, "dt_softplus": 1, "dt_min": LIMIT[0], "dt_max": LIMIT[1]}
    got = run_chain(SSD_SCAN, kw, attrs, specialised, ssd_chain_nodes(kw))
    y_ref, s_ref = ssd_scan_ref(**to64(kw))
    assert_close(got["y"], y_ref, dtype=dtype, name="ssd chain y")
    assert_close(got["present_ssm_state"], s_ref, dtype=dtype, name="ssd chain state")


@pytest.mark.parametrize("seqlen,chunk", [(1, 8), (45, 8), (70, 32)])
@pytest.mark.parametrize("ngroups", [3, 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("specialised", [True, False])
def test_the_selective_chain_is_its_op(seqlen, chunk, ngroups, dtype, specialised):
    kw = sel_kw(seqlen, dtype, ngroups=ngroups)
    got = run_chain(SELECTIVE_SCAN, kw, {"chunk_size": chunk, "delta_softplus": 1}, specialised,
                    sel_chain_nodes(kw, chunk))
    y_ref, s_ref = selective_scan_ref(**to64(kw))
    assert_close(got["y"], y_ref, dtype=dtype, name="selective chain y")
    assert_close(got["present_ssm_state"], s_ref, dtype=dtype, name="selective chain state")


# ----------------------------------------------------------------------------------------- the contract


def _all_nodes(nodes):
    for n in nodes:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g.node)


def _example_static(name: str, dtype=torch.float32) -> Static:
    if name.startswith("SSD"):
        kw = ssd_kw(45, 16, dtype)
        spec_inputs = dict(zip(CHAINS[SSD_SCAN.name], ssd_chain_nodes(kw), strict=True))[name]
        attrs = ssd_attrs(kw, name)
    else:
        kw = sel_kw(45, dtype)
        spec_inputs = dict(zip(CHAINS[SELECTIVE_SCAN.name], sel_chain_nodes(kw, 16), strict=True))[name]
        attrs = sel_attrs(kw, 16, name)
    return known(CHAIN_OPS[name], spec_inputs, attrs)


@pytest.mark.parametrize("name", list(CHAIN_OPS))
@pytest.mark.parametrize("specialised", [True, False])
def test_the_chain_bodies_follow_the_contract(name, specialised):
    """Each body declares exactly its spec's attributes and the plugin's, takes the spec's inputs in order and gives
    its outputs in order; specialised, it reads no attribute at run time and casts only the inputs not float32."""
    spec = CHAIN_OPS[name]
    static = {name: _example_static(name, torch.float16)} if specialised else None
    (fn,) = all_functions(OPSET, static, ops=[name])
    assert fn.domain == DOMAIN and fn.name == name
    assert set(fn.attribute) | {a.name for a in fn.attribute_proto} == set(spec.attributes) | set(PLUGIN_ATTRS)
    assert len(fn.attribute) + len(fn.attribute_proto) == len(spec.attributes) + len(PLUGIN_ATTRS)
    assert list(fn.input) == [t.name for t in spec.inputs]
    assert len(fn.output) == len(spec.outputs)
    for value, out in zip(fn.output, spec.outputs, strict=True):  # the value itself, or its cast (name_<n>)
        assert re.fullmatch(rf"{out.name}(_\d+)?", value), (name, value, out.name)
    nodes = list(_all_nodes(fn.node))
    read = {a.ref_attr_name for n in nodes for a in n.attribute if a.ref_attr_name}
    if specialised:
        assert not read
        casts = sorted(n.input[0] for n in nodes if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT)
        assert casts == sorted(t.name for t in spec.inputs if not t.fp32)
    else:
        assert read == set(spec.attributes) - ({"chunk_size"} if "Passing" in name else set())


def test_all_functions_gives_the_ops_asked_for():
    assert [f.name for f in all_functions(OPSET)] == list(OPS)
    ops = ("CausalConv1d", "SSDChunkState", "SSDStatePassing", "SSDChunkScan", "SSDScan")
    assert [f.name for f in all_functions(OPSET, ops=ops)] == list(ops)
    with pytest.raises(KeyError, match="NoSuchOp"):
        all_functions(OPSET, ops=["NoSuchOp"])
