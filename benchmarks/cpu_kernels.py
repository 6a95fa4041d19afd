"""The native CPU kernels of a decode step, alone: how fast they stream what a step reads.

    python benchmarks/cpu_kernels.py [--threads 2] [--json OUT] [--smoke]

1. HalfMatMul (ssmrt.cpu), one row (a decode step), told the session's threads as the runner tells it, against
   ONNX Runtime's float32 MatMul of the same shapes and against HalfMatMul not told them (blocks of rows dealt to
   the pool one at a time), in alternating blocks: a 130M-class Mamba-2's 24 layers of in_proj (768 x 3352) and
   out_proj (1536 x 768), each layer its own weights so that they come from memory as in a step, then the tied
   lm_head (the embedding, 50280 x 768, read transposed) alone. float16 reads half float32's bytes: 0.5 is the
   time ratio's floor.
2. SSDScan's decode step at that model's shape (24 heads x 64 x 128, float32 state), cycling through 96 states,
   75 MB, more than a CPU's last-level cache (in a step each layer's state comes from memory: the weights stream
   through the caches between one visit and the next): GB/s of the state read and written, against a numpy copy
   of the same bytes in the same run.
Every case checks its result against a reference before it is timed. --smoke: small shapes, few repeats (the
test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _session(nodes, inputs, outputs, inits, threads: int, spinning: bool = False):
    import onnxruntime as ort
    from onnx import helper

    from ssmrt import ort_ops
    from ssmrt.ops.spec import DOMAIN

    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1),
                                                    helper.make_opsetid(ort_ops.CPU_DOMAIN, 1)])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    # sessions of one case alternate: a pool spinning after its own run would take the next session's cores. A
    # session timed alone spins between runs, as a runner's does between a step's nodes.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.register_custom_ops_library(str(ort_ops.library_path()))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _alternate(runs: dict, blocks: int, per_block: int) -> dict:
    """name -> the median over blocks of one call's seconds, the callables run in alternating blocks."""
    times = {name: [] for name in runs}
    for fn in runs.values():
        fn()
    for _ in range(blocks):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            for _ in range(per_block):
                fn()
            times[name].append((time.perf_counter() - t0) / per_block)
    return times


def _paired(a: list, b: list) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def half_matmul_case(name, shapes, threads, blocks, per_block, rng) -> dict:
    """shapes: [(K, N, trans_b)], multiplied one after another by one row; float16 HalfMatMul (told the session's
    threads, as the runner tells it) against float32 MatMul of the same weights, and against HalfMatMul not told
    them ("float16 dealt out": its blocks of rows dealt to the pool one at a time, not one run per thread)."""
    from onnx import TensorProto, helper, numpy_helper

    weights = [(rng.standard_normal((n, k) if t else (k, n)) / k**0.5).astype(np.float16) for k, n, t in shapes]
    sessions, feeds = {}, {}
    for dtype in ("float16", "float32", "float16 dealt out"):
        nodes, inits, vis_in, outs = [], [], [], []
        for i, ((k, _, t), w) in enumerate(zip(shapes, weights, strict=True)):
            a, y = f"a{i}", f"y{i}"
            if dtype.startswith("float16"):
                inits.append(numpy_helper.from_array(w, f"w{i}"))
                nodes.append(helper.make_node("HalfMatMul", [a, f"w{i}"], [y], domain="ssmrt.cpu", trans_b=int(t),
                                              threads=0 if dtype.endswith("out") else threads))
            else:
                inits.append(numpy_helper.from_array((w.T if t else w).astype(np.float32), f"w{i}"))
                nodes.append(helper.make_node("MatMul", [a, f"w{i}"], [y]))
            elem = TensorProto.FLOAT if dtype == "float32" else TensorProto.FLOAT16
            vis_in.append(helper.make_tensor_value_info(a, elem, [1, 1, k]))
            outs.append(helper.make_tensor_value_info(y, elem, None))
        sessions[dtype] = _session(nodes, vis_in, outs, inits, threads)
        feeds[dtype] = {f"a{i}": rng.standard_normal((1, 1, k)).astype(np.float32 if dtype == "float32"
                                                                        else np.float16)
                        for i, (k, _, _) in enumerate(shapes)}
    # the check: HalfMatMul, both ways, against the float32 product of the float16 operands
    worst = 0.0
    for dtype in ("float16", "float16 dealt out"):
        got = sessions[dtype].run(None, feeds[dtype])
        for i, (w, (_, _, t)) in enumerate(zip(weights, shapes, strict=True)):
            want = feeds[dtype][f"a{i}"].astype(np.float32) @ (w.T if t else w).astype(np.float32)
            worst = max(worst, float(np.abs(got[i].astype(np.float32) - want).max() / (np.abs(want).max() + 1e-30)))
    ok = worst < 4e-3  # float16 rounding of the result
    times = _alternate({d: (lambda s=s, f=feeds[d]: s.run(None, f)) for d, s in sessions.items()}, blocks,
                       per_block)
    nbytes = sum(w.nbytes for w in weights)
    med = {d: statistics.median(v) for d, v in times.items()}
    return {"case": name, "ok": ok, "max_rel_error": worst, "weight_MB_float16": nbytes / 1e6,
            "ms": {d: v * 1e3 for d, v in med.items()},
            "GB_per_s": {"float16": nbytes / med["float16"] / 1e9, "float32": 2 * nbytes / med["float32"] / 1e9},
            "time_float16_over_float32": _paired(times["float16"], times["float32"]),
            "time_float16_over_dealt_out": _paired(times["float16"], times["float16 dealt out"])}


