"""Comparison helpers shared by the tests and the parity report: print the error, then assert."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops.spec import tolerance


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
    a = torch.as_tensor(actual).detach().double().cpu()
    e = torch.as_tensor(expected).detach().double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if a.numel() == 0:
        return Diff(0.0, 0.0, 0.0, 0.0)
    err = torch.where(a == e, torch.zeros_like(a), (a - e).abs())  # equal infinities count as equal
    if not bool(torch.isfinite(err).all()):
        inf = float("inf")
        return Diff(inf, inf, inf, inf)
    mag = torch.where(torch.isfinite(e), e.abs(), torch.zeros_like(e))
    rel = err / mag.clamp_min(1e-12)
    atol_needed = float((err - rtol * mag).clamp_min(0).max())
    rtol_needed = float(((err - atol).clamp_min(0) / mag.clamp_min(1e-12)).max())
    return Diff(float(err.max()), float(rel.max()), atol_needed, rtol_needed)


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
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
