"""RMSNorm and the group-wise gated RMSNorm of Mamba-2 (standard ONNX ops in the export, no custom op)."""

from __future__ import annotations

import torch

from .common import acc_dtype, silu


def rmsnorm_ref(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """x: (..., dim); weight: (dim,) or None (FalconMamba's weightless norms). Returns x.dtype."""
    dtype = acc_dtype(x, weight)
    xf = x.to(dtype)
    # x / sqrt(.) rather than x * rsqrt(.): the exported pattern ONNX Runtime fuses into one RMSNorm kernel
    y = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(dtype)
    return y.to(x.dtype)


def add_rmsnorm_ref(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    residual_in_fp32: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block entry (mamba_ssm's Add -> Norm): residual = x (+ residual), in float32 when residual_in_fp32
    (float64 stays float64); returns (rmsnorm(residual) in weight's dtype, residual).

    x: (..., dim); residual: (..., dim) or None (the first block); weight: (dim,)
    """
    residual = x if residual is None else residual + x
    if residual_in_fp32:
        residual = residual.to(acc_dtype(residual))  # float32, or float64 in a float64 witness
    return rmsnorm_ref(residual.to(weight.dtype), weight, eps), residual


def gated_rmsnorm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None = None,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """Group-wise RMSNorm with a SiLU gate, as mamba_ssm's RMSNormGated.

    x, z: (..., dim)
    weight: (dim,)
    group_size: normalise over consecutive groups of this many channels (dim // ngroups); None = whole dim
    norm_before_gate=False: norm(x * silu(z)) * weight ; True: norm(x) * weight * silu(z)
    """
    dtype = acc_dtype(x, weight, z)
    dim = x.shape[-1]
    group_size = dim if group_size is None else group_size
    if dim % group_size != 0:
        raise ValueError(f"group_size {group_size} does not divide the normalised width {dim}")
    xf = x.to(dtype)
    gate = silu(z.to(dtype)) if z is not None else None
    if gate is not None and not norm_before_gate:
        xf = xf * gate
    if group_size == dim:  # one group: the plain form, which an ONNX Runtime export fuses into one kernel
        y = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(dtype)
    else:
        xg = xf.reshape(*xf.shape[:-1], dim // group_size, group_size)
        xg = xg / torch.sqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
        y = xg.reshape(xf.shape) * weight.to(dtype)
    if gate is not None and norm_before_gate:
        y = y * gate
    return y.to(x.dtype)
