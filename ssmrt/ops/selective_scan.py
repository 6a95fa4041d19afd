"""SelectiveScan (Mamba-1): the selective state space recurrence, with optional D skip and z gate.

Contract (ONNX `ssmrt::SelectiveScan`, see DESIGN.md):
    0 u           (batch, seqlen, dim)               activation dtype
    1 delta       (batch, seqlen, dim)               activation dtype, before delta_bias / softplus
    2 A           (dim, dstate)                      float32, already -exp(A_log)
    3 B           (batch, seqlen, ngroups, dstate)
    4 C           (batch, seqlen, ngroups, dstate)
    5 D           (dim,)                             float32, optional
    6 z           (batch, seqlen, dim)               optional gate: y * silu(z)
    7 delta_bias  (dim,)                             float32, optional
    8 ssm_state   (batch, dim, dstate)               float32; zeros = empty
  ->
    0 y                  (batch, seqlen, dim)
    1 present_ssm_state  (batch, dim, dstate)
  attribute delta_softplus: int (0 / 1)

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
