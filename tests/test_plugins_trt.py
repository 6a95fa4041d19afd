"""The plugins inside TensorRT (marked `trt` and `gpu`: skipped with the reason where TensorRT or a GPU is
missing). Registration, then per op (the three one-node ops and the six chain ops) an engine of one plugin node,
built from the same ONNX node the exporter writes (every input supplied, plugin_namespace / plugin_version
set), in AOT and in JIT mode, run on random inputs into poisoned outputs against the op's float64 reference:
every output, intermediates and states as strictly as y."""

from __future__ import annotations

import pytest
import torch
from onnx import TensorProto, helper
from test_ops import conv_inputs, selective_inputs, ssd_inputs, to64

from ssmrt.closeness import assert_close
from ssmrt.ops import causal_conv1d_ref, chains, selective_scan_ref, ssd_scan_ref
from ssmrt.ops.spec import ALL_OPS, CHAIN_OPS, DOMAIN, OPS, OPSET_VERSION
from ssmrt.plugins import trt as plugins

pytestmark = [pytest.mark.trt, pytest.mark.gpu]

ONNX_TYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
              torch.bfloat16: TensorProto.BFLOAT16}


def case(op: str, seqlen: int, dtype):
    """(inputs by spec name, attributes, reference outputs) for one op."""
    if op == "CausalConv1d":
        kw = conv_inputs(2, seqlen, 24, 4, dtype=dtype)
        return kw, {"activation": "silu"}, causal_conv1d_ref(**to64(kw))
    if op == "SelectiveScan":
        kw = selective_inputs(2, seqlen, 32, 16, dtype=dtype)
        return kw, {"delta_softplus": int(kw["delta_softplus"])}, selective_scan_ref(**to64(kw))
    kw = ssd_inputs(2, seqlen, 4, 16, 32, dtype=dtype)
    lo, hi = kw["dt_limit"]
    attrs = {"chunk_size": int(kw["chunk_size"]), "dt_softplus": int(kw["dt_softplus"]), "dt_min": float(lo),
             "dt_max": float(hi)}
    return kw, attrs, ssd_scan_ref(**to64(kw))


def chain_case(op: str, seqlen: int, dtype, chunk: int = 16):
    """(inputs by spec name, attributes, reference outputs) for one chain node: its intermediate inputs are the
    previous node's reference outputs, in float32."""
    spec = CHAIN_OPS[op]
    if op.startswith("SSD"):
        kw = to64(ssd_inputs(2, seqlen, 4, 16, 32, dtype=dtype))
        lo, hi = kw["dt_limit"]
        attrs = {"chunk_size": chunk, "dt_softplus": 1, "dt_min": float(lo), "dt_max": float(hi)}
        dt_out, dA, S = chains.ssd_chunk_state_ref(kw["x"], kw["dt"], kw["A"], kw["B"], kw["dt_bias"], True,
                                                   (lo, hi), chunk)
        H, present = chains.ssd_state_passing_ref(S, dA, kw["ssm_state"], chunk)
        y = chains.ssd_chunk_scan_ref(kw["x"], kw["B"], kw["C"], kw["D"], dt_out, dA, H, chunk)
        values = {**kw, "dt_out": dt_out, "dA_cumsum": dA, "chunk_states": S, "entering_states": H}
        outputs = {"dt_out": dt_out, "dA_cumsum": dA, "chunk_states": S, "entering_states": H,
                   "present_ssm_state": present, "y": y}
    else:
        kw = to64(selective_inputs(2, seqlen, 32, 16, dtype=dtype))
        attrs = {"chunk_size": chunk, "delta_softplus": 1}
        S, dsum = chains.selective_chunk_state_ref(kw["u"], kw["delta"], kw["A"], kw["B"], kw["delta_bias"], True,
                                                   chunk)
        H, present = chains.selective_state_passing_ref(S, dsum, kw["A"], kw["ssm_state"], chunk)
        y = chains.selective_chunk_scan_ref(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"], kw["z"],
                                            kw["delta_bias"], H, True, chunk)
        values = {**kw, "chunk_states": S, "delta_sum": dsum, "entering_states": H}
        outputs = {"chunk_states": S, "delta_sum": dsum, "entering_states": H, "present_ssm_state": present, "y": y}
    inputs = {t.name: values[t.name].to(torch.float32 if t.fp32 else dtype) for t in spec.inputs}
    return inputs, {a: attrs[a] for a in spec.attributes}, [outputs[t.name] for t in spec.outputs]


