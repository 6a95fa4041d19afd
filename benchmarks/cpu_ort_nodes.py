"""What a node costs ONNX Runtime at decode, and the two graph forms the fallback bodies chose by it.

    python benchmarks/cpu_ort_nodes.py [--json OUT] [--smoke]

1. node cost: a graph of a 130M-class model's matmuls only (24 layers of in_proj / out_proj, the lm_head), with
   40 small Muls (1536 values) a layer switched on and off in alternating blocks: the extra time per node with
   the caches cold from the weight reads, as they are on every decode step.
2. conv: CausalConv1d at L = 1 and 512 (1536 channels, width 4) as a depthwise Conv over (B, C, 1, K-1+L)
   against a Gather of the K-wide windows and a sum.
3. outer product dt u (x) B (1536 x 16) as a broadcasting Mul against a K = 1 MatMul.
Every case checks that its forms agree before it is timed; times are medians of alternating blocks in one
process and are reported as ratios. --smoke: small shapes, few repeats (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def session(nodes, inputs, outputs, inits) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def alternate(runs: dict, blocks: int, per_block: int) -> dict:
    """name -> median seconds of one call, the callables run in alternating blocks."""
    times = {name: [] for name in runs}
    for _ in range(blocks):
        for name, fn in runs.items():
            fn()
            for _ in range(per_block):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def node_cost(layers: int, d_model: int, vocab: int, extra: int, blocks: int) -> dict:
    """One session, so both sides read the same weight buffers (separate sessions differ by more than the
    effect): each layer's extra Muls sit in an If branch that a `flag` input switches on or off."""
    rng = np.random.default_rng(0)
    inner, width = 4 * d_model, 2 * d_model
    out = lambda name: [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)]  # noqa: E731
    nodes, x = [], "x"
    inits = [numpy_helper.from_array(np.array([0], np.int64), "s0"),
             numpy_helper.from_array(np.array([width], np.int64), "s1"),
             numpy_helper.from_array(np.array([-1], np.int64), "ax")]
    for i in range(layers):
        inits += [numpy_helper.from_array(rng.standard_normal((d_model, inner), dtype=np.float32) * .02, f"w1_{i}"),
                  numpy_helper.from_array(rng.standard_normal((width, d_model), dtype=np.float32) * .02, f"w2_{i}")]
        inits += [numpy_helper.from_array(rng.standard_normal(width, dtype=np.float32), f"c{i}_{j}")
                  for j in range(extra)]
        muls = [helper.make_node("Mul", [f"a{i}_{j}", f"c{i}_{j}"], [f"a{i}_{j + 1}"]) for j in range(extra)]
        nodes += [helper.make_node("MatMul", [x, f"w1_{i}"], [f"h{i}"]),
                  helper.make_node("Slice", [f"h{i}", "s0", "s1", "ax"], [f"a{i}_0"]),
                  helper.make_node("If", ["flag"], [f"b{i}"],
                                   then_branch=helper.make_graph(muls, f"on{i}", [], out(f"a{i}_{extra}")),
                                   else_branch=helper.make_graph(
                                       [helper.make_node("Identity", [f"a{i}_0"], [f"i{i}"])], f"off{i}", [],
                                       out(f"i{i}"))),
                  helper.make_node("MatMul", [f"b{i}", f"w2_{i}"], [f"o{i}"]),
                  helper.make_node("Add", [x, f"o{i}"], [f"x{i + 1}"])]
        x = f"x{i + 1}"
    inits.append(numpy_helper.from_array(rng.standard_normal((d_model, vocab), dtype=np.float32) * .02, "wl"))
    nodes.append(helper.make_node("MatMul", [x, "wl"], ["y"]))
    sess = session(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, d_model]),
                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    x = np.ones((1, 1, d_model), np.float32)
    feeds = {n: {"x": x, "flag": np.array(n > 0)} for n in (0, extra)}
    t = alternate({n: (lambda f=f: sess.run(None, f)) for n, f in feeds.items()}, blocks, 6)
    return {"case": "node cost", "layers": layers, "extra_per_layer": extra,
            "matmuls_only_ms": t[0] * 1e3, "with_extra_ms": t[extra] * 1e3,
            "us_per_node_cold": (t[extra] - t[0]) / (layers * extra) * 1e6}


