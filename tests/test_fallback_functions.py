"""Each ssmrt::* fallback body, alone in a one-node model on ONNX Runtime, against its reference."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from test_ops import conv_inputs, selective_inputs, small_dt_inputs, ssd_inputs, state_ulps

from ssmrt.closeness import assert_close
from ssmrt.exporter.functions import SCAN_CHUNK, SSD_CHUNK, Builder, Static, all_functions
from ssmrt.ops import causal_conv1d_ref, selective_scan_ref, ssd_scan_ref
from ssmrt.ops.spec import CAUSAL_CONV1D, DOMAIN, SELECTIVE_SCAN, SSD_SCAN

OPSET = 21
ONNX_TYPE = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16}


def known(inputs: dict, attrs: dict) -> Static:
    """What an export knows of a node over `inputs`: every shape but batch and seqlen, the dtypes, the attributes."""
    def dynamic(name, tensor, axis):
        if name in ("conv_state", "ssm_state"):
            return axis == 0
        return tensor.dim() >= 3 and axis < 2

    return Static(
        shapes={k: tuple(None if dynamic(k, v, i) else d for i, d in enumerate(v.shape)) for k, v in inputs.items()},
        dtypes={k: str(v.dtype).removeprefix("torch.") for k, v in inputs.items()},
        attrs=dict(attrs))


def run_node(spec, inputs: dict, attrs: dict, n_outputs=2, static=False):
    """Build a model with one `spec` node over `inputs` (torch tensors) and run it on ONNX Runtime.

    static: give the bodies what an export knows: every input's shape but batch and seqlen, the dtypes and the
    attribute values (the bodies then drop casts, flag tests and a no-op dt limit).
    """
    names = [t.name for t in spec.inputs]
    vis = [helper.make_tensor_value_info(k, ONNX_TYPE[v.dtype], [f"{k}_{i}" for i in range(v.dim())])
           for k, v in inputs.items()]
    first, state = inputs[names[0]], inputs[names[-1]]  # y follows the activations, the new state its input
    outs = [helper.make_tensor_value_info(t.name, ONNX_TYPE[ref.dtype], [f"{t.name}_{i}" for i in range(ref.dim())])
            for t, ref in zip(spec.outputs[:n_outputs], (first, state), strict=True)]
    node = helper.make_node(spec.name, [k if k in inputs else "" for k in names], [o.name for o in outs],
                            domain=DOMAIN, plugin_namespace="ssmrt", plugin_version="1", **attrs)
    graph = helper.make_graph([node], "g", vis, outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
                              functions=all_functions(OPSET, {spec.name: known(inputs, attrs)} if static else None))
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    res = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
    return [torch.from_numpy(np.asarray(r)) for r in res]


@pytest.mark.parametrize("batch,seqlen,dim,width",
                         [(1, 1, 8, 4), (2, 7, 13, 4), (3, 2, 5, 4), (2, 33, 24, 3), (2, 1, 6, 2), (1, 300, 16, 4)])
@pytest.mark.parametrize("activation", ["silu", "none"])
@pytest.mark.parametrize("specialised", [False, True])
def test_causal_conv1d_body(batch, seqlen, dim, width, activation, specialised):
    kw = conv_inputs(batch, seqlen, dim, width)
    kw["activation"] = activation
    y, s = run_node(CAUSAL_CONV1D, {k: kw[k] for k in ("x", "weight", "bias", "conv_state")},
                    {"activation": activation}, static=specialised)
    y_ref, s_ref = causal_conv1d_ref(**kw)
    assert_close(y, y_ref, name="conv y")
    assert_close(s, s_ref, name="conv state")


@pytest.mark.parametrize("seqlen", [1, 2, 5, SCAN_CHUNK, SCAN_CHUNK + 1, 3 * SCAN_CHUNK - 1])
@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("static", [False, True])
def test_selective_scan_body(seqlen, ngroups, static):
    kw = selective_inputs(2, seqlen, 6, 4, ngroups=ngroups)
    ins = {k: kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "ssm_state")}
    y, s = run_node(SELECTIVE_SCAN, ins, {"delta_softplus": 1}, static=static)
    y_ref, s_ref = selective_scan_ref(**kw)
    assert_close(y, y_ref, name="selective y")
    assert_close(s, s_ref, name="selective state")


@pytest.mark.parametrize("static", [False, True])
def test_selective_scan_body_no_softplus(static):
    kw = selective_inputs(1, 20, 4, 8)
    kw["delta"] = kw["delta"].abs() * 0.1
    ins = {k: kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "ssm_state")}
    ins["delta_bias"] = kw["delta_bias"].abs()
    kw["delta_bias"], kw["delta_softplus"] = ins["delta_bias"], False
    y, s = run_node(SELECTIVE_SCAN, ins, {"delta_softplus": 0}, static=static)
    y_ref, s_ref = selective_scan_ref(**kw)
    assert_close(y, y_ref, name="selective y")
    assert_close(s, s_ref, name="selective state")


@pytest.mark.parametrize("op", ["selective", "ssd"])
@pytest.mark.parametrize("seqlen", [1, 64])
def test_scan_bodies_hold_float32_precision_at_small_dt(op, seqlen):
    """At Mamba's initial dt the bodies' float32 state stays as close to float64 as the float32 reference's,
    prefill (chunked) and decode step alike (Log(Exp(x) + 1) put it twice as far over 64 steps)."""
    kw = small_dt_inputs(op, seqlen)
    if op == "selective":
        names, spec, ref, attrs = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "ssm_state"), \
            SELECTIVE_SCAN, selective_scan_ref, {"delta_softplus": 1}
    else:
        names, spec, ref = ("x", "dt", "A", "B", "C", "D", "dt_bias", "ssm_state"), SSD_SCAN, ssd_scan_ref
        attrs = {"chunk_size": kw["chunk_size"], "dt_softplus": 1, "dt_min": 0.0, "dt_max": math.inf}
    _, s = run_node(spec, {k: kw[k] for k in names}, attrs)
    body, reference = state_ulps(s, kw, ref)
    assert body <= 1.5 * reference + 0.5, (f"{op}: the body's state {body:.1f} ulps of its RMS from float64, the "
                                           f"float32 reference's {reference:.1f}")


@pytest.mark.parametrize("seqlen,chunk_size",
                         [(1, 8), (2, 8), (7, 8), (21, 8), (50, 16), (13, 256), (64, 64), (150, 256)])
@pytest.mark.parametrize("ngroups,D_per_channel", [(1, False), (2, True)])
@pytest.mark.parametrize("dt_limit", [(0.0, math.inf), (0.05, 0.3)])
@pytest.mark.parametrize("static", [False, True])
def test_ssd_scan_body(seqlen, chunk_size, ngroups, D_per_channel, dt_limit, static):
    kw = ssd_inputs(2, seqlen, 4, 8, 16, ngroups=ngroups, D_per_channel=D_per_channel, dt_limit=dt_limit,
                    chunk_size=chunk_size)
    ins = {k: kw[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias", "ssm_state")}
    y, s = run_node(SSD_SCAN, ins, {"chunk_size": chunk_size, "dt_softplus": 1, "dt_min": dt_limit[0],
                                    "dt_max": dt_limit[1]}, static=static)
    y_ref, s_ref = ssd_scan_ref(**kw)
    assert_close(y, y_ref, name="ssd y")
    assert_close(s, s_ref, name="ssd state")


def test_ssd_body_many_chunks_long_sequence():
    """Several fallback chunks and a partial last one, with large decays: the inter-chunk segsum path."""
    seqlen = 3 * SSD_CHUNK + 5
    kw = ssd_inputs(1, seqlen, 4, 8, 16, ngroups=2, chunk_size=256)
    kw["dt"] = kw["dt"] + 2.0  # dt ~ 2: the state decays strongly across chunks
    ins = {k: kw[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias", "ssm_state")}
    y, s = run_node(SSD_SCAN, ins, {"chunk_size": 256, "dt_softplus": 1, "dt_min": 0.0, "dt_max": math.inf})
    y_ref, s_ref = ssd_scan_ref(**kw)
    assert_close(y, y_ref, name="ssd long y")
    assert_close(s, s_ref, name="ssd long state")


@pytest.mark.parametrize("seqlen", [1, 9])
@pytest.mark.parametrize("static", [False, True])
def test_fp16_activations_keep_fp32_state(seqlen, static):
    kw = ssd_inputs(1, seqlen, 2, 4, 8, dtype=torch.float16, chunk_size=4)
    ins = {k: kw[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias", "ssm_state")}
    y, s = run_node(SSD_SCAN, ins, {"chunk_size": 4, "dt_softplus": 1, "dt_min": 0.0, "dt_max": math.inf},
                    static=static)
    assert y.dtype == torch.float16 and s.dtype == torch.float32
    y_ref, s_ref = ssd_scan_ref(**kw)
    assert_close(y, y_ref, dtype=torch.float16, name="ssd fp16 y")
    assert_close(s, s_ref, dtype=torch.float16, name="ssd fp16 state")


def test_builder_binds_every_name_once():
    """Text reads only bound names (the enclosing graph's values are handed in explicitly) and defines each once."""
    b = Builder("p_", {"x": "outer_x"})
    b.add("""
        e = Exp (x)          # a comment
        y = Add (e, x)
    """)
    assert [list(n.input) for n in b.nodes] == [["outer_x"], ["p_e", "outer_x"]] and b["y"] == "p_y"
    with pytest.raises(KeyError, match="'z' is not bound"):
        b.add("w = Exp (z)")
    with pytest.raises(ValueError, match="'y' is bound already"):
        b.add("y = Neg (x)")


def _all_nodes(nodes):
    for n in nodes:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g.node)


