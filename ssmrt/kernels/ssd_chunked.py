"""SSDScan prefill in the chunked (state space dual) form: a chain of three Triton kernels whose inner work
is matrix products on tensor cores, for long prompts where the one-kernel recurrence (ssd_scan.py) is
serial over time. Its reference twin is ssmrt.ops.ssd_scan_ref (same signature and the same chunking).

The SSD chain: chunk c covers tokens [cQ, cQ + Q) (Q = chunk_size, a power of two from 16 to 256; the
last chunk may be partial). With dt after bias, softplus and limit, and a = cumsum(dt A) within a chunk:

  1. ssd_chunk_state   per chunk, its own contribution to the state at its end:
                         S_c = sum_l exp(a_last - a_l) dt_l x_l B_l^T                (headdim x dstate)
                       and, as side outputs, dt and a per position (the later kernels read them).
  2. ssd_state_passing the short serial part, over chunks only: the state entering each chunk,
                         H_c = exp(a_last(c-1)) H_{c-1} + S_{c-1},  H_0 = ssm_state,
                       written to its own tensor (no tensor is both read and written: TensorRT plugins cannot alias
                       without a preview feature); the state leaving the last chunk is present_ssm_state.
  3. ssd_chunk_scan    per chunk, the output: y_l = exp(a_l) C_l H_c + sum_{s<=l} exp(a_l - a_s) dt_s
                       (C_l . B_s) x_s + D x_l.

Contract of the chain (each kernel: one launch with input pointers, int32 scalars, output pointers, as
ssmrt.plugins.launch says; float attributes compile-time constants; the intermediates are tensors between
nodes, not a workspace):
    ssd_chunk_state(x, dt, A, B, dt_bias) -> dt_out, dA_cumsum, chunk_states
        x (batch, seqlen, nheads, headdim), dt (batch, seqlen, nheads), A (nheads,) fp32,
        B (batch, seqlen, ngroups, dstate), dt_bias (nheads,) fp32
        dt_out, dA_cumsum: (batch, nheads, nchunks, chunk_size) fp32 (zero dt past the end)
        chunk_states: (batch, nchunks, nheads, headdim, dstate) fp32
    ssd_state_passing(chunk_states, dA_cumsum, ssm_state) -> entering_states, present_ssm_state
        ssm_state (batch, nheads, headdim, dstate) fp32 (or fp16 / bf16); present_ssm_state may alias it
    ssd_chunk_scan(x, B, C, D, dt_out, dA_cumsum, entering_states) -> y (batch, seqlen, nheads, headdim)
The grids are in ssmrt.plugins.launch. No TensorRT types here.

Products run in the activation dtype (fp16 / bf16 tensor cores, fp32 accumulation), or in exact fp32
(`input_precision="ieee"`, no TF32) for fp32 activations; the decays, dt and the carried state stay fp32.
Where an fp32 factor (the state, the decay-weighted scores) meets a low-precision product, it is split into
a rounded part and its remainder, two products (SPLIT): rounding it once to fp16 / bf16 costs more than the
op tolerance on long chunks, which the one-kernel recurrence, exact in fp32, does not.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.spec import NO_DT_LIMIT, SSD_CHAIN_CHUNKS, ssd_chain_chunk
from ..plugins.launch import launch
from ._checks import check_groups, check_outputs, fp32
from ._jit import chunk_program, dt_limit_constexprs, dt_transform


@triton.jit
def _dt_block(dt_ptr, dt_bias_ptr, rows, h, nheads, mask, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
              DT_CLAMP: tl.constexpr, DT_MIN: tl.constexpr, DT_MAX: tl.constexpr):
    """dt of head h at the given (b, t) rows after bias, softplus and limit; zero where masked (past the end,
    so the cumulative decay stays flat there)."""
    dt = tl.load(dt_ptr + rows * nheads + h, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(dt_bias_ptr + h) if HAS_DT_BIAS else 0.0
    dt = dt_transform(dt, bias, HAS_DT_BIAS, DT_SOFTPLUS, DT_CLAMP, DT_MIN, DT_MAX)
    return tl.where(mask, dt, 0.0)


def _ssd_chunk_state_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, dt_bias_ptr,
    seqlen, nheads, headdim, dstate, ngroups,
    dt_out_ptr, dA_cumsum_ptr, chunk_states_ptr,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, DT_CLAMP: tl.constexpr,
    DT_MIN: tl.constexpr, DT_MAX: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr,
):
    pid_pn = tl.program_id(0)
    pid = tl.program_id(1)
    nchunks = tl.cdiv(seqlen, CHUNK)
    b, c, h = chunk_program(pid, nheads, nchunks)
    g = h // (nheads // ngroups)
    n_pblocks = tl.cdiv(headdim, BLOCK_P)
    offs_p = (pid_pn % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (pid_pn // n_pblocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    A = tl.load(A_ptr + h)
    side = ((b * nheads + h) * nchunks + c) * CHUNK
    last = tl.arange(0, BLOCK_K) == BLOCK_K - 1

    # 1. The chunk's dt and cumulative log decay a (side outputs), block by block: a_last
    dA_last = 0.0
    for k0 in range(0, CHUNK, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        dt = _dt_block(dt_ptr, dt_bias_ptr, b * seqlen + c * CHUNK + offs_k, h, nheads,
                       c * CHUNK + offs_k < seqlen, HAS_DT_BIAS, DT_SOFTPLUS, DT_CLAMP, DT_MIN, DT_MAX)
        dA_cumsum = dA_last + tl.cumsum(dt * A, axis=0)
        if pid_pn == 0:
            tl.store(dt_out_ptr + side + offs_k, dt)
            tl.store(dA_cumsum_ptr + side + offs_k, dA_cumsum)
        dA_last = tl.sum(tl.where(last, dA_cumsum, 0.0), axis=0)

    # 2. S_c = sum over blocks of (x * dt * exp(a_last - a))^T B: (headdim, k) @ (k, dstate); the same
    #    arithmetic as step 1 gives the same a bit for bit
    dtype = x_ptr.dtype.element_ty
    states = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    dA_run = 0.0
    for k0 in range(0, tl.minimum(CHUNK, seqlen - c * CHUNK), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = c * CHUNK + offs_k < seqlen
        rows = b * seqlen + c * CHUNK + offs_k
        dt = _dt_block(dt_ptr, dt_bias_ptr, rows, h, nheads, mask_k, HAS_DT_BIAS, DT_SOFTPLUS, DT_CLAMP,
                       DT_MIN, DT_MAX)
        dA_cumsum = dA_run + tl.cumsum(dt * A, axis=0)
        dA_run = tl.sum(tl.where(last, dA_cumsum, 0.0), axis=0)
        xT = tl.load(x_ptr + (rows[None, :] * nheads + h) * headdim + offs_p[:, None],
                     mask=mask_k[None, :] & mask_p[:, None], other=0.0)
        Bk = tl.load(B_ptr + (rows[:, None] * ngroups + g) * dstate + offs_n[None, :],
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(dtype)
        xs = xT.to(tl.float32) * (tl.exp(dA_last - dA_cumsum) * dt)[None, :]
        xs_hi = xs.to(dtype)
        states += tl.dot(xs_hi, Bk, input_precision=DOT_PRECISION)
        if SPLIT:
            states += tl.dot((xs - xs_hi.to(tl.float32)).to(dtype), Bk)
    out = (((b * nchunks + c) * nheads + h) * headdim + offs_p[:, None]) * dstate + offs_n[None, :]
    tl.store(chunk_states_ptr + out, states, mask=mask_p[:, None] & mask_n[None, :])


def _ssd_state_passing_kernel(
    chunk_states_ptr, dA_cumsum_ptr, state_ptr,
    nchunks, nheads, headdim, dstate,
    entering_states_ptr, state_out_ptr,
    CHUNK: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    size = headdim * dstate
    offs = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = offs < size
    s = tl.load(state_ptr + pid_bh * size + offs, mask=mask, other=0.0).to(tl.float32)
    for c in range(nchunks):
        at = ((b * nchunks + c) * nheads + h) * size + offs
        own = tl.load(chunk_states_ptr + at, mask=mask, other=0.0)
        tl.store(entering_states_ptr + at, s, mask=mask)
        dA_last = tl.load(dA_cumsum_ptr + ((b * nheads + h) * nchunks + c) * CHUNK + CHUNK - 1)
        s = s * tl.exp(dA_last) + own
    tl.store(state_out_ptr + pid_bh * size + offs, s.to(state_out_ptr.dtype.element_ty), mask=mask)


def _ssd_chunk_scan_kernel(
    x_ptr, B_ptr, C_ptr, D_ptr, dt_out_ptr, dA_cumsum_ptr, entering_states_ptr,
    seqlen, nheads, headdim, dstate, ngroups,
    y_ptr,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_D: tl.constexpr, D_HAS_HDIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
):
    pid_mp = tl.program_id(0)
    pid = tl.program_id(1)
    nchunks = tl.cdiv(seqlen, CHUNK)
    b, c, h = chunk_program(pid, nheads, nchunks)
    g = h // (nheads // ngroups)
    n_pblocks = tl.cdiv(headdim, BLOCK_P)
    pid_m = pid_mp // n_pblocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # positions within the chunk
    offs_p = (pid_mp % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    chunk_len = tl.minimum(CHUNK, seqlen - c * CHUNK)
    mask_m = offs_m < chunk_len
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    side = ((b * nheads + h) * nchunks + c) * CHUNK
    row_m = b * seqlen + c * CHUNK + offs_m
    dtype = x_ptr.dtype.element_ty

    # 1. From the entering state: exp(a_l) C_l H_c, (m, dstate) @ (dstate, headdim)
    dA_m = tl.load(dA_cumsum_ptr + side + offs_m, mask=mask_m, other=0.0)
    Cm = tl.load(C_ptr + (row_m[:, None] * ngroups + g) * dstate + offs_n[None, :],
                 mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(dtype)
    HT = tl.load(entering_states_ptr + (((b * nchunks + c) * nheads + h) * headdim + offs_p[None, :]) * dstate
                 + offs_n[:, None], mask=mask_n[:, None] & mask_p[None, :], other=0.0)
    HT_hi = HT.to(dtype)
    acc = tl.dot(Cm, HT_hi, input_precision=DOT_PRECISION)
    if SPLIT:
        # fp16 / bf16 keep 11 / 8 bits of an fp32 factor; a second product with the remainder keeps ~22 / 16
        acc += tl.dot(Cm, (HT - HT_hi.to(tl.float32)).to(dtype))
    acc *= tl.exp(dA_m)[:, None]

    # 2. Within the chunk, causally: sum_{s<=l} exp(a_l - a_s) dt_s (C_l . B_s) x_s, (m, k) @ (k, headdim)
    hi = tl.minimum((pid_m + 1) * BLOCK_M, chunk_len)
    for k0 in range(0, hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < hi
        row_k = b * seqlen + c * CHUNK + offs_k
        BkT = tl.load(B_ptr + (row_k[None, :] * ngroups + g) * dstate + offs_n[:, None],
                      mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(dtype)
        CB = tl.dot(Cm, BkT, input_precision=DOT_PRECISION)  # (m, k): C_l . B_s
        dA_k = tl.load(dA_cumsum_ptr + side + offs_k, mask=mask_k, other=0.0)
        dt_k = tl.load(dt_out_ptr + side + offs_k, mask=mask_k, other=0.0)
        causal = (offs_m[:, None] >= offs_k[None, :]) & mask_k[None, :]
        decay = tl.where(causal, tl.exp(tl.where(causal, dA_m[:, None] - dA_k[None, :], 0.0)), 0.0)
        xk = tl.load(x_ptr + (row_k[:, None] * nheads + h) * headdim + offs_p[None, :],
                     mask=mask_k[:, None] & mask_p[None, :], other=0.0)
        P = CB * decay * dt_k[None, :]
        P_hi = P.to(dtype)
        acc += tl.dot(P_hi, xk.to(dtype), input_precision=DOT_PRECISION)
        if SPLIT:
            acc += tl.dot((P - P_hi.to(tl.float32)).to(dtype), xk.to(dtype))

    # 3. Skip connection, then store the rows inside the sequence
    xm = tl.load(x_ptr + (row_m[:, None] * nheads + h) * headdim + offs_p[None, :],
                 mask=mask_m[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
    if HAS_D:
        if D_HAS_HDIM:
            acc += xm * tl.load(D_ptr + h * headdim + offs_p, mask=mask_p, other=0.0)[None, :]
        else:
            acc += xm * tl.load(D_ptr + h)
    tl.store(y_ptr + (row_m[:, None] * nheads + h) * headdim + offs_p[None, :], acc.to(dtype),
             mask=mask_m[:, None] & mask_p[None, :])


ssd_chunk_state_kernel = triton.jit(_ssd_chunk_state_kernel)
ssd_state_passing_kernel = triton.jit(_ssd_state_passing_kernel)
ssd_chunk_scan_kernel = triton.jit(_ssd_chunk_scan_kernel)


def chunk_of(chunk_size: int) -> int:
    """The chain's chunk for a model's chunk_size (ssmrt.ops.spec.ssd_chain_chunk)."""
    return ssd_chain_chunk(chunk_size)


def _check_chunk(chunk_size: int):
    lo, hi = SSD_CHAIN_CHUNKS
    if chunk_size != ssd_chain_chunk(chunk_size) or not lo <= chunk_size <= hi:
        raise ValueError(f"the SSD chain's chunk_size must be a power of two in [{lo}, {hi}], got {chunk_size}")


def constexprs(headdim: int, dstate: int, dtype: torch.dtype, chunk: int, *, has_D=True, D_has_hdim=False,
               has_dt_bias=True, dt_softplus=True, dt_limit=NO_DT_LIMIT) -> dict[str, dict]:
    """The compile-time constants of each kernel of the chain for one specialisation (what an AOT plugin
    bakes in), by kernel name, with the launch options num_warps / num_stages where they are not Triton's
    defaults."""
    precision = "ieee" if dtype == torch.float32 else "tf32"  # tf32 is moot for fp16 / bf16 operands
    block_p = min(max(triton.next_power_of_2(headdim), 16), 64)
    block_n = max(triton.next_power_of_2(dstate), 16)
    return {
        # 32 chunk rows a block in both: at 64 they come within a few registers of the 255 cap on sm_80 / sm_87,
        # and some ptxas builds spill there
        "ssd_chunk_state": {
            "CHUNK": chunk, "BLOCK_K": min(chunk, 32), "BLOCK_P": block_p, "BLOCK_N": min(block_n, 64),
            "HAS_DT_BIAS": bool(has_dt_bias), "DT_SOFTPLUS": bool(dt_softplus), **dt_limit_constexprs(dt_limit),
            "DOT_PRECISION": precision, "SPLIT": dtype != torch.float32,
        },
        "ssd_state_passing": {"CHUNK": chunk, "BLOCK_S": 1024},
        "ssd_chunk_scan": {
            # 32 rows: at 64 the sm_87 build (mma.sync, accumulators in registers) spills
            "CHUNK": chunk, "BLOCK_M": min(chunk, 32), "BLOCK_K": min(chunk, 32), "BLOCK_P": block_p,
            "BLOCK_N": block_n, "HAS_D": bool(has_D), "D_HAS_HDIM": bool(D_has_hdim), "DOT_PRECISION": precision,
            "SPLIT": dtype != torch.float32, "num_warps": 4, "num_stages": 2,
        },
    }


def ssd_chunk_state(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_DT_LIMIT,
    chunk_size: int = 256,
    *,
    dt_out: torch.Tensor | None = None,
    dA_cumsum: torch.Tensor | None = None,
    chunk_states: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ssmrt.ops.chains.ssd_chunk_state_ref as one kernel; the outputs may be given. chunk_size: the chain's
    chunk (a power of two, 16 to 256)."""
    _check_chunk(chunk_size)
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2], B.shape[-1]
    check_groups(nheads, ngroups, "nheads")
    if dstate > 256:
        raise ValueError(f"dstate must be at most 256, got {dstate}")
    check_outputs(dt_out=dt_out, dA_cumsum=dA_cumsum, chunk_states=chunk_states)
    nchunks = triton.cdiv(seqlen, chunk_size)
    x, dt, B = x.contiguous(), dt.contiguous(), B.contiguous()
    A = A.float().contiguous()
    f32 = {"device": x.device, "dtype": torch.float32}
    side = (batch, nheads, nchunks, chunk_size)
    dt_out = dt_out if dt_out is not None else torch.empty(side, **f32)
    dA_cumsum = dA_cumsum if dA_cumsum is not None else torch.empty(side, **f32)
    states = chunk_states if chunk_states is not None else torch.empty(batch, nchunks, nheads, headdim, dstate, **f32)
    meta = constexprs(headdim, dstate, x.dtype, chunk_size, has_dt_bias=dt_bias is not None,
                      dt_softplus=dt_softplus, dt_limit=dt_limit)["ssd_chunk_state"]
    launch("ssd_chunk_state", {"x": x, "dt": dt, "A": A, "B": B, "dt_bias": fp32(dt_bias, A), "dt_out": dt_out,
                               "dA_cumsum": dA_cumsum, "chunk_states": states}, meta)
    return dt_out, dA_cumsum, states


