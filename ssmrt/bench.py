"""Prefill throughput and decode latency of one runner, measured in one process."""

from __future__ import annotations

import statistics
import time

import numpy as np


def bench_runner(runner, prompt_len: int = 512, decode_steps: int = 64, batch: int = 1, repeat: int = 3,
                 progress: bool = True, warmup: int = 1, decode_blocks: int = 1) -> dict:
    """Median prefill time over `repeat` runs, then `decode_blocks` blocks of `decode_steps` single-token
    steps: decode_ms_per_token is the median of the blocks' median steps, decode_ms_best_block the lowest (on
    a noisy machine, the least disturbed block)."""
    from tqdm import tqdm

    rng = np.random.default_rng(0)
    ids = rng.integers(0, runner.config.vocab_size, (batch, prompt_len), dtype=np.int64)
    for _ in range(warmup):
        runner.forward(ids, runner.zero_state(batch))
    times = []
    for _ in tqdm(range(repeat), desc="prefill", disable=not progress, leave=False):
        t0 = time.perf_counter()
        logits, state = runner.forward(ids, runner.zero_state(batch))
        times.append(time.perf_counter() - t0)
    prefill = statistics.median(times)
    tok = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
    for _ in range(warmup):
        runner.forward(tok, runner.copy(state))
    blocks, steps = [], []
    for _ in range(decode_blocks):
        block = []
        for _ in tqdm(range(decode_steps), desc="decode", disable=not progress, leave=False):
            t0 = time.perf_counter()
            logits, state = runner.forward(tok, state)
            block.append(time.perf_counter() - t0)
            tok = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        blocks.append(statistics.median(block))
        steps += block
    return {
        "backend": runner.describe(),
        "batch": batch,
        "prefill_tokens": prompt_len,
        "prefill_s": prefill,
        "prefill_tokens_per_s": batch * prompt_len / prefill,
        "decode_steps": decode_steps,
        "decode_blocks": decode_blocks,
        "decode_ms_per_token": 1e3 * statistics.median(blocks),
        "decode_ms_best_block": 1e3 * min(blocks),
        "decode_ms_mean": 1e3 * statistics.fmean(steps),
    }
