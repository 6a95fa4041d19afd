"""Routes the models' ops to the Triton kernels when the tensors are on CUDA.

`use_kernels(force=True)` also routes CPU tensors, which then run in Triton's interpreter
(TRITON_INTERPRET=1): how CI checks the wiring without a GPU.
"""

from __future__ import annotations

from contextlib import contextmanager

from ..ops import causal_conv1d_ref, dispatch, selective_scan_ref, ssd_scan_ref


def _routes(force: bool):
    from . import causal_conv1d, selective_scan, ssd_scan

    def take(t):
        return force or t.is_cuda

    def conv(x, weight, bias, conv_state, activation):
        fn = causal_conv1d.causal_conv1d if take(x) and weight.shape[-1] >= 2 else causal_conv1d_ref
        return fn(x, weight, bias, conv_state, activation)

    def selective(u, delta, A, B, C, D, z, delta_bias, delta_softplus, ssm_state):
        fn = selective_scan.selective_scan if take(u) else selective_scan_ref
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, ssm_state)

    def ssd(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, ssm_state, chunk_size):
        fn = ssd_scan.ssd_scan if take(x) else ssd_scan_ref
        return fn(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, ssm_state, chunk_size)

    return {"causal_conv1d": conv, "selective_scan": selective, "ssd_scan": ssd}


@contextmanager
def use_kernels(force: bool = False):
    """Within the block, the models' ops on CUDA tensors (any tensors with force=True) run the kernels."""
    with dispatch.override(**_routes(force)):
        yield
