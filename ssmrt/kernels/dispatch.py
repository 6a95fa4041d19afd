"""Routes the models' ops to the Triton kernels: the decode step (seqlen 1) of every op, on CUDA tensors.

Prefill (seqlen > 1) still runs the references until the prefill kernels exist. `use_kernels(force=True)`
also routes CPU tensors, which run in Triton's interpreter (TRITON_INTERPRET=1): how CI checks the wiring.
"""

from __future__ import annotations

from contextlib import contextmanager

from ..ops import causal_conv1d_ref, dispatch, selective_scan_ref, ssd_scan_ref


def _routes(force: bool):
    from .causal_conv1d_step import causal_conv1d_step
    from .selective_step import selective_step
    from .ssd_step import ssd_step

    def take(t):
        return t.shape[1] == 1 and (force or t.is_cuda)

    def conv(x, weight, bias, conv_state, activation):
        if take(x) and weight.shape[-1] >= 2:
            return causal_conv1d_step(x, weight, bias, conv_state, activation)
        return causal_conv1d_ref(x, weight, bias, conv_state, activation)

    def selective(u, delta, A, B, C, D, z, delta_bias, delta_softplus, ssm_state):
        fn = selective_step if take(u) else selective_scan_ref
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, ssm_state)

    def ssd(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, ssm_state, chunk_size):
        fn = ssd_step if take(x) else ssd_scan_ref
        return fn(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, ssm_state, chunk_size)

    return {"causal_conv1d": conv, "selective_scan": selective, "ssd_scan": ssd}


@contextmanager
def use_kernels(force: bool = False):
    """Within the block, decode steps on CUDA tensors (any tensors with force=True) run the Triton kernels."""
    with dispatch.override(**_routes(force)):
        yield
