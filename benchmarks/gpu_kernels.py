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
- end to end, both families (130M-class Mamba-1 and Mamba-2, random weights, fp16) on the kernels:
  prefill at L 512, 2048 and 8192 with the last position's logits kept on the device, against the matmul
  floor (ssmrt.bench: the prefill's matmul FLOPs at the device's GEMM rate, measured now); the decode step
  at batch 1 and 64, the replayed CUDA graph and the whole runner step, against the copy floor
  (ssmrt.bench.step_read_bytes: matmul weights once, the state read and written, over copy bandwidth);
  each against mamba_ssm's own MambaLMHeadModel on the same weights (prefill with num_last_tokens=1; its
  CUDA-graph decode step from update_graph_cache) when mamba_ssm is importable and runs the family, else
  the row says why not. Parity first: the prefill's logits against the same model on the plain torch ops
  (and mamba_ssm's), the decode step likewise, and at batch 1 a short generation against the fp32 CPU
  reference.
Every ratio is of two times measured in this run.
"""

from __future__ import annotations

import argparse
import dataclasses
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

    # ---- end to end: both families, 130M-class, random weights, fp16 (the shapes of mamba-130m / mamba2-130m)
    from ssmrt.bench import bench_floors, bench_runner, step_read_bytes
    from ssmrt.compare import compare_runners
    from ssmrt.models import MambaLM, SSMConfig
    from ssmrt.runtime import TorchRunner

    def lm_config(arch):
        if smoke:
            sizes = dict(d_model=32, n_layer=2, vocab_size=256, d_state=8 if arch == "mamba1" else 16)
        else:
            sizes = dict(d_model=768, n_layer=24, vocab_size=50280, d_state=16 if arch == "mamba1" else 128)
        if arch == "mamba2":
            sizes["headdim"] = 8 if smoke else 64
        return SSMConfig(arch=arch, pad_vocab_size_multiple=16, **sizes)

    models = {}

    def lm(arch, dtype=torch.float16):
        """(fp32 CPU reference model, the same weights in `dtype` on the device, the kernels' runner), built once
        per family: random weights with A_log and dt_bias spread as trained ones are."""
        if arch not in models:
            cfg = lm_config(arch)
            torch.manual_seed(0)
            ref_model = MambaLM(cfg).eval()
            with torch.no_grad():
                for name, p in ref_model.named_parameters():
                    if name.endswith(("A_log", "dt_bias")):
                        p.copy_(torch.rand_like(p) * 2.0 - 1.0)
            model = MambaLM(cfg).eval()
            model.load_state_dict(ref_model.state_dict())
            model.cast(dtype).to(device)
            runner = TorchRunner(model, kernels=True, decode="static" if smoke else "cuda_graph")
            models[arch] = (ref_model, model, runner)
        return models[arch]

    peers = {}

    def peer(arch):
        """mamba_ssm's own MambaLMHeadModel with the same weights and dtype, or (None, why not)."""
        if arch in peers:
            return peers[arch]
        try:
            from mamba_ssm.models.config_mamba import MambaConfig
            from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

            from ssmrt.models.checkpoints import _mamba_ssm_config, _to_mamba_ssm_names
        except ImportError as e:
            peers[arch] = (None, f"mamba_ssm is not importable ({e})")
            return peers[arch]
        if device != "cuda":
            peers[arch] = (None, "mamba_ssm's model runs on CUDA only")
            return peers[arch]
        _, model, _ = lm(arch)
        try:
            fields = {f.name for f in dataclasses.fields(MambaConfig)}  # its versions differ in which they have
            cfg = MambaConfig(**{k: v for k, v in _mamba_ssm_config(model.config).items() if k in fields})
            m = MambaLMHeadModel(cfg, device=device, dtype=model.dtype)
            missing, unexpected = m.load_state_dict(_to_mamba_ssm_names(model.state_dict()), strict=False)
            if [k for k in missing if not k.endswith("lm_head.weight")] or unexpected:
                raise RuntimeError(f"weights do not map: missing {missing[:3]}, unexpected {unexpected[:3]}")
            peers[arch] = (m.eval(), None)
        except Exception as e:  # a family mamba_ssm cannot run here (Mamba-1 needs its CUDA extension)
            peers[arch] = (None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return peers[arch]

    def with_peer(row, arch, fn):
        """row updated by fn(peer model), or the reason there is no mamba_ssm figure."""
        m, why = peer(arch)
        if m is None:
            row["mamba_ssm_skipped"] = why
            return row
        try:
            with torch.inference_mode():
                row.update(fn(m))
        except Exception as e:
            row["mamba_ssm_skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return row

    def e2e_prefill_case(arch, L, batch=1, check_parity=False):
        """A prompt's prefill on the kernels, the logits of the last position kept on the device (what
        generation asks for): time against the matmul floor (ssmrt.bench: the prefill's matmul FLOPs at the
        device's GEMM rate) and mamba_ssm's model on the same weights (num_last_tokens=1)."""
        _, model, runner = lm(arch)
        ids = torch.randint(0, model.config.vocab_size, (batch, L), generator=g, device=device)

        def run():
            with torch.no_grad(), runner._routes():
                return model(ids, last_only=True)[0]

        logits = run()
        row = {"case": "e2e prefill", "arch": arch, "batch": batch, "L": L,
               "dtype": str(model.dtype).removeprefix("torch."), "logits": tuple(logits.shape)}
        if check_parity:  # against the same model on the plain torch ops
            with torch.no_grad():
                want = model(ids, last_only=True)[0]
            row.update(check("logits", logits.float(), want.float(), model.dtype, "model"))
        t = timed(run)
        f = bench_floors(runner, L, batch, logits="last")
        floor = batch * L / f["prefill_floor_tokens_per_s"]
        row.update({"ms": t * 1e3, "tokens_per_s": batch * L / t, "matmul_floor_ms": floor * 1e3,
                    "vs_matmul_floor": t / floor, "gemm_GFLOPps": f["gemm_GFLOPps"]})

        def vs_peer(m):
            out = {}
            peer_logits = m(ids, num_last_tokens=1).logits
            if check_parity:
                atol, rtol = tolerance(model.dtype, "model")
                d = diff(peer_logits[..., : logits.shape[-1]].float(), logits.float(), atol, rtol)
                out.update({"mamba_ssm_logits_max_abs_diff": d.max_abs, "mamba_ssm_logits_ok": d.atol_needed <= atol})
            t_peer = timed(lambda: m(ids, num_last_tokens=1).logits)
            return out | {"mamba_ssm_ms": t_peer * 1e3, "vs_mamba_ssm": t / t_peer}

        return with_peer(row, arch, vs_peer)

    def e2e_decode_case(arch, batch):
        """One decode step on the kernels: the replayed CUDA graph ("static" buffers run eagerly in the smoke
        run) and the whole runner step (ids in, logits to numpy), against the copy floor (ssmrt.bench
        .step_read_bytes: matmul weights once, the state read and written, over copy bandwidth) and mamba_ssm's
        CUDA-graph step (its update_graph_cache callable: ids copied in, replay, logits cloned). Parity: at batch
        1 the whole generation against the fp32 CPU reference (compare_runners); at any batch one graph step
        against the same step on the plain torch ops."""
        ref_model, model, runner = lm(arch)
        cfg = model.config
        prompt = torch.randint(0, cfg.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(batch)).numpy()
        row = {"case": "e2e decode", "arch": arch, "batch": batch, "dtype": str(model.dtype).removeprefix("torch."),
               "decode": runner.decode}
        if batch == 1:
            report = compare_runners(TorchRunner(ref_model), runner, prompt[0].tolist(), steps=8)
            row.update({"parity_ok": report.passed, "parity_atol_needed": report.atol_needed})
        eager = TorchRunner(model, kernels=False, decode="eager")
        _, state = runner.forward_last(prompt, runner.zero_state(batch))
        tok = prompt[:, -1:]
        want, _ = eager.forward(tok, eager.copy(state))
        got, _ = runner.forward(tok, runner.copy(state))
        row.update(check("step_logits", torch.from_numpy(got), torch.from_numpy(want), model.dtype, "model"))
        graph = runner._graphs[batch]
        with torch.no_grad():
            t_graph = timed(graph._run)
        steps = 4 if smoke else 64
        whole = bench_runner(runner, prompt_len=16, decode_steps=steps, batch=batch, repeat=1, progress=False,
                             decode_blocks=3)["decode_ms_per_token"] / 1e3
        step_bytes = step_read_bytes(runner, batch)
        floor = step_bytes / copy_bw
        row.update({"step_MB": step_bytes / 1e6, "copy_floor_us": floor * 1e6, "graph_us": t_graph * 1e6,
                    "graph_vs_copy_floor": t_graph / floor, "step_us": whole * 1e6,
                    "step_vs_copy_floor": whole / floor})

        def vs_peer(m):
            from mamba_ssm.utils.generation import update_graph_cache

            cache = update_graph_cache(m, None, batch, seqlen_og=16, max_seqlen=16 + 8)
            cache.inference_params.seqlen_offset = 16
            ids = torch.as_tensor(tok, device=device)
            pos = torch.full((batch, 1), 16, dtype=torch.long, device=device)
            t_peer = timed(lambda: cache.run(ids, pos, 16))
            return {"mamba_ssm_step_us": t_peer * 1e6, "vs_mamba_ssm": t_graph / t_peer}

        return with_peer(row, arch, vs_peer)

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
    # 4. end to end, both families, fp16: prefill (the last position's logits), then the decode step
    for arch in ("mamba1", "mamba2"):
        for i, L in enumerate((8, 40) if smoke else (512, 2048, 8192)):
            rows.append(e2e_prefill_case(arch, L, check_parity=i == 0))
        for batch in ((1, 2) if smoke else (1, 64)):
            rows.append(e2e_decode_case(arch, batch))

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
