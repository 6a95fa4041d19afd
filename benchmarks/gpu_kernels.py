"""GPU kernel benchmark (issue 4): the ssmrt Triton kernels against the device's copy bandwidth and, when
mamba_ssm is importable, its Triton kernels, all measured in this run.

    python benchmarks/gpu_kernels.py [--json OUT]      # on a GPU (pip install mamba-ssm with
                                                         MAMBA_SKIP_CUDA_BUILD=TRUE for the peers)
    python benchmarks/gpu_kernels.py --smoke           # tiny shapes on the CPU (Triton's interpreter):
                                                         checks this script, measures nothing meaningful

Cases (the issue's targets):
- decode state update, Mamba-2 2.7B shape (80 heads x 64 x 128, fp32 state), batch 1 and 64: GB/s of the
  state read + write against copy bandwidth (target >= 75% at batch 64; under 10 us at batch 1);
- SelectiveScan prefill, d_inner 1536 and 5120, d_state 16, L 2048 and 8192: GB/s of the bytes it must
  move (target >= 50% of copy bandwidth);
- SSDScan prefill, bf16, d_state 128, headdim 64, 24 heads, L 2048 and 8192, batch 1 and 8: tokens/s
  against mamba_ssm's mamba_chunk_scan_combined (target: at least its throughput).
"""

from __future__ import annotations

import argparse
import json
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
    import torch

    from ssmrt.kernels.selective_scan import selective_scan
    from ssmrt.kernels.ssd_scan import ssd_scan

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU, or pass --smoke to check the script on the CPU")
    repeat = 2 if args.smoke else args.repeat

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

    nbytes = (1 << 20) if args.smoke else (1 << 30)
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_bw = 2 * nbytes / timed(lambda: dst.copy_(src))
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        selective_state_update = mamba_chunk_scan_combined = None
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    def decode_case(batch, H, P, N):
        """Mamba-2 decode state update, in place."""
        x, dt = rand(batch, 1, H, P, dtype=torch.float16), rand(batch, 1, H, dtype=torch.float16)
        A, D, dt_bias = -torch.rand(H, device=device) - 0.5, rand(H), rand(H)
        B, C = rand(batch, 1, 1, N, dtype=torch.float16), rand(batch, 1, 1, N, dtype=torch.float16)
        state = rand(batch, H, P, N)
        y = torch.empty_like(x)
        t = timed(lambda: ssd_scan(x, dt, A, B, C, D, dt_bias, True, (0.0, float("inf")), state, out=y,
                                   state_out=state))
        moved = 2 * state.numel() * 4
        row = {"case": "ssd decode step", "batch": batch, "shape": [H, P, N], "us": t * 1e6,
               "GBps": moved / t / 1e9, "of_copy_bw": moved / t / copy_bw}
        if selective_state_update is not None:
            st2 = state.clone()
            xe, dte = x[:, 0], dt[:, 0, :, None].expand(batch, H, P)
            Ae = A[:, None, None].expand(H, P, N).float()
            t_peer = timed(lambda: selective_state_update(
                st2, xe, dte, Ae, B[:, 0], C[:, 0], D[:, None].expand(H, P), z=None,
                dt_bias=dt_bias[:, None].expand(H, P), dt_softplus=True))
            row["mamba_ssm_us"] = t_peer * 1e6
        return row

    def selective_case(dim, L, Nm=16):
        """Mamba-1 SelectiveScan prefill from zero state."""
        u, delta, z = (rand(1, L, dim, dtype=torch.float16) for _ in range(3))
        A, Dv, db = -torch.rand(dim, Nm, device=device) - 0.5, rand(dim), rand(dim)
        B, C = rand(1, L, 1, Nm, dtype=torch.float16), rand(1, L, 1, Nm, dtype=torch.float16)
        state = torch.zeros(1, dim, Nm, device=device)
        t = timed(lambda: selective_scan(u, delta, A, B, C, Dv, z, db, True, state))
        moved = 4 * L * dim * 2 + 2 * L * Nm * 2 + 2 * dim * Nm * 4  # u, delta, z, y; B, C; state in/out
        return {"case": "selective_scan prefill", "dim": dim, "L": L, "ms": t * 1e3,
                "GBps": moved / t / 1e9, "of_copy_bw": moved / t / copy_bw}

    def ssd_case(batch, L, H, P, N, act):
        """Mamba-2 SSDScan prefill from zero state, against mamba_chunk_scan_combined when present."""
        x, dt = rand(batch, L, H, P, dtype=act), rand(batch, L, H, dtype=act)
        A, Dv, db = -torch.rand(H, device=device) - 0.5, rand(H), rand(H)
        B, C = rand(batch, L, 1, N, dtype=act), rand(batch, L, 1, N, dtype=act)
        state = torch.zeros(batch, H, P, N, device=device)
        t = timed(lambda: ssd_scan(x, dt, A, B, C, Dv, db, True, (0.0, float("inf")), state))
        row = {"case": "ssd_scan prefill", "batch": batch, "L": L, "ms": t * 1e3, "tokens_per_s": batch * L / t}
        if mamba_chunk_scan_combined is not None:
            t_peer = timed(lambda: mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size=256, D=Dv, dt_bias=db,
                                                             dt_softplus=True))
            row["mamba_ssm_tokens_per_s"] = batch * L / t_peer
            row["vs_mamba_ssm"] = t_peer / t
        return row

    rows = []
    # 1. decode state update, Mamba-2 2.7B shape (80 heads x 64 x 128)
    for batch in ((1, 2) if args.smoke else (1, 64)):
        rows.append(decode_case(batch, *((4, 8, 16) if args.smoke else (80, 64, 128))))
    # 2. SelectiveScan prefill (Mamba-1), d_state 16
    for dim, L in (((16, 32),) if args.smoke else ((1536, 2048), (5120, 2048), (1536, 8192))):
        rows.append(selective_case(dim, L))
    # 3. SSDScan prefill (Mamba-2), bf16 (fp16 in the smoke run: the interpreter has no bf16)
    act = torch.float16 if args.smoke else torch.bfloat16
    for batch, L in (((1, 16),) if args.smoke else ((1, 2048), (1, 8192), (8, 2048))):
        rows.append(ssd_case(batch, L, *((2, 8, 16) if args.smoke else (24, 64, 128)), act))

    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
           "torch": torch.__version__, "triton": __import__("triton").__version__,
           "copy_GBps": copy_bw / 1e9, "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke}
    print(json.dumps(env))
    for r in rows:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