def conv_forms(channels: int, width: int, seqlens, blocks: int) -> list[dict]:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((channels, width), dtype=np.float32)
    bias = rng.standard_normal(channels, dtype=np.float32)
    ints = lambda name, v: numpy_helper.from_array(np.asarray(v, np.int64), name)  # noqa: E731
    io = ([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, channels]),
           helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, channels, width - 1])],
          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    depthwise = session([
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("Concat", ["state", "xt"], ["xs"], axis=2),
        helper.make_node("Unsqueeze", ["xs", "ax2"], ["xs4"]),
        helper.make_node("Conv", ["xs4", "w4", "b"], ["y4"], group=channels, kernel_shape=[1, width]),
        helper.make_node("Squeeze", ["y4", "ax2"], ["y3"]),
        helper.make_node("Transpose", ["y3"], ["y"], perm=[0, 2, 1])], *io,
        [numpy_helper.from_array(w.reshape(channels, 1, 1, width), "w4"), numpy_helper.from_array(bias, "b"),
         ints("ax2", [2])])
    windows = session([
        helper.make_node("Transpose", ["state"], ["st"], perm=[0, 2, 1]),
        helper.make_node("Concat", ["st", "x"], ["xs"], axis=1),
        helper.make_node("Shape", ["x"], ["L"], start=1, end=2),
        helper.make_node("Squeeze", ["L", "ax0"], ["Ls"]),
        helper.make_node("Range", ["zero", "Ls", "one"], ["t"]),
        helper.make_node("Unsqueeze", ["t", "ax1"], ["tu"]),
        helper.make_node("Add", ["tu", "k"], ["idx"]),
        helper.make_node("Gather", ["xs", "idx"], ["win"], axis=1),
        helper.make_node("Mul", ["win", "wt"], ["m"]),
        helper.make_node("ReduceSum", ["m", "ax2"], ["r"], keepdims=0),
        helper.make_node("Add", ["r", "b"], ["y"])], *io,
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "wt"), numpy_helper.from_array(bias, "b"),
         ints("ax0", [0]), ints("ax1", [1]), ints("ax2", [2]), ints("zero", 0), ints("one", 1),
         ints("k", [list(range(width))])])
    state = rng.standard_normal((1, channels, width - 1), dtype=np.float32)
    rows = []
    for L in seqlens:
        feeds = {"x": rng.standard_normal((1, L, channels), dtype=np.float32), "state": state}
        err = float(np.abs(depthwise.run(None, feeds)[0] - windows.run(None, feeds)[0]).max())
        t = alternate({name: (lambda s=s, f=feeds: s.run(None, f))
                       for name, s in (("depthwise", depthwise), ("windows", windows))}, blocks, 10)
        rows.append({"case": "conv", "seqlen": L, "channels": channels, "max_abs_diff": err, "ok": err < 1e-4,
                     "depthwise_us": t["depthwise"] * 1e6, "windows_us": t["windows"] * 1e6,
                     "windows_over_depthwise": t["windows"] / t["depthwise"]})
    return rows


def outer_product(dim: int, dstate: int, blocks: int) -> dict:
    rng = np.random.default_rng(2)
    io = ([helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 1, dim, 1]),
           helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 1, 1, dstate])],
          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    forms = {op: session([helper.make_node(op, ["a", "b"], ["y"])], *io, []) for op in ("Mul", "MatMul")}
    feeds = {"a": rng.standard_normal((1, 1, dim, 1), dtype=np.float32),
             "b": rng.standard_normal((1, 1, 1, dstate), dtype=np.float32)}
    err = float(np.abs(forms["Mul"].run(None, feeds)[0] - forms["MatMul"].run(None, feeds)[0]).max())
    t = alternate({op: (lambda s=s: s.run(None, feeds)) for op, s in forms.items()}, blocks, 20)
    return {"case": "outer product", "dim": dim, "dstate": dstate, "max_abs_diff": err, "ok": err < 1e-5,
            "mul_us": t["Mul"] * 1e6, "matmul_us": t["MatMul"] * 1e6, "mul_over_matmul": t["Mul"] / t["MatMul"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="small shapes, few repeats: checks the script only")
    args = ap.parse_args()
    if args.smoke:
        sizes = dict(layers=2, d_model=64, vocab=512, extra=4, blocks=2)
        conv = dict(channels=32, width=4, seqlens=(1, 16), blocks=2)
        outer = dict(dim=64, dstate=16, blocks=2)
    else:
        sizes = dict(layers=24, d_model=768, vocab=50280, extra=40, blocks=12)
        conv = dict(channels=1536, width=4, seqlens=(1, 512), blocks=10)
        outer = dict(dim=1536, dstate=16, blocks=20)
    results = [node_cost(**sizes), *conv_forms(**conv), outer_product(**outer)]
    for r in results:
        print(json.dumps(r))
    if args.json:
        env = {"machine": platform.machine(), "python": platform.python_version(), "onnxruntime": ort.__version__,
               "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke}
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=1))


if __name__ == "__main__":
    main()
