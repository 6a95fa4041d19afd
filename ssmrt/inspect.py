"""What an exported artifact holds: ops, inputs/outputs, state sizes, config (without loading weights)."""

from __future__ import annotations

from collections import Counter

from .errors import SsmrtError


def inspect_artifact(path) -> dict:
    import numpy as np
    import onnx

    from .artifact import model_file, read_metadata

    f = model_file(path)
    meta = read_metadata(f)  # refuses, in one line, anything that is not an ssmrt export
    try:
        m = onnx.load(str(f), load_external_data=False)
    except Exception as e:
        raise SsmrtError(f"{f}: not a readable ONNX model ({str(e).splitlines()[0]})") from None
    states = meta["states"]

    def tensor(vi):
        t = vi.type.tensor_type
        return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
                if t.elem_type != onnx.TensorProto.BFLOAT16 else "bfloat16",
                "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}

    ops = Counter(f"{n.domain + '::' if n.domain else ''}{n.op_type}" for n in m.graph.node)
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}
    state_bytes = sum(int(np.prod([d for d in s["shape"] if d != "batch"])) * itemsize[s["dtype"]] for s in states)
    conv = next(s for s in states if s["kind"] == "conv")
    ssm = next(s for s in states if s["kind"] == "ssm")
    return {
        "path": str(f),
        "config": meta["config"],
        "export": meta["export"],
        "nodes": len(m.graph.node),
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "functions": [f"{fn.domain}::{fn.name}" for fn in m.functions],
        "parameters": int(sum(int(np.prod(t.dims)) for t in m.graph.initializer)),
        "inputs": [tensor(v) for v in m.graph.input],
        "outputs": [tensor(v) for v in m.graph.output],
        "state_layers": len(states) // 2,
        "conv_state_shape": conv["shape"],
        "ssm_state_shape": ssm["shape"],
        "state_bytes_per_sequence": state_bytes,
    }
