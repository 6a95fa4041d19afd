"""CausalConv1d decode step (L = 1) as one Triton kernel. Its reference twin is
ssmrt.ops.causal_conv1d_ref with seqlen 1 (same signature).

Contract (one launch; tensor pointers and int32 scalars; the activation a compile-time constant):
    0 x           (batch, 1, dim)          contiguous
    1 weight      (dim, width)
    2 bias        (dim,)                   optional
    3 conv_state  (batch, dim, width - 1)  the last width-1 inputs
  ->
    y (batch, 1, dim), present_conv_state (may be conv_state itself)
Grid: (cdiv(dim, BLOCK_C), batch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _causal_conv1d_step_kernel(
    x_ptr, w_ptr, bias_ptr, state_ptr, y_ptr, state_out_ptr,
    dim, width,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
):
    pid_c = tl.program_id(0)
    b = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    mask_c = offs_c < dim
    nstate = width - 1
    x = tl.load(x_ptr + b * dim + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    # window[c, k] = input at time k - (width - 1): the state's columns, then x
    row = (b * dim + offs_c[:, None]) * nstate
    st = tl.load(state_ptr + row + offs_k[None, :], mask=mask_c[:, None] & (offs_k[None, :] < nstate),
                 other=0.0).to(tl.float32)
    window = tl.where(offs_k[None, :] == nstate, x[:, None], st)
    w = tl.load(w_ptr + offs_c[:, None] * width + offs_k[None, :],
                mask=mask_c[:, None] & (offs_k[None, :] < width), other=0.0).to(tl.float32)
    y = tl.sum(window * w, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    if SILU:
        y = y / (1.0 + tl.exp(-y))  # silu; spelled out so the kernel needs no Triton library function
    # the new state drops the oldest column and appends x: new[c, k] = window[c, k + 1]
    nxt = tl.load(state_ptr + row + offs_k[None, :] + 1,
                  mask=mask_c[:, None] & (offs_k[None, :] + 1 < nstate), other=0.0).to(tl.float32)
    new = tl.where(offs_k[None, :] == nstate - 1, x[:, None], nxt)
    tl.store(y_ptr + b * dim + offs_c, y.to(y_ptr.dtype.element_ty), mask=mask_c)
    tl.store(state_out_ptr + row + offs_k[None, :], new.to(state_out_ptr.dtype.element_ty),
             mask=mask_c[:, None] & (offs_k[None, :] < nstate))


causal_conv1d_step_kernel = triton.jit(_causal_conv1d_step_kernel)


def constexprs(dim: int, width: int, *, has_bias=True, activation="silu") -> dict:
    return {"BLOCK_C": min(triton.next_power_of_2(dim), 128), "BLOCK_K": triton.next_power_of_2(width),
            "HAS_BIAS": bool(has_bias), "SILU": activation == "silu"}


def causal_conv1d_step(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    conv_state: torch.Tensor | None = None,
    activation: str | None = "silu",
    out: torch.Tensor | None = None,
    state_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """causal_conv1d_ref's signature for seqlen == 1; out / state_out may be given (state_out may be
    conv_state, for an in-place update)."""
    batch, seqlen, dim = x.shape
    width = weight.shape[-1]
    if seqlen != 1:
        raise ValueError(f"causal_conv1d_step is the decode step: seqlen must be 1, got {seqlen}")
    if width < 2:
        raise ValueError(f"causal_conv1d_step needs width >= 2, got {width}")
    if activation not in ("silu", "none", None):
        raise ValueError(f"activation must be 'silu' or 'none', got {activation!r}")
    if conv_state is None:
        conv_state = x.new_zeros(batch, dim, width - 1)
    x, weight, conv_state = x.contiguous(), weight.contiguous(), conv_state.contiguous()
    y = out if out is not None else torch.empty_like(x)
    s_out = state_out if state_out is not None else torch.empty_like(conv_state)
    meta = constexprs(dim, width, has_bias=bias is not None, activation=activation or "none")
    grid = (triton.cdiv(dim, meta["BLOCK_C"]), batch)
    causal_conv1d_step_kernel[grid](x, weight, bias.contiguous() if bias is not None else weight, conv_state, y,
                                    s_out, dim, width, **meta)
    return y, s_out
