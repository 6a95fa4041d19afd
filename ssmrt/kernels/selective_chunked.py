"""SelectiveScan prefill split over time: a chain of three Triton kernels, for long prompts where the
one-kernel recurrence (selective_scan.py) walks the sequence one token at a time in as few programs as
there are channel blocks. Its reference twin is ssmrt.ops.selective_scan_ref (same signature).

Mamba-1's decay exp(delta_t A) is per channel and state index, so there is no matrix form as in SSD; the
time parallelism comes from the recurrence being linear. Chunk c covers tokens [cQ, cQ + Q) (the last may
be partial); within a program the chunk is walked in tiles of SUB tokens, each tile an associative scan
over time of (exp(delta A), delta u B) pairs, the state carried in registers between tiles:

  1. selective_chunk_state    per (chunk, channel block), from a zero state: the chunk's own final state
                              S_c, and sum(delta) over the chunk (its total decay is exp(A sum(delta)))
  2. selective_state_passing  serial over chunks only: the state entering each chunk,
                              H_c = exp(A sum_{c-1}(delta)) H_{c-1} + S_{c-1},  H_0 = ssm_state,
                              written to its own tensor; the state leaving the last chunk is the output state
  3. selective_chunk_scan     per (chunk, channel block), from H_c: y = (h C + D u) * silu(z)

Contract of the chain (each kernel: one launch with input pointers, int32 scalars, output pointers, as
ssmrt.plugins.launch says; flags compile-time constants; the intermediates are tensors between nodes, not a
workspace):
    selective_chunk_state(u, delta, A, B, delta_bias) -> chunk_states, delta_sum
        u, delta (batch, seqlen, dim); A (dim, dstate) fp32; B (batch, seqlen, ngroups, dstate);
        delta_bias (dim,) fp32
        chunk_states: (batch, nchunks, dim, dstate) fp32; delta_sum: (batch, nchunks, dim) fp32
    selective_state_passing(chunk_states, delta_sum, A, ssm_state) -> entering_states, present_ssm_state
        ssm_state (batch, dim, dstate) fp32 (or fp16 / bf16); present_ssm_state may alias it
    selective_chunk_scan(u, delta, A, B, C, D, z, delta_bias, entering_states) -> y (batch, seqlen, dim)
The grids are in ssmrt.plugins.launch.
No TensorRT types here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.spec import SELECTIVE_CHAIN_CHUNK
from ..plugins.launch import launch
from ._checks import check_groups, check_outputs, fp32
from ._jit import dt_transform, silu


@triton.jit
def _combine(a_l, b_l, a_r, b_r):
    """(a, b) pairs of h -> a h + b, composed left then right."""
    return a_l * a_r, a_r * b_l + b_r


@triton.jit
def _tile_states(h, u_ptr, delta_ptr, B_ptr, A, delta_bias, rows, mask_t, offs_d, mask_d, g, offs_n, mask_n,
                 dim, dstate, ngroups, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr):
    """One tile of SUB tokens from the state h (BD, BN): the state after every token (SUB, BD, BN), the state
    after the tile, delta (bias, softplus; zero past the end, where the state then stays) and u (SUB, BD)."""
    mask_td = mask_t[:, None] & mask_d[None, :]
    at = rows[:, None] * dim + offs_d[None, :]
    delta = tl.load(delta_ptr + at, mask=mask_td, other=0.0).to(tl.float32)
    delta = dt_transform(delta, delta_bias, HAS_DELTA_BIAS, DELTA_SOFTPLUS, False, 0.0, 0.0)
    delta = tl.where(mask_td, delta, 0.0)
    u = tl.load(u_ptr + at, mask=mask_td, other=0.0).to(tl.float32)
    grp = (rows[:, None, None] * ngroups + g[None, :, None]) * dstate + offs_n[None, None, :]
    Bt = tl.load(B_ptr + grp, mask=mask_td[:, :, None] & mask_n[None, None, :], other=0.0).to(tl.float32)
    dA = tl.exp(delta[:, :, None] * A[None, :, :])
    dBu = (delta * u)[:, :, None] * Bt
    decay, local = tl.associative_scan((dA, dBu), 0, _combine)
    hs = decay * h[None, :, :] + local
    last = (tl.arange(0, rows.shape[0]) == rows.shape[0] - 1)[:, None, None]
    return hs, tl.sum(tl.where(last, hs, 0.0), axis=0), delta, u


@triton.jit
def _chunk_program(dim, dstate, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """(chunk, batch, channel offsets and mask, state offsets and mask) of a program of the chunk kernels,
    whose grid is (cdiv(dim, BLOCK_D), nchunks, batch)."""
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    return tl.program_id(1), tl.program_id(2), offs_d, offs_d < dim, offs_n, offs_n < dstate


def _selective_chunk_state_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, delta_bias_ptr,
    seqlen, dim, dstate, ngroups,
    chunk_states_ptr, delta_sum_ptr,
    CHUNK: tl.constexpr, SUB: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
):
    c, b, offs_d, mask_d, offs_n, mask_n = _chunk_program(dim, dstate, BLOCK_D, BLOCK_N)
    nchunks = tl.cdiv(seqlen, CHUNK)
    g = offs_d // (dim // ngroups)
    A = tl.load(A_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_d[:, None] & mask_n[None, :], other=0.0)
    delta_bias = tl.load(delta_bias_ptr + offs_d, mask=mask_d, other=0.0) if HAS_DELTA_BIAS else 0.0

    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    delta_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t0 in range(0, tl.minimum(CHUNK, seqlen - c * CHUNK), SUB):
        t = c * CHUNK + t0 + tl.arange(0, SUB)
        _, h, delta, _ = _tile_states(h, u_ptr, delta_ptr, B_ptr, A, delta_bias, b * seqlen + t, t < seqlen,
                                      offs_d, mask_d, g, offs_n, mask_n, dim, dstate, ngroups,
                                      HAS_DELTA_BIAS, DELTA_SOFTPLUS)
        delta_sum += tl.sum(delta, axis=0)
    out = ((b * nchunks + c) * dim + offs_d[:, None]) * dstate + offs_n[None, :]
    tl.store(chunk_states_ptr + out, h, mask=mask_d[:, None] & mask_n[None, :])
    tl.store(delta_sum_ptr + (b * nchunks + c) * dim + offs_d, delta_sum, mask=mask_d)


def _selective_state_passing_kernel(
    chunk_states_ptr, delta_sum_ptr, A_ptr, state_ptr,
    nchunks, dim, dstate,
    entering_states_ptr, state_out_ptr,
    CHUNK: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_s = tl.program_id(0)
    b = tl.program_id(1)
    size = dim * dstate
    offs = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)  # (d, n) flattened
    mask = offs < size
    A = tl.load(A_ptr + offs, mask=mask, other=0.0)
    s = tl.load(state_ptr + b * size + offs, mask=mask, other=0.0).to(tl.float32)
    for c in range(nchunks):
        at = (b * nchunks + c) * size + offs
        own = tl.load(chunk_states_ptr + at, mask=mask, other=0.0)
        tl.store(entering_states_ptr + at, s, mask=mask)
        delta_sum = tl.load(delta_sum_ptr + (b * nchunks + c) * dim + offs // dstate, mask=mask, other=0.0)
        s = s * tl.exp(A * delta_sum) + own
    tl.store(state_out_ptr + b * size + offs, s.to(state_out_ptr.dtype.element_ty), mask=mask)


def _selective_chunk_scan_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, entering_states_ptr,
    seqlen, dim, dstate, ngroups,
    y_ptr,
    CHUNK: tl.constexpr, SUB: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
):
    c, b, offs_d, mask_d, offs_n, mask_n = _chunk_program(dim, dstate, BLOCK_D, BLOCK_N)
    nchunks = tl.cdiv(seqlen, CHUNK)
    mask_dn = mask_d[:, None] & mask_n[None, :]
    g = offs_d // (dim // ngroups)
    A = tl.load(A_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0)
    delta_bias = tl.load(delta_bias_ptr + offs_d, mask=mask_d, other=0.0) if HAS_DELTA_BIAS else 0.0
    Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0) if HAS_D else 0.0

    h = tl.load(entering_states_ptr + ((b * nchunks + c) * dim + offs_d[:, None]) * dstate + offs_n[None, :],
                mask=mask_dn, other=0.0)
    for t0 in range(0, tl.minimum(CHUNK, seqlen - c * CHUNK), SUB):
        t = c * CHUNK + t0 + tl.arange(0, SUB)
        rows = b * seqlen + t
        mask_t = t < seqlen
        hs, h, _, u = _tile_states(h, u_ptr, delta_ptr, B_ptr, A, delta_bias, rows, mask_t, offs_d, mask_d, g,
                                   offs_n, mask_n, dim, dstate, ngroups, HAS_DELTA_BIAS, DELTA_SOFTPLUS)
        mask_td = mask_t[:, None] & mask_d[None, :]
        grp = (rows[:, None, None] * ngroups + g[None, :, None]) * dstate + offs_n[None, None, :]
        Ct = tl.load(C_ptr + grp, mask=mask_td[:, :, None] & mask_n[None, None, :], other=0.0).to(tl.float32)
        y = tl.sum(hs * Ct, axis=2)
        if HAS_D:
            y += u * Dv[None, :]
        at = rows[:, None] * dim + offs_d[None, :]
        if HAS_Z:
            z = tl.load(z_ptr + at, mask=mask_td, other=0.0).to(tl.float32)
            y *= silu(z)
        tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=mask_td)


selective_chunk_state_kernel = triton.jit(_selective_chunk_state_kernel)
selective_state_passing_kernel = triton.jit(_selective_state_passing_kernel)
selective_chunk_scan_kernel = triton.jit(_selective_chunk_scan_kernel)

CHUNK = SELECTIVE_CHAIN_CHUNK  # tokens a program walks; the serial state passing takes seqlen / CHUNK steps


def constexprs(dim: int, dstate: int, *, has_D=True, has_z=True, has_delta_bias=True, delta_softplus=True,
               chunk: int = CHUNK) -> dict[str, dict]:
    """The compile-time constants (and launch options) of each kernel of the chain, by kernel name. A scan
    tile holds SUB x BLOCK_D x BLOCK_N pairs: 4K elements, 16 channels (32 bytes of fp16 a row) for
    dstate <= 16, fewer channels and tokens for larger states. (At 8K the scan's live tiles come within a
    few dozen registers of the 255 cap at 8 warps, and some ptxas builds spill.)"""
    block_n = triton.next_power_of_2(dstate)
    block_d = max(min(triton.next_power_of_2(dim), 16, 256 // block_n), 1)
    sub = max(min(4096 // (block_d * block_n), 32, chunk), 2)
    flags = {"HAS_DELTA_BIAS": bool(has_delta_bias), "DELTA_SOFTPLUS": bool(delta_softplus)}
    tile = {"CHUNK": chunk, "SUB": sub, "BLOCK_D": block_d, "BLOCK_N": block_n, "num_warps": 8}
    return {
        "selective_chunk_state": {**tile, **flags},
        "selective_state_passing": {"CHUNK": chunk, "BLOCK_S": 1024},
        "selective_chunk_scan": {**tile, "HAS_D": bool(has_D), "HAS_Z": bool(has_z), **flags},
    }


def _check_chunk(chunk_size: int):
    if chunk_size < 2 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 2, got {chunk_size}")


def selective_chunk_state(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int = CHUNK,
    *,
    chunk_states: torch.Tensor | None = None,
    delta_sum: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ssmrt.ops.chains.selective_chunk_state_ref as one kernel; the outputs may be given. chunk_size: tokens per
    program (a power of two; tests use small ones)."""
    _check_chunk(chunk_size)
    batch, seqlen, dim = u.shape
    ngroups, dstate = B.shape[-2], B.shape[-1]
    check_groups(dim, ngroups, "dim")
    check_outputs(chunk_states=chunk_states, delta_sum=delta_sum)
    nchunks = triton.cdiv(seqlen, chunk_size)
    u, delta, B = u.contiguous(), delta.contiguous(), B.contiguous()
    A = A.float().contiguous()
    f32 = {"device": u.device, "dtype": torch.float32}
    states = chunk_states if chunk_states is not None else torch.empty(batch, nchunks, dim, dstate, **f32)
    dsum = delta_sum if delta_sum is not None else torch.empty(batch, nchunks, dim, **f32)
    meta = constexprs(dim, dstate, has_delta_bias=delta_bias is not None, delta_softplus=delta_softplus,
                      chunk=chunk_size)["selective_chunk_state"]
    launch("selective_chunk_state", {"u": u, "delta": delta, "A": A, "B": B, "delta_bias": fp32(delta_bias, A),
                                     "chunk_states": states, "delta_sum": dsum}, meta)
    return states, dsum


