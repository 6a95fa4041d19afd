"""Triton kernels against their references: in Triton's interpreter on the CPU (CI), on the GPU when there
is one; and compiled ahead of time for Ampere, Jetson Orin and Hopper with no GPU present."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from test_ops import conv_inputs, selective_inputs, small_dt_inputs, ssd_inputs, state_ulps, to64

from ssmrt.closeness import assert_close
from ssmrt.ops import causal_conv1d_ref, selective_scan_ref, ssd_scan_ref

# Every test here but the PTX-text one runs or compiles Triton kernels: those are marked triton and skip without
# it (conftest.py), the PTX-text one runs regardless.
if importlib.util.find_spec("triton") is not None:
    from ssmrt.kernels.causal_conv1d import causal_conv1d
    from ssmrt.kernels.selective_chunked import selective_scan_chunked
    from ssmrt.kernels.selective_scan import selective_scan, selective_scan_recurrent
    from ssmrt.kernels.ssd_chunked import ssd_scan_chunked
    from ssmrt.kernels.ssd_scan import ssd_scan, ssd_scan_recurrent
else:  # the names stay for the parametrize tables of the tests, which then skip
    causal_conv1d = selective_scan_chunked = selective_scan = selective_scan_recurrent = None
    ssd_scan_chunked = ssd_scan = ssd_scan_recurrent = None

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter computes in numpy, which has no bfloat16: bf16 is checked on a GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# The interpreter is slow: CI sweeps short sequences, a GPU the long ones too.
SEQLENS = [1, 2, 9] + ([33, 257] if DEVICE == "cuda" else [])


def on_device(kw):
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def poisoned(like):
    return torch.full_like(like, float("nan"))


def pieces(kw, keys, sl):
    return {**kw, **{k: kw[k][:, sl] for k in keys if kw.get(k) is not None}}


# ------------------------------------------------------------------------------------------ SSDScan

SSD_SHAPES = [
    # batch, nheads, headdim, dstate, ngroups
    (1, 2, 4, 16, 1),
    (2, 4, 5, 7, 2),
    (3, 6, 33, 16, 3),
    (2, 8, 64, 128, 1),
    (1, 4, 128, 64, 4),
]


# The one-kernel recurrence (decode, short inputs) and the chunked chain (long prompts) both stand for the op;
# the chain runs with 16-token chunks here so that short inputs span several chunks, the last one partial.
SSD_IMPLS = {"recurrent": ssd_scan_recurrent, "chunked": ssd_scan_chunked}
SSD_SEQLENS = {"recurrent": SEQLENS, "chunked": [1, 16, 37] + ([300, 1000] if DEVICE == "cuda" else [])}
SSD_CASES = [(impl, seqlen) for impl in SSD_IMPLS for seqlen in SSD_SEQLENS[impl]]


@pytest.mark.triton
@pytest.mark.parametrize("batch,nheads,headdim,dstate,ngroups", SSD_SHAPES)
@pytest.mark.parametrize("impl,seqlen", SSD_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ssd_scan_matches_reference(batch, nheads, headdim, dstate, ngroups, impl, seqlen, dtype):
    kw = on_device(ssd_inputs(batch, seqlen, nheads, headdim, dstate, ngroups, dtype=dtype, chunk_size=16))
    y_out, s_out = poisoned(kw["x"]), poisoned(kw["ssm_state"])
    y, s = SSD_IMPLS[impl](**kw, out=y_out, state_out=s_out)
    assert y.data_ptr() == y_out.data_ptr() and s.data_ptr() == s_out.data_ptr()
    y_ref, s_ref = ssd_scan_ref(**to64(kw))  # the truth: fp32 chunked sums of 256 differ from each other by ~1e-4
    assert_close(y, y_ref.to(y.dtype), dtype=dtype, name=f"ssd {impl} y {dtype}")
    assert_close(s, s_ref.to(s.dtype), dtype=dtype, name=f"ssd {impl} state {dtype}")


@pytest.mark.triton
@pytest.mark.parametrize("impl", SSD_IMPLS)
@pytest.mark.parametrize("D_per_channel", [False, True])
@pytest.mark.parametrize("dt_limit", [(0.0, math.inf), (0.05, 0.3)])
@pytest.mark.parametrize("optional", [True, False])
def test_ssd_scan_options(impl, D_per_channel, dt_limit, optional):
    kw = on_device(ssd_inputs(2, 21, 4, 8, 16, 2, D_per_channel=D_per_channel, dt_limit=dt_limit, chunk_size=16))
    if not optional:
        kw.update(D=None, dt_bias=None, dt_softplus=False)
        kw["dt"] = kw["dt"].abs()
    y, s = SSD_IMPLS[impl](**kw)
    y_ref, s_ref = ssd_scan_ref(**kw)
    assert_close(y, y_ref, name=f"ssd {impl} y")
    assert_close(s, s_ref, name=f"ssd {impl} state")


@pytest.mark.triton
@pytest.mark.parametrize("chunk_size", [1, 16, 32, 64, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ssd_chunked_any_chunk_size(chunk_size, dtype):
    """The result does not depend on the chunk (rounded to a power of two in [16, 256]), up to the model's
    own 256, at the model's sizes (headdim 64, dstate 128)."""
    kw = on_device(ssd_inputs(1, 300, 2, 64, 128, 1, dtype=dtype, chunk_size=chunk_size))
    y, s = ssd_scan_chunked(**kw)
    y_ref, s_ref = ssd_scan_ref(**to64(kw))
    assert_close(y, y_ref.to(dtype), dtype=dtype, name=f"ssd chunked y, chunk {chunk_size}, {dtype}")
    assert_close(s, s_ref.float(), dtype=dtype, name=f"ssd chunked state, chunk {chunk_size}, {dtype}")


