"""CPU benchmark: a float16 artifact against the float32 one of the same model, and prefill with --logits last.

    python benchmarks/cpu_precision.py [--arch mamba2] [--prompt-len 512] [--decode-steps 16] [--repeat 5]
                                       [--json OUT] [--smoke]

A 130M-class config with random weights (d_model 768, 24 layers, vocab 50280; Mamba-2 24 heads of 64, d_state
128; Mamba-1 d_state 16), batch 1, exported three times: float32, float16, and float32 with --logits last. In one
ONNX Runtime process (CPU provider, default threads), in alternating blocks:
- decode ms/token: float32 with the native ops, float16 with the native ops (the runner's default: the scans
  native, the weight matmuls on ssmrt.cpu::HalfMatMul, the mixers and the residual norms fused), the same without
  the fused nodes (fuse=False), float16 on the ops' fallback bodies and ONNX Runtime's MatMul; each figure is the
  median of the per-block ratios (each pair of blocks under the same machine conditions; every other block runs
  the sessions in the reverse order);
- prefill of --prompt-len tokens: float32 with logits for every position against --logits last; float16 with and
  without the fused nodes; float16 with its weight matmuls behind the If that routes a decode step against the
  same file with the native ops and no rewriting (ONNX Runtime's MatMul in the main graph);
- where a decode step's time goes: ONNX Runtime's profile of a few steps of each artifact, per op type.
No figure is a bare time from another run.
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
from collections import Counter
from pathlib import Path

import numpy as np


def make_model(arch: str, layers: int):
    import torch

    from ssmrt.models import MambaLM, SSMConfig

    kw = dict(d_state=16) if arch == "mamba1" else dict(d_state=128, headdim=64, ngroups=1, chunk_size=256)
    cfg = SSMConfig(arch=arch, d_model=768, n_layer=layers, vocab_size=50280, **kw)
    torch.manual_seed(0)
    model = MambaLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and name.endswith("weight"):
                p.normal_(0, 0.02)
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand_like(p) * 15 + 1))
    return model.eval()


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def op_profile(path: str, steps: int, prefix: str) -> dict:
    """Milliseconds per decode step by op type, from ONNX Runtime's profile of `steps` steps of the artifact as the
    runner runs it (native ops; a float16 one's weight matmuls routed to HalfMatMul)."""
    import onnxruntime as ort

    from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact

    make_options = ort.SessionOptions

    def profiled():
        opts = make_options()
        opts.enable_profiling = True
        opts.profile_file_prefix = prefix
        return opts

    ort.SessionOptions = profiled  # the runner builds its session from these
    try:
        sess = OnnxRuntimeRunnerFromArtifact(path, provider="cpu", native_ops="on").session
    finally:
        ort.SessionOptions = make_options
    feeds = {"input_ids": np.array([[5]], np.int64)}
    for i in sess.get_inputs()[1:]:
        dtype = np.float16 if i.type == "tensor(float16)" else np.float32
        feeds[i.name] = np.zeros([1 if d == "batch" else d for d in i.shape], dtype)
    for _ in range(steps):
        sess.run(None, feeds)
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    by_op = Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"] / 1e3 / steps
    return dict(by_op.most_common())


class _PlainSession:
    """The artifact's file as it is on ONNX Runtime with the native library registered (no routed matmuls)."""

    def __init__(self, runner):
        import onnxruntime as ort

        from ssmrt import ort_ops

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.register_custom_ops_library(str(ort_ops.library_path()))
        self.runner = runner
        self.session = ort.InferenceSession(str(runner.path), opts, providers=["CPUExecutionProvider"])

    def forward(self, ids, state):
        feeds = {"input_ids": ids, **{s["name"]: v for s, v in zip(self.runner.state_specs, state, strict=True)}}
        return self.session.run(None, feeds)

    def zero_state(self, batch):
        return self.runner.zero_state(batch)


def _worker(conn, arts: dict, prompt_len: int, decode_steps: int, repeat: int, profile_steps: int, tmp: str):
    from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact

    runners = {"f32": OnnxRuntimeRunnerFromArtifact(arts["f32"], provider="cpu", native_ops="on"),
               "f16": OnnxRuntimeRunnerFromArtifact(arts["f16"], provider="cpu", native_ops="on"),
               "f16_unfused": OnnxRuntimeRunnerFromArtifact(arts["f16"], provider="cpu", native_ops="on", fuse=False),
               "f16_bodies": OnnxRuntimeRunnerFromArtifact(arts["f16"], provider="cpu", native_ops="off"),
               "f32_last": OnnxRuntimeRunnerFromArtifact(arts["f32_last"], provider="cpu", native_ops="on")}
    config = runners["f32"].config
    plain = _PlainSession(runners["f16"])
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, prompt_len), dtype=np.int64)
    states, toks = {}, {}
    for name, r in runners.items():
        logits, states[name] = r.forward(ids, r.zero_state(1))  # also the warm-up
        toks[name] = logits[:, -1].argmax(-1)[:, None].astype(np.int64)

    def step(name):
        logits, states[name] = runners[name].forward(toks[name], states[name])
        toks[name] = logits[:, -1].argmax(-1)[:, None].astype(np.int64)

    decode = {k: [] for k in ("f32", "f16", "f16_unfused", "f16_bodies")}
    prefill = {k: [] for k in ("f32", "f32_last", "f16", "f16_unfused", "f16_unrouted")}
    prefill_runners = {**runners, "f16_unrouted": plain}
    plain.forward(ids, plain.zero_state(1))
    for name in decode:
        step(name)
    for rep in range(repeat):
        # every other block in the reverse order: a session's idle pool threads spin for a while after its run,
        # which slows whichever session runs next
        for name in (list(decode)[::-1] if rep % 2 else decode):
            decode[name].append(_median_time(lambda n=name: step(n), decode_steps))
        for name in (list(prefill)[::-1] if rep % 2 else prefill):
            r = prefill_runners[name]
            prefill[name].append(_median_time(lambda r=r: r.forward(ids, r.zero_state(1)), 1))
    profiles = {name: op_profile(arts[name], profile_steps, os.path.join(tmp, f"profile-{name}"))
                for name in ("f32", "f16")}
    conn.send({"decode_s_blocks": decode, "prefill_s_blocks": prefill, "profile_ms_per_step": profiles,
               "native_ops": list(runners["f16"].native_ops), "decode_matmuls": runners["f16"].decode_matmuls,
               "fused_mixers": runners["f16"].fused_mixers, "fused_norms": runners["f16"].fused_norms,
               "fused_step_mixers": runners["f16"].fused_step_mixers, "fused_blocks": runners["f16"].fused_blocks})


