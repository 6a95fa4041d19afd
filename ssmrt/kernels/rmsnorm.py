"""The two norms of a Mamba block as one Triton kernel each (a decode step is launch-bound: unfused, each
norm is six to nine small kernels). Reference twins: ssmrt.ops.add_rmsnorm_ref / gated_rmsnorm_ref.

add_rmsnorm (block entry, Add -> Norm):
    0 x         (rows, dim)                  the previous mixer's output (or the embedding)
    1 residual  (rows, dim)                  optional (the first block has none)
    2 weight    (dim,)
  ->
    out (rows, dim) in weight's dtype, residual_out (rows, dim): float32 with residual_in_fp32
  Grid: (rows,). eps is a compile-time constant.

gated_rmsnorm (Mamba-2, after the scan):
    0 x         (rows, dim)                  row stride given (the scan's output)
    1 z         (rows, dim)                  optional; row stride given (a slice of in_proj's output)
    2 weight    (dim,)
  ->
    y (rows, dim) contiguous, x's dtype
  Grid: (rows, dim // group_size). eps, group size and the gate order are compile-time constants.
No TensorRT types here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_outputs


def _add_rmsnorm_kernel(
    x_ptr, residual_ptr, w_ptr, out_ptr, residual_out_ptr,
    dim,
    BLOCK: tl.constexpr, EPS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < dim
    at = row * dim + offs
    r = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r += tl.load(residual_ptr + at, mask=mask, other=0.0).to(tl.float32)
    # the norm reads the residual as stored, then in the weight's dtype (as the reference's casts do)
    r = r.to(residual_out_ptr.dtype.element_ty)
    tl.store(residual_out_ptr + at, r, mask=mask)
    x = r.to(w_ptr.dtype.element_ty).to(tl.float32)
    y = x / tl.sqrt(tl.sum(x * x, axis=0) / dim + EPS)
    y *= tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + at, y.to(out_ptr.dtype.element_ty), mask=mask)


def _gated_rmsnorm_kernel(
    x_ptr, z_ptr, w_ptr, y_ptr,
    dim, stride_x, stride_z,
    BLOCK: tl.constexpr, GROUP: tl.constexpr, EPS: tl.constexpr, HAS_Z: tl.constexpr,
    NORM_BEFORE_GATE: tl.constexpr,
):
    row = tl.program_id(0)
    group = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < GROUP
    col = group * GROUP + offs
    x = tl.load(x_ptr + row * stride_x + col, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + row * stride_z + col, mask=mask, other=0.0).to(tl.float32)
        gate = z / (1.0 + tl.exp(-z))  # silu(z), spelled out (no Triton library function)
        if not NORM_BEFORE_GATE:
            x *= gate
    y = x / tl.sqrt(tl.sum(x * x, axis=0) / GROUP + EPS)
    y *= tl.load(w_ptr + col, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z and NORM_BEFORE_GATE:
        y *= gate
    tl.store(y_ptr + row * dim + col, y.to(y_ptr.dtype.element_ty), mask=mask)


add_rmsnorm_kernel = triton.jit(_add_rmsnorm_kernel)
gated_rmsnorm_kernel = triton.jit(_gated_rmsnorm_kernel)


def add_constexprs(dim: int, eps: float, has_residual: bool = True) -> dict:
    block = triton.next_power_of_2(dim)
    return {"BLOCK": block, "EPS": float(eps), "HAS_RESIDUAL": bool(has_residual),
            "num_warps": min(max(block // 256, 1), 16)}


def gated_constexprs(group_size: int, eps: float, has_z: bool = True, norm_before_gate: bool = False) -> dict:
    block = triton.next_power_of_2(group_size)
    return {"BLOCK": block, "GROUP": int(group_size), "EPS": float(eps), "HAS_Z": bool(has_z),
            "NORM_BEFORE_GATE": bool(norm_before_gate), "num_warps": min(max(block // 256, 1), 16)}


def _rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., dim) as (rows, dim) with unit column stride: a view when the leading axes flatten (a slice of a
    wider last axis does), else a copy."""
    t = t.reshape(-1, dim)
    return t if t.stride(-1) == 1 else t.contiguous()


def add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    residual_in_fp32: bool = True,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rmsnorm_ref's signature; out / residual_out may be given (residual_out may be residual)."""
    check_outputs(out=out, residual_out=residual_out)
    dim = x.shape[-1]
    res_dtype = torch.float32 if residual_in_fp32 else (
        x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype))
    x2 = x.reshape(-1, dim).contiguous()
    r2 = residual.reshape(-1, dim).contiguous() if residual is not None else x2
    y = out if out is not None else torch.empty(x.shape, dtype=weight.dtype, device=x.device)
    r_out = residual_out if residual_out is not None else torch.empty(x.shape, dtype=res_dtype, device=x.device)
    meta = add_constexprs(dim, eps, residual is not None)
    add_rmsnorm_kernel[(x2.shape[0],)](x2, r2, weight.contiguous(), y, r_out, dim, **meta)
    return y, r_out


def gated_rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None = None,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """gated_rmsnorm_ref's signature; out may be given."""
    check_outputs(out=out)
    dim = x.shape[-1]
    group_size = dim if group_size is None else group_size
    if dim % group_size != 0:
        raise ValueError(f"group_size {group_size} does not divide the normalised width {dim}")
    x2 = _rows(x, dim)
    z2 = _rows(z, dim) if z is not None else x2
    y = out if out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    meta = gated_constexprs(group_size, eps, z is not None, norm_before_gate)
    gated_rmsnorm_kernel[(x2.shape[0], dim // group_size)](x2, z2, weight.contiguous(), y, dim, x2.stride(0),
                                                            z2.stride(0), **meta)
    return y
