"""Argument checks and buffers shared by the kernel wrappers."""

from __future__ import annotations

import torch


def check_outputs(**tensors):
    """The kernels write through raw pointers with contiguous strides: a given out / state_out must be
    contiguous (a .contiguous() copy would silently receive the result instead)."""
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernel writes it with contiguous strides)")


def check_groups(channels: int, ngroups: int, what: str):
    if channels % ngroups:
        raise ValueError(f"ngroups ({ngroups}) must divide {what} ({channels})")


def scan_io(x, others, ssm_state, state_shape, out, state_out):
    """What every scan wrapper prepares: outputs checked, a zero float32 state when none is given, the
    inputs contiguous, y and the new state allocated unless given (state_out may be ssm_state).
    Returns (x, others, ssm_state, y, state_out)."""
    check_outputs(out=out, state_out=state_out)
    if ssm_state is None:
        ssm_state = torch.zeros(state_shape, device=x.device, dtype=torch.float32)
    x, ssm_state = x.contiguous(), ssm_state.contiguous()
    others = [t.contiguous() for t in others]
    y = out if out is not None else torch.empty_like(x)
    s_out = state_out if state_out is not None else torch.empty_like(ssm_state)
    return x, others, ssm_state, y, s_out


def fp32(t, fallback):
    """An optional fp32 parameter as a contiguous float32 tensor; `fallback` (any valid pointer the kernel
    will not read) when absent."""
    return t.float().contiguous() if t is not None else fallback
