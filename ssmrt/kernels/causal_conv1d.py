"""CausalConv1d as one Triton kernel for any seqlen (seqlen 1 is the decode step). Its reference twin is
ssmrt.ops.causal_conv1d_ref (same signature).

Contract (one launch: input pointers, int32 scalars, output pointers, as ssmrt.plugins.launch says; the
activation a compile-time constant):
    0 x           (batch, seqlen, dim)     contiguous
    1 weight      (dim, width)
    2 bias        (dim,)                   optional
    3 conv_state  (batch, dim, width - 1)  the last width-1 inputs
  ->
    y (batch, seqlen, dim), present_conv_state (may be conv_state itself: a program reads all the state it
    needs before writing it)
The launch (argument order, int32 scalars, grid) is in ssmrt.plugins.launch.
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
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
):
    pid_c = tl.program_id(0)
    b = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    mask_c = offs_c < dim
    nstate = width - 1
    w = tl.load(w_ptr + offs_c[:, None] * width + offs_k[None, :],
                mask=mask_c[:, None] & (offs_k[None, :] < width), other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    # the new state, the last width-1 inputs, read before anything is written (state_out may be the state)
    j_state = seqlen - nstate + offs_k[None, :]
    new = _window(x_ptr, state_ptr, b, j_state, offs_c, mask_c, offs_k[None, :] < nstate, seqlen, dim, nstate)
    for t in range(seqlen):
        # y_t = sum_k w[:, k] * input at time t - (width - 1) + k
        j = t - nstate + offs_k[None, :]
        window = _window(x_ptr, state_ptr, b, j, offs_c, mask_c, offs_k[None, :] < width, seqlen, dim, nstate)
        y = tl.sum(window * w, axis=1)
        if HAS_BIAS:
            y += bias
        if SILU:
            y = silu(y)
        tl.store(y_ptr + (b * seqlen + t) * dim + offs_c, y.to(y_ptr.dtype.element_ty), mask=mask_c)
    tl.store(state_out_ptr + (b * dim + offs_c[:, None]) * nstate + offs_k[None, :],
             new.to(state_out_ptr.dtype.element_ty), mask=mask_c[:, None] & (offs_k[None, :] < nstate))


causal_conv1d_kernel = triton.jit(_causal_conv1d_kernel)


def constexprs(dim: int, width: int, *, has_bias=True, activation="silu") -> dict:
    return {"BLOCK_C": min(triton.next_power_of_2(dim), 128), "BLOCK_K": triton.next_power_of_2(width),
            "HAS_BIAS": bool(has_bias), "SILU": activation == "silu"}


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
    meta = constexprs(dim, width, has_bias=bias is not None, activation=activation or "none")
    launch("causal_conv1d", {"x": x, "w": weight, "bias": bias.contiguous() if bias is not None else weight,
                             "state": conv_state, "y": y, "state_out": s_out}, meta)
    return y, s_out