def _decode_branch(fn):
    (node,) = [n for n in fn.node if n.op_type == "If"]
    return next(a.g for a in node.attribute if a.name == "then_branch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("op", ["CausalConv1d", "SelectiveScan", "SSDScan"])
def test_specialised_bodies_decide_at_build_time(op, dtype):
    """With what an export knows: no attribute is read at run time, no float32 input is cast, the decode step reads
    no shape; with no Static, the body reads its attributes."""
    if op == "CausalConv1d":
        spec, kw, attrs = CAUSAL_CONV1D, conv_inputs(1, 3, 8, 4, dtype=dtype), {"activation": "silu"}
    elif op == "SelectiveScan":
        spec, kw, attrs = SELECTIVE_SCAN, selective_inputs(1, 3, 8, 4, ngroups=2, dtype=dtype), {"delta_softplus": 1}
    else:
        spec, kw = SSD_SCAN, ssd_inputs(1, 3, 4, 8, 16, ngroups=2, dtype=dtype)
        attrs = {"chunk_size": 16, "dt_softplus": 1, "dt_min": 0.0, "dt_max": math.inf}
    inputs = {t.name: kw[t.name] for t in spec.inputs}
    fn = {f.name: f for f in all_functions(OPSET, {op: known(inputs, attrs)})}[op]
    nodes = list(_all_nodes(fn.node))
    assert not [a.ref_attr_name for n in nodes for a in n.attribute if a.ref_attr_name]
    casts = sorted(n.input[0] for n in nodes if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT)
    assert casts == sorted(t.name for t in spec.inputs if not (t.fp32 or dtype == torch.float32))
    if op != "CausalConv1d":
        assert not [n for n in _decode_branch(fn).node if n.op_type == "Shape"]
    if op == "SSDScan":  # the chunked form: no loop at all
        assert not {"Loop", "Scan"} & {n.op_type for n in nodes}
    generic = {f.name: f for f in all_functions(OPSET)}[op]
    assert {a.ref_attr_name for n in _all_nodes(generic.node) for a in n.attribute if a.ref_attr_name} >= {
        "activation", "delta_softplus", "dt_softplus"} & set(spec.attributes)
