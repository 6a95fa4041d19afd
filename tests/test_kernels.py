"""Triton kernels against their references: in Triton's interpreter on the CPU (CI), on the GPU when there
is one; and compiled ahead of time for Ampere, Jetson Orin and Hopper with no GPU present."""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
from test_ops import ssd_inputs

from ssmrt.ops import ssd_scan_ref
from ssmrt.testing import assert_close

triton = pytest.importorskip("triton")

from ssmrt.kernels import ssd_step as ssd_step_mod  # noqa: E402
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


# ------------------------------------------------------------------------------- ahead-of-time compile

TARGETS = {"sm_80 (A100)": 80, "sm_87 (Jetson Orin)": 87, "sm_90 (H100)": 90}
SIGNATURE = {
    "x_ptr": "*fp16", "dt_ptr": "*fp16", "A_ptr": "*fp32", "B_ptr": "*fp16", "C_ptr": "*fp16", "D_ptr": "*fp32",
    "dt_bias_ptr": "*fp32", "state_ptr": "*fp32", "y_ptr": "*fp16", "state_out_ptr": "*fp32",
    "nheads": "i32", "headdim": "i32", "dstate": "i32", "ngroups": "i32",
}


@pytest.mark.parametrize("target", list(TARGETS))
def test_aot_compile_and_ptx_parameters(target, monkeypatch):
    """The kernel compiles for the target with no GPU, and its PTX entry takes exactly the 10 tensor
    pointers and 4 int32 scalars of the contract, plus the two scratch pointers Triton (>= 3.3) appends to
    every kernel: an AOT plugin must pass those as null."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # code generation, not interpretation, for this test
    meta = ssd_step_mod.constexprs(64, 128, dt_limit=(0.0, math.inf))
    sig = {**SIGNATURE, **{k: "constexpr" for k in meta}}
    src = triton.compiler.ASTSource(fn=JITFunction(ssd_step_mod._ssd_step_kernel), signature=sig, constexprs=meta)
    kernel = triton.compile(src, target=GPUTarget("cuda", TARGETS[target], 32))
    ptx = kernel.asm["ptx"]
    entry = ptx[ptx.index(".visible .entry") : ptx.index(")", ptx.index(".visible .entry"))]
    params = re.findall(r"\.param \.(u64|u32|f32|b32|u8|s32)", entry)
    print(target, f"{len(kernel.asm['cubin'])} bytes of cubin; params: {params}")
    assert params == ["u64"] * 10 + ["u32"] * 4 + ["u64"] * 2
    assert f".target sm_{TARGETS[target]}" in ptx
