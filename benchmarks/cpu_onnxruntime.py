"""CPU benchmark: ssmrt on ONNX Runtime vs HF transformers eager, with the floors measured in the same run.

    python benchmarks/cpu_onnxruntime.py [--arch mamba1 mamba2] [--prompt-len 512] [--decode-steps 24] [--json OUT]
                                         [--smoke]

130M-class configs with random weights (d_model 768, 24 layers, vocab 50280; Mamba-1 d_state 16; Mamba-2
24 heads of 64, d_state 128), batch 1, float32. Reported:
- decode ms/token: ssmrt (ONNX Runtime with ssmrt's native kernels, the runner's default on a CPU), the same
  artifact on stock ONNX Runtime (the ops' fallback bodies), ONNX Runtime's matmuls alone (the same weight
  bytes: what no graph can beat) and HF eager, in alternating blocks (ONNX Runtime in its own process), with
  the median of the per-block-pair ratios; and the floor = the bytes a step must move (ssmrt.bench.step_bytes:
  the matmul weights once, the state read and written) / the copy bandwidth timed in this run, as `ssmrt bench`;
- prefill tokens/s at --prompt-len: the same runtimes, and the floor = matmul FLOPs (ssmrt.bench.prefill_flops)
  / the fp32 GEMM rate timed in this run.
Every number is a ratio to something measured in the same process, never a bare time from elsewhere.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ssmrt.artifact import read_metadata, state_bytes
from ssmrt.bench import copy_bandwidth, gemm_rate, prefill_flops, step_bytes
from ssmrt.models import SSMConfig


def timed(fn, repeat: int, warmup: bool = True) -> float:
    """Median wall time of fn() over `repeat` runs, after one untimed run if `warmup` (the floors take the best
    instead: ssmrt.bench)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hf_model(arch: str, layers: int, vocab_size: int = 50280, d_model: int = 768):
    """A random HF model of the 130M-class shape (Mamba-2: heads of 64 filling 2 * d_model)."""
    import transformers

    common = dict(hidden_size=d_model, num_hidden_layers=layers, vocab_size=vocab_size)
    if arch == "mamba1":
        cfg = transformers.MambaConfig(state_size=16, **common)
        model = transformers.MambaForCausalLM(cfg)
    else:
        cfg = transformers.Mamba2Config(state_size=128, num_heads=2 * d_model // 64, head_dim=64, n_groups=1,
                                        chunk_size=256, tie_word_embeddings=True, **common)
        model = transformers.Mamba2ForCausalLM(cfg)
    return model.eval()


def matmul_chain_onnx(config):
    """An ONNX model of a decode step's matmuls alone: per layer the model's matmul shapes
    (ssmrt.bench.matmul_shapes), each fed a Slice of the one before, a residual Add per layer, then the
    lm_head; random float32 weights. Its step time is what ONNX Runtime's own GEMVs need for these weight
    bytes: no graph of standard ops computing this model decodes faster under the same session options."""
    from onnx import TensorProto, helper, numpy_helper

    from ssmrt.bench import matmul_shapes

    layer, head = matmul_shapes(config)
    if layer[-1][1] != config.d_model:
        raise ValueError(f"last matmul of a layer gives {layer[-1][1]} features, not d_model {config.d_model}")
    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def weight(name, shape):
        inits.append(numpy_helper.from_array(rng.standard_normal(shape, dtype=np.float32) * 0.02, name))
        return name

    def const(name, values):
        inits.append(numpy_helper.from_array(np.array(values, np.int64), name))
        return name

    starts, axes = const("starts", [0]), const("axes", [-1])
    h = "h"
    for i in range(config.n_layer):
        x, width = h, config.d_model
        for j, (k, n) in enumerate(layer):
            if width != k:  # the next matmul reads the first k features, as the model's splits do
                nodes.append(helper.make_node("Slice", [x, starts, const(f"end{i}_{j}", [k]), axes], [f"s{i}_{j}"]))
                x = f"s{i}_{j}"
            nodes.append(helper.make_node("MatMul", [x, weight(f"w{i}_{j}", (k, n))], [f"m{i}_{j}"]))
            x, width = f"m{i}_{j}", n
        nodes.append(helper.make_node("Add", [h, x], [f"h{i}"]))
        h = f"h{i}"
    nodes.append(helper.make_node("MatMul", [h, weight("lm_head", head)], ["logits"]))
    graph = helper.make_graph(nodes, "matmul_chain",
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, head[0]])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, head[1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _onnxruntime_worker(conn, artifact: str, prompt_len: int):
    """ONNX Runtime in its own process, as a deployment runs it, with two sessions of the artifact: "native"
    (ssmrt's native kernels, ssmrt.ort_ops, where this machine can build them: the runner's default) and "bodies"
    (every op through its fallback body: stock ONNX Runtime). Answers ("prefill", which, repeat) with the median
    prefill seconds, ("decode", which, steps) with the median seconds of one block of single-token steps
    (continuing from that session's last state) and ("matmuls", steps) with the median seconds of the model's
    matmuls alone (matmul_chain_onnx, a session with the same options), until ("stop",). Sends
    ("ready", native ops) first."""
    import onnxruntime

    from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact

    runners = {"native": OnnxRuntimeRunnerFromArtifact(artifact, provider="cpu", native_ops="auto"),
               "bodies": OnnxRuntimeRunnerFromArtifact(artifact, provider="cpu", native_ops="off")}
    config = runners["native"].config
    chain = onnxruntime.InferenceSession(matmul_chain_onnx(config).SerializeToString(),
                                         providers=["CPUExecutionProvider"])
    h = {"h": np.random.default_rng(1).standard_normal((1, 1, config.d_model), dtype=np.float32)}
    chain.run(None, h)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, prompt_len), dtype=np.int64)
    states, toks = {}, {}
    for name, runner in runners.items():
        logits, states[name] = runner.forward(ids, runner.zero_state(1))
        toks[name] = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        runner.forward(toks[name], runner.copy(states[name]))  # warm-up step
    conn.send(("ready", runners["native"].native_ops))

    def step(name):
        logits, states[name] = runners[name].forward(toks[name], states[name])
        toks[name] = logits[:, -1].argmax(-1)[:, None].astype(np.int64)

    while True:
        cmd = conn.recv()
        if cmd[0] == "prefill":
            runner = runners[cmd[1]]
            conn.send(timed(lambda r=runner: r.forward(ids, r.zero_state(1)), cmd[2]))
        elif cmd[0] == "decode":
            conn.send(timed(lambda name=cmd[1]: step(name), cmd[2], warmup=False))
        elif cmd[0] == "matmuls":
            conn.send(timed(lambda: chain.run(None, h), cmd[1], warmup=False))
        else:
            return


