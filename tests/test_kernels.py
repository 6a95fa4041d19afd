"""Triton kernels against their references: in Triton's interpreter on the CPU (CI), on the GPU when there
is one; and compiled ahead of time for Ampere, Jetson Orin and Hopper with no GPU present."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from test_ops import conv_inputs, selective_inputs, ssd_inputs

from ssmrt.ops import causal_conv1d_ref, selective_scan_ref, ssd_scan_ref
from ssmrt.testing import assert_close

triton = pytest.importorskip("triton")

from ssmrt.kernels.causal_conv1d_step import causal_conv1d_step  # noqa: E402
from ssmrt.kernels.selective_step import selective_step  # noqa: E402
from ssmrt.kernels.ssd_step import ssd_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter computes in numpy, which has no bfloat16: bf16 is checked on a GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def on_device(kw):
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def poisoned(like):
    return torch.full_like(like, float("nan"))


SHAPES = [
    # batch, nheads, headdim, dstate, ngroups
    (1, 2, 4, 16, 1),
    (2, 4, 5, 7, 2),
    (3, 6, 33, 16, 3),
    (2, 8, 64, 128, 1),
    (1, 4, 128, 64, 4),
]


@pytest.mark.parametrize("batch,nheads,headdim,dstate,ngroups", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ssd_step_matches_reference(batch, nheads, headdim, dstate, ngroups, dtype):
    kw = on_device(ssd_inputs(batch, 1, nheads, headdim, dstate, ngroups, dtype=dtype))
    y_out, s_out = poisoned(kw["x"]), poisoned(kw["ssm_state"])
    y, s = ssd_step(**kw, out=y_out, state_out=s_out)
    assert y.data_ptr() == y_out.data_ptr() and s.data_ptr() == s_out.data_ptr()
    y_ref, s_ref = ssd_scan_ref(**kw)
    assert_close(y, y_ref, dtype=dtype, name=f"ssd_step y {dtype}")
    assert_close(s, s_ref, dtype=dtype, name=f"ssd_step state {dtype}")


@pytest.mark.parametrize("D_per_channel", [False, True])
@pytest.mark.parametrize("dt_limit", [(0.0, math.inf), (0.05, 0.3)])
@pytest.mark.parametrize("optional", [True, False])
def test_ssd_step_options(D_per_channel, dt_limit, optional):
    kw = on_device(ssd_inputs(2, 1, 4, 8, 16, 2, D_per_channel=D_per_channel, dt_limit=dt_limit))
    if not optional:
        kw.update(D=None, dt_bias=None, dt_softplus=False)
        kw["dt"] = kw["dt"].abs()
    y, s = ssd_step(**kw)
    y_ref, s_ref = ssd_scan_ref(**kw)
    assert_close(y, y_ref, name="ssd_step y")
    assert_close(s, s_ref, name="ssd_step state")


def test_ssd_step_in_place_and_from_zero():
    kw = on_device(ssd_inputs(2, 1, 4, 8, 16, 2))
    y_ref, s_ref = ssd_scan_ref(**kw)
    state = kw["ssm_state"].clone()
    y, s = ssd_step(**{**kw, "ssm_state": state}, state_out=state)
    assert s.data_ptr() == state.data_ptr()
    assert_close(s, s_ref, name="in-place state")
    y0, s0 = ssd_step(**{**kw, "ssm_state": None})
    y0_ref, s0_ref = ssd_scan_ref(**{**kw, "ssm_state": None})
    assert_close(s0, s0_ref, name="state from zero")


def test_steps_equal_one_pass():
    """Token after token with the kernel == the reference over the whole sequence."""
    kw = on_device(ssd_inputs(2, 9, 4, 8, 16, 2, chunk_size=4))
    y_ref, s_ref = ssd_scan_ref(**kw)
    state, ys = kw["ssm_state"], []
    for t in range(9):
        step = {**kw, **{k: kw[k][:, t : t + 1] for k in ("x", "dt", "B", "C")}, "ssm_state": state}
        y, state = ssd_step(**step)
        ys.append(y)
    assert_close(torch.cat(ys, 1), y_ref, name="steps y")
    assert_close(state, s_ref, name="steps state")


def test_rejects_a_sequence():
    kw = on_device(ssd_inputs(1, 3, 2, 4, 8))
    with pytest.raises(ValueError, match="seqlen must be 1"):
        ssd_step(**kw)


# ------------------------------------------------------------------------------------- CausalConv1d


@pytest.mark.parametrize("batch,dim,width", [(1, 8, 4), (2, 13, 4), (3, 200, 3), (2, 5, 2), (1, 64, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,activation", [(True, "silu"), (False, "none")])
def test_conv1d_step_matches_reference(batch, dim, width, dtype, bias, activation):
    kw = on_device(conv_inputs(batch, 1, dim, width, bias=bias, dtype=dtype))
    kw["activation"] = activation
    y_out, s_out = poisoned(kw["x"]), poisoned(kw["conv_state"])
    y, s = causal_conv1d_step(**kw, out=y_out, state_out=s_out)
    y_ref, s_ref = causal_conv1d_ref(**kw)
    assert_close(y, y_ref, dtype=dtype, name=f"conv step y {dtype}")
    assert_close(s, s_ref, dtype=dtype, name=f"conv step state {dtype}")


def test_conv1d_steps_in_place_equal_one_pass():
    kw = on_device(conv_inputs(2, 9, 24, 4))
    y_ref, s_ref = causal_conv1d_ref(**kw)
    state, ys = kw["conv_state"].clone(), []
    for t in range(9):
        y, s = causal_conv1d_step(**{**kw, "x": kw["x"][:, t : t + 1], "conv_state": state}, state_out=state)
        assert s.data_ptr() == state.data_ptr()
        ys.append(y)
    assert_close(torch.cat(ys, 1), y_ref, name="conv steps y")
    assert_close(state, s_ref, name="conv steps state")


# ------------------------------------------------------------------------------------ SelectiveScan


@pytest.mark.parametrize("batch,dim,dstate,ngroups", [(1, 4, 16, 1), (2, 12, 16, 2), (3, 100, 7, 1), (2, 64, 16, 4)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_selective_step_matches_reference(batch, dim, dstate, ngroups, dtype):
    kw = on_device(selective_inputs(batch, 1, dim, dstate, ngroups=ngroups, dtype=dtype))
    y_out, s_out = poisoned(kw["u"]), poisoned(kw["ssm_state"])
    y, s = selective_step(**kw, out=y_out, state_out=s_out)
    y_ref, s_ref = selective_scan_ref(**kw)
    assert_close(y, y_ref, dtype=dtype, name=f"selective step y {dtype}")
    assert_close(s, s_ref, dtype=dtype, name=f"selective step state {dtype}")


def test_selective_step_without_optional_inputs():
    kw = on_device(selective_inputs(2, 1, 12, 16, optional=False))
    kw["delta"] = kw["delta"].abs()
    kw["delta_softplus"] = False
    y, s = selective_step(**kw)
    y_ref, s_ref = selective_scan_ref(**kw)
    assert_close(y, y_ref, name="selective step y")
    assert_close(s, s_ref, name="selective step state")


def test_selective_steps_in_place_equal_one_pass():
    kw = on_device(selective_inputs(2, 9, 12, 8, ngroups=2))
    y_ref, s_ref = selective_scan_ref(**kw)
    state, ys = kw["ssm_state"].clone(), []
    for t in range(9):
        step = {**kw, **{k: kw[k][:, t : t + 1] for k in ("u", "delta", "B", "C", "z")}, "ssm_state": state}
        y, _ = selective_step(**step, state_out=state)
        ys.append(y)
    assert_close(torch.cat(ys, 1), y_ref, name="selective steps y")
    assert_close(state, s_ref, name="selective steps state")


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


def test_aot_compile_and_ptx_parameters(aot_results):
    """Each kernel compiles for Ampere, Jetson Orin and Hopper with no GPU, and its PTX entry takes exactly the
    contract's tensor pointers and int32 scalars, plus the two scratch pointers Triton (>= 3.3) appends to
    every kernel: an AOT plugin must pass those as null."""
    assert {(r["kernel"], r["sm"]) for r in aot_results} == {
        (k, sm) for k in ("ssd_step", "causal_conv1d_step", "selective_step") for sm in (80, 87, 90)}
    for r in aot_results:
        assert r["params"] == ["u64"] * r["pointers"] + ["u32"] * r["int32"] + ["u64"] * 2, r
        assert r["ptx_target"] and r["cubin_bytes"] > 0, r


# ------------------------------------------------------------------------------------ model dispatch


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_model_decode_through_kernels(arch, monkeypatch):
    """A model's prefill-then-steps with the decode steps on the kernels == the reference's one pass."""
    from test_models import random_lm

    from ssmrt.kernels import causal_conv1d_step as conv_mod
    from ssmrt.kernels import selective_step as sel_mod
    from ssmrt.kernels import ssd_step as ssd_mod
    from ssmrt.kernels.dispatch import use_kernels

    calls = {}

    def counting(fn, name):
        def counted(*args, **kw):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kw)
        return counted

    for mod, name in ((conv_mod, "causal_conv1d_step"), (sel_mod, "selective_step"), (ssd_mod, "ssd_step")):
        monkeypatch.setattr(mod, name, counting(getattr(mod, name), name))

    model = random_lm(arch=arch, d_model=32, n_layer=2, d_state=8, headdim=8).to(DEVICE)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        full, full_state = model(ids)
        with use_kernels(force=True):
            logits, state = model(ids[:, :4])
            steps = [logits]
            for t in range(4, 9):
                out, state = model(ids[:, t : t + 1], state)
                steps.append(out)
    scan = "selective_step" if arch == "mamba1" else "ssd_step"
    assert calls == {"causal_conv1d_step": 5 * 2, scan: 5 * 2}, calls  # 5 steps x 2 layers, prefill on the refs
    assert_close(torch.cat(steps, 1), full, name=f"{arch} logits, decode on kernels")
    for (c, s), (c_ref, s_ref) in zip(state, full_state, strict=True):
        assert_close(c, c_ref, name="conv_state")
        assert_close(s, s_ref, name="ssm_state")
