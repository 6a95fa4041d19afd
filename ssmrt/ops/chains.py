"""The chain ops: SSDScan and SelectiveScan as three nodes each, for a prefill graph whose nodes each run one
kernel (a TensorRT AOT plugin runs exactly one). Their contracts are ssmrt.ops.spec's CHAIN_OPS; these are
the plain-torch references, the twins of the chain kernels (ssmrt.kernels.ssd_chunked, selective_chunked).

Chunk c covers tokens [cQ, cQ + Q) (Q = chunk_size), the last chunk may be partial; positions past the end
have dt = 0, so the decay there is 1 and they add nothing. Composed, each chain is its one-node op:

    dt_out, dA_cumsum, S = ssd_chunk_state(x, dt, A, B, dt_bias, ...)       S_c: chunk c's own final state
    H, present = ssd_state_passing(S, dA_cumsum, ssm_state)                 H_c: the state entering chunk c
    y = ssd_chunk_scan(x, B, C, D, dt_out, dA_cumsum, H)                     == ssd_scan_ref(...)

    S, delta_sum = selective_chunk_state(u, delta, A, B, delta_bias, ...)
    H, present = selective_state_passing(S, delta_sum, A, ssm_state)
    y = selective_chunk_scan(u, delta, A, B, C, D, z, delta_bias, H, ...)    == selective_scan_ref(...)

The intermediates are float32 (float64 for float64 inputs), whatever the activations' dtype.
"""

from __future__ import annotations

import math

import torch

from .common import acc_dtype, expand_groups, silu, softplus
from .spec import NO_DT_LIMIT
from .ssd_scan import _d_skip, _dt_processed


def _chunks(seqlen: int, chunk_size: int) -> int:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return max(math.ceil(seqlen / chunk_size), 1) if seqlen else 0


def _pad_time(t: torch.Tensor, length: int) -> torch.Tensor:
    """Zeros appended along axis 1 up to `length`."""
    if t.shape[1] == length:
        return t
    pad = t.new_zeros(t.shape[0], length - t.shape[1], *t.shape[2:])
    return torch.cat([t, pad], dim=1)


def _check_chunk(side: torch.Tensor, chunk_size: int, what: str):
    if side.shape[-1] != chunk_size:
        raise ValueError(f"{what} has chunks of {side.shape[-1]}, chunk_size is {chunk_size}")


# ------------------------------------------------------------------------------------------------- SSD


def ssd_chunk_state_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_DT_LIMIT,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each chunk's dt, its cumulative log decay, and its own final state from a zero state.

    x: (batch, seqlen, nheads, headdim)
    dt: (batch, seqlen, nheads)
    A: (nheads,)
    B: (batch, seqlen, ngroups, dstate)
    dt_bias: (nheads,) or None
    returns dt_out, dA_cumsum: (batch, nheads, nchunks, chunk_size), dt after bias, softplus and limit (0 past
    the end) and cumsum(dt A) within each chunk; chunk_states: (batch, nchunks, nheads, headdim, dstate),
    S_c = sum_l exp(a_last - a_l) dt_l x_l B_l^T
    """
    batch, seqlen, nheads, headdim = x.shape
    nchunks = _chunks(seqlen, chunk_size)
    Q, T = chunk_size, nchunks * chunk_size
    dtype = acc_dtype(x, dt, A, B, dt_bias)
    dtf = _pad_time(_dt_processed(dt, dt_bias, dt_softplus, dt_limit, dtype), T)  # (b, T, h)
    dt_out = dtf.reshape(batch, nchunks, Q, nheads).permute(0, 3, 1, 2).contiguous()  # (b, h, c, Q)
    dA_cumsum = torch.cumsum(dt_out * A.to(dtype)[None, :, None, None], dim=-1)
    X = _pad_time(x.to(dtype), T).reshape(batch, nchunks, Q, nheads, headdim)
    Bh = _pad_time(expand_groups(B.to(dtype), nheads), T).reshape(batch, nchunks, Q, nheads, -1)
    to_end = torch.exp(dA_cumsum[..., -1:] - dA_cumsum) * dt_out  # (b, h, c, Q)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bh, to_end, X)
    return dt_out, dA_cumsum, states


def ssd_state_passing_ref(
    chunk_states: torch.Tensor,
    dA_cumsum: torch.Tensor,
    ssm_state: torch.Tensor,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The state entering each chunk, H_0 = ssm_state, H_{c+1} = exp(a_last(c)) H_c + S_c, and the state leaving
    the last chunk.

    chunk_states: (batch, nchunks, nheads, headdim, dstate)
    dA_cumsum: (batch, nheads, nchunks, chunk_size)
    ssm_state: (batch, nheads, headdim, dstate)
    returns entering_states like chunk_states, present_ssm_state like ssm_state (its dtype)
    """
    _check_chunk(dA_cumsum, chunk_size, "dA_cumsum")
    dtype = acc_dtype(chunk_states, dA_cumsum, ssm_state)
    s = ssm_state.to(dtype)
    entering = []
    for c in range(chunk_states.shape[1]):
        entering.append(s)
        s = torch.exp(dA_cumsum[:, :, c, -1].to(dtype))[..., None, None] * s + chunk_states[:, c].to(dtype)
    return torch.stack(entering, dim=1) if entering else chunk_states.to(dtype), s.to(ssm_state.dtype)