def bench_arch(arch: str, layers: int, prompt_len: int, decode_steps: int, repeat: int, workdir: Path) -> dict:
    from ssmrt.exporter import export

    torch.manual_seed(0)
    hf = hf_model(arch, layers)
    ckpt = workdir / f"{arch}-ckpt"
    hf.save_pretrained(ckpt)
    artifact = export(ckpt, workdir / f"{arch}-onnx")

    params = sum(p.numel() for p in hf.parameters())  # tied embeddings counted once
    meta = read_metadata(artifact)
    config = SSMConfig.from_dict(meta["config"])
    # the floors of ssmrt.bench, from the artifact: what every backend's `ssmrt bench` measures against
    decode_bytes = step_bytes(config, "float32", state_bytes(meta["states"]))
    flops = prefill_flops(config, prompt_len, 1, meta["export"]["logits"])

    ids = np.random.default_rng(0).integers(0, 50280, (1, prompt_len), dtype=np.int64)
    ids_t = torch.from_numpy(ids)

    # ONNX Runtime in a fresh process (no torch thread pool spinning beside it), driven from here so that its
    # decode blocks alternate with HF's: each pair of blocks runs under the same machine conditions, and
    # the paired ratio is what drifts on this VM least.
    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    worker = ctx.Process(target=_onnxruntime_worker, args=(child_conn, str(artifact), prompt_len))
    worker.start()
    ready, native_ops = conn.recv()
    assert ready == "ready"
    conn.send(("prefill", "native", repeat))
    ort_prefill = conn.recv()
    conn.send(("prefill", "bodies", repeat))
    bodies_prefill = conn.recv()

    with torch.no_grad():
        hf_prefill = timed(lambda: hf(ids_t, use_cache=False), repeat)

    # HF eager decode per block: generate(n + 1 tokens) - generate(1 token), per token
    hf.generation_config.eos_token_id = None
    prompt = ids_t[:, :8]

    def gen(n):
        with torch.no_grad():
            hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    gen(2)
    ort_blocks, bodies_blocks, matmul_blocks, hf_blocks = [], [], [], []
    for _ in range(repeat):
        conn.send(("decode", "native", decode_steps))
        ort_blocks.append(conn.recv())
        conn.send(("decode", "bodies", decode_steps))
        bodies_blocks.append(conn.recv())
        conn.send(("matmuls", decode_steps))
        matmul_blocks.append(conn.recv())
        t1 = timed(lambda: gen(1), 3)  # the median: one noisy generate(1) would move a short block's figure
        hf_blocks.append((timed(lambda: gen(decode_steps + 1), 1) - t1) / decode_steps)
    conn.send(("stop",))
    worker.join()
    ort_decode, hf_decode = statistics.median(ort_blocks), statistics.median(hf_blocks)
    paired = statistics.median(h / o for h, o in zip(hf_blocks, ort_blocks, strict=True))
    # The most any ONNX Runtime graph of these weights could show against HF in each block: HF / matmuls alone.
    ceiling = [h / m for h, m in zip(hf_blocks, matmul_blocks, strict=True)]

    bw = copy_bandwidth("cpu", nbytes=1 << 29)
    gemm = gemm_rate(prompt_len, 768, 3072)
    decode_floor = decode_bytes / bw
    prefill_floor_s = flops / gemm
    return {
        "arch": arch,
        "layers": layers,
        "params": params,
        "prompt_len": prompt_len,
        "native_ops": list(native_ops),
        "decode_ms": {"ssmrt_onnxruntime": 1e3 * ort_decode, "hf_eager": 1e3 * hf_decode,
                      "floor": 1e3 * decode_floor,
                      "ssmrt_onnxruntime_bodies": 1e3 * statistics.median(bodies_blocks)},
        "prefill_tokens_per_s": {"ssmrt_onnxruntime": prompt_len / ort_prefill, "hf_eager": prompt_len / hf_prefill,
                                 "floor": prompt_len / prefill_floor_s,
                                 "ssmrt_onnxruntime_bodies": prompt_len / bodies_prefill},
        "decode_ms_best": {"ssmrt_onnxruntime": 1e3 * min(ort_blocks), "hf_eager": 1e3 * min(hf_blocks)},
        "decode_ms_blocks": {"ssmrt_onnxruntime": [1e3 * t for t in ort_blocks],
                             "ssmrt_onnxruntime_bodies": [1e3 * t for t in bodies_blocks],
                             "onnxruntime_matmuls_only": [1e3 * t for t in matmul_blocks],
                             "hf_eager": [1e3 * t for t in hf_blocks]},
        "decode_ms_matmuls_only": 1e3 * statistics.median(matmul_blocks),
        "decode_vs_matmuls_only": ort_decode / statistics.median(matmul_blocks),
        "decode_speedup_ceiling_blocks": ceiling,
        "decode_speedup_vs_hf": hf_decode / ort_decode,
        "decode_speedup_vs_hf_paired": paired,
        "decode_speedup_vs_hf_bodies_paired": statistics.median(
            h / o for h, o in zip(hf_blocks, bodies_blocks, strict=True)),
        "decode_speedup_vs_hf_best": min(hf_blocks) / min(ort_blocks),
        "decode_vs_floor": ort_decode / decode_floor,
        "prefill_vs_floor": ort_prefill / prefill_floor_s,
        "copy_bandwidth_GBps": bw / 1e9,
        "gemm_GFLOPps": gemm / 1e9,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["mamba1", "mamba2"], choices=["mamba1", "mamba2"])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="one layer, a few tokens: checks the script (a test runs it)")
    args = ap.parse_args()
    if args.smoke:
        args.layers, args.prompt_len, args.decode_steps, args.repeat = 1, 16, 6, 2
    import onnxruntime

    env = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
           "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "torch_threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke}
    print(json.dumps(env))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            r = bench_arch(arch, args.layers, args.prompt_len, args.decode_steps, args.repeat, Path(tmp))
            results.append(r)
            d, p = r["decode_ms"], r["prefill_tokens_per_s"]
            print(f"{arch}: {r['params'] / 1e6:.0f}M params; copy {r['copy_bandwidth_GBps']:.1f} GB/s, "
                  f"GEMM {r['gemm_GFLOPps']:.0f} GFLOP/s")
            print(f"  ssmrt on ONNX Runtime with native {'/'.join(r['native_ops']) or 'nothing'}:")
            print(f"  decode ms/token: ssmrt/ORT {d['ssmrt_onnxruntime']:.2f}, HF eager {d['hf_eager']:.2f}, "
                  f"floor {d['floor']:.2f} -> {r['decode_speedup_vs_hf']:.2f}x faster than HF, "
                  f"{r['decode_vs_floor']:.2f}x the floor (paired blocks: {r['decode_speedup_vs_hf_paired']:.2f}x; "
                  f"best blocks: {r['decode_ms_best']['ssmrt_onnxruntime']:.2f} vs "
                  f"{r['decode_ms_best']['hf_eager']:.2f} -> {r['decode_speedup_vs_hf_best']:.2f}x)")
            print(f"  the same artifact on stock ONNX Runtime (every op through its fallback body): decode "
                  f"{d['ssmrt_onnxruntime_bodies']:.2f} ms/token (paired vs HF: "
                  f"{r['decode_speedup_vs_hf_bodies_paired']:.2f}x), prefill {p['ssmrt_onnxruntime_bodies']:.0f} tok/s")
            print(f"  ONNX Runtime's matmuls alone: {r['decode_ms_matmuls_only']:.2f} ms/token; the model's step is "
                  f"{r['decode_vs_matmuls_only']:.2f}x that; HF / matmuls alone per block (the most any ONNX Runtime "
                  f"graph could show): {' '.join(f'{c:.2f}x' for c in r['decode_speedup_ceiling_blocks'])}")
            print(f"  prefill tok/s at L={args.prompt_len}: ssmrt/ORT {p['ssmrt_onnxruntime']:.0f}, "
                  f"HF eager {p['hf_eager']:.0f}, floor {p['floor']:.0f} -> {r['prefill_vs_floor']:.2f}x the floor")
    if args.json:
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=2))


if __name__ == "__main__":
    main()
