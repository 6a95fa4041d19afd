"""Routes the models' ops (the SSM ops and the two fused norms) to the Triton kernels when the tensors are
on CUDA.

`use_kernels(force=True)` also routes CPU tensors, which then run in Triton's interpreter
(TRITON_INTERPRET=1): how CI checks the wiring without a GPU. With `inplace_state=True` the kernels write the
new state over the state they are given (the op returns that same tensor): what a CUDA-graph decode step
with static state buffers needs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from ..ops import add_rmsnorm_ref, causal_conv1d_ref, dispatch, gated_rmsnorm_ref, selective_scan_ref, ssd_scan_ref


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (read as Triton reads it; no Triton import)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on", "y")


def _routes(force: bool, inplace_state: bool):
    from . import causal_conv1d, rmsnorm, selective_scan, ssd_scan

    def take(t):
        return force or t.is_cuda

    def conv(x, weight, bias, conv_state, activation):
        if not (take(x) and weight.shape[-1] >= 2):
            return causal_conv1d_ref(x, weight, bias, conv_state, activation)
        return causal_conv1d.causal_conv1d(x, weight, bias, conv_state, activation,
                                           state_out=conv_state if inplace_state else None)

    def selective(u, delta, A, B, C, D, z, delta_bias, delta_softplus, ssm_state):
        if not take(u):
            return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, ssm_state)
        return selective_scan.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, ssm_state,
                                             state_out=ssm_state if inplace_state else None)

    def ssd(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, ssm_state, chunk_size):
        if not take(x):
            return ssd_scan_ref(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, ssm_state, chunk_size)
        return ssd_scan.ssd_scan(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, ssm_state, chunk_size,
                                 state_out=ssm_state if inplace_state else None)

    def add_norm(x, residual, weight, eps, residual_in_fp32):
        fn = rmsnorm.add_rmsnorm if take(x) else add_rmsnorm_ref
        return fn(x, residual, weight, eps, residual_in_fp32)

    def gated_norm(x, weight, z, eps, group_size, norm_before_gate):
        fn = rmsnorm.gated_rmsnorm if take(x) else gated_rmsnorm_ref
        return fn(x, weight, z, eps, group_size, norm_before_gate)

    return {"causal_conv1d": conv, "selective_scan": selective, "ssd_scan": ssd, "add_rmsnorm": add_norm,
            "gated_rmsnorm": gated_norm}


@contextmanager
def use_kernels(force: bool = False, inplace_state: bool = False):
    """Within the block, the models' ops on CUDA tensors (any tensors with force=True) run the kernels;
    with inplace_state=True they update the given states in place (a state of None is still allocated)."""
    with dispatch.override(**_routes(force, inplace_state)):
        yield
