"""The op entry points the models call. A backend (ONNX export, GPU kernels) overrides what they run.

The models never call a reference or a kernel directly, so one model definition serves the reference
run, the export (ssmrt::* nodes) and the GPU path.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar

from .causal_conv1d import causal_conv1d_ref
from .rmsnorm import add_rmsnorm_ref, gated_rmsnorm_ref
from .selective_scan import selective_scan_ref
from .ssd_scan import ssd_scan_ref

# The three SSM ops (ssmrt::* nodes in an export) and the two norms, which the export leaves in standard
# ONNX ops but the GPU path fuses into one kernel each.
REFERENCES: dict[str, Callable] = {
    "causal_conv1d": causal_conv1d_ref,
    "selective_scan": selective_scan_ref,
    "ssd_scan": ssd_scan_ref,
    "add_rmsnorm": add_rmsnorm_ref,
    "gated_rmsnorm": gated_rmsnorm_ref,
}

# Which implementation each op runs, per thread (and per asyncio task): a context variable, not a module
# global, so two runners used from two threads (one on the kernels, one on the references) cannot see each
# other's choice. Each thread starts from the references.
_impls: ContextVar[dict[str, Callable]] = ContextVar("ssmrt_op_impls", default=REFERENCES)


def causal_conv1d(x, weight, bias, conv_state, activation):
    return _impls.get()["causal_conv1d"](x, weight, bias, conv_state, activation)


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, ssm_state):
    return _impls.get()["selective_scan"](u, delta, A, B, C, D, z, delta_bias, delta_softplus, ssm_state)


def ssd_scan(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, ssm_state, chunk_size):
    return _impls.get()["ssd_scan"](x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, ssm_state, chunk_size)


def add_rmsnorm(x, residual, weight, eps, residual_in_fp32):
    return _impls.get()["add_rmsnorm"](x, residual, weight, eps, residual_in_fp32)


def gated_rmsnorm(x, weight, z, eps, group_size, norm_before_gate):
    return _impls.get()["gated_rmsnorm"](x, weight, z, eps, group_size, norm_before_gate)


def current() -> dict[str, Callable]:
    """The implementations the ops run here and now (a copy)."""
    return dict(_impls.get())


@contextmanager
def override(**impls: Callable):
    """Within the block, in this thread, the named ops run the given implementations (same signature as the
    refs); other threads keep theirs."""
    unknown = set(impls) - set(REFERENCES)
    if unknown:
        raise KeyError(f"unknown ops {sorted(unknown)}; known: {sorted(REFERENCES)}")
    token = _impls.set({**_impls.get(), **impls})
    try:
        yield
    finally:
        _impls.reset(token)