def test_fp32_dots_take_full_precision():
    """Every tl.dot of the kernels either takes the specialisation's DOT_PRECISION, "ieee" (no TF32) for fp32
    activations, or sits under `if SPLIT:`, which only fp16 / bf16 activations compile (their operands are
    exact in any precision). The numbers are test_ssd_chunked_any_chunk_size's: fp32 up to chunk 256 against
    the float64 reference at the op tolerance."""
    import ast
    from pathlib import Path

    import ssmrt.kernels

    dots = []
    for path in sorted(Path(ssmrt.kernels.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())

        def walk(node, under_split, path=path):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "tl.dot":
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                dots.append((path.name, node.lineno, kw.get("input_precision"), under_split))
            split = isinstance(node, ast.If) and ast.unparse(node.test) == "SPLIT"
            for child in ast.iter_child_nodes(node):
                walk(child, under_split or (split and child in node.body))

        walk(tree, False)
    assert dots, "no tl.dot found: the check would pass vacuously"
    assert [d for d in dots if d[2] != "DOT_PRECISION" and not d[3]] == [], dots
    if importlib.util.find_spec("triton") is not None:
        from ssmrt.kernels import ssd_chunked

        for name, meta in ssd_chunked.constexprs(64, 128, torch.float32, 256).items():
            assert meta.get("DOT_PRECISION", "ieee") == "ieee" and not meta.get("SPLIT", False), (name, meta)


# Longer sequences and batch 8 through the dispatching wrappers (the chained kernels past CHUNKED_MIN_SEQLEN,
# at the model's chunk), against the float64 reference: minutes each in the interpreter (the selective chain's
# scans the most: one channel block, fp32 only there; fp16 runs at the short lengths above).
LONG_CASES = [(8, 300), (1, 2049)]


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.parametrize("batch,seqlen", LONG_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ssd_scan_long_and_batched(batch, seqlen, dtype):
    kw = on_device(ssd_inputs(batch, seqlen, 2, 16, 16, 1, dtype=dtype, chunk_size=256, seed=seqlen))
    state = kw["ssm_state"].clone()
    y, s = ssd_scan(**{**kw, "ssm_state": state}, state_out=state)
    y_ref, s_ref = ssd_scan_ref(**to64(kw))
    assert_close(y, y_ref.to(dtype), dtype=dtype, name=f"ssd y, batch {batch}, seqlen {seqlen}, {dtype}")
    assert_close(s, s_ref.float(), dtype=dtype, name=f"ssd state, batch {batch}, seqlen {seqlen}, {dtype}")


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.parametrize("batch,seqlen", LONG_CASES)
@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.float16] if DEVICE == "cuda" else []))
def test_selective_scan_long_and_batched(batch, seqlen, dtype):
    kw = on_device(selective_inputs(batch, seqlen, 16, 16, ngroups=1, dtype=dtype, seed=seqlen))
    state = kw["ssm_state"].clone()
    y, s = selective_scan(**{**kw, "ssm_state": state}, state_out=state)
    y_ref, s_ref = selective_scan_ref(**to64(kw))
    assert_close(y, y_ref.to(dtype), dtype=dtype, name=f"selective y, batch {batch}, seqlen {seqlen}, {dtype}")
    assert_close(s, s_ref.to(s.dtype), dtype=dtype, name=f"selective state, batch {batch}, seqlen {seqlen}, {dtype}")


