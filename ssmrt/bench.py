"""Prefill throughput and decode latency of one runner, and the floors they are measured against.

A time alone says little on a shared or noisy machine, so `bench_floors` also measures, in the same run, what
the device can do: a decode step cannot beat reading its weights and state once (step bytes / copy
bandwidth), a prefill cannot beat its matmuls at the device's GEMM rate (matmul FLOPs / GEMM rate).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from .artifact import ITEMSIZE
from .errors import SsmrtError

# Upper bounds of bench's counts. A prompt or a decode run longer than a million tokens, or more than a thousand
# prefill repeats (the median of a thousand says nothing the median of fewer does not), is likelier a typo than
# a plan, and would run for hours before saying anything; batch times prompt length is checked against memory.
MAX_TOKENS = 1_000_000
MAX_REPEAT = 1000
MAX_BATCH = 65_536


def check_bench_args(prompt_len, decode_steps, batch, repeat, cli: bool = False) -> None:
    """Each count an integer from 1 to its bound; `cli` names the options as the command line spells them."""
    from .runtime.sampling import is_int

    for arg, v, top in (("prompt_len", prompt_len, MAX_TOKENS), ("decode_steps", decode_steps, MAX_TOKENS),
                        ("batch", batch, MAX_BATCH), ("repeat", repeat, MAX_REPEAT)):
        flag = "--" + arg.replace("_", "-")
        name = flag if cli else f"{arg} ({flag})"
        if not is_int(v) or not 1 <= v <= top:
            raise SsmrtError(f"{name} must be an integer from 1 to {top:_}, got {v!r}")


def matmul_shapes(config) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(in, out) of the matmuls one token runs through in one layer, and the lm_head's (in, out).

    The weights a decode step streams are these (n_layer times) and the lm_head; norms, conv and scan
    parameters are well under 1% of them and left out."""
    c = config
    if c.arch == "mamba1":
        layer = [(c.d_model, 2 * c.d_inner), (c.d_inner, c.dt_rank + 2 * c.d_state), (c.dt_rank, c.d_inner),
                 (c.d_inner, c.d_model)]
    else:
        layer = [(c.d_model, 2 * c.d_inner + 2 * c.ngroups * c.d_state + c.nheads), (c.d_inner, c.d_model)]
    return layer, (c.d_model, c.padded_vocab_size)


def step_bytes(config, dtype: str, state_bytes: int, weights: dict | None = None) -> int:
    """Bytes a decode step must move at the least: its matmul weights (in `dtype`, or packed as `weights`, an
    artifact's quantisation scheme: the codes, a float32 scale and a zero point per block) once, and a state of
    `state_bytes` read and written."""
    layer, head = matmul_shapes(config)
    params = config.n_layer * sum(i * o for i, o in layer) + head[0] * head[1]
    if weights:
        per_block = 4 + (0 if weights["symmetric"] else weights["bits"] / 8)
        return int(params * (weights["bits"] / 8 + per_block / weights["block_size"])) + 2 * state_bytes
    return params * ITEMSIZE[dtype] + 2 * state_bytes


def step_read_bytes(runner, batch: int = 1) -> int:
    """step_bytes of a runner's model and state (numpy arrays and torch tensors alike)."""
    return step_bytes(runner.config, runner.dtype, sum(s.nbytes for s in runner.zero_state(batch)),
                      getattr(runner, "weights", None))


def prefill_flops(config, prompt_len: int, batch: int = 1, logits: str = "all") -> int:
    """The matmul FLOPs of a prefill: every layer's matmuls per token, and the lm_head per token for
    logits "all" or once per sequence for "last"."""
    layer, head = matmul_shapes(config)
    head_tokens = prompt_len if logits == "all" else 1
    return 2 * batch * (prompt_len * config.n_layer * sum(i * o for i, o in layer) + head_tokens * head[0] * head[1])


