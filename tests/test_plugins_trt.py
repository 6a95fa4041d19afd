"""The plugins inside TensorRT (marked `trt` and `gpu`: skipped with the reason where TensorRT or a GPU is
missing). Registration, then per op an engine of one plugin node, built from the same ONNX node the exporter
writes (every input supplied, plugin_namespace / plugin_version set), in AOT and in JIT mode, run on random
inputs against the op's float64 reference: outputs and state."""

from __future__ import annotations

import pytest
import torch
from onnx import TensorProto, helper
from test_ops import conv_inputs, selective_inputs, ssd_inputs, to64

from ssmrt.closeness import assert_close
from ssmrt.ops import causal_conv1d_ref, selective_scan_ref, ssd_scan_ref
from ssmrt.ops.spec import DOMAIN, OPS, OPSET_VERSION
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


def one_node_model(op: str, inputs: dict, attrs: dict) -> bytes:
    spec = OPS[op]
    vis = [helper.make_tensor_value_info(t.name, ONNX_TYPES[inputs[t.name].dtype], list(inputs[t.name].shape))
           for t in spec.inputs]
    outs = [helper.make_tensor_value_info(t.name, ONNX_TYPES[inputs[spec.inputs[0].name].dtype] if not t.fp32
                                          else TensorProto.FLOAT, None) for t in spec.outputs]
    node = helper.make_node(op, [t.name for t in spec.inputs], [t.name for t in spec.outputs], domain=DOMAIN,
                            plugin_namespace=DOMAIN, plugin_version=str(OPSET_VERSION), **attrs)
    model = helper.make_model(helper.make_graph([node], op, vis, outs),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, OPSET_VERSION)])
    return model.SerializeToString()


def build_and_run(op: str, inputs: dict, attrs: dict, aot: bool):
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
    spec = OPS[op]
    feeds = {t.name: inputs[t.name].cuda().contiguous() for t in spec.inputs}
    outs = {t.name: torch.full_like(feeds[spec.inputs[0].name] if i == 0 else feeds[spec.inputs[-1].name],
                                    float("nan")) for i, t in enumerate(spec.outputs)}
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
    for op in OPS:
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
