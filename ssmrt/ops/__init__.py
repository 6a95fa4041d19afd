"""The SSM ops: plain-torch references (`*_ref`, fp32 math, cast back) and their contracts (spec.py).

The names are imported on first use (PEP 562): the contracts in `ssmrt.ops.spec` come without torch. What the
models call (and a backend overrides) is in `ssmrt.ops.dispatch`.
"""

from __future__ import annotations

from .._lazy import lazy_attributes

_WHERE = {
    "OPS": ".spec",
    "CHAIN_OPS": ".spec",
    "ssd_chunk_state_ref": ".chains",
    "ssd_state_passing_ref": ".chains",
    "ssd_chunk_scan_ref": ".chains",
    "selective_chunk_state_ref": ".chains",
    "selective_state_passing_ref": ".chains",
    "selective_chunk_scan_ref": ".chains",
    "TOLERANCES": ".spec",
    "tolerance": ".spec",
    "add_rmsnorm_ref": ".rmsnorm",
    "gated_rmsnorm_ref": ".rmsnorm",
    "rmsnorm_ref": ".rmsnorm",
    "causal_conv1d_ref": ".causal_conv1d",
    "selective_scan_ref": ".selective_scan",
    "ssd_minimal_discrete": ".ssd_scan",
    "ssd_scan_recurrent_ref": ".ssd_scan",
    "ssd_scan_ref": ".ssd_scan",
}
__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_attributes(__name__, _WHERE)
