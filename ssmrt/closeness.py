"""How close two arrays are, as the parity report and the tests measure it: the largest absolute and relative
errors and the tolerances that would have passed. numpy only (torch tensors are converted), so the ONNX
Runtime path needs no torch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ops.spec import tolerance


def _float64(x) -> np.ndarray:
    """A torch tensor (any dtype or device, bfloat16 too) or an array-like, as a float64 numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


@dataclass
class Diff:
    max_abs: float
    max_rel: float
    # the smallest atol that passes with the given rtol (and vice versa): what "would have passed"
    atol_needed: float
    rtol_needed: float

    def __str__(self):
        return (f"max abs {self.max_abs:.3e}, max rel {self.max_rel:.3e} "
                f"(would pass with atol {self.atol_needed:.3e} at the rtol given, or rtol {self.rtol_needed:.3e})")


def diff(actual, expected, atol: float = 0.0, rtol: float = 0.0) -> Diff:
    """actual, expected: torch tensors or numpy arrays of the same shape."""
    a, e = _float64(actual), _float64(expected)
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if a.size == 0:
        return Diff(0.0, 0.0, 0.0, 0.0)
    with np.errstate(invalid="ignore"):
        err = np.where(a == e, 0.0, np.abs(a - e))  # equal infinities count as equal
    if not np.isfinite(err).all():
        inf = float("inf")
        return Diff(inf, inf, inf, inf)
    mag = np.where(np.isfinite(e), np.abs(e), 0.0)
    rel = err / np.maximum(mag, 1e-12)
    atol_needed = float(np.maximum(err - rtol * mag, 0.0).max())
    rtol_needed = float((np.maximum(err - atol, 0.0) / np.maximum(mag, 1e-12)).max())
    return Diff(float(err.max()), float(rel.max()), atol_needed, rtol_needed)


def assert_close(
    actual,
    expected,
    dtype=None,
    atol: float | None = None,
    rtol: float | None = None,
    name: str = "",
) -> Diff:
    """Print the max error of actual vs expected, then assert it is within (atol, rtol).

    The tolerances default to the table in ops/spec.py for `dtype` (default: expected's dtype).
    """
    t_atol, t_rtol = tolerance(dtype if dtype is not None else expected.dtype)
    atol = t_atol if atol is None else atol
    rtol = t_rtol if rtol is None else rtol
    d = diff(actual, expected, atol, rtol)
    print(f"{name or 'tensor'}: {d} [atol {atol:g}, rtol {rtol:g}]")
    if d.atol_needed > atol:
        raise AssertionError(f"{name or 'tensor'} differs: {d}; allowed atol {atol:g} + rtol {rtol:g}")
    return d