def ssd_chunk_scan_ref(
    x: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    dt_out: torch.Tensor,
    dA_cumsum: torch.Tensor,
    entering_states: torch.Tensor,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Each chunk's output from the state entering it:
    y_l = exp(a_l) C_l H_c + sum_{s<=l} exp(a_l - a_s) dt_s (C_l . B_s) x_s + D x_l.

    x: (batch, seqlen, nheads, headdim)
    B, C: (batch, seqlen, ngroups, dstate)
    D: (nheads,) or (nheads, headdim) or None
    dt_out, dA_cumsum: (batch, nheads, nchunks, chunk_size)
    entering_states: (batch, nchunks, nheads, headdim, dstate)
    returns y: (batch, seqlen, nheads, headdim) in x.dtype
    """
    _check_chunk(dA_cumsum, chunk_size, "dA_cumsum")
    batch, seqlen, nheads, headdim = x.shape
    nchunks, Q = dA_cumsum.shape[2], chunk_size
    T = nchunks * Q
    dtype = acc_dtype(x, B, C, D, dt_out, dA_cumsum, entering_states)
    xf = x.to(dtype)
    X = _pad_time(xf, T).reshape(batch, nchunks, Q, nheads, headdim)
    Bh = _pad_time(expand_groups(B.to(dtype), nheads), T).reshape(batch, nchunks, Q, nheads, -1)
    Ch = _pad_time(expand_groups(C.to(dtype), nheads), T).reshape(batch, nchunks, Q, nheads, -1)
    a, dts = dA_cumsum.to(dtype), dt_out.to(dtype)  # (b, h, c, Q)
    diff = a[..., :, None] - a[..., None, :]  # (b, h, c, l, s)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(diff.masked_fill(~causal, -math.inf)) * dts[..., None, :]
    scores = torch.einsum("bclhn,bcshn->bhcls", Ch, Bh) * decay
    y = torch.einsum("bhcls,bcshp->bclhp", scores, X)
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Ch, entering_states.to(dtype), torch.exp(a))
    y = y.reshape(batch, T, nheads, headdim)[:, :seqlen]
    return _d_skip(y, xf, D, dtype).to(x.dtype)


# ------------------------------------------------------------------------------------------- selective


def _delta_processed(delta, delta_bias, delta_softplus, dtype):
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)
    return softplus(dt) if delta_softplus else dt


def _selective_chunks(u, delta, A, B, delta_bias, delta_softplus, chunk_size, dtype):
    """Per chunk and position: dt (b, c, Q, d) with 0 past the end, dA = exp(dt A) and dBu = dt u B
    (b, c, Q, d, n), and u (b, c, Q, d)."""
    batch, seqlen, dim = u.shape
    nchunks = _chunks(seqlen, chunk_size)
    T = nchunks * chunk_size
    dt = _pad_time(_delta_processed(delta, delta_bias, delta_softplus, dtype), T).reshape(batch, nchunks, -1, dim)
    uf = _pad_time(u.to(dtype), T).reshape(batch, nchunks, -1, dim)
    Bf = _pad_time(expand_groups(B.to(dtype), dim), T).reshape(batch, nchunks, chunk_size, dim, -1)
    dA = torch.exp(dt[..., None] * A.to(dtype))
    dBu = (dt * uf)[..., None] * Bf
    return dt, dA, dBu, uf


def selective_chunk_state_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each chunk's own final state from a zero state, and its sum of dt (its decay is exp(A delta_sum)).

    u, delta: (batch, seqlen, dim)
    A: (dim, dstate)
    B: (batch, seqlen, ngroups, dstate)
    delta_bias: (dim,) or None
    returns chunk_states: (batch, nchunks, dim, dstate), delta_sum: (batch, nchunks, dim)
    """
    dtype = acc_dtype(u, delta, A, B, delta_bias)
    dt, dA, dBu, _ = _selective_chunks(u, delta, A, B, delta_bias, delta_softplus, chunk_size, dtype)
    h = dBu.new_zeros(dBu.shape[0], dBu.shape[1], *dBu.shape[3:])
    for t in range(chunk_size):
        h = dA[:, :, t] * h + dBu[:, :, t]
    return h, dt.sum(dim=2)


def selective_state_passing_ref(
    chunk_states: torch.Tensor,
    delta_sum: torch.Tensor,
    A: torch.Tensor,
    ssm_state: torch.Tensor,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The state entering each chunk, H_0 = ssm_state, H_{c+1} = exp(A delta_sum_c) H_c + S_c, and the state
    leaving the last chunk.

    chunk_states: (batch, nchunks, dim, dstate)
    delta_sum: (batch, nchunks, dim)
    A: (dim, dstate)
    ssm_state: (batch, dim, dstate)
    returns entering_states like chunk_states, present_ssm_state like ssm_state (its dtype)
    """
    dtype = acc_dtype(chunk_states, delta_sum, A, ssm_state)
    s = ssm_state.to(dtype)
    entering = []
    for c in range(chunk_states.shape[1]):
        entering.append(s)
        s = torch.exp(A.to(dtype) * delta_sum[:, c, :, None].to(dtype)) * s + chunk_states[:, c].to(dtype)
    return torch.stack(entering, dim=1) if entering else chunk_states.to(dtype), s.to(ssm_state.dtype)


def selective_chunk_scan_ref(
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
    chunk_size: int = 256,
) -> torch.Tensor:
    """Each chunk's output from the state entering it: the recurrence within the chunk, y = (h C + D u) silu(z).

    u, delta, z: (batch, seqlen, dim)
    A: (dim, dstate)
    B, C: (batch, seqlen, ngroups, dstate)
    D, delta_bias: (dim,) or None
    entering_states: (batch, nchunks, dim, dstate)
    returns y: (batch, seqlen, dim) in u.dtype
    """
    batch, seqlen, dim = u.shape
    dtype = acc_dtype(u, delta, A, B, C, D, z, delta_bias, entering_states)
    _, dA, dBu, uf = _selective_chunks(u, delta, A, B, delta_bias, delta_softplus, chunk_size, dtype)
    nchunks = dA.shape[1]
    Cf = _pad_time(expand_groups(C.to(dtype), dim), nchunks * chunk_size).reshape(batch, nchunks, chunk_size, dim, -1)
    h = entering_states.to(dtype)
    ys = []
    for t in range(chunk_size):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append((h * Cf[:, :, t]).sum(-1))
    y = torch.stack(ys, dim=2).reshape(batch, nchunks * chunk_size, dim)[:, :seqlen]
    if D is not None:
        y = y + uf.reshape(batch, -1, dim)[:, :seqlen] * D.to(dtype)
    if z is not None:
        y = y * silu(z.to(dtype))
    return y.to(u.dtype)
