"""SSDScan as one Triton kernel for any seqlen: Mamba-2's recurrence h = exp(dt A) h + dt x B^T, y = h C + D x,
step by step with the state tile held in registers (seqlen 1 is the decode step). Its reference twin is
ssmrt.ops.ssd_scan_ref (same signature). Long prompts go to the chunked tensor-core chain instead
(ssd_chunked.py): `ssd_scan` picks one by seqlen.

Contract (the AOT-plugin shape: one launch, arguments are input pointers, int32 scalars, output pointers, float
attributes as compile-time constants):
    0 x          (batch, seqlen, nheads, headdim)    fp32 / fp16 / bf16, contiguous
    1 dt         (batch, seqlen, nheads)
    2 A          (nheads,)                           fp32
    3 B, 4 C     (batch, seqlen, ngroups, dstate)
    5 D          (nheads,) or (nheads, headdim) fp32
    6 dt_bias    (nheads,)                      fp32
    7 ssm_state  (batch, nheads, headdim, dstate) fp32 (or fp16 / bf16)
  ->
    y (batch, seqlen, nheads, headdim), present_ssm_state (may be ssm_state itself: each program reads its
    whole tile before writing it)
The launch (argument order, int32 scalars, grid) is in ssmrt.plugins.launch. No TensorRT types here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.spec import NO_DT_LIMIT
from ..plugins.launch import launch
from ._checks import check_groups, fp32, scan_io
from ._jit import dt_limit_constexprs, dt_transform


def _ssd_scan_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, state_ptr,
    seqlen, nheads, headdim, dstate, ngroups,
    y_ptr, state_out_ptr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, D_HAS_HDIM: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr, DT_CLAMP: tl.constexpr, DT_MIN: tl.constexpr, DT_MAX: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    g = h // (nheads // ngroups)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate

    tile = (pid_bh * headdim + offs_p[:, None]) * dstate + offs_n[None, :]
    mask = mask_p[:, None] & mask_n[None, :]
    s = tl.load(state_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + h)
    dt_bias = tl.load(dt_bias_ptr + h) if HAS_DT_BIAS else 0.0
    if HAS_D:
        if D_HAS_HDIM:
            Dv = tl.load(D_ptr + h * headdim + offs_p, mask=mask_p, other=0.0)
        else:
            Dv = tl.load(D_ptr + h)
    for t in range(seqlen):
        bt = b * seqlen + t  # row (b, t)
        # 1. dt after bias, softplus and limit
        dt = dt_transform(tl.load(dt_ptr + bt * nheads + h).to(tl.float32), dt_bias, HAS_DT_BIAS, DT_SOFTPLUS,
                          DT_CLAMP, DT_MIN, DT_MAX)
        # 2. h = exp(dt A) h + (dt x) B^T ; y = h C (+ D x)
        x = tl.load(x_ptr + (bt * nheads + h) * headdim + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        Bv = tl.load(B_ptr + (bt * ngroups + g) * dstate + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        Cv = tl.load(C_ptr + (bt * ngroups + g) * dstate + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        s = s * tl.exp(dt * A) + (dt * x)[:, None] * Bv[None, :]
        y = tl.sum(s * Cv[None, :], axis=1)
        if HAS_D:
            y += x * Dv
        tl.store(y_ptr + (bt * nheads + h) * headdim + offs_p, y.to(y_ptr.dtype.element_ty), mask=mask_p)
    tl.store(state_out_ptr + tile, s.to(state_out_ptr.dtype.element_ty), mask=mask)


ssd_scan_kernel = triton.jit(_ssd_scan_kernel)


def constexprs(headdim: int, dstate: int, *, has_D=True, D_has_hdim=False, has_dt_bias=True, dt_softplus=True,
               dt_limit=NO_DT_LIMIT) -> dict:
    """The compile-time constants of one specialisation (what an AOT plugin bakes into its kernel)."""
    return {
        # 16 rows of the state a program: 4x the programs of 64 at batch 1 (80 heads fill only 80 SMs of an
        # H100 otherwise) and ~100 registers instead of 255
        "BLOCK_P": min(triton.next_power_of_2(headdim), 16),
        "BLOCK_N": triton.next_power_of_2(dstate),
        "HAS_D": bool(has_D),
        "D_HAS_HDIM": bool(D_has_hdim),
        "HAS_DT_BIAS": bool(has_dt_bias),
        "DT_SOFTPLUS": bool(dt_softplus),
        **dt_limit_constexprs(dt_limit),
    }


def ssd_scan_recurrent(
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
    """ssd_scan_ref's signature (chunk_size is ignored); out / state_out may be given (state_out may be
    ssm_state, for an in-place update)."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2], B.shape[-1]
    check_groups(nheads, ngroups, "nheads")
    x, (dt, B, C), ssm_state, y, s_out = scan_io(x, (dt, B, C), ssm_state, (batch, nheads, headdim, dstate), out,
                                                 state_out)
    A = A.float().contiguous()
    Df, db = fp32(D, A), fp32(dt_bias, A)
    meta = constexprs(headdim, dstate, has_D=D is not None, D_has_hdim=D is not None and D.dim() == 2,
                      has_dt_bias=dt_bias is not None, dt_softplus=dt_softplus, dt_limit=dt_limit)
    launch("ssd_scan", {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": Df, "dt_bias": db, "state": ssm_state,
                        "y": y, "state_out": s_out}, meta)
    return y, s_out


# From this many tokens on, the chunked chain (three launches, tensor cores) replaces the one-kernel
# recurrence (serial over time). benchmarks/gpu_kernels.py measures both at the crossover.
CHUNKED_MIN_SEQLEN = 32


def ssd_scan(
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
    """ssd_scan_ref's signature (+ out / state_out): the recurrence for short inputs (decode), the chunked
    chain from CHUNKED_MIN_SEQLEN tokens on."""
    from .ssd_chunked import ssd_scan_chunked

    fn = ssd_scan_chunked if x.shape[1] >= CHUNKED_MIN_SEQLEN else ssd_scan_recurrent
    return fn(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, ssm_state, chunk_size, out, state_out)