def selective_state_passing(
    chunk_states: torch.Tensor,
    delta_sum: torch.Tensor,
    A: torch.Tensor,
    ssm_state: torch.Tensor,
    chunk_size: int = CHUNK,
    *,
    entering_states: torch.Tensor | None = None,
    state_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ssmrt.ops.chains.selective_state_passing_ref as one kernel; the outputs may be given (state_out may be
    ssm_state: each element is read before it is written, by the same program)."""
    _check_chunk(chunk_size)
    check_outputs(entering_states=entering_states, state_out=state_out)
    chunk_states, delta_sum, ssm_state = chunk_states.contiguous(), delta_sum.contiguous(), ssm_state.contiguous()
    entering = entering_states if entering_states is not None else torch.empty_like(chunk_states)
    s_out = state_out if state_out is not None else torch.empty_like(ssm_state)
    launch("selective_state_passing", {"chunk_states": chunk_states, "delta_sum": delta_sum,
                                       "A": A.float().contiguous(), "state": ssm_state, "entering_states": entering,
                                       "state_out": s_out},
           constexprs(chunk_states.shape[2], chunk_states.shape[3], chunk=chunk_size)["selective_state_passing"])
    return entering, s_out


def selective_chunk_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    entering_states: torch.Tensor,
    delta_softplus: bool = False,
    chunk_size: int = CHUNK,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """ssmrt.ops.chains.selective_chunk_scan_ref as one kernel; out may be given."""
    _check_chunk(chunk_size)
    dim, dstate = u.shape[-1], B.shape[-1]
    check_groups(dim, B.shape[-2], "dim")
    check_outputs(out=out)
    u, delta, B, C, entering = (t.contiguous() for t in (u, delta, B, C, entering_states))
    A = A.float().contiguous()
    y = out if out is not None else torch.empty_like(u)
    meta = constexprs(dim, dstate, has_D=D is not None, has_z=z is not None, has_delta_bias=delta_bias is not None,
                      delta_softplus=delta_softplus, chunk=chunk_size)["selective_chunk_scan"]
    launch("selective_chunk_scan", {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": fp32(D, A),
                                    "z": z.contiguous() if z is not None else u, "delta_bias": fp32(delta_bias, A),
                                    "entering_states": entering, "y": y}, meta)
    return y


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    ssm_state: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    state_out: torch.Tensor | None = None,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """selective_scan_ref's signature, as the three-kernel chain; out / state_out may be given (state_out may be
    ssm_state). chunk: tokens per program (a power of two; tests use small ones)."""
    batch, seqlen, dim = u.shape
    check_outputs(out=out, state_out=state_out)
    if ssm_state is None:
        ssm_state = torch.zeros(batch, dim, B.shape[-1], device=u.device, dtype=torch.float32)
    states, delta_sum = selective_chunk_state(u, delta, A, B, delta_bias, delta_softplus, chunk)
    entering, s_out = selective_state_passing(states, delta_sum, A, ssm_state, chunk, state_out=state_out)
    y = selective_chunk_scan(u, delta, A, B, C, D, z, delta_bias, entering, delta_softplus, chunk, out=out)
    return y, s_out
