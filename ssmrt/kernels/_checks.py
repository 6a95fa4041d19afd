"""Argument checks shared by the kernel wrappers."""

from __future__ import annotations


def check_outputs(**tensors):
    """The kernels write through raw pointers with contiguous strides: a given out / state_out must be
    contiguous (a .contiguous() copy would silently receive the result instead)."""
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernel writes it with contiguous strides)")