def ssd_state_passing(
    chunk_states: torch.Tensor,
    dA_cumsum: torch.Tensor,
    ssm_state: torch.Tensor,
    chunk_size: int = 256,
    *,
    entering_states: torch.Tensor | None = None,
    state_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ssmrt.ops.chains.ssd_state_passing_ref as one kernel; the outputs may be given (state_out may be
    ssm_state: each element is read before it is written, by the same program)."""
    _check_chunk(chunk_size)
    if dA_cumsum.shape[-1] != chunk_size:
        raise ValueError(f"dA_cumsum has chunks of {dA_cumsum.shape[-1]}, chunk_size is {chunk_size}")
    check_outputs(entering_states=entering_states, state_out=state_out)
    chunk_states, dA_cumsum, ssm_state = chunk_states.contiguous(), dA_cumsum.contiguous(), ssm_state.contiguous()
    entering = entering_states if entering_states is not None else torch.empty_like(chunk_states)
    s_out = state_out if state_out is not None else torch.empty_like(ssm_state)
    meta = constexprs(chunk_states.shape[3], chunk_states.shape[4], torch.float32, chunk_size)["ssd_state_passing"]
    launch("ssd_state_passing", {"chunk_states": chunk_states, "dA_cumsum": dA_cumsum, "state": ssm_state,
                                 "entering_states": entering, "state_out": s_out}, meta)
    return entering, s_out


def ssd_chunk_scan(
    x: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    dt_out: torch.Tensor,
    dA_cumsum: torch.Tensor,
    entering_states: torch.Tensor,
    chunk_size: int = 256,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """ssmrt.ops.chains.ssd_chunk_scan_ref as one kernel; out may be given."""
    _check_chunk(chunk_size)
    headdim, dstate = x.shape[-1], B.shape[-1]
    check_groups(x.shape[2], B.shape[-2], "nheads")
    check_outputs(out=out)
    x, B, C = x.contiguous(), B.contiguous(), C.contiguous()
    dt_out, dA_cumsum, entering = (t.contiguous() for t in (dt_out, dA_cumsum, entering_states))
    y = out if out is not None else torch.empty_like(x)
    meta = constexprs(headdim, dstate, x.dtype, chunk_size, has_D=D is not None,
                      D_has_hdim=D is not None and D.dim() == 2)["ssd_chunk_scan"]
    launch("ssd_chunk_scan", {"x": x, "B": B, "C": C, "D": fp32(D, dA_cumsum), "dt_out": dt_out,
                              "dA_cumsum": dA_cumsum, "entering_states": entering, "y": y}, meta)
    return y


def ssd_scan_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_DT_LIMIT,
    ssm_state: torch.Tensor | None = None,
    chunk_size: int = 256,
    out: torch.Tensor | None = None,
    state_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ssd_scan_ref's signature, as the three-kernel chain; out / state_out may be given (state_out may be
    ssm_state). chunk_size is rounded by chunk_of()."""
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[-1]
    check_outputs(out=out, state_out=state_out)
    chunk = chunk_of(chunk_size)
    if ssm_state is None:
        ssm_state = torch.zeros(batch, nheads, headdim, dstate, device=x.device, dtype=torch.float32)
    dt_out, dA_cumsum, states = ssd_chunk_state(x, dt, A, B, dt_bias, dt_softplus, dt_limit, chunk)
    entering, s_out = ssd_state_passing(states, dA_cumsum, ssm_state, chunk, state_out=state_out)
    y = ssd_chunk_scan(x, B, C, D, dt_out, dA_cumsum, entering, chunk, out=out)
    return y, s_out