@pytest.mark.triton
@pytest.mark.parametrize("state_dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("impl", SSD_IMPLS)
def test_ssd_low_precision_state(impl, state_dtype):
    kw = on_device(ssd_inputs(2, 20, 4, 8, 16, 2, chunk_size=16))
    kw["ssm_state"] = kw["ssm_state"].to(state_dtype)
    y, s = SSD_IMPLS[impl](**kw)
    y_ref, s_ref = ssd_scan_ref(**kw)
    assert s.dtype == state_dtype
    assert_close(y, y_ref, dtype=state_dtype, name=f"ssd {impl} y, {state_dtype} state")
    assert_close(s, s_ref, dtype=state_dtype, name=f"ssd {impl} state, {state_dtype} state")


@pytest.mark.triton
def test_ssd_scan_picks_by_seqlen(monkeypatch):
    from ssmrt.kernels import ssd_chunked
    from ssmrt.kernels import ssd_scan as ssd_mod

    picked = []
    monkeypatch.setattr(ssd_chunked, "ssd_scan_chunked", lambda *a: picked.append("chunked") or a)
    monkeypatch.setattr(ssd_mod, "ssd_scan_recurrent", lambda *a: picked.append("recurrent") or a)
    for seqlen in (1, ssd_mod.CHUNKED_MIN_SEQLEN - 1, ssd_mod.CHUNKED_MIN_SEQLEN):
        kw = ssd_inputs(1, seqlen, 2, 4, 16, 1)
        ssd_scan(**kw)
    assert picked == ["recurrent", "recurrent", "chunked"]


@pytest.mark.triton
@pytest.mark.parametrize("impl", SSD_IMPLS)
def test_ssd_prefill_then_steps_in_place_equal_one_pass(impl):
    kw = on_device(ssd_inputs(2, 40, 4, 8, 16, 2, chunk_size=16))
    y_ref, s_ref = ssd_scan_ref(**kw)
    state = kw["ssm_state"].clone()
    keys = ("x", "dt", "B", "C")
    prefill = SSD_IMPLS[impl]
    y, _ = prefill(**pieces({**kw, "ssm_state": state}, keys, slice(0, 33)), state_out=state)
    ys = [y]
    for t in range(33, 40):
        y, s = ssd_scan_recurrent(**pieces({**kw, "ssm_state": state}, keys, slice(t, t + 1)), state_out=state)
        assert s.data_ptr() == state.data_ptr()
        ys.append(y)
    assert_close(torch.cat(ys, 1), y_ref, name=f"ssd {impl} prefill + steps y")
    assert_close(state, s_ref, name=f"ssd {impl} prefill + steps state")
    y0, s0 = prefill(**{**kw, "ssm_state": None})
    y0_ref, s0_ref = ssd_scan_ref(**{**kw, "ssm_state": None})
    assert_close(y0, y0_ref, name=f"ssd {impl} y from zero")
    assert_close(s0, s0_ref, name=f"ssd {impl} state from zero")


# ------------------------------------------------------------------------------------- CausalConv1d


@pytest.mark.triton
@pytest.mark.parametrize("batch,dim,width", [(1, 8, 4), (2, 13, 4), (3, 200, 3), (2, 5, 2), (1, 64, 5)])
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,activation", [(True, "silu"), (False, "none")])
def test_conv1d_matches_reference(batch, dim, width, seqlen, dtype, bias, activation):
    kw = on_device(conv_inputs(batch, seqlen, dim, width, bias=bias, dtype=dtype))
    kw["activation"] = activation
    y_out, s_out = poisoned(kw["x"]), poisoned(kw["conv_state"])
    y, s = causal_conv1d(**kw, out=y_out, state_out=s_out)
    y_ref, s_ref = causal_conv1d_ref(**kw)
    assert_close(y, y_ref, dtype=dtype, name=f"conv y {dtype}")
    assert_close(s, s_ref, dtype=dtype, name=f"conv state {dtype}")


@pytest.mark.triton
@pytest.mark.parametrize("split", [1, 2, 5])
def test_conv1d_pieces_in_place_equal_one_pass(split):
    """Pieces shorter than width-1 read back into the carried state; in place included."""
    kw = on_device(conv_inputs(2, 9, 24, 4))
    y_ref, s_ref = causal_conv1d_ref(**kw)
    state, ys = kw["conv_state"].clone(), []
    for start in range(0, 9, split):
        y, s = causal_conv1d(**{**kw, "x": kw["x"][:, start : start + split], "conv_state": state},
                             state_out=state)
        assert s.data_ptr() == state.data_ptr()
        ys.append(y)
    assert_close(torch.cat(ys, 1), y_ref, name="conv pieces y")
    assert_close(state, s_ref, name="conv pieces state")


# The conv kernel's grid is over time tiles too: tile 0 alone reads the old state and writes the new one. The
# sequences straddle the tile (as the JIT path picks it for a prompt: BLOCK_T) and the state's width-1, and go
# to a thousand tokens, in batches of 1 and 8; the state updated in place or into its own tensor.
CONV_TILE = 32
CONV_SEQLENS = [1, 2, 3, 4, CONV_TILE - 1, CONV_TILE, CONV_TILE + 1, 300, 1029]


@pytest.mark.triton
def test_conv1d_tile_is_the_kernels():
    from ssmrt.kernels import causal_conv1d as conv_mod

    assert conv_mod.BLOCK_T == CONV_TILE
    for width in (2, 3, 4, 5, 9, 40):
        for seqlen in (None, 1, 2, 3, 1000):
            meta = conv_mod.constexprs(70, width, seqlen=seqlen)
            # BLOCK_T >= width-1 is what makes tile 0 the old state's only reader
            assert meta["BLOCK_T"] >= width - 1 and meta["BLOCK_K"] >= width, (width, seqlen, meta)
            assert meta["BLOCK_T"] <= max(CONV_TILE, meta["BLOCK_K"]), (width, seqlen, meta)


# batch 8 at the long sequences: a minute in the interpreter
CONV_CASES = [pytest.param(seqlen, batch, marks=[pytest.mark.slow] if batch > 1 and seqlen >= 300 else [])
              for seqlen in CONV_SEQLENS for batch in (1, 8)]


@pytest.mark.triton
@pytest.mark.parametrize("seqlen,batch", CONV_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias,activation,inplace", [(True, "silu", True), (False, "none", False),
                                                     (True, "none", True), (False, "silu", False)])
