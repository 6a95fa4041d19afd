"""SelectiveScan as one Triton kernel for any seqlen: Mamba-1's recurrence h = exp(dt A) h + dt u B,
y = (h C + D u) * silu(z), step by step with the state tile in registers (seqlen 1 is the decode step).
Its reference twin is ssmrt.ops.selective_scan_ref (same signature). Long prompts go to the chain split over
time instead (selective_chunked.py): `selective_scan` picks one by seqlen.

Contract (one launch: input pointers, int32 scalars, output pointers; flags compile-time constants):
    0 u, 1 delta  (batch, seqlen, dim)      contiguous
    2 A           (dim, dstate)             fp32
    3 B, 4 C      (batch, seqlen, ngroups, dstate)
    5 D           (dim,)                    fp32, optional
    6 z           (batch, seqlen, dim)      optional
    7 delta_bias  (dim,)                    fp32, optional
    8 ssm_state   (batch, dim, dstate)      fp32
  ->
    y (batch, seqlen, dim), present_ssm_state (may be ssm_state itself)
The launch (argument order, int32 scalars, grid) is in ssmrt.plugins.launch. Channel d reads group
d // (dim // ngroups).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..plugins.launch import launch
from ._checks import check_groups, fp32, scan_io
from ._jit import dt_transform, silu


def _selective_scan_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, state_ptr,
    seqlen, dim, dstate, ngroups,
    y_ptr, state_out_ptr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask = mask_d[:, None] & mask_n[None, :]
    g = offs_d // (dim // ngroups)

    A = tl.load(A_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=mask, other=0.0)
    delta_bias = tl.load(delta_bias_ptr + offs_d, mask=mask_d, other=0.0) if HAS_DELTA_BIAS else 0.0
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    tile = (b * dim + offs_d[:, None]) * dstate + offs_n[None, :]
    s = tl.load(state_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    for t in range(seqlen):
        bt = b * seqlen + t  # row (b, t)
        dt = tl.load(delta_ptr + bt * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        dt = dt_transform(dt, delta_bias, HAS_DELTA_BIAS, DELTA_SOFTPLUS, False, 0.0, 0.0)
        u = tl.load(u_ptr + bt * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        grp = (bt * ngroups + g[:, None]) * dstate + offs_n[None, :]
        Bv = tl.load(B_ptr + grp, mask=mask, other=0.0).to(tl.float32)
        Cv = tl.load(C_ptr + grp, mask=mask, other=0.0).to(tl.float32)
        s = s * tl.exp(dt[:, None] * A) + (dt * u)[:, None] * Bv
        y = tl.sum(s * Cv, axis=1)
        if HAS_D:
            y += u * Dv
        if HAS_Z:
            z = tl.load(z_ptr + bt * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            y *= silu(z)
        tl.store(y_ptr + bt * dim + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)
    tl.store(state_out_ptr + tile, s.to(state_out_ptr.dtype.element_ty), mask=mask)


selective_scan_kernel = triton.jit(_selective_scan_kernel)


def constexprs(dim: int, dstate: int, *, has_D=True, has_z=True, has_delta_bias=True, delta_softplus=True) -> dict:
    # 16 channels a program (32 bytes of fp16): at batch 1 a 1536-wide layer gets 96 programs, not 24
    return {"BLOCK_D": min(triton.next_power_of_2(dim), 16), "BLOCK_N": triton.next_power_of_2(dstate),
            "HAS_D": bool(has_D), "HAS_Z": bool(has_z), "HAS_DELTA_BIAS": bool(has_delta_bias),
            "DELTA_SOFTPLUS": bool(delta_softplus)}


def selective_scan_recurrent(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """selective_scan_ref's signature; out / state_out may be given (state_out may be ssm_state, for an
    in-place update)."""
    batch, seqlen, dim = u.shape
    ngroups, dstate = B.shape[-2], B.shape[-1]
    check_groups(dim, ngroups, "dim")
    u, (delta, B, C), ssm_state, y, s_out = scan_io(u, (delta, B, C), ssm_state, (batch, dim, dstate), out, state_out)
    A = A.float().contiguous()
    meta = constexprs(dim, dstate, has_D=D is not None, has_z=z is not None, has_delta_bias=delta_bias is not None,
                      delta_softplus=delta_softplus)
    launch("selective_scan", {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": fp32(D, A),
                              "z": z.contiguous() if z is not None else u, "delta_bias": fp32(delta_bias, A),
                              "state": ssm_state, "y": y, "state_out": s_out}, meta)
    return y, s_out


# From this many tokens on, the chain split over time replaces the one-kernel recurrence (which walks the
# sequence token by token). benchmarks/gpu_kernels.py measures both at the crossover.
CHUNKED_MIN_SEQLEN = 32


def selective_scan(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """selective_scan_ref's signature (+ out / state_out): the recurrence for short inputs (decode), the chain
    split over time from CHUNKED_MIN_SEQLEN tokens on."""
    from .selective_chunked import selective_scan_chunked

    fn = selective_scan_chunked if u.shape[1] >= CHUNKED_MIN_SEQLEN else selective_scan_recurrent
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, ssm_state, out, state_out)
