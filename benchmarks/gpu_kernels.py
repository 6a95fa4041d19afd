"""GPU benchmark: one run builds, checks and times the ssmrt kernels and the torch backend's
CUDA-graph decode, against the device's copy bandwidth and, when mamba_ssm is importable, its Triton
kernels, all measured in this run.

    python benchmarks/gpu_kernels.py [--json OUT]      # on a GPU (pip install mamba-ssm with
                                                         MAMBA_SKIP_CUDA_BUILD=TRUE for the peers)
    python benchmarks/gpu_kernels.py --smoke           # tiny shapes on the CPU (Triton's interpreter):
                                                         checks this script, measures nothing meaningful

Every case first checks its result against the reference (max abs error, and whether it is within the
per-dtype op / model tolerance), then times it. Cases:
- decode state update, Mamba-2 2.7B shape (80 heads x 64 x 128, fp32 state), batch 1 and 64: GB/s of the
  state read + write against copy bandwidth (target >= 75% at batch 64; under 10 us at batch 1), timed as a
  CUDA graph of 20 launches so that launch overhead does not count;
- SelectiveScan prefill, d_state 16: the recurrence and the chain split over time at short L (where
  selective_scan switches), then d_inner 1536 and 5120, L 2048 and 8192: GB/s of the bytes it must move
  (target >= 50% of copy bandwidth);
- SSDScan prefill, bf16, d_state 128, headdim 64, 24 heads: the recurrence and the chunked chain at short L
  (where ssd_scan switches, CHUNKED_MIN_SEQLEN), then L 2K-16K, batch 1 and 8, against mamba_ssm's
  mamba_chunk_scan_combined (target: at least its throughput);
- end-to-end decode of a 130M-class Mamba-2 (random weights) in fp16 at batch 1 on the torch backend: the
  replayed CUDA graph and the whole runner step, against the weight-read floor (ssmrt.bench.step_read_bytes:
  matmul weights once, state read and written, over copy bandwidth; target within 2x) and against the same
  model's eager step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under Triton's interpreter")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    import numpy as np
    import torch

    from ssmrt.closeness import diff
    from ssmrt.kernels.selective_chunked import selective_scan_chunked
    from ssmrt.kernels.selective_scan import CHUNKED_MIN_SEQLEN as SELECTIVE_CHUNKED_MIN_SEQLEN
    from ssmrt.kernels.selective_scan import selective_scan, selective_scan_recurrent
    from ssmrt.kernels.ssd_chunked import ssd_scan_chunked
    from ssmrt.kernels.ssd_scan import CHUNKED_MIN_SEQLEN, ssd_scan, ssd_scan_recurrent
    from ssmrt.ops import selective_scan_ref, ssd_scan_ref, tolerance

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU, or pass --smoke to check the script on the CPU")
    repeat = 2 if args.smoke else args.repeat
    smoke = args.smoke

    def timed(fn) -> float:
        """Median seconds of fn() after a warm-up (CUDA events on the GPU)."""
        fn()
        times = []
        for _ in range(repeat):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def timed_launches(fn, n: int = 20) -> float:
        """Seconds per call of fn, n calls captured in one CUDA graph (no launch overhead); plain on the CPU."""
        if device != "cuda":
            return timed(fn)
        fn()  # compiles
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(n):
                fn()
        return timed(graph.replay) / n

    def check(name, got, want, dtype, scope="op"):
        atol, rtol = tolerance(dtype, scope)
        d = diff(got, want, atol, rtol)
        return {f"{name}_max_abs_err": d.max_abs, f"{name}_ok": d.atol_needed <= atol}

    nbytes = (1 << 20) if smoke else (1 << 30)
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_bw = 2 * nbytes / timed(lambda: dst.copy_(src))
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        selective_state_update = mamba_chunk_scan_combined = None
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, dtype=torch.float32, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, device=device, dtype=torch.float32)).to(dtype)

    def ssd_inputs(batch, L, H, P, N, act):
        return dict(x=rand(batch, L, H, P, dtype=act), dt=rand(batch, L, H, dtype=act, scale=0.5),
                    A=-torch.rand(H, device=device) - 0.5, B=rand(batch, L, 1, N, dtype=act),
                    C=rand(batch, L, 1, N, dtype=act), D=rand(H), dt_bias=rand(H, scale=0.1) - 1.0,
                    dt_softplus=True, dt_limit=(0.0, math.inf), chunk_size=256)

    def decode_case(batch, H, P, N):
        """Mamba-2 decode state update (the recurrence at L = 1), in place."""
        kw = ssd_inputs(batch, 1, H, P, N, torch.float16)
        state = rand(batch, H, P, N)
        y_ref, s_ref = ssd_scan_ref(**kw, ssm_state=state)
        y = torch.empty_like(kw["x"])
        row = {"case": "ssd decode step", "batch": batch, "shape": [H, P, N]}
        s = state.clone()
        ssd_scan(**kw, ssm_state=s, out=y, state_out=s)
        row.update(check("y", y, y_ref, torch.float16) | check("state", s, s_ref, torch.float16))
        t = timed_launches(lambda: ssd_scan(**kw, ssm_state=s, out=y, state_out=s))
        moved = 2 * state.numel() * 4
        row.update({"us": t * 1e6, "GBps": moved / t / 1e9, "of_copy_bw": moved / t / copy_bw})
        if selective_state_update is not None:
            st2 = state.clone()
            x, dt, A, B, C = kw["x"][:, 0], kw["dt"][:, 0], kw["A"], kw["B"][:, 0], kw["C"][:, 0]
            t_peer = timed_launches(lambda: selective_state_update(
                st2, x, dt[..., None].expand(batch, H, P), A[:, None, None].expand(H, P, N), B, C,
                kw["D"][:, None].expand(H, P), z=None, dt_bias=kw["dt_bias"][:, None].expand(H, P),
                dt_softplus=True))
            row.update({"mamba_ssm_us": t_peer * 1e6, "vs_mamba_ssm": t_peer / t})
        return row

    def selective_case(dim, L, impls, Nm=16):
        """Mamba-1 SelectiveScan prefill from zero state, each implementation named."""
        u, delta, z = (rand(1, L, dim, dtype=torch.float16) for _ in range(3))
        A, Dv, db = -torch.rand(dim, Nm, device=device) - 0.5, rand(dim), rand(dim)
        B, C = rand(1, L, 1, Nm, dtype=torch.float16), rand(1, L, 1, Nm, dtype=torch.float16)
        state = torch.zeros(1, dim, Nm, device=device)
        args_ = (u, delta, A, B, C, Dv, z, db, True, state)
        y_ref, s_ref = selective_scan_ref(*args_)
        moved = 4 * L * dim * 2 + 2 * L * Nm * 2 + 2 * dim * Nm * 4  # u, delta, z, y; B, C; state in/out
        row = {"case": "selective_scan prefill", "dim": dim, "L": L}
        for name, fn in impls.items():
            y, s = fn(*args_)
            row.update(check(f"{name}_y", y, y_ref, torch.float16) | check(f"{name}_state", s, s_ref, torch.float16))
            t = timed(lambda fn=fn: fn(*args_))
            row.update({f"{name}_ms": t * 1e3, f"{name}_GBps": moved / t / 1e9,
                        f"{name}_of_copy_bw": moved / t / copy_bw})
        return row

    def ssd_case(batch, L, H, P, N, act, impls):
        """Mamba-2 SSDScan prefill from zero state: each implementation named, against the fp32 reference and,
        for the dispatcher's choice, mamba_chunk_scan_combined when present."""
        kw = ssd_inputs(batch, L, H, P, N, act)
        state = torch.zeros(batch, H, P, N, device=device)
        y_ref, s_ref = ssd_scan_ref(**kw, ssm_state=state)
        row = {"case": "ssd_scan prefill", "batch": batch, "L": L, "dtype": str(act).removeprefix("torch.")}
        for name, fn in impls.items():
            y, s = fn(**kw, ssm_state=state)
            row.update(check(f"{name}_y", y, y_ref, act) | check(f"{name}_state", s, s_ref, act))
            t = timed(lambda fn=fn: fn(**kw, ssm_state=state))
            row[f"{name}_tokens_per_s"] = batch * L / t
        if mamba_chunk_scan_combined is not None and "ssd_scan" in impls:
            t_peer = timed(lambda: mamba_chunk_scan_combined(
                kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], chunk_size=256, D=kw["D"], dt_bias=kw["dt_bias"],
                dt_softplus=True, return_final_states=True))
            row["mamba_ssm_tokens_per_s"] = batch * L / t_peer
            row["vs_mamba_ssm"] = row["ssd_scan_tokens_per_s"] / row["mamba_ssm_tokens_per_s"]
        return row

    def e2e_decode_case(dtype):
        """130M-class Mamba-2 decode on the torch backend: parity with the fp32 CPU reference, then the
        replayed graph alone, the whole runner step (ids in, logits out to numpy), and the eager step."""
        from ssmrt.bench import bench_runner, step_read_bytes
        from ssmrt.compare import compare_runners
        from ssmrt.models import MambaLM, SSMConfig
        from ssmrt.runtime import TorchRunner

        sizes = (dict(d_model=32, n_layer=2, vocab_size=256, headdim=8, d_state=16) if smoke else
                 dict(d_model=768, n_layer=24, vocab_size=50280, headdim=64, d_state=128))
        cfg = SSMConfig(arch="mamba2", pad_vocab_size_multiple=16, **sizes)
        torch.manual_seed(0)
        ref_model = MambaLM(cfg).eval()
        with torch.no_grad():
            for name, p in ref_model.named_parameters():
                if name.endswith(("A_log", "dt_bias")):
                    p.copy_(torch.rand_like(p) * 2.0 - 1.0)
        model = MambaLM(cfg).eval()
        model.load_state_dict(ref_model.state_dict())
        model.cast(dtype).to(device)
        decode = "static" if smoke else "cuda_graph"
        runner = TorchRunner(model, kernels=True, decode=decode)
        step_bytes = step_read_bytes(runner)  # matmul weights once, the state read and written
        prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, 16).tolist()
        report = compare_runners(TorchRunner(ref_model), runner, prompt, steps=8)
        row = {"case": "e2e decode", "model": "mamba2-130m-class" if not smoke else "tiny",
               "dtype": str(dtype).removeprefix("torch."), "decode": decode, "step_MB": step_bytes / 1e6,
               "parity_ok": report.passed, "parity_atol_needed": report.atol_needed}
        graph = runner._graphs[1]
        t_graph = timed(graph._run)
        steps = 4 if smoke else 64
        whole = bench_runner(runner, prompt_len=32 if smoke else 512, decode_steps=steps, repeat=1,
                             progress=False, decode_blocks=3)["decode_ms_per_token"] / 1e3
        eager = bench_runner(TorchRunner(model, kernels=True, decode="eager"), prompt_len=32 if smoke else 512,
                             decode_steps=steps, repeat=1, progress=False, decode_blocks=3)["decode_ms_per_token"] / 1e3
        floor = step_bytes / copy_bw
        row.update({"floor_us": floor * 1e6, "graph_us": t_graph * 1e6, "graph_vs_floor": t_graph / floor,
                    "step_us": whole * 1e6, "step_vs_floor": whole / floor, "eager_step_us": eager * 1e6,
                    "eager_vs_graph_step": eager / whole})
        return row

    rows = []
    # 1. decode state update, Mamba-2 2.7B shape (80 heads x 64 x 128)
    for batch in ((1, 2) if smoke else (1, 64)):
        rows.append(decode_case(batch, *((4, 8, 16) if smoke else (80, 64, 128))))
    # 2. SelectiveScan prefill (Mamba-1), d_state 16: the recurrence and the chain at short L, then long L
    sel_both = {"recurrent": selective_scan_recurrent, "chunked": selective_scan_chunked}
    for L in ((8, 40) if smoke else (16, 32, 64, 128, 256)):
        rows.append(selective_case(16 if smoke else 1536, L, sel_both))
    for dim, L in (((16, 64),) if smoke else ((1536, 2048), (5120, 2048), (1536, 8192))):
        rows.append(selective_case(dim, L, {"selective_scan": selective_scan}))
    # 3. SSDScan prefill (Mamba-2), bf16 (fp16 in the smoke run: the interpreter has no bf16)
    act = torch.float16 if smoke else torch.bfloat16
    shape = (2, 16, 16) if smoke else (24, 64, 128)
    both = {"recurrent": ssd_scan_recurrent, "chunked": ssd_scan_chunked}
    for L in ((8, 40) if smoke else (16, 32, 64, 128, 256)):
        rows.append(ssd_case(1, L, *shape, act, both))
    for batch, L in (((1, 64),) if smoke else ((1, 2048), (1, 8192), (1, 16384), (8, 2048), (8, 8192))):
        rows.append(ssd_case(batch, L, *shape, act, {"ssd_scan": ssd_scan}))
    # 4. end-to-end decode, fp16, batch 1
    rows.append(e2e_decode_case(torch.float16))

    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
           "torch": torch.__version__, "triton": __import__("triton").__version__,
           "mamba_ssm": getattr(sys.modules.get("mamba_ssm"), "__version__", None),
           "copy_GBps": copy_bw / 1e9, "chunked_min_seqlen": CHUNKED_MIN_SEQLEN,
           "selective_chunked_min_seqlen": SELECTIVE_CHUNKED_MIN_SEQLEN,
           "date": time.strftime("%Y-%m-%d"), "smoke": smoke}
    if device == "cuda":
        env["driver"] = torch.cuda.get_device_properties(0).name
        env["cuda"] = torch.version.cuda
    print(json.dumps(env))
    for r in rows:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
