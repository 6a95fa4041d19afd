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
