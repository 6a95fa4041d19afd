"""Helpers shared by the op references: accumulation dtype, softplus as the kernels do it, group expansion."""

from __future__ import annotations

import torch

from .spec import SOFTPLUS_THRESHOLD


def acc_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64 (the references' own high-precision witness), else float32."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def softplus(x: torch.Tensor) -> torch.Tensor:
    """`x <= SOFTPLUS_THRESHOLD ? log1p(exp(x)) : x`, the form every Mamba kernel uses (torch's F.softplus default
    agrees)."""
    return torch.where(x <= SOFTPLUS_THRESHOLD, torch.log1p(torch.exp(x)), x)


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def expand_groups(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """(..., ngroups, n) -> (..., nheads, n): head h reads group h // (nheads // ngroups)."""
    ngroups = t.shape[-2]
    if nheads % ngroups != 0:
        raise ValueError(f"ngroups ({ngroups}) must divide the number of heads/channels ({nheads})")
    return t.repeat_interleave(nheads // ngroups, dim=-2)