def ssd_step_case(nheads, headdim, dstate, states, threads, blocks, per_block, rng) -> dict:
    import torch
    from onnx import TensorProto, helper

    from ssmrt.ops import ssd_scan_ref
    from ssmrt.ops.spec import DOMAIN, SSD_SCAN

    f32 = np.float32
    kw = {"x": rng.standard_normal((1, 1, nheads, headdim)).astype(f32),
          "dt": (0.5 * rng.standard_normal((1, 1, nheads)) - 1).astype(f32),
          "A": -np.exp(rng.standard_normal(nheads).clip(-2, 2)).astype(f32),
          "B": rng.standard_normal((1, 1, 1, dstate)).astype(f32),
          "C": rng.standard_normal((1, 1, 1, dstate)).astype(f32),
          "D": rng.standard_normal(nheads).astype(f32), "dt_bias": (0.1 * rng.standard_normal(nheads)).astype(f32)}
    pool = [rng.standard_normal((1, nheads, headdim, dstate)).astype(f32) for _ in range(states)]
    names = [t.name for t in SSD_SCAN.inputs]
    vis = [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in
           {**kw, "ssm_state": pool[0]}.items()]
    node = helper.make_node(SSD_SCAN.name, names, [t.name for t in SSD_SCAN.outputs], domain=DOMAIN,
                            chunk_size=256, dt_softplus=1, dt_min=0.0, dt_max=float("inf"))
    sess = _session([node], vis, [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, None)
                                  for t in SSD_SCAN.outputs], [], threads, spinning=True)
    y, state = sess.run(None, {**kw, "ssm_state": pool[0]})
    t = {k: torch.from_numpy(v) for k, v in kw.items()}
    y_ref, state_ref = ssd_scan_ref(**t, dt_softplus=True, ssm_state=torch.from_numpy(pool[0]))
    err = max(float(np.abs(y - y_ref.numpy()).max() / np.abs(y_ref.numpy()).max()),
              float(np.abs(state - state_ref.numpy()).max() / np.abs(state_ref.numpy()).max()))
    out = np.empty_like(pool[0])
    turn = {"step": 0, "copy": 0}

    def step():
        turn["step"] = (turn["step"] + 1) % states
        sess.run(None, {**kw, "ssm_state": pool[turn["step"]]})

    def copy():
        turn["copy"] = (turn["copy"] + 1) % states
        np.copyto(out, pool[turn["copy"]])

    times = _alternate({"ssd step": step, "numpy copy": copy}, blocks, per_block)
    nbytes = 2 * pool[0].nbytes  # read and written
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"case": "ssd decode step", "ok": err < 1e-5, "max_rel_error": err, "state_MB": pool[0].nbytes / 1e6,
            "us": {k: v * 1e6 for k, v in med.items()},
            "GB_per_s": {k: nbytes / v / 1e9 for k, v in med.items()},
            "time_step_over_copy": _paired(times["ssd step"], times["numpy copy"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--smoke", action="store_true", help="small shapes, few repeats: checks the script")
    a = ap.parse_args()
    if a.threads < 1:
        ap.error(f"--threads must be 1 or more, got {a.threads}")
    rng = np.random.default_rng(0)
    layers, d, d_in, vocab = (2, 64, 200, 500) if a.smoke else (24, 768, 3352, 50280)
    blocks, per_block = (2, 2) if a.smoke else (9, 10)
    proj = [s for _ in range(layers) for s in ((d, d_in, False), (2 * d, d, False))]
    results = [half_matmul_case("half_matmul projections", proj, a.threads, blocks, per_block, rng),
               half_matmul_case("half_matmul tied lm_head", [(d, vocab, True)], a.threads, blocks, per_block, rng),
               ssd_step_case(*((4, 8, 16) if a.smoke else (24, 64, 128)), 4 if a.smoke else 96, a.threads,
                             blocks, 4 * per_block, rng)]
    for r in results:
        print(json.dumps(r))
    import onnxruntime as ort

    env = {"machine": platform.machine(), "python": platform.python_version(), "onnxruntime": ort.__version__,
           "threads": a.threads, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": " ".join(["benchmarks/cpu_kernels.py", *sys.argv[1:]]), "smoke": a.smoke}
    if a.json:
        a.json.write_text(json.dumps({"env": env, "results": results}, indent=2))
    if not all(r["ok"] for r in results):
        print("a kernel disagreed with its reference: figures not valid", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