def test_conv1d_time_tiles(seqlen, batch, dtype, bias, activation, inplace):
    """Two channel blocks (the second partial), width 4; in place, the state written over the one read."""
    if seqlen > 300 and (bias, activation) not in ((True, "silu"), (False, "none")):
        pytest.skip("the long sequences run the two main variants only (the interpreter is slow)")
    kw = on_device(conv_inputs(batch, seqlen, 70, 4, bias=bias, dtype=dtype, seed=seqlen))
    kw["activation"] = activation
    y_ref, s_ref = causal_conv1d_ref(**kw)
    state = kw["conv_state"].clone() if inplace else kw["conv_state"]
    s_out = state if inplace else poisoned(state)
    y, s = causal_conv1d(**{**kw, "conv_state": state}, out=poisoned(kw["x"]), state_out=s_out)
    assert s.data_ptr() == s_out.data_ptr()
    assert_close(y, y_ref, dtype=dtype, name=f"conv y, seqlen {seqlen}, batch {batch}, {dtype}")
    assert_close(s, s_ref, dtype=dtype, name=f"conv state, seqlen {seqlen}, batch {batch}, {dtype}")


@pytest.mark.triton
@pytest.mark.parametrize("seqlen", [0, 1, 2, 3, 4, 33, 100])
@pytest.mark.parametrize("width", [2, 3, 4, 5])
def test_conv1d_plugin_tile_any_seqlen(seqlen, width, monkeypatch):
    """An AOT plugin compiles one tile for every seqlen (constexprs without seqlen): the decode step and short
    pieces then run in a tile mostly past the end, in place."""
    from ssmrt.kernels import causal_conv1d as conv_mod

    fixed = conv_mod.constexprs
    monkeypatch.setattr(conv_mod, "constexprs", lambda *a, seqlen=None, **k: fixed(*a, **k))
    kw = on_device(conv_inputs(2, seqlen, 24, width, seed=width))
    y_ref, s_ref = causal_conv1d_ref(**kw)
    state = kw["conv_state"].clone()
    y, s = causal_conv1d(**{**kw, "conv_state": state}, state_out=state)
    assert s.data_ptr() == state.data_ptr() and y.shape == y_ref.shape
    assert_close(y, y_ref, name=f"conv y, plugin tile, seqlen {seqlen}, width {width}")
    assert_close(state, s_ref, name=f"conv state, plugin tile, seqlen {seqlen}, width {width}")


