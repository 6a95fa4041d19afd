"""The ONNX Runtime runner's fused nodes against their references: ssmrt.cpu::SSDMixer, a Mamba-2 mixer's middle
(the ops' references chained as Mamba2Mixer chains them), and ssmrt.cpu::AddRMSNorm, a block's residual add and
norm (add_rmsnorm_ref); and the fusions that put them in a graph: what they fuse, what they leave, and that a
fused artifact computes what the graph it replaces did."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from test_models import random_ids, random_lm
from test_ort_ops import elem_type, native_library

from ssmrt import ort_ops
from ssmrt.closeness import assert_close
from ssmrt.ops import causal_conv1d_ref, selective_scan_ref, ssd_scan_ref
from ssmrt.ops.rmsnorm import add_rmsnorm_ref, gated_rmsnorm_ref
from ssmrt.ops.spec import tolerance

INPUTS = ("zxbcdt", "conv_weight", "conv_bias", "conv_state", "A", "D", "dt_bias", "ssm_state", "norm_weight")
FP32_INPUTS = {"A", "D", "dt_bias", "ssm_state", "norm_weight"}


def mixer_inputs(batch, seqlen, nheads, headdim, dstate, ngroups=1, width=4, D_per_channel=False,
                 dt_limit=(0.0, math.inf), optional=True, dtype=torch.float32, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    d_ssm = nheads * headdim
    conv_dim = d_ssm + 2 * ngroups * dstate
    zxbcdt = r(batch, seqlen, d_ssm + conv_dim + nheads)
    zxbcdt[..., -nheads:] = 0.5 * zxbcdt[..., -nheads:] - 1.0  # dt before its bias and softplus
    return dict(
        zxbcdt=zxbcdt.to(dtype),
        conv_weight=(0.5 * r(conv_dim, width)).to(dtype),
        conv_bias=r(conv_dim).to(dtype) if optional else None,
        conv_state=r(batch, conv_dim, width - 1).to(dtype),
        A=-torch.exp(r(nheads).clamp(-2, 2)).float(),
        D=((r(nheads, headdim) if D_per_channel else r(nheads)).float()) if optional else None,
        dt_bias=(0.1 * r(nheads)).float() if optional else None,
        ssm_state=r(batch, nheads, headdim, dstate).float(),
        norm_weight=(1.0 + 0.3 * r(d_ssm)).float(),
        dt_softplus=True,
        dt_limit=dt_limit,
        eps=1e-5,
    )


def ssd_mixer_ref(zxbcdt, conv_weight, conv_bias, conv_state, A, D, dt_bias, ssm_state, norm_weight, dt_softplus,
                  dt_limit, eps):
    """What SSDMixer computes: Mamba2Mixer's forward between in_proj and out_proj, on the ops' references. The
    activations keep zxbcdt's dtype between the ops (float16: rounded where a float16 graph stores them).

    zxbcdt: (batch, seqlen, d_ssm + conv_dim + nheads)
    ssm_state: (batch, nheads, headdim, dstate); every other size follows from these two and conv_weight
    """
    batch, seqlen, _ = zxbcdt.shape
    nheads, headdim, dstate = ssm_state.shape[1:]
    d_ssm, conv_dim = nheads * headdim, conv_weight.shape[0]
    gn = (conv_dim - d_ssm) // 2
    z, xBC, dt = torch.split(zxbcdt, [d_ssm, conv_dim, nheads], dim=-1)
    xBC, conv_out = causal_conv1d_ref(xBC, conv_weight, conv_bias, conv_state, "silu")
    x, B, C = torch.split(xBC, [d_ssm, gn, gn], dim=-1)
    groups = (batch, seqlen, gn // dstate, dstate)
    y, ssm_out = ssd_scan_ref(x.reshape(batch, seqlen, nheads, headdim), dt, A, B.reshape(groups), C.reshape(groups),
                              D, dt_bias, dt_softplus, dt_limit, ssm_state)
    y = gated_rmsnorm_ref(y.reshape(batch, seqlen, d_ssm), norm_weight, z, eps)
    return y, conv_out, ssm_out


def mixer_session(inputs: dict, attrs: dict, op: str = "SSDMixer") -> ort.InferenceSession:
    """One `op` node over `inputs` (name -> tensor, None for an absent optional one, in the op's order); outputs
    y and the conv state in the first input's type, the SSM state float32."""
    present = {k: v for k, v in inputs.items() if v is not None}
    act = elem_type(next(iter(inputs.values())))
    vis = [helper.make_tensor_value_info(k, elem_type(v), None) for k, v in present.items()]
    outs = [helper.make_tensor_value_info("y", act, None), helper.make_tensor_value_info("conv_out", act, None),
            helper.make_tensor_value_info("ssm_out", onnx.TensorProto.FLOAT, None)]
    node = helper.make_node(op, [k if k in present else "" for k in inputs], ["y", "conv_out", "ssm_out"],
                            domain=ort_ops.FUSION_DOMAIN, **attrs)
    model = helper.make_model(helper.make_graph([node], "g", vis, outs),
                              opset_imports=[helper.make_opsetid("", 21),
                                             helper.make_opsetid(ort_ops.FUSION_DOMAIN, 1)])
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(native_library()))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_mixer(kw: dict):
    lo, hi = kw["dt_limit"]
    attrs = {"dt_softplus": int(kw["dt_softplus"]), "dt_min": lo, "dt_max": hi, "eps": kw["eps"]}
    ins = {k: kw[k] for k in INPUTS}
    sess = mixer_session(ins, attrs)
    return [torch.from_numpy(r) for r in sess.run(None, {k: v.numpy() for k, v in ins.items() if v is not None})]


# Decode steps and prompts; one and several groups for B and C; a dstate the eight-lane loop does not divide; the
# 130M Mamba-2's shape in a decode step and at a prompt length.
SHAPES = [(1, 1, 4, 8, 16, 1), (2, 1, 6, 5, 7, 2), (2, 9, 4, 8, 16, 2), (1, 33, 3, 4, 5, 1), (1, 1, 24, 64, 128, 1),
          (1, 64, 24, 64, 128, 1)]


