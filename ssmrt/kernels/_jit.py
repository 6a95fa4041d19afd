"""Device functions and compile-time constants shared by the Triton kernels, each decision made once.

The op semantics they implement (the softplus threshold, when a dt limit applies) come from ssmrt.ops.spec.
"""

from __future__ import annotations

import triton  # noqa: F401  (triton.jit below)
import triton.language as tl

from ..ops.spec import SOFTPLUS_THRESHOLD as _SOFTPLUS_THRESHOLD
from ..ops.spec import dt_limit_active

SOFTPLUS_THRESHOLD = tl.constexpr(_SOFTPLUS_THRESHOLD)
# The clamp's upper bound when the limit has none: the largest float32 is not needed, any bound beyond every
# softplus result works, and this one stays finite in every dtype the constant is compiled into.
NO_DT_MAX = 3.0e38


@triton.jit
def softplus(x):
    """x <= SOFTPLUS_THRESHOLD ? log1p(exp(x)) : x (ssmrt.ops.spec).

    Triton has no log1p outside the CUDA / HIP libdevice (which the interpreter cannot run), and log(1 + e) rounds
    away up to 6e-8 of a small e = exp(x): at Mamba's small dt (x near -7) that is 6e-5 of dt, summed into the
    state every step. Goldberg's log1p(e) = log(u) * e / (u - 1), u = 1 + e, cancels u's rounding (a few ulps;
    tl.log is libdevice's logf on the GPU), and is e itself where u rounds to 1."""
    e = tl.exp(x)
    u = 1.0 + e
    soft = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    return tl.where(x <= SOFTPLUS_THRESHOLD, soft, x)


@triton.jit
def silu(z):
    """z * sigmoid(z), spelled out (Triton has no library function for it)."""
    return z / (1.0 + tl.exp(-z))


@triton.jit
def dt_transform(dt, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr,
                 DT_MIN: tl.constexpr, DT_MAX: tl.constexpr):
    """A time step (fp32) after its bias, softplus and limit, each only where the specialisation has it."""
    if HAS_BIAS:
        dt += bias
    if SOFTPLUS:
        dt = softplus(dt)
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, DT_MIN), DT_MAX)
    return dt


def dt_limit_constexprs(dt_limit) -> dict:
    """DT_CLAMP / DT_MIN / DT_MAX for dt_transform: no clamp at all where the limit changes nothing."""
    clamp = dt_limit_active(dt_limit)
    lo, hi = dt_limit if clamp else (0.0, NO_DT_MAX)
    return {"DT_CLAMP": clamp, "DT_MIN": float(lo), "DT_MAX": float(min(hi, NO_DT_MAX))}


@triton.jit
def chunk_program(pid, nheads, nchunks):
    """(batch, chunk, head) of a program whose grid axis 1 spans batch * nchunks * nheads, heads fastest: how the
    chunked SSD kernels decode the grid ssmrt.plugins.launch gives them (a test checks the two agree)."""
    h = pid % nheads
    c = (pid // nheads) % nchunks
    b = pid // (nheads * nchunks)
    return b, c, h