def _best(fn, repeat: int, sync=lambda: None) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def copy_bandwidth(device: str = "cpu", nbytes: int = 1 << 28, repeat: int = 10) -> float:
    """Bytes per second a large copy moves (read + write) on `device`, the best of `repeat`: what the machine
    can do when nothing disturbs it. On the CPU the better of numpy's copy (one thread) and torch's (all its
    threads): one core cannot saturate the memory of a many-core machine, and a runtime uses them all."""
    import torch

    if device == "cpu":
        src = np.ones(nbytes // 4, dtype=np.float32)
        dst = np.empty_like(src)
        src_t, dst_t = torch.from_numpy(src), torch.from_numpy(dst)
        return 2 * nbytes / min(_best(lambda: np.copyto(dst, src), repeat), _best(lambda: dst_t.copy_(src_t), repeat))
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best(lambda: dst.copy_(src), repeat, torch.cuda.synchronize)


def gemm_rate(m: int, k: int, n: int, device: str = "cpu", dtype: str = "float32", repeat: int = 10) -> float:
    """FLOP/s of an (m, k) @ (k, n) matmul on `device`, the best of `repeat`; on the CPU in float32, the best
    of torch and numpy."""
    import torch

    a = torch.randn(m, k, dtype=getattr(torch, dtype), device=device)
    b = torch.randn(k, n, dtype=getattr(torch, dtype), device=device)
    if device == "cpu":
        an, bn = a.float().numpy(), b.float().numpy()
        a, b = a.float(), b.float()
        t = min(_best(lambda: torch.mm(a, b), repeat), _best(lambda: an @ bn, repeat))
    else:
        t = _best(lambda: torch.mm(a, b), repeat, torch.cuda.synchronize)
    return 2 * m * k * n / t


def bench_floors(runner, prompt_len: int, batch: int = 1, logits: str | None = None) -> dict | None:
    """The decode and prefill floors of `runner`'s model on its device, measured now; None where this
    process cannot time that device (a CUDA execution provider without a CUDA PyTorch). logits: the positions
    whose logits the prefill was asked for ("last" or "all"; by default the runner's logits_mode): the floor
    counts the lm_head for those only, the least work that answers the question."""
    device = runner.device_kind
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            return None
    layer, _ = matmul_shapes(runner.config)
    flops = prefill_flops(runner.config, prompt_len, batch, "last" if "last" in (logits, runner.logits_mode) else "all")
    moved = step_read_bytes(runner, batch)
    bandwidth = copy_bandwidth(device)
    gemm = gemm_rate(batch * prompt_len, *layer[0], device=device,
                     dtype="float32" if device == "cpu" else runner.dtype)
    return {"device": device, "step_read_bytes": moved, "copy_bandwidth_GBps": bandwidth / 1e9,
            "gemm_GFLOPps": gemm / 1e9, "decode_floor_ms": 1e3 * moved / bandwidth,
            "prefill_floor_tokens_per_s": batch * prompt_len * gemm / flops}


def bench_runner(runner, prompt_len: int = 512, decode_steps: int = 64, batch: int = 1, repeat: int = 3,
                 progress: bool = True, warmup: int = 1, decode_blocks: int = 1, floors: bool = False,
                 logits: str = "last") -> dict:
    """Median prefill time over `repeat` runs, then `decode_blocks` blocks of `decode_steps` single-token
    steps: decode_ms_per_token is the median of the blocks' median steps, decode_ms_best_block the lowest (on
    a noisy machine, the least disturbed block). floors: also the bench_floors figures and the ratios to
    them (decode_vs_floor, prefill_vs_floor: 1.0 is the device's limit; None where they cannot be timed).
    logits: "last" (the default) asks the prefill for the last position's logits only (Runner.forward_last),
    as generation does, so a runner that can skip the other positions' lm_head and their copy to the host
    does; "all" asks for every position's."""
    from tqdm import tqdm

    from .runtime.limits import check_prefill_fits

    check_bench_args(prompt_len, decode_steps, batch, repeat)
    if logits not in ("last", "all"):
        raise SsmrtError(f"logits must be 'last' or 'all', got {logits!r}")
    check_prefill_fits(runner, batch, prompt_len, "bench")
    prefill_fn = runner.forward_last if logits == "last" else runner.forward
    rng = np.random.default_rng(0)
    ids = rng.integers(0, runner.config.vocab_size, (batch, prompt_len), dtype=np.int64)
    for _ in range(warmup):
        prefill_fn(ids, runner.zero_state(batch))
    times = []
    for _ in tqdm(range(repeat), desc="prefill", disable=not progress, leave=False):
        t0 = time.perf_counter()
        out, state = prefill_fn(ids, runner.zero_state(batch))
        times.append(time.perf_counter() - t0)
    prefill = statistics.median(times)
    tok = out[:, -1].argmax(-1)[:, None].astype(np.int64)
    for _ in range(warmup):
        runner.forward(tok, runner.copy(state))
    blocks, steps = [], []
    for _ in range(decode_blocks):
        block = []
        for _ in tqdm(range(decode_steps), desc="decode", disable=not progress, leave=False):
            t0 = time.perf_counter()
            out, state = runner.forward(tok, state)
            block.append(time.perf_counter() - t0)
            tok = out[:, -1].argmax(-1)[:, None].astype(np.int64)
        blocks.append(statistics.median(block))
        steps += block
    return {
        "backend": runner.describe(),
        "batch": batch,
        "prefill_tokens": prompt_len,
        "prefill_logits": logits,
        "prefill_s": prefill,
        "prefill_tokens_per_s": batch * prompt_len / prefill,
        "decode_steps": decode_steps,
        "decode_blocks": decode_blocks,
        "decode_ms_per_token": 1e3 * statistics.median(blocks),
        "decode_ms_best_block": 1e3 * min(blocks),
        "decode_ms_mean": 1e3 * statistics.fmean(steps),
    } | (_with_floors(runner, prompt_len, batch, prefill, statistics.median(blocks), logits) if floors else {})


def _with_floors(runner, prompt_len: int, batch: int, prefill_s: float, decode_s: float, logits: str) -> dict:
    f = bench_floors(runner, prompt_len, batch, logits)
    if f is None:
        return {"floors": None, "decode_vs_floor": None, "prefill_vs_floor": None}
    return {"floors": f, "decode_vs_floor": 1e3 * decode_s / f["decode_floor_ms"],
            "prefill_vs_floor": f["prefill_floor_tokens_per_s"] * prefill_s / (batch * prompt_len)}