def bench_arch(arch: str, layers: int, prompt_len: int, decode_steps: int, repeat: int, profile_steps: int,
               workdir: Path) -> dict:
    from ssmrt.exporter import export_model

    model = make_model(arch, layers)
    arts = {"f32": export_model(model, workdir / f"{arch}-f32"),
            "f16": export_model(model, workdir / f"{arch}-f16", dtype="float16"),
            "f32_last": export_model(model, workdir / f"{arch}-f32-last", logits="last")}
    ctx = multiprocessing.get_context("spawn")  # ONNX Runtime alone in its process, as a deployment runs it
    conn, child = ctx.Pipe()
    worker = ctx.Process(target=_worker, args=(child, {k: str(v) for k, v in arts.items()}, prompt_len, decode_steps,
                                               repeat, profile_steps, str(workdir)))
    worker.start()
    r = conn.recv()
    worker.join()
    d, p = r["decode_s_blocks"], r["prefill_s_blocks"]
    prof = r["profile_ms_per_step"]

    def paired(a, b):
        return statistics.median(x / y for x, y in zip(a, b, strict=True))

    return {
        "arch": arch, "layers": layers, "prompt_len": prompt_len, "native_ops_f16": r["native_ops"],
        "decode_matmuls_f16": r["decode_matmuls"], "fused_mixers_f16": r["fused_mixers"],
        "fused_norms_f16": r["fused_norms"], "fused_step_mixers_f16": r["fused_step_mixers"],
        "fused_blocks_f16": r["fused_blocks"],
        "decode_ms_per_token": {k: 1e3 * statistics.median(v) for k, v in d.items()},
        "decode_ms_blocks": {k: [1e3 * t for t in v] for k, v in d.items()},
        "decode_f16_over_f32_paired": paired(d["f16"], d["f32"]),
        "decode_f16_bodies_over_f32_paired": paired(d["f16_bodies"], d["f32"]),
        "decode_f16_fused_over_unfused_paired": paired(d["f16"], d["f16_unfused"]),
        "prefill_tokens_per_s": {k: prompt_len / statistics.median(v) for k, v in p.items()},
        "prefill_s_blocks": p,
        "prefill_last_over_all_paired": paired(p["f32_last"], p["f32"]),
        "prefill_f16_routed_over_unrouted_paired": paired(p["f16_unfused"], p["f16_unrouted"]),
        "prefill_f16_fused_over_unfused_paired": paired(p["f16"], p["f16_unfused"]),
        "prefill_f16_over_f32_paired": paired(p["f16"], p["f32"]),
        "profile_ms_per_step": prof,
        # the float16 step's weight matmuls are HalfMatMul nodes inside the routing If (the profile counts both)
        "matmul_ms_f16_over_f32": prof["f16"].get("HalfMatMul", 0.0) / max(prof["f32"].get("MatMul", 0.0), 1e-9),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["mamba2"], choices=["mamba1", "mamba2"])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="one layer, a few tokens: checks the script (a test runs it)")
    args = ap.parse_args()
    if args.smoke:
        args.layers, args.prompt_len, args.decode_steps, args.repeat, args.profile_steps = 1, 16, 3, 2, 1
    import onnxruntime

    env = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
           "onnxruntime": onnxruntime.__version__, "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke}
    print(json.dumps(env))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            r = bench_arch(arch, args.layers, args.prompt_len, args.decode_steps, args.repeat, args.profile_steps,
                           Path(tmp))
            results.append(r)
            d, p = r["decode_ms_per_token"], r["prefill_tokens_per_s"]
            print(f"{arch}, {args.layers} layers, native ops in the float16 artifact: {'/'.join(r['native_ops_f16'])}")
            print(f"  decode ms/token: float32 {d['f32']:.2f}, float16 {d['f16']:.2f}, unfused "
                  f"{d['f16_unfused']:.2f}, on the bodies {d['f16_bodies']:.2f}; float16 / float32 paired "
                  f"{r['decode_f16_over_f32_paired']:.3f}, fused / unfused "
                  f"{r['decode_f16_fused_over_unfused_paired']:.3f}, bodies / float32 "
                  f"{r['decode_f16_bodies_over_f32_paired']:.3f}")
            routed = r["prefill_f16_routed_over_unrouted_paired"]
            print(f"  prefill tok/s at L={args.prompt_len}: float32 logits all {p['f32']:.0f}, last "
                  f"{p['f32_last']:.0f} (time last / all paired {r['prefill_last_over_all_paired']:.3f}); float16 "
                  f"{p['f16']:.0f}, unfused {p['f16_unfused']:.0f} (fused / unfused "
                  f"{r['prefill_f16_fused_over_unfused_paired']:.3f}), unrouted {p['f16_unrouted']:.0f} (unfused, "
                  f"routed / unrouted {routed:.3f}); float16 / float32 {r['prefill_f16_over_f32_paired']:.3f}")
            for name, prof in r["profile_ms_per_step"].items():
                top = ", ".join(f"{k} {v:.2f}" for k, v in list(prof.items())[:5])
                print(f"  {name} decode step by op (ms): {top}; total {sum(prof.values()):.2f}")
            print(f"  weight matmul time, float16 HalfMatMul / float32 MatMul: {r['matmul_ms_f16_over_f32']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=2))


if __name__ == "__main__":
    main()
