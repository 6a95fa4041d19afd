"""CausalConv1d as one Triton kernel for any seqlen (seqlen 1 is the decode step). Its reference twin is
ssmrt.ops.causal_conv1d_ref (same signature).

Contract (one launch: input pointers, int32 scalars, output pointers, as ssmrt.plugins.launch says; the
activation a compile-time constant):
    0 x           (batch, seqlen, dim)     contiguous
    1 weight      (dim, width)
    2 bias        (dim,)                   optional
    3 conv_state  (batch, dim, width - 1)  the last width-1 inputs
  ->
    y (batch, seqlen, dim), present_conv_state (may be conv_state itself: see "the state in place" below)
The launch (argument order, int32 scalars, grid) is in ssmrt.plugins.launch.

The grid is (channel blocks, time tiles, batch): a program computes y for BLOCK_T times of BLOCK_C channels,
reading its tile's inputs and the width-1 before it (from x, or from the carried state for times before 0).
A prompt is as parallel over time as over channels; a decode step (seqlen 1) is one tile a channel block.

The state in place. present_conv_state may be conv_state, and programs run in no particular order, so a
program that reads the old state must not be overtaken by one that writes the new state over it. Only the
outputs at times t < width-1 read the old state (their windows start at t-(width-1) < 0), and the new state
needs it only when seqlen < width-1. With BLOCK_T >= width-1 (constexprs makes it so) all those times are in
tile 0: tile 0 computes them, reads the new state's inputs and, after a barrier that orders every read of
its own threads before the write, writes the new state; every other tile reads x only and writes no state,
and other channel blocks or batch rows are other state elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..plugins.launch import launch
from ._checks import check_outputs
from ._jit import silu


@triton.jit
def _window(x_ptr, state_ptr, b, j, offs_c, mask_c, valid, seqlen, dim, nstate):
    """Inputs at times j (BLOCK_C, BLOCK_K): x where j >= 0, else the carried state's column nstate + j."""
    from_x = valid & (j >= 0)
    from_s = valid & (j < 0)
    xv = tl.load(x_ptr + (b * seqlen + j) * dim + offs_c[:, None], mask=mask_c[:, None] & from_x, other=0.0)
    sv = tl.load(state_ptr + (b * dim + offs_c[:, None]) * nstate + nstate + j, mask=mask_c[:, None] & from_s,
                 other=0.0)
    return xv.to(tl.float32) + sv.to(tl.float32)


