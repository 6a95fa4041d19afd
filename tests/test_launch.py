"""ssmrt.plugins.launch: each kernel's launch as a TensorRT AOT plugin makes it (input pointers, int32 scalars,
output pointers; scalars and grid from the input shapes), checked against the kernels themselves."""

from __future__ import annotations

import importlib
import inspect

import pytest

from ssmrt.plugins.launch import KERNELS, cdiv

NAMES = sorted(KERNELS)


@pytest.mark.triton
@pytest.mark.parametrize("name", NAMES)
def test_the_table_is_the_kernels_runtime_parameters(name):
    """Every kernel's non-constexpr parameters, in order, are exactly the launch's: the wrappers and the AOT
    plugins pass what the kernel takes."""
    k = KERNELS[name]
    module = importlib.import_module(f"ssmrt.kernels.{k.module}")
    raw = getattr(module, k.raw)
    runtime = [p.name for p in inspect.signature(raw).parameters.values()
               if "constexpr" not in str(p.annotation)]
    assert runtime == k.parameters
    assert getattr(module, k.jit).fn is raw  # the jit object the wrappers launch wraps that function
    assert set(k.scalars) <= set(k.sizes)
    assert {t for t, _ in k.sizes.values()} <= {p.name for p in k.inputs}  # sizes come from inputs alone


def test_sizes_and_grids_on_concrete_shapes():
    """Hand-computed for a Mamba-2 layer (batch 2, 300 tokens, 24 heads of 64, dstate 128, 1 group) and a
    Mamba-1 layer (batch 3, 1536 channels, dstate 16)."""
    ssd = {"x": (2, 300, 24, 64), "B": (2, 300, 1, 128)}
    k = KERNELS["ssd_scan"]
    s = k.resolve(ssd)
    assert [s[n] for n in k.scalars] == [300, 24, 64, 128, 1]
    assert k.grid(s, {"BLOCK_P": 16}) == (4, 48)
    k = KERNELS["ssd_chunk_state"]
    assert k.grid(k.resolve(ssd), {"CHUNK": 256, "BLOCK_P": 64, "BLOCK_N": 64}) == (2, 2 * 2 * 24)
    k = KERNELS["ssd_chunk_scan"]
    assert k.grid(k.resolve(ssd), {"CHUNK": 256, "BLOCK_M": 32, "BLOCK_P": 64}) == (8, 2 * 2 * 24)
    k = KERNELS["ssd_state_passing"]
    s = k.resolve({"chunk_states": (2, 2, 24, 64, 128), "state": (2, 24, 64, 128)})
    assert [s[n] for n in k.scalars] == [2, 24, 64, 128]
    assert k.grid(s, {"BLOCK_S": 1024}) == (8, 48)
    sel = {"u": (3, 40, 1536), "B": (3, 40, 1, 16)}
    k = KERNELS["selective_chunk_scan"]
    assert k.grid(k.resolve(sel), {"CHUNK": 16, "BLOCK_D": 16}) == (96, 3, 3)
    k = KERNELS["causal_conv1d"]
    s = k.resolve({"x": (3, 40, 1536), "w": (1536, 4)})
    assert [s[n] for n in k.scalars] == [40, 1536, 4]
    assert k.grid(s, {"BLOCK_C": 128, "BLOCK_T": 32}) == (12, 2, 3)


class Sym:
    """A symbolic size: what a TensorRT plugin has instead of ints (its shape expressions support +, -, *, //)."""

    def __init__(self, text):
        self.text = text

    def _op(self, other, sym):
        return Sym(f"({self.text} {sym} {other.text if isinstance(other, Sym) else other})")

    def __add__(self, o):
        return self._op(o, "+")

    def __sub__(self, o):
        return self._op(o, "-")

    def __mul__(self, o):
        return self._op(o, "*")

    def __floordiv__(self, o):
        return self._op(o, "//")


@pytest.mark.parametrize("name", NAMES)
def test_grids_and_scalars_are_expressions_of_the_input_shapes(name):
    """Written so that they evaluate on symbolic shapes too (TensorRT's SymInt32 expressions), and equal the
    concrete values when the symbols are replaced by numbers."""
    k = KERNELS[name]
    meta = {"CHUNK": 64, "BLOCK_C": 128, "BLOCK_T": 32, "BLOCK_D": 16, "BLOCK_P": 16, "BLOCK_N": 64, "BLOCK_M": 32,
            "BLOCK_S": 1024}
    symbols = {p.name: tuple(Sym(f"{p.name}_{i}") for i in range(5)) for p in k.inputs}
    numbers = {p.name: (2, 70, 8, 16, 32) for p in k.inputs}
    values = {f"{p}_{i}": v for p, dims in numbers.items() for i, v in enumerate(dims)}
    grid = k.grid(k.resolve(symbols), meta)
    assert 1 <= len(grid) <= 3
    evaluated = [eval(g.text, {"__builtins__": {}}, values) if isinstance(g, Sym) else g for g in grid]  # noqa: S307
    assert evaluated == list(k.grid(k.resolve(numbers), meta))


def test_cdiv():
    assert [cdiv(n, 16) for n in (1, 16, 17, 32)] == [1, 1, 2, 2]


def test_what_a_compile_may_assume_divisible_by_16():
    """Pointers (when aligned) and the model's dimensions that are multiples of 16; never the batch, sequence or
    chunk count, which a plugin sees change from call to call."""
    k = KERNELS["ssd_chunk_scan"]
    sizes = k.resolve({"x": (2, 64, 24, 64), "B": (2, 64, 2, 128)})
    ptrs = tuple(f"{p.name}_ptr" for p in k.pointers)
    assert k.divisible(sizes) == (*ptrs, "headdim", "dstate")  # seqlen 64 is per call; 24 heads, 2 groups are not
    assert k.divisible(sizes, aligned=False) == ("headdim", "dstate")
    assert k.divisible(sizes, static=lambda n: n != "dstate") == (*ptrs, "headdim")
    k = KERNELS["ssd_state_passing"]
    sizes = k.resolve({"chunk_states": (32, 16, 16, 16, 16), "state": (32, 16, 16, 16)})
    assert k.divisible(sizes, aligned=False) == ("nheads", "headdim", "dstate")  # not nchunks
