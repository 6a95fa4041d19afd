"""SSDScan (Mamba-2): the state space dual scan, chunked, from a given state.

The op's interface (inputs, outputs, shapes, attributes, which inputs are optional or float32) is
ssmrt.ops.spec.SSD_SCAN; the design is docs/design.md.

Head h reads group h // (nheads // ngroups). Per time step, with dt_h after bias, softplus and clamp:
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T ;  y_t = h_t C_t + D x_t
"""

from __future__ import annotations

import math

import torch

from .common import acc_dtype, expand_groups, softplus
from .spec import NO_DT_LIMIT, dt_limit_active


def _dt_processed(dt, dt_bias, dt_softplus, dt_limit, dtype):
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = softplus(dt)
    if dt_limit_active(dt_limit):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _d_skip(y, x, D, dtype):
    if D is None:
        return y
    Df = D.to(dtype)
    return y + x * (Df[:, None] if Df.dim() == 1 else Df)


def segsum(x: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T): out[..., i, j] = sum(x[..., j+1 : i+1]) for j <= i, -inf above the diagonal.

    Built from a masked cumsum rather than a difference of cumsums, which loses precision.
    """
    T = x.shape[-1]
    x = x[..., None].expand(*x.shape, T)
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~below, 0)
    out = torch.cumsum(x, dim=-2)
    keep = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=0)
    return out.masked_fill(~keep, -math.inf)


def ssd_scan_ref(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD for any seqlen (the last chunk may be partial), from a given state.

    x: (batch, seqlen, nheads, headdim)
    dt: (batch, seqlen, nheads)
    A: (nheads,)
    B, C: (batch, seqlen, ngroups, dstate)
    D: (nheads,) or (nheads, headdim) or None
    dt_bias: (nheads,) or None
    ssm_state: (batch, nheads, headdim, dstate) or None (zeros)
    returns y: (batch, seqlen, nheads, headdim) in x.dtype, new_state in ssm_state's dtype (float32,
    or float64 for float64 inputs, if None)
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[-1]
    dtype = acc_dtype(x, dt, A, B, C, D, dt_bias, ssm_state)
    state_dtype = ssm_state.dtype if ssm_state is not None else dtype

    # 1. dt after bias, softplus and limit; discretise: X = x * dt, a = A * dt (log of the decay)
    dtf = _dt_processed(dt, dt_bias, dt_softplus, dt_limit, dtype)  # (b, l, h)
    xf = x.to(dtype)
    X = xf * dtf[..., None]
    a = A.to(dtype) * dtf
    Bh = expand_groups(B.to(dtype), nheads)  # (b, l, h, n)
    Ch = expand_groups(C.to(dtype), nheads)

    # 2. Chunk by chunk (the last may be partial), carrying the state between chunks
    h = ssm_state.to(dtype) if ssm_state is not None else x.new_zeros(batch, nheads, headdim, dstate, dtype=dtype)
    ys = []
    for start in range(0, seqlen, chunk_size):
        sl = slice(start, min(start + chunk_size, seqlen))
        Xc, Bc, Cc = X[:, sl], Bh[:, sl], Ch[:, sl]
        acum = torch.cumsum(a[:, sl], dim=1).transpose(1, 2)  # (b, h, l): log decay from the chunk start
        # 3. Within the chunk: y_l = sum_{s<=l} exp(acum_l - acum_s) <C_l, B_s> X_s
        diff = acum[..., :, None] - acum[..., None, :]  # (b, h, l, s)
        causal = torch.ones(diff.shape[-2:], dtype=torch.bool, device=x.device).tril()
        decay = torch.exp(diff.masked_fill(~causal, -math.inf))
        scores = torch.einsum("blhn,bshn->bhls", Cc, Bc) * decay
        y_diag = torch.einsum("bhls,bshp->blhp", scores, Xc)
        # 4. The entering state, decayed to each position: y_l += exp(acum_l) h C_l
        y_off = torch.einsum("blhn,bhpn->blhp", Cc, h) * torch.exp(acum).transpose(1, 2)[..., None]
        ys.append(y_diag + y_off)
        # 5. The state leaving the chunk: decay the entering state, add each input decayed to the chunk end
        to_end = torch.exp(acum[..., -1:] - acum)  # (b, h, l)
        h = torch.exp(acum[..., -1])[..., None, None] * h + torch.einsum("blhn,bhl,blhp->bhpn", Bc, to_end, Xc)
    y = torch.cat(ys, dim=1)
    y = _d_skip(y, xf, D, dtype)
    return y.to(x.dtype), h.to(state_dtype)


def ssd_scan_recurrent_ref(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same op as a token-by-token recurrence (what a decode step does); chunk_size is ignored."""
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[-1]
    dtype = acc_dtype(x, dt, A, B, C, D, dt_bias, ssm_state)
    state_dtype = ssm_state.dtype if ssm_state is not None else dtype
    dtf = _dt_processed(dt, dt_bias, dt_softplus, dt_limit, dtype)
    xf = x.to(dtype)
    Bh = expand_groups(B.to(dtype), nheads)
    Ch = expand_groups(C.to(dtype), nheads)
    h = ssm_state.to(dtype) if ssm_state is not None else x.new_zeros(batch, nheads, headdim, dstate, dtype=dtype)
    ys = []
    for t in range(seqlen):
        decay = torch.exp(dtf[:, t] * A.to(dtype))  # (b, h)
        h = decay[..., None, None] * h + (dtf[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
    y = _d_skip(torch.stack(ys, dim=1), xf, D, dtype)
    return y.to(x.dtype), h.to(state_dtype)


def ssd_minimal_discrete(
    X: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    block_len: int,
    initial_states: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD listing of the Mamba-2 paper (Dao & Gu 2024, listing 1), as a second witness.

    X: (batch, length, nheads, headdim)   already multiplied by dt
    A: (batch, length, nheads)            already multiplied by dt
    B, C: (batch, length, nheads, dstate) one per head
    length must be a multiple of block_len.
    returns Y: (batch, length, nheads, headdim), final_state: (batch, nheads, headdim, dstate)
    """
    b, length, h, p = X.shape
    if length % block_len != 0:
        raise ValueError(f"length {length} is not a multiple of block_len {block_len}")
    c = length // block_len
    X, A, B, C = (t.reshape(b, c, block_len, *t.shape[2:]) for t in (X, A, B, C))
    A = A.permute(0, 3, 1, 2)  # (b, h, c, l)
    A_cumsum = torch.cumsum(A, dim=-1)

    # 1. Compute the output for each intra-chunk (diagonal blocks)
    L = torch.exp(segsum(A))
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L, X)

    # 2. Compute the state for each intra-chunk (right term of the low-rank factorisation of off-diagonal blocks)
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)

    # 3. Compute the inter-chunk SSM recurrence (middle term)
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, :1])
    else:
        initial_states = initial_states[:, None]
    states = torch.cat([initial_states, states], dim=1)
    decay_chunk = torch.exp(segsum(torch.nn.functional.pad(A_cumsum[:, :, :, -1], (1, 0))))
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]

    # 4. Compute state -> output conversion per chunk (left term)
    state_decay_out = torch.exp(A_cumsum)
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, state_decay_out)

    Y = (Y_diag + Y_off).reshape(b, length, h, p)
    return Y, final_state
