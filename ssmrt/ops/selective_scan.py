"""SelectiveScan (Mamba-1): the selective state space recurrence, with optional D skip and z gate.

The op's interface (inputs, outputs, shapes, attributes, which inputs are optional or float32) is
ssmrt.ops.spec.SELECTIVE_SCAN; the design is docs/design.md.

Semantics, per channel d and time step t, with dt = softplus(delta + delta_bias) (softplus if delta_softplus;
A already -exp(A_log), float32):
    h_t = exp(dt_t A_d) h_{t-1} + dt_t u_t B_t ;  y_t = (h_t C_t + D_d u_t) * silu(z_t)

Channel d reads group d // (dim // ngroups); Mamba-1 models have ngroups == 1.
"""

from __future__ import annotations

import torch

from .common import acc_dtype, expand_groups, silu, softplus


def selective_scan_ref(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential reference: the truth for Mamba-1.

    u, delta, z: (batch, seqlen, dim)
    A: (dim, dstate)
    B, C: (batch, seqlen, ngroups, dstate)
    D, delta_bias: (dim,) or None
    ssm_state: (batch, dim, dstate) or None (zeros)
    returns y: (batch, seqlen, dim) in u.dtype, new_state: (batch, dim, dstate) in ssm_state's dtype
    (float32, or float64 for float64 inputs, when ssm_state is None)
    """
    batch, seqlen, dim = u.shape
    dstate = A.shape[-1]
    dtype = acc_dtype(u, delta, A, B, C, D, z, delta_bias, ssm_state)
    state_dtype = ssm_state.dtype if ssm_state is not None else dtype

    # 1. Discretisation step: delta <- softplus(delta + delta_bias)
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)
    if delta_softplus:
        dt = softplus(dt)
    uf = u.to(dtype)
    Bf = expand_groups(B.to(dtype), dim)  # (batch, seqlen, dim, dstate)
    Cf = expand_groups(C.to(dtype), dim)
    # 2. dA = exp(dt * A), dBu = dt * B * u
    dA = torch.exp(dt[..., None] * A.to(dtype))
    dBu = (dt * uf)[..., None] * Bf

    # 3. h_t = dA_t * h_{t-1} + dBu_t ; y_t = <h_t, C_t>
    h = ssm_state.to(dtype) if ssm_state is not None else u.new_zeros(batch, dim, dstate, dtype=dtype)
    ys = []
    for t in range(seqlen):
        h = dA[:, t] * h + dBu[:, t]
        ys.append((h * Cf[:, t]).sum(-1))
    y = torch.stack(ys, dim=1)

    # 4. Skip and gate
    if D is not None:
        y = y + uf * D.to(dtype)
    if z is not None:
        y = y * silu(z.to(dtype))
    return y.to(u.dtype), h.to(state_dtype)