# ------------------------------------------------------------------------------------ SelectiveScan


# The one-kernel recurrence (decode, short inputs) and the chain split over time (long prompts); the chain runs
# with 16-token chunks here so that short inputs span several chunks, the last one partial. Its scan tiles are
# slow in the interpreter, so CI gives it fewer and smaller shapes.
SELECTIVE_IMPLS = {"recurrent": selective_scan_recurrent,
                   "chunked": lambda *a, **kw: selective_scan_chunked(*a, **kw, chunk=16)}
SELECTIVE_SHAPES = [(1, 4, 16, 1), (2, 12, 16, 2), (3, 100, 7, 1), (2, 64, 16, 4)]
SELECTIVE_CASES = [("recurrent", shape, seqlen) for shape in SELECTIVE_SHAPES for seqlen in SEQLENS] + [
    ("chunked", shape, seqlen) for shape in (SELECTIVE_SHAPES if DEVICE == "cuda" else SELECTIVE_SHAPES[:2])
    for seqlen in [1, 37] + ([300, 1000] if DEVICE == "cuda" else [])]


@pytest.mark.triton
@pytest.mark.parametrize("impl,shape,seqlen", SELECTIVE_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_selective_scan_matches_reference(impl, shape, seqlen, dtype):
    batch, dim, dstate, ngroups = shape
    kw = on_device(selective_inputs(batch, seqlen, dim, dstate, ngroups=ngroups, dtype=dtype))
    y_out, s_out = poisoned(kw["u"]), poisoned(kw["ssm_state"])
    y, s = SELECTIVE_IMPLS[impl](**kw, out=y_out, state_out=s_out)
    assert y.data_ptr() == y_out.data_ptr() and s.data_ptr() == s_out.data_ptr()
    y_ref, s_ref = selective_scan_ref(**to64(kw))
    assert_close(y, y_ref.to(dtype), dtype=dtype, name=f"selective {impl} y {dtype}")
    assert_close(s, s_ref.to(s.dtype), dtype=dtype, name=f"selective {impl} state {dtype}")


@pytest.mark.triton
@pytest.mark.parametrize("impl", SELECTIVE_IMPLS)
def test_selective_scan_without_optional_inputs(impl):
    kw = on_device(selective_inputs(2, 21, 12, 16, optional=False))
    kw["delta"] = kw["delta"].abs()
    kw["delta_softplus"] = False
    y, s = SELECTIVE_IMPLS[impl](**kw)
    y_ref, s_ref = selective_scan_ref(**kw)
    assert_close(y, y_ref, name=f"selective {impl} y")
    assert_close(s, s_ref, name=f"selective {impl} state")


@pytest.mark.triton
@pytest.mark.parametrize("op,impl", [("ssd", i) for i in SSD_IMPLS] + [("selective", i) for i in SELECTIVE_IMPLS])
def test_scans_hold_float32_precision_at_small_dt(op, impl):
    """At Mamba's initial dt the kernels' float32 state stays as close to float64 as the float32 reference's (a
    softplus computed as log(1 + exp(x)) put it 15-22x further over 40 steps)."""
    kw = small_dt_inputs(op, 40)
    run, ref = (SSD_IMPLS[impl], ssd_scan_ref) if op == "ssd" else (SELECTIVE_IMPLS[impl], selective_scan_ref)
    _, s = run(**on_device(kw))
    kernel, reference = state_ulps(s, kw, ref)
    assert kernel <= 2 * reference + 1, (f"{op} {impl}: the state {kernel:.1f} ulps of its RMS from float64, the "
                                         f"float32 reference's {reference:.1f}")


@pytest.mark.triton
@pytest.mark.parametrize("dstate", [7, 64] + ([256] if DEVICE == "cuda" else []))
def test_selective_chunked_larger_states(dstate):
    """The chain's tiles shrink for larger states (fewer channels and tokens a tile)."""
    kw = on_device(selective_inputs(1, 20, 6, dstate, ngroups=2))
    y, s = SELECTIVE_IMPLS["chunked"](**kw)
    y_ref, s_ref = selective_scan_ref(**to64(kw))
    assert_close(y, y_ref.float(), name=f"selective chunked y, dstate {dstate}")
    assert_close(s, s_ref.float(), name=f"selective chunked state, dstate {dstate}")


@pytest.mark.triton
def test_selective_scan_picks_by_seqlen(monkeypatch):
    from ssmrt.kernels import selective_chunked
    from ssmrt.kernels import selective_scan as sel_mod

    picked = []
    monkeypatch.setattr(selective_chunked, "selective_scan_chunked", lambda *a: picked.append("chunked") or a)
    monkeypatch.setattr(sel_mod, "selective_scan_recurrent", lambda *a: picked.append("recurrent") or a)
    for seqlen in (1, sel_mod.CHUNKED_MIN_SEQLEN - 1, sel_mod.CHUNKED_MIN_SEQLEN):
        selective_scan(**selective_inputs(1, seqlen, 4, 16))
    assert picked == ["recurrent", "recurrent", "chunked"]


@pytest.mark.triton
@pytest.mark.parametrize("impl", SELECTIVE_IMPLS)
def test_selective_prefill_then_steps_in_place_equal_one_pass(impl):
    kw = on_device(selective_inputs(2, 40, 12, 8, ngroups=2))
    y_ref, s_ref = selective_scan_ref(**kw)
    state = kw["ssm_state"].clone()
    keys = ("u", "delta", "B", "C", "z")
    y, _ = SELECTIVE_IMPLS[impl](**pieces({**kw, "ssm_state": state}, keys, slice(0, 35)), state_out=state)
    ys = [y]
    for t in range(35, 40):
        y, _ = selective_scan_recurrent(**pieces({**kw, "ssm_state": state}, keys, slice(t, t + 1)), state_out=state)
        ys.append(y)
    assert_close(torch.cat(ys, 1), y_ref, name=f"selective {impl} pieces y")
    assert_close(state, s_ref, name=f"selective {impl} pieces state")


# ------------------------------------------------------------------------------------ model dispatch


@pytest.mark.triton
@pytest.mark.parametrize("arch,prefill", [("mamba1", 4), ("mamba1", 40), ("mamba2", 4), ("mamba2", 40)])
def test_model_through_kernels(arch, prefill, monkeypatch):
    """A model's prefill-then-steps with every op on the kernels == the reference's one pass (a 40-token
    prefill takes the chunked chains)."""
    from test_models import random_lm

    from ssmrt.kernels import causal_conv1d as conv_mod
    from ssmrt.kernels import rmsnorm as norm_mod
    from ssmrt.kernels import selective_scan as sel_mod
    from ssmrt.kernels import ssd_scan as ssd_mod
    from ssmrt.kernels.dispatch import use_kernels

    calls = {}

    def counting(fn, name):
        def counted(*args, **kw):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kw)
        return counted

    for mod, name in ((conv_mod, "causal_conv1d"), (sel_mod, "selective_scan"), (ssd_mod, "ssd_scan"),
                      (norm_mod, "add_rmsnorm"), (norm_mod, "gated_rmsnorm")):
        monkeypatch.setattr(mod, name, counting(getattr(mod, name), name))

    model = random_lm(arch=arch, d_model=32, n_layer=2, d_state=8, headdim=8).to(DEVICE)
    total = prefill + 5
    ids = torch.randint(0, 97, (2, total), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        full, full_state = model(ids)
        with use_kernels(force=True):
            logits, state = model(ids[:, :prefill])
            steps = [logits]
            for t in range(prefill, total):
                out, state = model(ids[:, t : t + 1], state)
                steps.append(out)
    scan = "selective_scan" if arch == "mamba1" else "ssd_scan"
    want = {"causal_conv1d": 6 * 2, scan: 6 * 2, "add_rmsnorm": 6 * 3}  # prefill + 5 steps, 2 layers + norm_f
    if arch == "mamba2":
        want["gated_rmsnorm"] = 6 * 2
    assert calls == want, calls
    assert_close(torch.cat(steps, 1), full, name=f"{arch} logits on the kernels")
    for (c, s), (c_ref, s_ref) in zip(state, full_state, strict=True):
        assert_close(c, c_ref, name="conv_state")
        assert_close(s, s_ref, name="ssm_state")


# ------------------------------------------------------------------------------- ahead-of-time compile


@pytest.fixture(scope="module")
def aot_results():
    """Every kernel compiled for sm_80 / sm_87 / sm_90 by `python -m ssmrt.kernels.aot`, in a process without
    the interpreter (Triton's library cannot be compiled once it is decorated for interpretation)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "ssmrt.kernels.aot"], capture_output=True, text=True, env=env,
                         timeout=600)
    print(res.stdout, res.stderr[-3000:])
    assert res.returncode == 0
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


@pytest.mark.triton
def test_aot_compile_and_ptx_parameters(aot_results):
    """Each kernel compiles for Ampere, Jetson Orin and Hopper with no GPU; the PTX a plugin embeds takes exactly
    the launch's arguments, nothing hidden, and assembles: for a plugin kernel, TensorRT's order (input pointers,
    int32 scalars, output pointers). (Triton >= 3.3 appends scratch pointers to every kernel, two in 3.9;
    contract_ptx removes them, since no kernel uses scratch.)"""
    from ssmrt.plugins.launch import KERNELS

    assert {(r["kernel"], r["sm"]) for r in aot_results} == {
        (k, sm) for k in ("ssd_scan", "causal_conv1d", "selective_scan", "ssd_chunk_state", "ssd_state_passing",
                          "ssd_chunk_scan", "selective_chunk_state", "selective_state_passing",
                          "selective_chunk_scan", "add_rmsnorm", "gated_rmsnorm") for sm in (80, 87, 90)}
    for r in aot_results:
        assert r["params"] == r["signature"] and r["params"].count("u64") == r["pointers"], r
        if r["kernel"] in KERNELS:
            k = KERNELS[r["kernel"]]
            assert r["params"] == ["u64"] * len(k.inputs) + ["u32"] * len(k.scalars) + ["u64"] * len(k.outputs), r
        hidden = r["triton_params"][len(r["params"]):]
        assert r["triton_params"][: len(r["params"])] == r["params"] and set(hidden) <= {"u64"}, r
        assert r["ptx_target"] and r["cubin_bytes"] > 0, r


@pytest.mark.triton
def test_aot_no_register_spills(aot_results):
    """No kernel spills registers to local memory on any target (a spill is a silent slowdown)."""
    for r in aot_results:
        print(r["kernel"], r["sm"], r["registers"], "registers", r["spill_bytes"], "spill bytes")
    assert [(r["kernel"], r["sm"]) for r in aot_results if r["spill_bytes"]] == []


def test_contract_ptx_refuses_scratch_and_read_hidden_parameters():
    from types import SimpleNamespace

    from ssmrt.kernels.aot import contract_ptx, ptx_params

    entry = (".visible .entry k(\n\t.param .u64 .ptr .global .align 1 k_param_0,\n\t.param .u32 k_param_1,\n"
             "\t.param .u64 .ptr .global .align 1 k_param_2\n)\n{\n\tld.param.u64 %rd1, [k_param_0];\n")

    def compiled(body="", scratch=0):
        md = SimpleNamespace(name="k", global_scratch_size=scratch, profile_scratch_size=0)
        return SimpleNamespace(metadata=md, asm={"ptx": entry + body + "}\n"})

    assert ptx_params(contract_ptx(compiled(), 2)) == ["u64", "u32"]
    with pytest.raises(ValueError, match="k_param_2 is read"):
        contract_ptx(compiled("\tld.param.u64 %rd2, [k_param_2];\n"), 2)
    with pytest.raises(ValueError, match="scratch memory"):
        contract_ptx(compiled(scratch=256), 2)


# ------------------------------------------------------------------------------------------------ norms


@pytest.mark.triton
@pytest.mark.parametrize("rows,dim", [(1, 768), (3, 100), (5, 33)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("first,residual_in_fp32", [(True, True), (False, True), (False, False)])
def test_add_rmsnorm_matches_reference(rows, dim, dtype, first, residual_in_fp32):
    from ssmrt.kernels.rmsnorm import add_rmsnorm
    from ssmrt.ops import add_rmsnorm_ref

    g = torch.Generator().manual_seed(rows * dim)
    x = torch.randn(rows, 1, dim, generator=g).to(dtype).to(DEVICE)
    residual = None if first else torch.randn(rows, 1, dim, generator=g).to(
        torch.float32 if residual_in_fp32 else dtype).to(DEVICE)
    weight = (1 + 0.3 * torch.randn(dim, generator=g)).to(dtype).to(DEVICE)
    out, res_out = poisoned(x.to(dtype)), poisoned(x.float() if residual_in_fp32 else x)
    y, r = add_rmsnorm(x, residual, weight, 1e-5, residual_in_fp32, out=out, residual_out=res_out)
    y_ref, r_ref = add_rmsnorm_ref(x, residual, weight, 1e-5, residual_in_fp32)
    assert y.dtype == y_ref.dtype and r.dtype == r_ref.dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype=dtype, name=f"add_rmsnorm out {dtype}")
    assert_close(r, r_ref, dtype=dtype, name=f"add_rmsnorm residual {dtype}")


@pytest.mark.triton
@pytest.mark.parametrize("dim,group_size", [(64, 64), (96, 32), (40, 20)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_before_gate,has_z", [(False, True), (True, True), (False, False)])
def test_gated_rmsnorm_matches_reference(dim, group_size, dtype, norm_before_gate, has_z):
    """z is a slice of a wider tensor, as in_proj's output gives it (a row stride, no copy)."""
    from ssmrt.kernels.rmsnorm import gated_rmsnorm
    from ssmrt.ops import gated_rmsnorm_ref

    g = torch.Generator().manual_seed(dim)
    x = torch.randn(2, 3, dim, generator=g).to(dtype).to(DEVICE)
    wide = torch.randn(2, 3, 3 * dim, generator=g).to(dtype).to(DEVICE)
    z = wide[..., dim : 2 * dim] if has_z else None
    weight = (1 + 0.3 * torch.randn(dim, generator=g)).to(dtype).to(DEVICE)
    y = gated_rmsnorm(x, weight, z, 1e-5, group_size, norm_before_gate, out=poisoned(x))
    y_ref = gated_rmsnorm_ref(x, weight, z, 1e-5, group_size, norm_before_gate)
    assert_close(y, y_ref, dtype=dtype, name=f"gated_rmsnorm {dtype}")


@pytest.mark.triton
def test_aot_compile_bf16_and_fp32_activations():
    """Every kernel also compiles for bf16 and fp32 activations (the interpreter cannot run bf16; fp32 takes
    the exact `ieee` products in the SSD chain), for Jetson Orin and Hopper, with the contract's parameters."""
    code = (
        "import json\n"
        "from ssmrt.kernels.aot import _table, compile_kernel, contract_ptx, ptx_params\n"
        "for act in ('bf16', 'fp32'):\n"
        "    for name, (_, sig, _) in _table(act).items():\n"
        "        for cc in (87, 90):\n"
        "            k = compile_kernel(name, cc, act)\n"
        "            print(json.dumps({'kernel': name, 'act': act, 'sm': cc, 'n': len(sig),\n"
        "                              'params': ptx_params(contract_ptx(k, len(sig)))}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    print(res.stderr[-3000:])
    assert res.returncode == 0
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2 * 2 * 11, len(rows)
    assert all(len(r["params"]) == r["n"] for r in rows)