def one_node_model(op: str, inputs: dict, attrs: dict) -> bytes:
    spec = ALL_OPS[op]
    vis = [helper.make_tensor_value_info(t.name, ONNX_TYPES[inputs[t.name].dtype], list(inputs[t.name].shape))
           for t in spec.inputs]
    outs = [helper.make_tensor_value_info(t.name, ONNX_TYPES[inputs[spec.inputs[0].name].dtype] if not t.fp32
                                          else TensorProto.FLOAT, None) for t in spec.outputs]
    node = helper.make_node(op, [t.name for t in spec.inputs], [t.name for t in spec.outputs], domain=DOMAIN,
                            plugin_namespace=DOMAIN, plugin_version=str(OPSET_VERSION), **attrs)
    model = helper.make_model(helper.make_graph([node], op, vis, outs),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, OPSET_VERSION)])
    return model.SerializeToString()


def build_and_run(op: str, inputs: dict, attrs: dict, aot: bool, expected=None):
    """The outputs of an engine of one `op` node on `inputs`, written into NaN-filled buffers shaped like
    `expected` (default: y like the first input, the state like the last)."""
    import tensorrt as trt

    plugins.register()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    prefer = "PREFER_AOT_PYTHON_PLUGINS" if aot else "PREFER_JIT_PYTHON_PLUGINS"
    flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, prefer))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(one_node_model(op, inputs, attrs)), [parser.get_error(i) for i in range(parser.num_errors)]
    engine = trt.Runtime(logger).deserialize_cuda_engine(builder.build_serialized_network(
        network, builder.create_builder_config()))
    context = engine.create_execution_context()
    spec = ALL_OPS[op]
    feeds = {t.name: inputs[t.name].cuda().contiguous() for t in spec.inputs}
    act = feeds[spec.inputs[0].name].dtype
    if expected is None:
        expected = [feeds[spec.inputs[0].name], feeds[spec.inputs[-1].name]]
    outs = {t.name: torch.full(tuple(e.shape), float("nan"), dtype=torch.float32 if t.fp32 else act, device="cuda")
            for t, e in zip(spec.outputs, expected, strict=True)}
    for name, t in {**feeds, **outs}.items():
        context.set_tensor_address(name, t.data_ptr())
    stream = torch.cuda.Stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return [outs[t.name] for t in spec.outputs]


def test_register_once_and_again():
    import tensorrt as trt

    plugins.register()
    plugins.register()  # idempotent: a second call registers nothing twice (TensorRT would refuse a duplicate)
    registry = trt.get_plugin_registry()
    for op in ALL_OPS:
        assert registry.get_creator(op, str(OPSET_VERSION), DOMAIN) is not None, op


@pytest.mark.parametrize("aot", [True, False], ids=["aot", "jit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seqlen", [1, 37])
@pytest.mark.parametrize("op", list(OPS))
def test_one_plugin_node_engine_matches_the_reference(op, seqlen, dtype, aot):
    inputs, attrs, (y_ref, s_ref) = case(op, seqlen, dtype)
    inputs = {t.name: inputs[t.name] for t in OPS[op].inputs}
    y, s = build_and_run(op, inputs, attrs, aot)
    assert_close(y.cpu(), y_ref.to(y.dtype), dtype=dtype, name=f"{op} y")
    assert_close(s.cpu(), s_ref.to(s.dtype), dtype=dtype, name=f"{op} state")


@pytest.mark.parametrize("aot", [True, False], ids=["aot", "jit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seqlen", [1, 37])
@pytest.mark.parametrize("op", list(CHAIN_OPS))
def test_one_chain_node_engine_matches_its_reference(op, seqlen, dtype, aot):
    inputs, attrs, expected = chain_case(op, seqlen, dtype)
    got = build_and_run(op, inputs, attrs, aot, expected)
    for t, g, e in zip(CHAIN_OPS[op].outputs, got, expected, strict=True):
        assert_close(g.cpu(), e.to(g.dtype), dtype=dtype, name=f"{op} {t.name}")
