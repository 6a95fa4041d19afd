"""The SSM ops: plain-torch references (`*_ref`, fp32 math, cast back) and their contracts (spec.py)."""

from .causal_conv1d import causal_conv1d_ref
from .dispatch import add_rmsnorm, causal_conv1d, gated_rmsnorm, selective_scan, ssd_scan
from .rmsnorm import add_rmsnorm_ref, gated_rmsnorm_ref, rmsnorm_ref
from .selective_scan import selective_scan_ref
from .spec import OPS, TOLERANCES, tolerance
from .ssd_scan import ssd_minimal_discrete, ssd_scan_recurrent_ref, ssd_scan_ref

__all__ = [
    "OPS",
    "TOLERANCES",
    "add_rmsnorm",
    "add_rmsnorm_ref",
    "causal_conv1d",
    "causal_conv1d_ref",
    "gated_rmsnorm",
    "gated_rmsnorm_ref",
    "rmsnorm_ref",
    "selective_scan",
    "selective_scan_ref",
    "ssd_minimal_discrete",
    "ssd_scan",
    "ssd_scan_recurrent_ref",
    "ssd_scan_ref",
    "tolerance",
]
