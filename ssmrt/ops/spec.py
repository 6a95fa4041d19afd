"""One declarative place for the ssmrt::* ops: inputs, outputs, attributes, and the tolerances by dtype.

Every other place that names an op's inputs, outputs or attributes (the references, the kernels and their AOT
signatures, the exporter's nodes, the fallback bodies, the native ONNX Runtime ops) derives from these tables
or is checked against them by tests/test_contract.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DOMAIN = "ssmrt"
OPSET_VERSION = 1

# Semantics every implementation shares (references, fallback bodies, Triton kernels, native ops):
# softplus(x) = x <= SOFTPLUS_THRESHOLD ? log1p(exp(x)) : x, as every Mamba kernel computes it.
SOFTPLUS_THRESHOLD = 20.0
# SSDScan's dt limit (dt_min, dt_max) when the model sets none; the clamp is then skipped, not applied.
NO_DT_LIMIT = (0.0, math.inf)


def dt_limit_active(dt_limit) -> bool:
    """Whether a (dt_min, dt_max) limit changes any dt (dt is >= 0 after softplus): False for None or
    NO_DT_LIMIT, so the clamp can be left out."""
    if dt_limit is None:
        return False
    lo, hi = dt_limit
    return lo > 0.0 or hi < math.inf


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[str, ...]
    optional: bool = False
    fp32: bool = False  # kept float32 whatever the activation dtype (A, D, biases, SSM state)


@dataclass(frozen=True)
class OpSpec:
    """One ssmrt::* op. `name` is its ONNX op type; `function` its Python name (ssmrt.ops.dispatch.<function>,
    the reference <function>_ref, the kernel wrapper ssmrt.kernels.<function>.<function>), which takes
    `params` in that order: the inputs and attributes, where an attribute may map to another parameter
    (`attribute_params`: SSDScan's dt_min and dt_max are one dt_limit pair in Python)."""

    name: str
    function: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attributes: dict[str, type] = field(default_factory=dict)
    params: tuple[str, ...] = ()
    attribute_params: dict[str, str] = field(default_factory=dict)

    @property
    def optional(self) -> tuple[int, ...]:
        """Indices of the optional inputs."""
        return tuple(i for i, t in enumerate(self.inputs) if t.optional)


CAUSAL_CONV1D = OpSpec(
    "CausalConv1d",
    "causal_conv1d",
    inputs=(
        TensorSpec("x", ("batch", "seqlen", "dim")),
        TensorSpec("weight", ("dim", "width")),
        TensorSpec("bias", ("dim",), optional=True),
        TensorSpec("conv_state", ("batch", "dim", "width-1")),
    ),
    outputs=(
        TensorSpec("y", ("batch", "seqlen", "dim")),
        TensorSpec("present_conv_state", ("batch", "dim", "width-1")),
    ),
    attributes={"activation": str},
    params=("x", "weight", "bias", "conv_state", "activation"),
)

SELECTIVE_SCAN = OpSpec(
    "SelectiveScan",
    "selective_scan",
    inputs=(
        TensorSpec("u", ("batch", "seqlen", "dim")),
        TensorSpec("delta", ("batch", "seqlen", "dim")),
        TensorSpec("A", ("dim", "dstate"), fp32=True),
        TensorSpec("B", ("batch", "seqlen", "ngroups", "dstate")),
        TensorSpec("C", ("batch", "seqlen", "ngroups", "dstate")),
        TensorSpec("D", ("dim",), optional=True, fp32=True),
        TensorSpec("z", ("batch", "seqlen", "dim"), optional=True),
        TensorSpec("delta_bias", ("dim",), optional=True, fp32=True),
        TensorSpec("ssm_state", ("batch", "dim", "dstate"), fp32=True),
    ),
    outputs=(
        TensorSpec("y", ("batch", "seqlen", "dim")),
        TensorSpec("present_ssm_state", ("batch", "dim", "dstate"), fp32=True),
    ),
    attributes={"delta_softplus": int},
    params=("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "ssm_state"),
)

SSD_SCAN = OpSpec(
    "SSDScan",
    "ssd_scan",
    inputs=(
        TensorSpec("x", ("batch", "seqlen", "nheads", "headdim")),
        TensorSpec("dt", ("batch", "seqlen", "nheads")),
        TensorSpec("A", ("nheads",), fp32=True),
        TensorSpec("B", ("batch", "seqlen", "ngroups", "dstate")),
        TensorSpec("C", ("batch", "seqlen", "ngroups", "dstate")),
        TensorSpec("D", ("nheads",), optional=True, fp32=True),  # or (nheads, headdim)
        TensorSpec("dt_bias", ("nheads",), optional=True, fp32=True),
        TensorSpec("ssm_state", ("batch", "nheads", "headdim", "dstate"), fp32=True),
    ),
    outputs=(
        TensorSpec("y", ("batch", "seqlen", "nheads", "headdim")),
        TensorSpec("present_ssm_state", ("batch", "nheads", "headdim", "dstate"), fp32=True),
    ),
    attributes={"chunk_size": int, "dt_softplus": int, "dt_min": float, "dt_max": float},
    params=("x", "dt", "A", "B", "C", "D", "dt_bias", "dt_softplus", "dt_limit", "ssm_state", "chunk_size"),
    attribute_params={"dt_min": "dt_limit", "dt_max": "dt_limit"},
)

OPS = {op.name: op for op in (CAUSAL_CONV1D, SELECTIVE_SCAN, SSD_SCAN)}
# The ops a model of each SSMConfig.arch exports to.
OPS_BY_ARCH = {"mamba1": (CAUSAL_CONV1D.name, SELECTIVE_SCAN.name), "mamba2": (CAUSAL_CONV1D.name, SSD_SCAN.name)}


# ------------------------------------------------------------------------------------------- the chains
#
# A long prompt's scan on a GPU is three kernels: each chunk's own final state (time-parallel), the short
# serial pass over chunks that gives the state entering each, and each chunk's output from its entering state
# (time-parallel). A TensorRT AOT plugin runs one kernel, so for TensorRT a prefill graph carries each scan as
# three chain nodes, the intermediates as tensors between them (ssmrt export --target tensorrt). Chunk c covers
# tokens [c Q, c Q + Q), Q = the chain nodes' chunk_size (a power of two); the last chunk may be partial, and
# positions past the end have dt = 0 (their decay is 1 and they add nothing). Composed, each chain equals
# its one-node op; tests/test_chains.py holds them to that and each node to its reference.

SSD_CHAIN_CHUNKS = (16, 256)  # the SSD chain's chunk: a power of two in this range (tensor-core tiles)
SELECTIVE_CHAIN_CHUNK = 256  # the Mamba-1 chain's chunk (its result does not depend on it)


def ssd_chain_chunk(chunk_size: int) -> int:
    """The SSD chain's chunk for a model's chunk_size: rounded up to a power of two within SSD_CHAIN_CHUNKS (the
    result does not depend on the chunk; the kernels' tiles need it)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lo, hi = SSD_CHAIN_CHUNKS
    return min(max(1 << (chunk_size - 1).bit_length(), lo), hi)


def _like(op: OpSpec, *names: str) -> tuple[TensorSpec, ...]:
    by_name = {t.name: t for t in op.inputs}
    return tuple(by_name[n] for n in names)


_SSD_SIDE = ("batch", "nheads", "nchunks", "chunk_size")
_SSD_STATES = ("batch", "nchunks", "nheads", "headdim", "dstate")
_SEL_STATES = ("batch", "nchunks", "dim", "dstate")

SSD_CHUNK_STATE = OpSpec(
    "SSDChunkState",
    "ssd_chunk_state",
    inputs=_like(SSD_SCAN, "x", "dt", "A", "B", "dt_bias"),
    outputs=(
        TensorSpec("dt_out", _SSD_SIDE, fp32=True),  # dt after bias, softplus and limit; 0 past the end
        TensorSpec("dA_cumsum", _SSD_SIDE, fp32=True),  # cumsum of dt A within each chunk
        TensorSpec("chunk_states", _SSD_STATES, fp32=True),  # each chunk's final state from a zero state
    ),
    attributes={"chunk_size": int, "dt_softplus": int, "dt_min": float, "dt_max": float},
    params=("x", "dt", "A", "B", "dt_bias", "dt_softplus", "dt_limit", "chunk_size"),
    attribute_params={"dt_min": "dt_limit", "dt_max": "dt_limit"},
)

SSD_STATE_PASSING = OpSpec(
    "SSDStatePassing",
    "ssd_state_passing",
    inputs=(
        TensorSpec("chunk_states", _SSD_STATES, fp32=True),
        TensorSpec("dA_cumsum", _SSD_SIDE, fp32=True),
        *_like(SSD_SCAN, "ssm_state"),
    ),
    outputs=(
        TensorSpec("entering_states", _SSD_STATES, fp32=True),  # the state entering each chunk
        SSD_SCAN.outputs[1],  # present_ssm_state: the state leaving the last chunk
    ),
    attributes={"chunk_size": int},
    params=("chunk_states", "dA_cumsum", "ssm_state", "chunk_size"),
)

SSD_CHUNK_SCAN = OpSpec(
    "SSDChunkScan",
    "ssd_chunk_scan",
    inputs=(
        *_like(SSD_SCAN, "x", "B", "C", "D"),
        TensorSpec("dt_out", _SSD_SIDE, fp32=True),
        TensorSpec("dA_cumsum", _SSD_SIDE, fp32=True),
        TensorSpec("entering_states", _SSD_STATES, fp32=True),
    ),
    outputs=(SSD_SCAN.outputs[0],),
    attributes={"chunk_size": int},
    params=("x", "B", "C", "D", "dt_out", "dA_cumsum", "entering_states", "chunk_size"),
)

SELECTIVE_CHUNK_STATE = OpSpec(
    "SelectiveChunkState",
    "selective_chunk_state",
    inputs=_like(SELECTIVE_SCAN, "u", "delta", "A", "B", "delta_bias"),
    outputs=(
        TensorSpec("chunk_states", _SEL_STATES, fp32=True),  # each chunk's final state from a zero state
        TensorSpec("delta_sum", ("batch", "nchunks", "dim"), fp32=True),  # the chunk's decay is exp(A delta_sum)
    ),
    attributes={"chunk_size": int, "delta_softplus": int},
    params=("u", "delta", "A", "B", "delta_bias", "delta_softplus", "chunk_size"),
)

SELECTIVE_STATE_PASSING = OpSpec(
    "SelectiveStatePassing",
    "selective_state_passing",
    inputs=(
        TensorSpec("chunk_states", _SEL_STATES, fp32=True),
        TensorSpec("delta_sum", ("batch", "nchunks", "dim"), fp32=True),
        *_like(SELECTIVE_SCAN, "A", "ssm_state"),
    ),
    outputs=(
        TensorSpec("entering_states", _SEL_STATES, fp32=True),
        SELECTIVE_SCAN.outputs[1],
    ),
    attributes={"chunk_size": int},
    params=("chunk_states", "delta_sum", "A", "ssm_state", "chunk_size"),
)

SELECTIVE_CHUNK_SCAN = OpSpec(
    "SelectiveChunkScan",
    "selective_chunk_scan",
    inputs=(
        *_like(SELECTIVE_SCAN, "u", "delta", "A", "B", "C", "D", "z", "delta_bias"),
        TensorSpec("entering_states", _SEL_STATES, fp32=True),
    ),
    outputs=(SELECTIVE_SCAN.outputs[0],),
    attributes={"chunk_size": int, "delta_softplus": int},
    params=("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "entering_states", "delta_softplus", "chunk_size"),
)

CHAIN_OPS = {op.name: op for op in (SSD_CHUNK_STATE, SSD_STATE_PASSING, SSD_CHUNK_SCAN, SELECTIVE_CHUNK_STATE,
                                    SELECTIVE_STATE_PASSING, SELECTIVE_CHUNK_SCAN)}
# Each one-node scan op and its chain, in launch order.
CHAINS = {
    SSD_SCAN.name: (SSD_CHUNK_STATE.name, SSD_STATE_PASSING.name, SSD_CHUNK_SCAN.name),
    SELECTIVE_SCAN.name: (SELECTIVE_CHUNK_STATE.name, SELECTIVE_STATE_PASSING.name, SELECTIVE_CHUNK_SCAN.name),
}
# Every op an artifact may hold: the one-node ops and the chain ops.
ALL_OPS = OPS | CHAIN_OPS

# (atol, rtol) by the dtype of the activations, for two scopes:
# - "op": one op / kernel against its reference on the same inputs;
# - "model": a whole model's logits and states (a backend or artifact against the fp32 reference), where
#   low precision compounds over layers and time steps.
# float64 is the references' own witness.
TOLERANCES: dict[str, dict[str, tuple[float, float]]] = {
    "float64": {"op": (1e-10, 1e-10), "model": (1e-8, 1e-8)},
    "float32": {"op": (1e-4, 1e-4), "model": (1e-4, 1e-4)},
    "float16": {"op": (3e-3, 5e-3), "model": (5e-2, 5e-2)},
    "bfloat16": {"op": (3e-2, 5e-2), "model": (2.5e-1, 1e-1)},
}


def tolerance(dtype, scope: str = "op") -> tuple[float, float]:
    """(atol, rtol) for a torch dtype or a dtype name, scope "op" or "model"."""
    name = str(dtype).removeprefix("torch.")
    if name not in TOLERANCES:
        raise KeyError(f"no tolerance for dtype {name!r}; known: {sorted(TOLERANCES)}")
    return TOLERANCES[name][scope]