def _causal_conv1d_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr,
    seqlen, dim, width,
    y_ptr, state_out_ptr,
    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < dim
    offs_k = tl.arange(0, BLOCK_K)
    nstate = width - 1
    # Tile 0 alone reads the old state and writes the new one (module docstring). The new state's masks are
    # `index < width-1`; on every other tile the index is offset by BLOCK_K >= width, so they are all false.
    head = offs_k + pid_t * BLOCK_K  # (BLOCK_K,): on tile 0, times 0 .. BLOCK_K-1 and state columns
    w = tl.load(w_ptr + offs_c[:, None] * width + offs_k[None, :],
                mask=mask_c[:, None] & (offs_k[None, :] < width), other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)

    # The new state, the last width-1 inputs, read before the barrier below.
    new = _window(x_ptr, state_ptr, b, seqlen - nstate + offs_k[None, :], offs_c, mask_c,
                  head[None, :] < nstate, seqlen, dim, nstate)

    # y_t = sum_k w[:, k] * input at time t - (width - 1) + k. The times t >= width-1 read x only: one shifted
    # (BLOCK_T, BLOCK_C) tile of x a tap (the taps' tiles overlap, so all but the first come from the cache).
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    body = (offs_t < seqlen) & (offs_t >= nstate)
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(BLOCK_K):
        wk = tl.sum(tl.where(offs_k[None, :] == k, w, 0.0), axis=1)
        # a tap k >= width (BLOCK_K is a power of two) would reach forward in time: it reads nothing (the
        # condition as a vector: the interpreter takes no scalar in a mask)
        tap = body & (offs_t * 0 + k <= nstate)
        xk = tl.load(x_ptr + (b * seqlen + offs_t[:, None] - nstate + k) * dim + offs_c[None, :],
                     mask=tap[:, None] & mask_c[None, :], other=0.0)
        acc += xk.to(tl.float32) * wk[None, :]
    if HAS_BIAS:
        acc += bias[None, :]
    if SILU:
        acc = silu(acc)
    tl.store(y_ptr + (b * seqlen + offs_t[:, None]) * dim + offs_c[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=body[:, None] & mask_c[None, :])

    # The times t < width-1 reach back into the carried state: a (BLOCK_C, BLOCK_K) window a time, on tile 0
    # only (the loop is empty on tile p >= 1, which starts at p * BLOCK_T >= width-1).
    for t in range(pid_t * BLOCK_T, tl.minimum(nstate, seqlen)):
        window = _window(x_ptr, state_ptr, b, t - nstate + offs_k[None, :], offs_c, mask_c,
                         offs_k[None, :] < width, seqlen, dim, nstate)
        y = tl.sum(window * w, axis=1)
        if HAS_BIAS:
            y += bias
        if SILU:
            y = silu(y)
        tl.store(y_ptr + (b * seqlen + t) * dim + offs_c, y.to(y_ptr.dtype.element_ty), mask=mask_c)

    # every thread of the program has read the old state (above) before any thread writes it
    tl.debug_barrier()
    tl.store(state_out_ptr + (b * dim + offs_c[:, None]) * nstate + offs_k[None, :],
             new.to(state_out_ptr.dtype.element_ty), mask=mask_c[:, None] & (head[None, :] < nstate))


causal_conv1d_kernel = triton.jit(_causal_conv1d_kernel)

# A prompt's tile: 32 times x 64 channels, a 2048-element fp32 accumulator (16 values a thread at the default 4
# warps, far from spilling on any target) whose x rows are 128 bytes of fp16; a prompt of a few thousand
# tokens gives thousands of programs. The tile must cover the state's width-1 times (module docstring).
BLOCK_T = 32
BLOCK_C = 64


def constexprs(dim: int, width: int, *, has_bias=True, activation="silu", seqlen: int | None = None) -> dict:
    """The kernel's compile-time constants. seqlen, when known (the JIT path), shrinks the time tile for short
    inputs, the decode step's seqlen 1 above all; unknown (an AOT plugin, any seqlen) it is BLOCK_T. The tile
    is never shorter than width-1: that makes tile 0 the only reader of the old state (module docstring)."""
    block_t = BLOCK_T if seqlen is None else min(BLOCK_T, triton.next_power_of_2(max(seqlen, 2)))
    return {"BLOCK_C": min(triton.next_power_of_2(dim), BLOCK_C),
            "BLOCK_T": max(block_t, triton.next_power_of_2(width - 1)),
            "BLOCK_K": triton.next_power_of_2(width), "HAS_BIAS": bool(has_bias), "SILU": activation == "silu"}


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    conv_state: torch.Tensor | None = None,
    activation: str | None = "silu",
    out: torch.Tensor | None = None,
    state_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """causal_conv1d_ref's signature; out / state_out may be given (state_out may be conv_state, for an
    in-place update)."""
    check_outputs(out=out, state_out=state_out)
    batch, seqlen, dim = x.shape
    width = weight.shape[-1]
    if width < 2:
        raise ValueError(f"the causal_conv1d kernel needs width >= 2, got {width}")
    if activation not in ("silu", "none", None):
        raise ValueError(f"activation must be 'silu' or 'none', got {activation!r}")
    if conv_state is None:
        conv_state = x.new_zeros(batch, dim, width - 1)
    x, weight, conv_state = x.contiguous(), weight.contiguous(), conv_state.contiguous()
    y = out if out is not None else torch.empty_like(x)
    s_out = state_out if state_out is not None else torch.empty_like(conv_state)
    if seqlen == 0:  # no time tile, so no program to carry the state over
        if s_out.data_ptr() != conv_state.data_ptr():
            s_out.copy_(conv_state)
        return y, s_out
    meta = constexprs(dim, width, has_bias=bias is not None, activation=activation or "none", seqlen=seqlen)
    launch("causal_conv1d", {"x": x, "w": weight, "bias": bias.contiguous() if bias is not None else weight,
                             "state": conv_state, "y": y, "state_out": s_out}, meta)
    return y, s_out