@pytest.mark.parametrize("batch,seqlen,nheads,headdim,dstate,ngroups", SHAPES)
@pytest.mark.parametrize("D_per_channel,dt_limit", [(False, (0.0, math.inf)), (True, (0.05, 0.3))])
def test_ssd_mixer(batch, seqlen, nheads, headdim, dstate, ngroups, D_per_channel, dt_limit):
    kw = mixer_inputs(batch, seqlen, nheads, headdim, dstate, ngroups, D_per_channel=D_per_channel,
                      dt_limit=dt_limit, seed=seqlen + nheads)
    got = run_mixer(kw)
    want = ssd_mixer_ref(**{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    for name, g, w in zip(("y", "conv_state", "ssm_state"), got, want, strict=True):
        assert g.dtype == torch.float32
        assert_close(g, w.float(), name=f"SSDMixer {name}")


def test_ssd_mixer_without_optional_inputs():
    kw = mixer_inputs(2, 5, 4, 8, 16, optional=False, width=3)
    got = run_mixer(kw)
    want = ssd_mixer_ref(**{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    for name, g, w in zip(("y", "conv_state", "ssm_state"), got, want, strict=True):
        assert_close(g, w.float(), name=f"SSDMixer {name}")


@pytest.mark.parametrize("batch,seqlen,nheads,headdim,dstate,ngroups", SHAPES)
def test_ssd_mixer_float16(batch, seqlen, nheads, headdim, dstate, ngroups):
    """float16 activations: the reference on the same inputs rounds the conv's output and the scan's y to float16
    as the float16 graph does, and so does the op: y agrees with it bit for bit in nearly every value (with either
    rounding point left out, about a quarter of them differ); the conv state, a copy of inputs, exactly; the float32
    SSM state, computed in float32 from the same float16 values, at the float32 tolerance."""
    kw = mixer_inputs(batch, seqlen, nheads, headdim, dstate, ngroups, dtype=torch.float16, seed=seqlen)
    for name in INPUTS:
        assert kw[name] is None or kw[name].dtype == (torch.float32 if name in FP32_INPUTS else torch.float16)
    assert_float16_mixer(run_mixer(kw), ssd_mixer_ref(**kw), "SSDMixer float16")


def assert_float16_mixer(got, want, name):
    """A float16 fused mixer's (y, conv state, SSM state) against its reference on the same inputs: y within the
    float16 op tolerance and equal bit for bit in over 90% of values (a rounding point left out moves about a
    quarter), the conv state (a copy of inputs) exactly, the float32 SSM state at the float32 tolerance."""
    (y, conv_out, ssm_out), (y_ref, conv_ref, ssm_ref) = got, want
    assert (y.dtype, conv_out.dtype, ssm_out.dtype) == (torch.float16, torch.float16, torch.float32)
    atol, rtol = tolerance("float16", "op")
    assert_close(y.float(), y_ref.float(), atol=atol, rtol=rtol, name=f"{name} y")
    assert (y != y_ref).float().mean() < 0.1
    assert torch.equal(conv_out, conv_ref)
    assert_close(ssm_out, ssm_ref, name=f"{name} ssm_state")


def test_ssd_mixer_errors_name_the_input():
    kw = mixer_inputs(1, 1, 4, 8, 16)
    kw["zxbcdt"] = kw["zxbcdt"][..., :-1].contiguous()
    with pytest.raises(Exception, match=r"ssmrt.cpu::SSDMixer: input zxbcdt has shape \(1, 1, 99\), expected "
                                        r"\(1, 1, 100\)"):
        run_mixer(kw)
    kw = mixer_inputs(1, 1, 4, 8, 16)
    kw["norm_weight"] = kw["norm_weight"][:-1].contiguous()
    with pytest.raises(Exception, match=r"input norm_weight has shape \(31,\), expected \(32,\)"):
        run_mixer(kw)
    kw = mixer_inputs(1, 1, 4, 8, 16)
    kw["conv_weight"] = kw["conv_weight"][:-3].contiguous()
    with pytest.raises(Exception, match=r"conv_weight's 61 channels must be nheads \* headdim \(32"):
        run_mixer(kw)
    kw = mixer_inputs(1, 1, 4, 8, 16)
    kw["eps"] = -1.0
    with pytest.raises(Exception, match="SSDMixer: attribute eps must be 0 or more"):
        run_mixer(kw)


def run_add_rmsnorm(x, residual, weight, eps=1e-5, round_half=0):
    act = elem_type(x)
    ins = {"x": x, "residual": residual, "weight": weight}
    vis = [helper.make_tensor_value_info(k, elem_type(v), None) for k, v in ins.items() if v is not None]
    outs = [helper.make_tensor_value_info("y", act, None),
            helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, None)]
    node = helper.make_node("AddRMSNorm", ["x", "residual" if residual is not None else "", "weight"], ["y", "r"],
                            domain=ort_ops.FUSION_DOMAIN, eps=eps, round_half=round_half)
    model = helper.make_model(helper.make_graph([node], "g", vis, outs),
                              opset_imports=[helper.make_opsetid("", 21),
                                             helper.make_opsetid(ort_ops.FUSION_DOMAIN, 1)])
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(native_library()))
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    y, r = sess.run(None, {k: v.numpy() for k, v in ins.items() if v is not None})
    return torch.from_numpy(y), torch.from_numpy(r)


def norm_inputs(shape, residual=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    # the weight's values float16 can hold: a float16 model's weight, widened
    return r(*shape), r(*shape) if residual else None, (1.0 + 0.3 * r(shape[-1])).half().double()


@pytest.mark.parametrize("shape", [(1, 1, 768), (2, 7, 48), (3, 13), (1, 300, 24)])
@pytest.mark.parametrize("residual", [True, False])
def test_add_rmsnorm(shape, residual):
    x, res, w = norm_inputs(shape, residual, seed=len(shape))
    y, r = run_add_rmsnorm(x.float(), None if res is None else res.float(), w.float(), eps=1e-3)
    y_ref, r_ref = add_rmsnorm_ref(x, res, w, 1e-3)
    assert_close(y, y_ref.float(), name="AddRMSNorm y")
    assert_close(r, r_ref.float(), name="AddRMSNorm residual")


@pytest.mark.parametrize("shape", [(1, 1, 768), (2, 7, 48), (1, 300, 24)])
@pytest.mark.parametrize("residual", [True, False])
def test_add_rmsnorm_float16(shape, residual):
    """A float16 model's block entry: a float32 residual stream (the sum exactly the reference's), the norm of the
    sum rounded to float16, the output float16."""
    x, res, w = norm_inputs(shape, residual, seed=1)
    x16, res32 = x.half(), None if res is None else res.float()
    y, r = run_add_rmsnorm(x16, res32, w.float(), round_half=1)
    y_ref, r_ref = add_rmsnorm_ref(x16, res32, w.half(), 1e-5, residual_in_fp32=True)
    assert (y.dtype, r.dtype, y_ref.dtype, r_ref.dtype) == (torch.float16, torch.float32) * 2
    assert torch.equal(r, r_ref)
    atol, rtol = tolerance("float16", "op")
    assert_close(y.float(), y_ref.float(), atol=atol, rtol=rtol, name="AddRMSNorm float16 y")
    if residual:  # without round_half the norm reads the float32 sum (x alone is float16 already): outputs differ
        assert not torch.equal(run_add_rmsnorm(x16, res32, w.float(), round_half=0)[0], y)


def test_add_rmsnorm_errors_name_the_input():
    x, res, w = (t.float() for t in norm_inputs((2, 3, 8)))
    with pytest.raises(Exception, match=r"ssmrt.cpu::AddRMSNorm: input weight has shape \(7,\), expected \(8,\)"):
        run_add_rmsnorm(x, res, w[:7].contiguous())
    with pytest.raises(Exception, match=r"input residual has shape \(2, 2, 8\), expected \(2, 3, 8\) like x"):
        run_add_rmsnorm(x, res[:, :2].contiguous(), w)
    with pytest.raises(Exception, match="AddRMSNorm: attribute round_half must be 0 or 1, got 2"):
        run_add_rmsnorm(x, res, w, round_half=2)


# ------------------------------------------------------------------------------------------ SelectiveMixer

SELECTIVE_INPUTS = ("xz", "conv_weight", "conv_bias", "conv_state", "x_proj", "dt_proj", "A", "D", "dt_bias",
                    "ssm_state")


def selective_mixer_inputs(batch, seqlen, dim, dstate, dt_rank, width=4, optional=True, seed=0) -> dict:
    """A float16 Mamba-1 mixer's middle: activations and the two projections float16, A / D / dt_bias / state
    float32, scaled as a trained model's (dt after dt_proj around -1 before its bias and softplus)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    h = torch.float16
    return dict(
        xz=r(batch, seqlen, 2 * dim).to(h),
        conv_weight=(0.5 * r(dim, width)).to(h),
        conv_bias=r(dim).to(h) if optional else None,
        conv_state=r(batch, dim, width - 1).to(h),
        x_proj=(r(dim, dt_rank + 2 * dstate) / dim**0.5).to(h),
        dt_proj=(0.5 * r(dt_rank, dim) / dt_rank**0.5).to(h),
        A=-torch.exp(r(dim, dstate).clamp(-2, 2)),
        D=r(dim) if optional else None,
        dt_bias=(0.1 * r(dim) - 1.0) if optional else None,
        ssm_state=r(batch, dim, dstate),
    )


def selective_mixer_ref(xz, conv_weight, conv_bias, conv_state, x_proj, dt_proj, A, D, dt_bias, ssm_state,
                        delta_softplus=True):
    """What SelectiveMixer computes: MambaMixer's forward between in_proj and out_proj on the ops' references,
    float16 between them as a float16 graph holds it (each product the float32 sum of float16 operands, rounded).

    xz: (batch, seqlen, 2 dim)
    x_proj: (dim, dt_rank + 2 dstate); dt_proj: (dt_rank, dim); every other size follows
    """
    dt_rank, dstate = dt_proj.shape[0], A.shape[1]
    x, z = xz.chunk(2, dim=-1)
    u, conv_out = causal_conv1d_ref(x, conv_weight, conv_bias, conv_state, "silu")
    dt_low, B, C = torch.split((u.float() @ x_proj.float()).half(), [dt_rank, dstate, dstate], dim=-1)
    dt = (dt_low.float() @ dt_proj.float()).half()
    y, ssm_out = selective_scan_ref(u, dt, A, B.unsqueeze(2), C.unsqueeze(2), D, z, dt_bias, delta_softplus,
                                    ssm_state)
    return y, conv_out, ssm_out


def run_selective_mixer(kw: dict, delta_softplus=1, threads=0):
    sess = mixer_session({k: kw[k] for k in SELECTIVE_INPUTS}, {"delta_softplus": delta_softplus, "threads": threads},
                         op="SelectiveMixer")
    return [torch.from_numpy(r) for r in sess.run(None, {k: kw[k].numpy() for k in SELECTIVE_INPUTS
                                                           if kw[k] is not None})]


# Decode steps and prompts, odd sizes, the 130M Mamba-1's decode step (dim 1536, dstate 16, dt_rank 48)
SELECTIVE_SHAPES = [(1, 1, 8, 4, 2), (2, 1, 24, 5, 3), (2, 7, 16, 16, 4), (1, 1, 1536, 16, 48), (1, 33, 40, 16, 3)]


@pytest.mark.parametrize("batch,seqlen,dim,dstate,dt_rank", SELECTIVE_SHAPES)
@pytest.mark.parametrize("softplus", [1, 0])
def test_selective_mixer(batch, seqlen, dim, dstate, dt_rank, softplus):
    """Against the references chained: y within the float16 op tolerance and equal bit for bit in nearly every
    value (the same roundings at the same points; leaving one out moves far more of them), the conv state (a copy
    of inputs) exactly, the float32 SSM state at the float32 tolerance."""
    kw = selective_mixer_inputs(batch, seqlen, dim, dstate, dt_rank, seed=dim + seqlen)
    if not softplus:  # dt as used, positive (a negative one grows the state)
        kw["dt_bias"] = kw["dt_bias"] + 3.0
    assert_float16_mixer(run_selective_mixer(kw, softplus), selective_mixer_ref(**kw, delta_softplus=bool(softplus)),
                         "SelectiveMixer")


def test_selective_mixer_without_optional_inputs_and_any_threads():
    """No conv bias, D or dt bias, a conv of width 2; the result does not depend on the threads it is told."""
    kw = selective_mixer_inputs(2, 3, 24, 8, 4, width=2, optional=False)
    want = selective_mixer_ref(**kw)
    first = None
    for threads in (0, 1, 2, 5):
        got = run_selective_mixer(kw, threads=threads)
        atol, rtol = tolerance("float16", "op")
        assert_close(got[0].float(), want[0].float(), atol=atol, rtol=rtol, name="y")
        assert torch.equal(got[1], want[1])
        assert_close(got[2], want[2], name="ssm_state")
        first = first or got
        assert all(torch.equal(a, b) for a, b in zip(got, first, strict=True)), threads


def test_selective_mixer_errors_name_the_input():
    kw = selective_mixer_inputs(1, 1, 8, 4, 2)
    kw["xz"] = kw["xz"][..., :-1].contiguous()
    with pytest.raises(Exception, match=r"ssmrt.cpu::SelectiveMixer: input xz has shape \(1, 1, 15\), expected "
                                        r"\(1, 1, 16\)"):
        run_selective_mixer(kw)
    kw = selective_mixer_inputs(1, 1, 8, 4, 2)
    kw["x_proj"] = kw["x_proj"][:, :-1].contiguous()
    with pytest.raises(Exception, match=r"input x_proj has shape \(8, 9\), expected \(8, 10\) \(dim, dt_rank"):
        run_selective_mixer(kw)
    kw = selective_mixer_inputs(1, 1, 8, 4, 2)
    kw["dt_proj"] = kw["dt_proj"][:, :-1].contiguous()
    with pytest.raises(Exception, match=r"input dt_proj has shape \(2, 7\), expected \(dt_rank, 8\)"):
        run_selective_mixer(kw)
    kw = selective_mixer_inputs(1, 1, 8, 4, 2)
    kw["ssm_state"] = kw["ssm_state"][:, :, :-1].contiguous()
    with pytest.raises(Exception, match=r"input ssm_state has shape \(1, 8, 3\), expected \(1, 8, 4\)"):
        run_selective_mixer(kw)
    with pytest.raises(Exception, match="SelectiveMixer: attribute threads must be 0 or more, got -1"):
        run_selective_mixer(selective_mixer_inputs(1, 1, 8, 4, 2), threads=-1)


# ------------------------------------------------------------------------------------------ SSDBlock

BLOCK_INPUTS = ("hidden", "in_proj", *INPUTS[1:], "out_proj", "residual", "next_norm_weight")


def block_inputs(batch, seqlen, d_model, nheads, headdim, dstate, ngroups=1, width=4, optional=True, residual=True,
                 seed=0) -> dict:
    """A float16 Mamba-2 decode step's layer: the normed input and the projections float16 (scaled as a trained
    model's, so that the mixer's input is of order one), the mixer's inputs as SSDMixer's, the residual stream
    and the next norm's weight float32."""
    kw = mixer_inputs(batch, seqlen, nheads, headdim, dstate, ngroups, width=width, optional=optional,
                      dtype=torch.float16, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    d_ssm, in_len = nheads * headdim, kw["zxbcdt"].shape[-1]
    in_proj = r(d_model, in_len) / d_model**0.5
    in_proj[:, -nheads:] = in_proj[:, -nheads:] * 0.5  # dt before its bias and softplus, as mixer_inputs has it
    return dict(
        hidden=r(batch, seqlen, d_model).half(),
        in_proj=in_proj.half(),
        **{k: kw[k] for k in INPUTS[1:]},
        out_proj=(r(d_ssm, d_model) / d_ssm**0.5).half(),
        residual=r(batch, seqlen, d_model) if residual else None,
        next_norm_weight=(1.0 + 0.3 * r(d_model)).half().float(),
        attrs={"dt_softplus": 1, "dt_min": 0.0, "dt_max": math.inf, "eps": 1e-5},
    )


def ssd_block_ref(hidden, in_proj, conv_weight, conv_bias, conv_state, A, D, dt_bias, ssm_state, norm_weight,
                  out_proj, residual, next_norm_weight, attrs, norm_eps=1e-5):
    """What SSDBlock computes: in_proj, Mamba2Mixer's middle, out_proj and the next block's residual add and norm
    on the ops' references, float16 between them as a float16 graph holds it (each product the float32 sum of
    float16 operands, rounded).

    hidden: (batch, seqlen, d_model); in_proj: (d_model, d_ssm + conv_dim + nheads); out_proj: (d_ssm, d_model)
    """
    zxbcdt = (hidden.float() @ in_proj.float()).half()
    m, conv_out, ssm_out = ssd_mixer_ref(zxbcdt, conv_weight, conv_bias, conv_state, A, D, dt_bias, ssm_state,
                                         norm_weight, bool(attrs["dt_softplus"]), (attrs["dt_min"], attrs["dt_max"]),
                                         attrs["eps"])
    o = (m.float() @ out_proj.float()).half()
    y, res = add_rmsnorm_ref(o, residual, next_norm_weight.half(), norm_eps, residual_in_fp32=True)
    return y, res, conv_out, ssm_out


def block_session(kw: dict, threads: int = 0, norm_eps: float = 1e-5, nodes: bool = False) -> ort.InferenceSession:
    """One SSDBlock node over kw's inputs, or (nodes) the four nodes it replaces: HalfMatMul, SSDMixer, HalfMatMul,
    AddRMSNorm. Outputs y, residual_out, the conv state and the SSM state."""
    ins = {k: kw[k] for k in BLOCK_INPUTS}
    names = [k if ins[k] is not None else "" for k in BLOCK_INPUTS]
    vis = [helper.make_tensor_value_info(k, elem_type(v), None) for k, v in ins.items() if v is not None]
    h, f = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    outs = [helper.make_tensor_value_info(n, t, None) for n, t in (("y", h), ("r", f), ("conv_out", h),
                                                                    ("ssm_out", f))]
    d = ort_ops.FUSION_DOMAIN
    if nodes:
        graph = [helper.make_node("HalfMatMul", names[:2], ["zx"], domain=d, threads=threads),
                 helper.make_node("SSDMixer", ["zx", *names[2:10]], ["m", "conv_out", "ssm_out"], domain=d,
                                  **kw["attrs"]),
                 helper.make_node("HalfMatMul", ["m", names[10]], ["o"], domain=d, threads=threads),
                 helper.make_node("AddRMSNorm", ["o", *names[11:]], ["y", "r"], domain=d, eps=norm_eps,
                                  round_half=1)]
    else:
        graph = [helper.make_node("SSDBlock", names, ["y", "r", "conv_out", "ssm_out"], domain=d, threads=threads,
                                  norm_eps=norm_eps, round_half=1, **kw["attrs"])]
    model = helper.make_model(helper.make_graph(graph, "g", vis, outs),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(d, 1)])
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(native_library()))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_block(kw: dict, **opts) -> list:
    feeds = {k: kw[k].numpy() for k in BLOCK_INPUTS if kw[k] is not None}
    return [torch.from_numpy(r) for r in block_session(kw, **opts).run(None, feeds)]


# Decode steps (the fused node is put only there) and a prompt; several groups; a dstate the eight-lane loop does
# not divide; the 130M Mamba-2's layer (d_model 768, 24 heads of 64, dstate 128)
BLOCK_SHAPES = [(1, 1, 32, 4, 8, 16, 1), (2, 1, 40, 6, 5, 7, 2), (1, 1, 768, 24, 64, 128, 1), (2, 5, 24, 4, 4, 8, 1)]


@pytest.mark.parametrize("batch,seqlen,d_model,nheads,headdim,dstate,ngroups", BLOCK_SHAPES)
@pytest.mark.parametrize("residual", [True, False])
def test_ssd_block_gives_the_four_nodes_values_bit_for_bit(batch, seqlen, d_model, nheads, headdim, dstate, ngroups,
                                                           residual):
    """SSDBlock runs the kernels of the nodes it replaces, rounding where they stored float16: every output equals
    theirs bit for bit; and (that comparison alone would pass for any shared mistake) against the references
    chained: y and the residual stream (the sum of out_proj's float16 product and the float32 stream) within the
    float16 op tolerance; the conv state's new column (in_proj's product) too and the rest (the old state shifted)
    exactly; the SSM state at the float32 tolerance."""
    kw = block_inputs(batch, seqlen, d_model, nheads, headdim, dstate, ngroups, residual=residual, seed=d_model)
    got = run_block(kw)
    for name, a, b in zip(("y", "residual_out", "conv_state", "ssm_state"), got, run_block(kw, nodes=True),
                          strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    y, res, conv_out, ssm_out = ssd_block_ref(**kw)
    assert (got[0].dtype, got[1].dtype) == (torch.float16, torch.float32)
    atol, rtol = tolerance("float16", "op")
    assert_close(got[0].float(), y.float(), atol=atol, rtol=rtol, name="SSDBlock y")
    assert_close(got[1], res, atol=atol, rtol=rtol, name="SSDBlock residual_out")
    assert_close(got[2].float(), conv_out.float(), atol=atol, rtol=rtol, name="SSDBlock conv_state")
    assert torch.equal(got[2][..., :-1], conv_out[..., :-1])
    assert_close(got[3], ssm_out, name="SSDBlock ssm_state")


def test_ssd_block_without_optional_inputs_and_any_threads():
    """No conv bias, D, dt bias or residual, a conv of width 2, its own norm eps; the result does not depend on the
    threads the products are told, and is the nodes' for each."""
    kw = block_inputs(2, 1, 48, 4, 8, 16, width=2, optional=False, residual=False, seed=3)
    first = None
    for threads in (0, 1, 2, 5):
        got = run_block(kw, threads=threads, norm_eps=1e-3)
        nodes = run_block(kw, threads=threads, norm_eps=1e-3, nodes=True)
        assert all(torch.equal(a, b) for a, b in zip(got, nodes, strict=True)), threads
        first = first or got
        assert all(torch.equal(a, b) for a, b in zip(got, first, strict=True)), threads
    want = ssd_block_ref(**kw, norm_eps=1e-3)
    atol, rtol = tolerance("float16", "op")
    assert_close(first[0].float(), want[0].float(), atol=atol, rtol=rtol, name="SSDBlock y")


def test_ssd_block_errors_name_the_input():
    def fails(match, threads=0, attrs=None, **change):
        kw = block_inputs(1, 1, 16, 4, 8, 16)
        kw["attrs"].update(attrs or {})
        kw.update({k: f(kw[k]).contiguous() for k, f in change.items()})
        with pytest.raises(Exception, match=match):
            run_block(kw, threads=threads)

    fails(r"ssmrt.cpu::SSDBlock: input in_proj has shape \(16, 99\), expected \(16, 100\) \(d_model, d_ssm",
          in_proj=lambda t: t[:, :-1])
    fails(r"input out_proj has shape \(32, 15\), expected \(32, 16\) \(nheads \* headdim, d_model\)",
          out_proj=lambda t: t[:, :-1])
    fails(r"input hidden has shape \(2, 1, 16\), expected \(batch, seqlen, d_model\) with batch 1",
          hidden=lambda t: t.expand(2, 1, 16))
    fails(r"input residual has shape \(1, 1, 15\), expected \(1, 1, 16\) like hidden", residual=lambda t: t[..., :-1])
    fails(r"input next_norm_weight has shape \(15,\), expected \(16,\)", next_norm_weight=lambda t: t[:-1])
    fails(r"input conv_state has shape \(1, 64, 2\), expected \(1, 64, 3\)", conv_state=lambda t: t[..., :-1])
    fails("SSDBlock: attribute eps must be 0 or more", attrs={"eps": -1.0})
    fails("SSDBlock: attribute threads must be 0 or more, got -1", threads=-1)


# ------------------------------------------------------------------------------------------ the graph fusion


def runners(art):
    """(fused, as exported) ONNX Runtime runners of one artifact, both with the native ops."""
    from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact

    return (OnnxRuntimeRunnerFromArtifact(art, native_ops="on"),
            OnnxRuntimeRunnerFromArtifact(art, native_ops="on", fuse=False))


def same_results(fused, plain, dtype, batch=2, steps=4):
    """A prompt, then decode steps each fed the state the last returned: logits and every state alike at the
    dtype's tolerance; the first layer's states (the same inputs through the same kernels) equal."""
    atol, rtol = tolerance(dtype, "op" if dtype == "float32" else "model")
    ids = random_ids(batch, 9, seed=1).numpy()
    sf = sp = fused.zero_state(batch)
    for t, step in enumerate([ids] + [ids[:, k : k + 1] for k in range(steps)]):
        (lf, sf), (lp, sp) = fused.forward(step, sf), plain.forward(step, sp)
        assert_close(torch.from_numpy(lf), torch.from_numpy(lp), atol=atol, rtol=rtol, name=f"call {t} logits")
        for i, (a, b) in enumerate(zip(sf, sp, strict=True)):
            assert a.dtype == b.dtype
            assert_close(torch.from_numpy(a.astype(np.float32)), torch.from_numpy(b.astype(np.float32)), atol=atol,
                         rtol=rtol, name=f"call {t} state {i}")
        assert np.array_equal(sf[0], sp[0]) and np.array_equal(sf[1], sp[1])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("variant", [{}, {"D_has_hdim": True, "conv_bias": False},
                                     {"dt_min_limit": 0.05, "dt_max_limit": 0.3, "gated_norm_eps": 1e-3}])
def test_the_runner_fuses_every_mamba2_mixer(tmp_path, dtype, variant):
    """Each mixer becomes one SSDMixer node, each block's residual add and norm after the first (and the final
    norm) one AddRMSNorm, and the runner computes what the graph as exported does."""
    from ssmrt.exporter import export_model

    native_library()
    model = random_lm(ngroups=1, n_layer=3, **variant)
    fused, plain = runners(export_model(model, tmp_path / "a", dtype=dtype))
    assert (fused.fused_mixers, fused.fused_norms, plain.fused_mixers, plain.fused_norms) == (3, 3, 0, 0)
    assert (fused.fused_blocks, plain.fused_blocks) == (3 * (dtype == "float16"), 0)
    assert plain.native_ops == fused.native_ops == ("CausalConv1d", "SSDScan")
    assert "3 Mamba-2 mixers fused, 3 residual norms fused" in fused.describe() and "fused" not in plain.describe()
    assert ("3 decode-step layers on SSDBlock" in fused.describe()) == (dtype == "float16")
    same_results(fused, plain, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_runner_fuses_mamba1_norms_and_float16_decode_mixers(tmp_path, dtype):
    """Mamba-1 has no SSD mixer; its blocks' residual adds and norms fuse as Mamba-2's do, and a float16 graph's
    decode step runs each mixer's middle as one SelectiveMixer node."""
    from ssmrt.exporter import export_model

    native_library()
    fused, plain = runners(export_model(random_lm(arch="mamba1", n_layer=3), tmp_path / "a", dtype=dtype))
    assert (fused.fused_mixers, fused.fused_norms, fused.fused_step_mixers) == (0, 3, 3 * (dtype == "float16"))
    assert plain.fused_step_mixers == 0
    assert ("3 Mamba-1 mixers fused in the decode step" in fused.describe()) == (dtype == "float16")
    same_results(fused, plain, dtype)


def same_bits(fused, nodes):
    """A 7-token prompt of two sequences, then five decode steps each fed the state the last returned: the two
    runners' logits and states equal bit for bit."""
    ids = random_ids(2, 7, seed=2).numpy()
    sf = sn = fused.zero_state(2)
    for step in [ids] + [ids[:, k : k + 1] for k in range(5)]:
        (lf, sf), (ln, sn) = fused.forward(step, sf), nodes.forward(step, sn)
        assert np.array_equal(lf, ln)
        assert all(np.array_equal(a, b) for a, b in zip(sf, sn, strict=True))


@pytest.mark.parametrize("variant", [{}, {"conv_bias": False, "bias": True}])
def test_float16_mamba1_decode_mixers_give_the_nodes_values_bit_for_bit(tmp_path, monkeypatch, variant):
    """SelectiveMixer rounds where the nodes it replaces did and multiplies with HalfMatMul's kernel: a float16
    Mamba-1's logits and states over a prompt and decode steps are those of the same runner without it, bit for
    bit. The prompt runs the graph's own nodes (the products there are ONNX Runtime's)."""
    from ssmrt.exporter import export_model
    from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact

    native_library()
    art = export_model(random_lm(arch="mamba1", n_layer=2, **variant), tmp_path / "a", dtype="float16")
    fused = OnnxRuntimeRunnerFromArtifact(art, native_ops="on")
    monkeypatch.setattr(ort_ops, "fuse_selective_mixers", lambda model: 0)
    nodes = OnnxRuntimeRunnerFromArtifact(art, native_ops="on")
    assert (fused.fused_step_mixers, nodes.fused_step_mixers, fused.decode_matmuls) == (2, 0, 4 * 2 + 1)
    same_bits(fused, nodes)


@pytest.mark.parametrize("logits", ["all", "last"])
def test_float16_mamba2_decode_blocks_give_the_nodes_values_bit_for_bit(tmp_path, monkeypatch, logits):
    """SSDBlock runs the kernels of the four nodes it replaces: a float16 Mamba-2's logits and states over a prompt
    and decode steps are those of the same runner without it, bit for bit. With logits "last" the last layer's
    out_proj reaches the final norm through a Slice, and that layer stays as four nodes."""
    from ssmrt.exporter import export_model
    from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact

    native_library()
    art = export_model(random_lm(ngroups=1, n_layer=3), tmp_path / "a", dtype="float16", logits=logits)
    fused = OnnxRuntimeRunnerFromArtifact(art, native_ops="on")
    monkeypatch.setattr(ort_ops, "fuse_ssd_blocks", lambda model: 0)
    nodes = OnnxRuntimeRunnerFromArtifact(art, native_ops="on")
    assert (fused.fused_blocks, nodes.fused_blocks) == (3 if logits == "all" else 2, 0)
    assert (fused.fused_mixers, fused.fused_norms, fused.decode_matmuls) == (3, 3, 2 * 3 + 1)
    same_bits(fused, nodes)


@pytest.mark.parametrize("value", ["zxbcdt", "mixed", "out"])
def test_the_block_match_leaves_a_layer_whose_values_are_read_elsewhere(tmp_path, value):
    """A value between the four nodes read by another node (in_proj's product, the mixer's output, out_proj's)
    keeps that layer as it was; the other layers fuse."""
    from ssmrt.exporter import export_model

    art = export_model(random_lm(ngroups=1, n_layer=3), tmp_path / "a", dtype="float16")
    model = onnx.load(str(art / "model.onnx"))
    assert ort_ops.fuse_ssd_mixers(model) == 3 and ort_ops.fuse_add_rmsnorms(model, "float16") == 3
    assert ort_ops.route_decode_matmuls(model, 2) == 2 * 3 + 1
    (route,) = [n for n in model.graph.node if n.name == ort_ops.ROUTED]
    (step,) = [a.g for a in route.attribute if a.name == "then_branch"]
    mixer = next(n for n in step.node if n.op_type == "SSDMixer")
    out = next(n for n in step.node if n.op_type == "HalfMatMul" and n.input[0] == mixer.output[0])
    read = {"zxbcdt": mixer.input[0], "mixed": mixer.output[0], "out": out.output[0]}[value]
    step.node.append(helper.make_node("Identity", [read], ["seen"]))
    assert ort_ops.fuse_ssd_blocks(model) == 2
    ops = [n.op_type for n in step.node]
    assert ops.count("SSDMixer") == 1 and ops.count("SSDBlock") == 2
    assert any(n.op_type == "SSDMixer" and n.input[0] == mixer.input[0] for n in step.node)


@pytest.mark.parametrize("value", ["u", "x_proj", "delta"])
def test_the_decode_mixer_match_leaves_a_mixer_whose_values_are_read_elsewhere(tmp_path, value):
    """A value inside the mixer read by another node (the conv's output, x_proj's product, dt_proj's) keeps that
    mixer as it was; the other layer's fuses."""
    from ssmrt.exporter import export_model

    art = export_model(random_lm(arch="mamba1", n_layer=2), tmp_path / "a", dtype="float16")
    model = onnx.load(str(art / "model.onnx"))
    assert ort_ops.route_decode_matmuls(model, 2) == 4 * 2 + 1
    (route,) = [n for n in model.graph.node if n.name == ort_ops.ROUTED]
    (step,) = [a.g for a in route.attribute if a.name == "then_branch"]
    scan = next(n for n in step.node if n.op_type == "SelectiveScan")
    made = {o: n for n in step.node for o in n.output}
    read = {"u": scan.input[0], "delta": scan.input[1],
            "x_proj": made[made[scan.input[1]].input[0]].input[0]}[value]  # dt_low's Split reads x_proj's product
    step.node.append(helper.make_node("Identity", [read], ["seen"]))
    assert ort_ops.fuse_selective_mixers(model) == 1
    ops = [n.op_type for n in step.node]
    assert ops.count("SelectiveScan") == ops.count("SelectiveMixer") == 1
    assert any(n.op_type == "SelectiveScan" and n.input[0] == scan.input[0] for n in step.node)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fused_norms_carry_the_models_eps_and_rounding(tmp_path, dtype):
    """Each AddRMSNorm reads the block's own weight and eps, and rounds the sum to float16 where the float16
    graph did (a wrong rounding would move a float16 model's logits by less than the model tolerance)."""
    from ssmrt.exporter import export_model

    model = random_lm(arch="mamba1", n_layer=3, norm_eps=1e-3)
    with torch.no_grad():  # random_lm leaves the final norm's weight at ones
        model.backbone.norm_f.weight.normal_(1.0, 0.3, generator=torch.Generator().manual_seed(5))
    graph = onnx.load(str(export_model(model, tmp_path / "a", dtype=dtype) / "model.onnx"))
    assert ort_ops.fuse_add_rmsnorms(graph, dtype) == 3
    fused = [n for n in graph.graph.node if n.op_type == "AddRMSNorm"]
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in fused]
    assert all(a["eps"] == pytest.approx(1e-3) and a["round_half"] == (dtype == "float16") for a in attrs)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    made = {o: n for n in graph.graph.node for o in n.output}
    # the float16 model's weight is widened by a Cast or stored widened
    weights = [inits[w] if w in inits else inits[made[w].input[0]] for w in (n.input[2] for n in fused)]
    norms = [model.backbone.layers[1].norm, model.backbone.layers[2].norm, model.backbone.norm_f]
    for got, norm in zip(weights, norms, strict=True):
        assert np.array_equal(got.astype(np.float32), norm.weight.detach().to(getattr(torch, dtype)).float().numpy())


def test_a_float16_residual_stream_keeps_its_norms_as_exported(tmp_path):
    """residual_in_fp32 off: a float16 model's residual adds are float16 and its norms read them widened, not
    rounded from a float32 sum: not AddRMSNorm's form, so they stay; the runner still computes the graph."""
    from ssmrt.exporter import export_model

    native_library()
    model = random_lm(ngroups=1, residual_in_fp32=False)
    fused, plain = runners(export_model(model, tmp_path / "a", dtype="float16"))
    assert (fused.fused_mixers, fused.fused_norms) == (2, 0)
    same_results(fused, plain, "float16")


@pytest.mark.parametrize("variant", [{"ngroups": 2}, {"norm_before_gate": True}, {"rmsnorm": False},
                                     {"d_inner": 96, "d_ssm": 64}])
def test_mixers_the_fused_op_does_not_compute_are_left_as_exported(tmp_path, variant):
    """A gated norm over several groups, the norm before the gate, no norm, an MLP part: the pattern does not
    match, the mixer stays as exported, and the runner still computes the graph."""
    from ssmrt.exporter import export_model

    native_library()
    model = random_lm(**{"ngroups": 1, **variant})
    fused, plain = runners(export_model(model, tmp_path / "a"))
    assert fused.fused_mixers == 0 and fused.fused_norms == 2  # the blocks' norms still fuse
    same_results(fused, plain, "float32")


def test_a_value_read_outside_the_mixer_keeps_that_mixer_as_exported(tmp_path):
    """A graph that also outputs one layer's scan output (or reads it anywhere else) keeps that layer's nodes; the
    other layers fuse, and the rewritten graph computes what the graph did, that output included."""
    from ssmrt.exporter import export_model

    art = export_model(random_lm(ngroups=1, n_layer=3), tmp_path / "a")
    model = onnx.load(str(art / "model.onnx"))
    first = next(n for n in model.graph.node if n.op_type == "SSDScan")
    model.graph.output.append(helper.make_tensor_value_info(first.output[0], onnx.TensorProto.FLOAT, list("blhp")))
    exported = model.SerializeToString()
    assert ort_ops.fuse_ssd_mixers(model) == 2
    assert sum(n.op_type == "SSDScan" for n in model.graph.node) == 1
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(native_library()))
    feeds = None
    outs = []
    for graph in (exported, model.SerializeToString()):
        sess = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
        if feeds is None:
            feeds = {i.name: np.zeros([1 if isinstance(d, str) else d for d in i.shape], np.float32)
                     for i in sess.get_inputs() if i.name != "input_ids"}
            feeds["input_ids"] = random_ids(1, 6).numpy()
            for k, v in feeds.items():
                if k != "input_ids":
                    v[...] = np.random.default_rng(len(k)).standard_normal(v.shape)
        outs.append(sess.run(None, feeds))
    assert len(outs[0]) == len(outs[1])
    for a, b in zip(*outs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_fused_nodes_are_put_in_an_order_onnx_accepts():
    """A fused node takes the place of the last node it replaced; a node that read one of its outputs from
    between the replaced ones moves after it, and everything else keeps its order."""
    from ssmrt.ort_ops.fusion import _in_order

    nodes = [helper.make_node("Neg", ["a"], ["b"]), helper.make_node("Abs", ["r"], ["c"]),  # reads r too early
             helper.make_node("Fused", ["b"], ["y", "r"]), helper.make_node("Exp", ["y"], ["d"])]
    assert [n.op_type for n in _in_order(nodes)] == ["Neg", "Fused", "Exp", "Abs"]
    with pytest.raises(ValueError, match="cycle"):
        _in_order([helper.make_node("Neg", ["b"], ["a"]), helper.make_node("Abs", ["a"], ["b"])])


def file_sized_lm(tmp_path, dtype):
    """A Mamba-2 artifact of a few MB (six layers): a copy of its weights stands out of what a runner needs besides."""
    from ssmrt.exporter import export_model

    return export_model(random_lm(ngroups=1, d_model=128, n_layer=6, vocab_size=1000), tmp_path / "a", dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_rewritten_graph_is_not_kept_as_bytes_beside_its_session(tmp_path, dtype):
    """The runner hands ONNX Runtime the rewritten graph as bytes, which ONNX Runtime copies the weights out of;
    the bytes are then let go, not kept for the session's life (ONNX Runtime's Python session would keep them: a
    second copy of every weight). tracemalloc sees Python's and numpy's allocations, not ONNX Runtime's own."""
    import gc
    import tracemalloc

    from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact

    native_library()
    art = file_sized_lm(tmp_path, dtype)
    size = (art / "model.onnx").stat().st_size
    OnnxRuntimeRunnerFromArtifact(art, native_ops="on")  # imports and the library's first load settle first
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        runner = OnnxRuntimeRunnerFromArtifact(art, native_ops="on")
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert runner.fused_mixers == 6 and runner.decode_matmuls == (13 if dtype == "float16" else 0), runner.describe()
    assert held < size / 10, f"the runner holds {held} bytes of Python memory for a {size}-byte model"
    logits, _ = runner.forward(np.array([[1, 2, 3]]), runner.zero_state(1))  # the session still runs
    assert logits.shape == (1, 3, 1000) and np.isfinite(logits).all()


def test_prompts_shrink_the_cpu_arena_and_steps_do_not(tmp_path):
    """A prompt runs with ONNX Runtime's arena shrinkage asked for (its widened float16 weights and activations
    would otherwise stay allocated for the session's life); a decode step without it."""
    from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact

    runner = OnnxRuntimeRunnerFromArtifact(file_sized_lm(tmp_path, "float16"))
    asked, run = [], runner.session.run

    def spy(names, feeds, options=None):
        asked.append(None if options is None else options.get_run_config_entry("memory.enable_memory_arena_shrinkage"))
        return run(names, feeds, options)

    runner.session.run = spy
    _, state = runner.forward(np.array([[1, 2, 3]]), runner.zero_state(1))
    runner.forward(np.array([[4]]), state)
    runner.forward_last(np.array([[5, 6]]), state)
    assert asked == ["cpu:0", None, "cpu:0"]


def test_fuse_must_be_a_bool(tmp_path):
    from ssmrt.errors import SsmrtError
    from ssmrt.exporter import export_model
    from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact

    with pytest.raises(SsmrtError, match="fuse must be True or False, got 'no'"):
        OnnxRuntimeRunnerFromArtifact(export_model(random_lm(n_layer=1), tmp_path / "a"), fuse="no")


@pytest.mark.parametrize("arch,dtype,fusion,name", [("mamba2", "float32", "fuse_ssd_mixers", "SSDMixer"),
                                                     ("mamba1", "float16", "fuse_selective_mixers", "SelectiveMixer")])
def test_a_fusion_that_trips_is_left_out_and_the_rest_kept(tmp_path, monkeypatch, arch, dtype, fusion, name):
    """Fusion is an optimisation: an error in one leaves the graph without that fusion (not half-rewritten), the
    other fusions and a float16 graph's routing kept, with the reason in fuse_note; the runner computes what one
    without that fusion does, bit for bit."""
    from ssmrt.exporter import export_model
    from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact

    native_library()
    art = export_model(random_lm(arch=arch, ngroups=1), tmp_path / "a", dtype=dtype)

    def trip(model):
        del model.graph.node[:3]  # a half-done rewrite must not reach ONNX Runtime
        raise ValueError("the fused graph has a cycle")

    monkeypatch.setattr(ort_ops, fusion, trip)
    r = OnnxRuntimeRunnerFromArtifact(art, native_ops="on")
    assert r.fuse_note == f"{name} not fused: ValueError: the fused graph has a cycle"
    monkeypatch.setattr(ort_ops, fusion, lambda model: 0)
    without = OnnxRuntimeRunnerFromArtifact(art, native_ops="on")
    counts = ("fused_mixers", "fused_norms", "fused_step_mixers", "decode_matmuls")
    assert [getattr(r, c) for c in counts] == [getattr(without, c) for c in counts]
    assert r.fused_norms == 2 and r.decode_matmuls == (4 * 2 + 1 if dtype == "float16" else 0)
    assert r.fused_mixers == r.fused_step_mixers == 0 and without.fuse_note == ""
    ids = random_ids(1, 5).numpy()
    sr, sw = r.zero_state(1), without.zero_state(1)
    for step in (ids, ids[:, :1], ids[:, 1:2]):  # a prompt, then decode steps
        (lr, sr), (lw, sw) = r.forward(step, sr), without.forward(step, sw)
        assert np.array_equal(lr, lw) and all(np.array_equal(a, b) for a, b in zip(sr, sw, strict=True))
