"""ssmrt.ort_ops: the native ONNX Runtime kernels against the float64 references, op by op (a one-node model with
no fallback body, so the native kernel is the only thing that can run it), their errors, and the build cache.
The whole-model checks with the native ops on and off are in test_export.py."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from test_ops import conv_inputs, selective_inputs, small_dt_inputs, ssd_inputs, state_ulps

from ssmrt import ort_ops
from ssmrt.closeness import assert_close
from ssmrt.errors import SsmrtError
from ssmrt.ops import causal_conv1d_ref, selective_scan_ref, ssd_scan_ref
from ssmrt.ops.spec import CAUSAL_CONV1D, DOMAIN, SELECTIVE_SCAN, SSD_SCAN, tolerance


def native_library():
    """The built library, or the test skips with why it cannot be built here."""
    try:
        return ort_ops.library_path()
    except ort_ops.NativeOpsUnavailable as e:
        pytest.skip(f"native ops cannot be built here: {e}")


def elem_type(array) -> int:
    """The ONNX element type of a numpy array or torch tensor (float32 or float16)."""
    return onnx.TensorProto.FLOAT16 if str(array.dtype).removeprefix("torch.") == "float16" else onnx.TensorProto.FLOAT


def library_session(model, threads: int = 0) -> ort.InferenceSession:
    """An ONNX Runtime CPU session of `model` with the native library registered; `threads` intra-op threads
    (0: default)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(str(native_library()))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def native_session(spec, inputs: dict, attrs: dict, threads: int = 0) -> ort.InferenceSession:
    """A session of one `spec` node over `inputs` (name -> array or None for an absent optional input), with the
    library registered and no fallback body in the model; `threads` ONNX Runtime intra-op threads (0: default).
    The graph's types are the inputs' own; the outputs' follow the first input, float32 where the spec keeps them
    float32."""
    present = {k: v for k, v in inputs.items() if v is not None}
    vis = [helper.make_tensor_value_info(k, elem_type(v), [f"{k}_{i}" for i in range(v.ndim)])
           for k, v in present.items()]
    act = elem_type(present[spec.inputs[0].name])  # the activations' type: the first input's
    outs = [helper.make_tensor_value_info(t.name, onnx.TensorProto.FLOAT if t.fp32 else act, None)
            for t in spec.outputs]
    node = helper.make_node(spec.name, [t.name if t.name in present else "" for t in spec.inputs],
                            [t.name for t in spec.outputs], domain=DOMAIN, **attrs)
    model = helper.make_model(helper.make_graph([node], "g", vis, outs),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)])
    return library_session(model, threads)


def run_native(spec, inputs: dict, attrs: dict):
    sess = native_session(spec, inputs, attrs)
    feeds = {k: v.numpy() for k, v in inputs.items() if v is not None}
    return [torch.from_numpy(r) for r in sess.run(None, feeds)]


def f64(kw: dict) -> dict:
    return {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


@pytest.mark.parametrize("batch,seqlen,dim,width",
                         [(1, 1, 8, 4), (2, 7, 13, 4), (3, 2, 5, 4), (2, 33, 24, 3), (2, 1, 6, 2), (1, 300, 16, 4),
                          (2, 5, 7, 1), (3, 1, 9, 1), (2, 1, 10, 3), (2, 1, 11, 6), (2, 1, 1536, 4),
                          (2, 600, 1536, 4)])
@pytest.mark.parametrize("activation", ["silu", "none"])
def test_causal_conv1d(batch, seqlen, dim, width, activation):
    kw = conv_inputs(batch, seqlen, dim, width, seed=seqlen)
    kw["activation"] = activation
    ins = {k: kw[k] for k in ("x", "weight", "bias", "conv_state")}
    y, s = run_native(CAUSAL_CONV1D, ins, {"activation": activation})
    y_ref, s_ref = causal_conv1d_ref(**f64(kw))
    assert_close(y, y_ref.float(), name="conv y")
    assert_close(s, s_ref.float(), atol=0, rtol=0, name="conv state")  # a copy of inputs: exact


def test_causal_conv1d_without_bias():
    kw = conv_inputs(2, 9, 10, 4, bias=False)
    y, s = run_native(CAUSAL_CONV1D, {k: kw[k] for k in ("x", "weight", "bias", "conv_state")},
                      {"activation": "silu"})
    y_ref, s_ref = causal_conv1d_ref(**f64(kw))
    assert_close(y, y_ref.float(), name="conv y")
    assert_close(s, s_ref.float(), name="conv state")


SCAN_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "ssm_state")


# dims cover a partial channel block (a prompt walks 16 channels at a time, a decode step 64), dstate odd, the
# models' 16 and 12 (eight lanes, then the rest one at a time); a decode step whose second block starts inside the
# first group and crosses into the second; the 130M Mamba-1's decode step and a prompt, split across threads.
@pytest.mark.parametrize("batch,seqlen,dim,dstate,ngroups",
                         [(1, 1, 6, 4, 1), (2, 1, 20, 16, 2), (2, 1, 160, 12, 2), (1, 1, 1536, 16, 1),
                          (2, 5, 37, 5, 1), (1, 17, 32, 16, 4), (3, 40, 24, 8, 2), (2, 512, 256, 16, 1)])
@pytest.mark.parametrize("delta_softplus", [True, False])
def test_selective_scan(batch, seqlen, dim, dstate, ngroups, delta_softplus):
    kw = selective_inputs(batch, seqlen, dim, dstate, ngroups=ngroups, seed=seqlen + dim)
    kw["delta_softplus"] = delta_softplus
    if not delta_softplus:  # dt must stay positive without the softplus
        kw["delta"], kw["delta_bias"] = kw["delta"].abs() * 0.1, kw["delta_bias"].abs()
    y, s = run_native(SELECTIVE_SCAN, {k: kw[k] for k in SCAN_INPUTS}, {"delta_softplus": int(delta_softplus)})
    y_ref, s_ref = selective_scan_ref(**f64(kw))
    assert_close(y, y_ref.float(), name="selective y")
    assert_close(s, s_ref.float(), name="selective state")


@pytest.mark.parametrize("seqlen", [3, 1])
def test_selective_scan_large_dt_takes_the_softplus_threshold(seqlen):
    """dt above 20 passes through softplus unchanged, as in every Mamba kernel."""
    kw = selective_inputs(1, seqlen, 16, 4)
    kw["delta"] = kw["delta"] * 20 + 10  # spans both sides of 20
    y, s = run_native(SELECTIVE_SCAN, {k: kw[k] for k in SCAN_INPUTS}, {"delta_softplus": 1})
    y_ref, s_ref = selective_scan_ref(**f64(kw))
    assert_close(y, y_ref.float(), name="selective y")
    assert_close(s, s_ref.float(), name="selective state")


@pytest.mark.parametrize("seqlen", [6, 1])
def test_selective_scan_without_optional_inputs(seqlen):
    kw = selective_inputs(2, seqlen, 12, 4, optional=False)
    y, s = run_native(SELECTIVE_SCAN, {k: kw[k] for k in SCAN_INPUTS}, {"delta_softplus": 1})
    y_ref, s_ref = selective_scan_ref(**f64(kw))
    assert_close(y, y_ref.float(), name="selective y")
    assert_close(s, s_ref.float(), name="selective state")


@pytest.mark.parametrize("seqlen,dstate", [(1, 16), (1, 12), (2, 16)])
def test_selective_scan_decays_within_an_ulp(seqlen, dstate):
    """The scan's exp, seen through the op: with B = 0, dt = 1 and a state of ones, the new state is exp(A) itself,
    here over A in [-87, 88]. The kernel computes it in registers eight lanes at a time, within one ulp of the
    correctly rounded value; the rest of a row (dstate 12: the last four) goes to the C library's exp, which the
    compiler vectorises (measured up to two ulp). A prompt's second step has dt = 0 (a decay of exactly 1), so its
    state is the first step's. Below float32's normal range the decay is 0 or subnormal."""
    dim = 64
    A = torch.linspace(-87.0, 88.0, dim * dstate, dtype=torch.float32).reshape(dim, dstate)
    A[-1, :4] = torch.tensor([-87.5, -100.0, -1e4, -1e30])
    delta = torch.zeros(1, seqlen, dim)
    delta[:, 0] = 1.0
    ins = dict(u=torch.randn(1, seqlen, dim), delta=delta, A=A, B=torch.zeros(1, seqlen, 1, dstate),
               C=torch.zeros(1, seqlen, 1, dstate), D=None, z=None, delta_bias=None,
               ssm_state=torch.ones(1, dim, dstate))
    _, s = run_native(SELECTIVE_SCAN, ins, {"delta_softplus": 0})
    got, want = s[0].double(), torch.exp(A.double()).float().double()
    normal = A > -87.3
    ulp = (got - want).abs() / torch.from_numpy(np.spacing(want.float().numpy())).double()
    lanes = torch.zeros_like(normal)
    lanes[:, :dstate // 8 * 8] = True
    for where, bound in ((normal & lanes, 1.0), (normal & ~lanes, 2.0)):
        if where.any():
            worst = ulp[where].max()
            assert worst <= bound, f"exp off by {worst:.2f} ulp at A = {A[where][ulp[where].argmax()]:.4f}"
    assert ((got[~normal] >= 0) & (got[~normal] < 1.2e-38)).all()


@pytest.mark.parametrize("seqlen", [4, 1])
def test_selective_scan_carries_a_nan(seqlen):
    """A NaN in delta reaches y and the state of its channel, as in the reference: the kernel's exp keeps NaN a NaN
    (its clamps would otherwise turn one into a decay of 0 or 1 and a plausible output)."""
    kw = selective_inputs(1, seqlen, 16, 8)
    kw["delta"][0, 0, 3] = math.nan
    y, s = run_native(SELECTIVE_SCAN, {k: kw[k] for k in SCAN_INPUTS}, {"delta_softplus": 1})
    assert torch.isnan(y[0, 0, 3]) and torch.isnan(s[0, 3]).all()
    assert torch.isfinite(y[0, 0, :3]).all() and torch.isfinite(s[0, 4:]).all()


SSD_INPUTS = ("x", "dt", "A", "B", "C", "D", "dt_bias", "ssm_state")


def ssd_attrs(kw) -> dict:
    lo, hi = kw["dt_limit"]
    return {"chunk_size": kw["chunk_size"], "dt_softplus": int(kw["dt_softplus"]), "dt_min": lo, "dt_max": hi}


# Decode steps (seqlen 1, their own single-pass loop) with dstate a multiple of eight (rows of eight lanes, streamed
# out), shorter than eight and neither (eight lanes, then the rest one at a time). The last two cases are the 130M
# Mamba-2's head shape in a decode step and at a prefill length, split across threads.
@pytest.mark.parametrize("batch,seqlen,nheads,headdim,dstate,ngroups",
                         [(1, 1, 4, 8, 16, 1), (2, 1, 6, 5, 7, 2), (1, 1, 3, 4, 21, 1), (2, 9, 4, 8, 16, 2),
                          (1, 33, 3, 4, 5, 1), (2, 1, 24, 64, 128, 1), (2, 300, 24, 64, 128, 1)])
@pytest.mark.parametrize("D_per_channel", [False, True])
@pytest.mark.parametrize("dt_limit", [(0.0, math.inf), (0.05, 0.3)])
def test_ssd_scan(batch, seqlen, nheads, headdim, dstate, ngroups, D_per_channel, dt_limit):
    kw = ssd_inputs(batch, seqlen, nheads, headdim, dstate, ngroups=ngroups, D_per_channel=D_per_channel,
                    dt_limit=dt_limit, seed=seqlen)
    y, s = run_native(SSD_SCAN, {k: kw[k] for k in SSD_INPUTS}, ssd_attrs(kw))
    y_ref, s_ref = ssd_scan_ref(**f64(kw))
    assert_close(y, y_ref.float(), name="ssd y")
    assert_close(s, s_ref.float(), name="ssd state")


def test_ssd_scan_without_softplus_or_optional_inputs():
    kw = ssd_inputs(2, 7, 4, 8, 16)
    kw["dt"], kw["dt_softplus"], kw["D"], kw["dt_bias"] = kw["dt"].abs() * 0.1, False, None, None
    y, s = run_native(SSD_SCAN, {k: kw[k] for k in SSD_INPUTS}, ssd_attrs(kw))
    y_ref, s_ref = ssd_scan_ref(**f64(kw))
    assert_close(y, y_ref.float(), name="ssd y")
    assert_close(s, s_ref.float(), name="ssd state")


@pytest.mark.parametrize("op", ["selective", "ssd"])
def test_scans_hold_float32_precision_at_small_dt(op):
    """At Mamba's initial dt the native scans' float32 state stays as close to float64 as the float32 reference's
    over a prompt's steps (a softplus computed as log(1 + e) put it 8x further)."""
    kw = small_dt_inputs(op, 64)
    if op == "selective":
        spec, ref, names, attrs = SELECTIVE_SCAN, selective_scan_ref, SCAN_INPUTS, {"delta_softplus": 1}
    else:
        spec, ref, names, attrs = SSD_SCAN, ssd_scan_ref, SSD_INPUTS, ssd_attrs(kw)
    _, s = run_native(spec, {k: kw[k] for k in names}, attrs)
    native, reference = state_ulps(s, kw, ref)
    assert native <= 2 * reference + 1, (f"{op}: native state {native:.1f} ulps of its RMS from float64, the float32 "
                                         f"reference {reference:.1f}")


# ------------------------------------------------------------------------------------------ float16
#
# The float16 variants against the references run on the same float16 inputs (which compute in float32 and round
# the activations' outputs to float16, as the kernels do), at the float16 op tolerance of ssmrt.ops.spec; the SSM
# state, float32 in a float16 model, at the same tolerance as the outputs, and the conv state, a copy of inputs,
# exactly. Odd sizes, partial channel blocks, decode steps, and shapes large enough to be split across threads.

F16 = torch.float16


def check_f16(spec, ref, kw, names, attrs, exact_state=False):
    ins = {k: kw[k] for k in names}
    for name, t in ins.items():  # the contract's float32 tensors stay float32, the rest are float16
        fp32 = next(s.fp32 for s in spec.inputs if s.name == name)
        assert t is None or t.dtype == (torch.float32 if fp32 else F16), (name, t.dtype)
    y, state = run_native(spec, ins, attrs)
    y_ref, state_ref = ref(**kw)
    assert y.dtype == y_ref.dtype == F16 and state.dtype == state_ref.dtype
    atol, rtol = tolerance("float16", "op")
    assert_close(y.float(), y_ref.float(), atol=atol, rtol=rtol, name=f"{spec.name} float16 y")
    if exact_state:
        assert torch.equal(state, state_ref)
    else:
        assert_close(state, state_ref, atol=atol, rtol=rtol, name=f"{spec.name} float16 state")
    return y, state


@pytest.mark.parametrize("batch,seqlen,dim,width",
                         [(1, 1, 8, 4), (2, 7, 13, 4), (3, 2, 5, 3), (2, 1, 1536, 4), (2, 301, 24, 4), (2, 5, 7, 1)])
def test_causal_conv1d_float16(batch, seqlen, dim, width):
    kw = conv_inputs(batch, seqlen, dim, width, dtype=F16, seed=seqlen + dim)
    check_f16(CAUSAL_CONV1D, causal_conv1d_ref, kw, ("x", "weight", "bias", "conv_state"), {"activation": "silu"},
              exact_state=True)


@pytest.mark.parametrize("batch,seqlen,dim,dstate,ngroups",
                         [(1, 1, 6, 4, 1), (2, 1, 1536, 16, 1), (2, 5, 37, 5, 1), (3, 40, 24, 8, 2),
                          (2, 300, 256, 16, 1)])
def test_selective_scan_float16(batch, seqlen, dim, dstate, ngroups):
    kw = selective_inputs(batch, seqlen, dim, dstate, ngroups=ngroups, dtype=F16, seed=seqlen + dim)
    check_f16(SELECTIVE_SCAN, selective_scan_ref, kw, SCAN_INPUTS, {"delta_softplus": 1})


def test_selective_scan_float16_without_optional_inputs():
    kw = selective_inputs(2, 6, 12, 4, optional=False, dtype=F16)
    check_f16(SELECTIVE_SCAN, selective_scan_ref, kw, SCAN_INPUTS, {"delta_softplus": 1})


@pytest.mark.parametrize("batch,seqlen,nheads,headdim,dstate,ngroups",
                         [(1, 1, 4, 8, 16, 1), (2, 1, 24, 64, 128, 1), (2, 9, 6, 5, 7, 2), (1, 33, 3, 4, 5, 1),
                          (2, 200, 24, 64, 128, 1)])
@pytest.mark.parametrize("D_per_channel", [False, True])
def test_ssd_scan_float16(batch, seqlen, nheads, headdim, dstate, ngroups, D_per_channel):
    kw = ssd_inputs(batch, seqlen, nheads, headdim, dstate, ngroups=ngroups, D_per_channel=D_per_channel,
                    dt_limit=(0.05, 0.3) if ngroups == 2 else (0.0, math.inf), dtype=F16, seed=seqlen)
    check_f16(SSD_SCAN, ssd_scan_ref, kw, SSD_INPUTS, ssd_attrs(kw))


def test_float16_decode_steps_carry_the_state():
    """Eight float16 decode steps, each fed the state the last returned, against the reference doing the same:
    the float32 state carries no float16 rounding from step to step (an SSM state rounded to float16 each step
    would drift past the tolerance)."""
    kw = ssd_inputs(1, 8, 4, 16, 32, dtype=F16, seed=7)
    state, state_ref = kw["ssm_state"], kw["ssm_state"]
    atol, rtol = tolerance("float16", "op")
    for t in range(8):
        step = {**kw, **{k: kw[k][:, t : t + 1].contiguous() for k in ("x", "dt", "B", "C")}}
        (y, state) = run_native(SSD_SCAN, {**{k: step[k] for k in SSD_INPUTS}, "ssm_state": state}, ssd_attrs(kw))
        y_ref, state_ref = ssd_scan_ref(**{**step, "ssm_state": state_ref})
        assert state.dtype == torch.float32
        assert_close(y.float(), y_ref.float(), atol=atol, rtol=rtol, name=f"step {t} y")
        assert_close(state, state_ref, atol=atol, rtol=rtol, name=f"step {t} state")


def half_matmul_session(trans_b: int, pool: int = 0, **attrs) -> ort.InferenceSession:
    """ssmrt.cpu::HalfMatMul (the float16 runner's decode-step MatMul) alone in a graph."""
    vis = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT16, [f"{n}{i}" for i in range(r)])
           for n, r in (("a", 3), ("b", 2))]
    node = helper.make_node("HalfMatMul", ["a", "b"], ["y"], domain=ort_ops.CPU_DOMAIN, trans_b=trans_b,
                            **attrs)
    model = helper.make_model(
        helper.make_graph([node], "g", vis, [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, None)]),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ort_ops.CPU_DOMAIN, 1)])
    return library_session(model, pool)


# (batch, seqlen, K, N): one row (a decode step) and a few, more rows than one pass takes (4), K not a multiple of
# the four rows of b summed at once, N not a multiple of a vector, and the 130M models' in_proj / lm_head sizes,
# which split over many pieces.
@pytest.mark.parametrize("batch,seqlen,K,N", [(1, 1, 16, 8), (1, 1, 37, 13), (2, 1, 5, 300), (3, 5, 64, 33),
                                              (1, 1, 768, 3352), (1, 1, 1536, 768), (2, 1, 1536, 768),
                                              (1, 1, 768, 50280)])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_half_matmul(batch, seqlen, K, N, trans_b):
    """HalfMatMul against the plain torch reference (float32 matmul of the float16 operands, rounded to float16)."""
    g = torch.Generator().manual_seed(K + N)
    a = torch.randn(batch, seqlen, K, generator=g).half()
    b = (torch.randn(K, N, generator=g) / K**0.5).half()
    want = (a.float() @ b.float()).half()
    (y,) = half_matmul_session(trans_b).run(None, {"a": a.numpy(), "b": (b.t() if trans_b else b).contiguous().numpy()})
    assert y.dtype == np.float16 and y.shape == (batch, seqlen, N)
    atol, rtol = tolerance("float16", "op")
    assert_close(torch.from_numpy(y).float(), want.float(), atol=atol, rtol=rtol, name="HalfMatMul")


# threads: b's rows in one run, two, three (more than a small b has blocks), eight, and in a pool larger than eight
# (a block a thread), in sessions of one and two threads; up to eight the blocks are the same and their partial sums
# are added in block order, so every way gives the same bits. K = 1027: four blocks, the last with the 3 rows left
# over from the groups of four.
@pytest.mark.parametrize("batch,seqlen,K,N", [(1, 1, 768, 3352), (1, 1, 1536, 768), (5, 1, 1536, 768),
                                              (1, 1, 1027, 512), (2, 1, 37, 300)])
def test_half_matmul_threads(batch, seqlen, K, N):
    g = torch.Generator().manual_seed(K * N)
    a = torch.randn(batch, seqlen, K, generator=g).half()
    b = (torch.randn(K, N, generator=g) / K**0.5).half()
    want = (a.float() @ b.float()).half()
    atol, rtol = tolerance("float16", "op")
    first = None
    for threads in (0, 1, 2, 3, 8, 64):
        for pool in (1, 2):
            (y,) = half_matmul_session(0, pool, threads=threads).run(None, {"a": a.numpy(), "b": b.numpy()})
            assert_close(torch.from_numpy(y).float(), want.float(), atol=atol, rtol=rtol,
                         name=f"HalfMatMul threads={threads} in a pool of {pool}")
            first = y if first is None else first
            if threads <= 8:
                assert np.array_equal(y.view(np.uint16), first.view(np.uint16)), (threads, pool)


def test_half_matmul_refuses_negative_threads():
    with pytest.raises(Exception, match="HalfMatMul: attribute threads must be 0 or more, got -1"):
        half_matmul_session(0, threads=-1)


@pytest.mark.parametrize("last_only", [False, True])
def test_route_decode_matmuls_tied_head(last_only):
    """A graph shaped like a tied lm_head (Gather from the embedding, MatMul by its Transpose) after routing: no
    Transpose of the embedding is left (ONNX Runtime would fold it into a second copy), and both branches, a decode
    step's HalfMatMul and a prompt's Gemm over rows (HalfMatMul too where the logits are the last position's, one
    row a sequence), give the float32 product of the float16 operands."""
    V, d = 37, 16
    g = torch.Generator().manual_seed(3)
    emb = (torch.randn(V, d, generator=g) / d**0.5).half()
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
             helper.make_node("Transpose", ["emb"], ["emb_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "emb_t"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64,
                                                                         ["batch", "seq"])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT16, None)],
                              [onnx.numpy_helper.from_array(emb.numpy(), "emb")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert ort_ops.route_decode_matmuls(model, threads=3, last_only=last_only) == 1
    assert [n.op_type for n in model.graph.node if n.op_type in ("Transpose", "MatMul")] == []
    (branch,) = [n for n in model.graph.node if n.op_type == "If"]
    prompt_ops = [n.op_type for a in branch.attribute if a.name == "else_branch" for n in a.g.node]
    assert prompt_ops == ["HalfMatMul"] if last_only else "Gemm" in prompt_ops
    (step,) = [n for a in branch.attribute if a.name == "then_branch" for n in a.g.node]
    assert (step.op_type, helper.get_node_attr_value(step, "threads")) == ("HalfMatMul", 3)
    sess = library_session(model)
    atol, rtol = tolerance("float16", "op")
    for shape in ((2, 1), (2, 5)):  # a decode step, a prompt
        ids = torch.randint(0, V, shape, generator=g)
        (y,) = sess.run(None, {"input_ids": ids.numpy()})
        want = (emb[ids].float() @ emb.float().t()).half()
        assert y.shape == (*shape, V)
        assert_close(torch.from_numpy(y).float(), want.float(), atol=atol, rtol=rtol, name=f"logits {shape}")


def test_route_decode_matmuls_one_if_for_the_step():
    """Routing puts what is downstream of the weight matmuls in one If on "input_ids has one position" (not an If
    a matmul): its then-branch runs them as HalfMatMul, its else-branch as they were, and what does not depend on
    them (the embedding, a value computed from initializers, a graph output made before the first matmul) stays in
    the main graph. A nested If reading a downstream value goes with it. Both branches give the graph's results."""
    V, d, n = 11, 8, 6
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(V, d, generator=g).half()
    w1 = (torch.randn(d, n, generator=g) / d**0.5).half()
    w2 = (torch.randn(n, d, generator=g) / n**0.5).half()
    scale = torch.randn(d, generator=g).half()

    def branch(op):
        return helper.make_graph([helper.make_node(op, ["h", "h"], ["b"])], op, [],
                                 [helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT16, ["batch", "seq", n])])

    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
             helper.make_node("Neg", ["scale"], ["neg_scale"]),  # initializers alone
             helper.make_node("Mul", ["x", "neg_scale"], ["x2"]),
             helper.make_node("Identity", ["x2"], ["early"]),  # a graph output before the first matmul
             helper.make_node("MatMul", ["x2", "w1"], ["h"]),
             helper.make_node("ReduceSum", ["x2"], ["flag_sum"], keepdims=0, noop_with_empty_axes=0),
             helper.make_node("Constant", [], ["zero"], value=onnx.numpy_helper.from_array(np.array(0, np.float16))),
             helper.make_node("Greater", ["flag_sum", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["hb"], then_branch=branch("Add"), else_branch=branch("Mul")),
             helper.make_node("MatMul", ["hb", "w2"], ["y"])]
    f16 = onnx.TensorProto.FLOAT16
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64,
                                                                         ["batch", "seq"])],
                              [helper.make_tensor_value_info("y", f16, ["batch", "seq", d]),
                               helper.make_tensor_value_info("early", f16, ["batch", "seq", d])],
                              [onnx.numpy_helper.from_array(t.numpy(), k)
                               for k, t in (("emb", emb), ("w1", w1), ("w2", w2), ("scale", scale))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    assert ort_ops.route_decode_matmuls(model, threads=2) == 2
    main = [n.op_type for n in model.graph.node]
    assert main.count("If") == 1 and "MatMul" not in main and "HalfMatMul" not in main
    assert {"Gather", "Neg", "Mul", "Identity"} <= set(main)
    (route,) = [n for n in model.graph.node if n.op_type == "If"]
    assert route.name == ort_ops.ROUTED and list(route.output) == ["y"]
    step, prompt = ([n.op_type for n in a.g.node] for name in ("then_branch", "else_branch")
                    for a in route.attribute if a.name == name)
    assert step.count("HalfMatMul") == 2 and "MatMul" not in step and "If" in step
    assert prompt.count("MatMul") == 2 and "HalfMatMul" not in prompt and "If" in prompt
    onnx.checker.check_model(model)
    sess = library_session(model)
    atol, rtol = tolerance("float16", "op")
    for shape in ((2, 1), (1, 4)):  # a decode step, a prompt
        ids = torch.randint(0, V, shape, generator=g)
        y, early = sess.run(None, {"input_ids": ids.numpy()})
        x2 = emb[ids] * -scale
        h = (x2.float() @ w1.float()).half()
        hb = h + h if float(x2.float().sum()) > 0 else h * h  # the If reads h from its branches only
        want = (hb.float() @ w2.float()).half()
        assert np.array_equal(early, x2.numpy())
        assert_close(torch.from_numpy(y).float(), want.float(), atol=atol, rtol=rtol, name=f"y {shape}")


def test_half_matmul_shape_errors():
    with pytest.raises(Exception, match=r"HalfMatMul: A \(1, 1, 8\) and B \(7, 4\) do not multiply"):
        half_matmul_session(0).run(None, {"a": np.zeros((1, 1, 8), np.float16), "b": np.zeros((7, 4), np.float16)})


def int8_matmul_model(op: str, K: int, N: int, block: int, zero_points: bool, **attrs) -> onnx.ModelProto:
    """One op node (ssmrt.cpu::Int8MatMul, or com.microsoft::MatMulNBits with bits 8 at accuracy level 0) over
    graph inputs a, b, scales (and zero_points)."""
    u8, f32 = onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT
    # dimensions by name, so that shapes ONNX Runtime would refuse itself reach the op
    vis = [helper.make_tensor_value_info("a", f32, ["batch", "seq", "k"]),
           helper.make_tensor_value_info("b", u8, ["n", "blocks", "block"]),
           helper.make_tensor_value_info("scales", f32, None)]  # any rank: they may be flat
    if zero_points:
        vis.append(helper.make_tensor_value_info("zero_points", u8, None))
    domain = ort_ops.CPU_DOMAIN if op == "Int8MatMul" else "com.microsoft"
    extra = {} if op == "Int8MatMul" else {"bits": 8, "accuracy_level": 0}
    node = helper.make_node(op, [v.name for v in vis], ["y"], domain=domain,
                            **{"K": K, "N": N, "block_size": block, **extra, **attrs})
    return helper.make_model(
        helper.make_graph([node], "g", vis, [helper.make_tensor_value_info("y", f32, None)]),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)])


def int8_operands(batch, seqlen, K, N, block, seed=0):
    """Random activations, codes (those past K in the last block nonzero: unused), scales and zero points."""
    g = np.random.default_rng(seed)
    blocks = -(-K // block)
    return {"a": g.standard_normal((batch, seqlen, K)).astype(np.float32),
            "b": g.integers(0, 256, (N, blocks, block), dtype=np.uint8),
            "scales": (g.random((N, blocks)) * 0.02 + 1e-3).astype(np.float32),
            "zero_points": g.integers(0, 256, (N, blocks), dtype=np.uint8)}


def int8_matmul_ref(a, b, scales, zero_points=None):
    """a @ W in float64, W[k][n] = scale[n][k // block] * (code[n][k] - zero point), as MatMulNBits dequantises."""
    N, blocks, block = b.shape
    K = a.shape[-1]
    zp = np.full((N, blocks), 128.0) if zero_points is None else zero_points.astype(np.float64)
    w = (scales.astype(np.float64)[..., None] * (b.astype(np.float64) - zp[..., None])).reshape(N, -1)[:, :K]
    return a.astype(np.float64) @ w.T


# (batch, seqlen, K, N, block): a decode step's row at the 130M models' in_proj / out_proj / head sizes, a few rows
# and more than the four that share a pass (15: passes of 4, 4, 4, 3), K not a multiple of the block (codes past
# K in the last block), K not a multiple of a vector, blocks of 16 / 64 / 128, N odd, one row of an odd number of
# whole blocks of 32 (a row's two chains take blocks in pairs: the last whole block alone), and one row of an odd
# number and a part. One row with AVX-512 runs each block's whole 32-code stretches in 512-bit registers and the
# rest in 256-bit ones: a part of 4 codes (scalar only), of 24 (256-bit only), of 44 in a block of 128 (both and
# a scalar tail), blocks of 16 (256-bit only) and of 64 (two wide stretches a block).
@pytest.mark.parametrize("batch,seqlen,K,N,block", [(1, 1, 768, 3352, 32), (1, 1, 1536, 768, 32),
                                                    (1, 1, 768, 50280, 32), (1, 1, 96, 13, 32), (1, 1, 100, 37, 32),
                                                    (1, 1, 120, 11, 32), (1, 1, 48, 13, 16), (1, 1, 200, 9, 64),
                                                    (2, 1, 100, 37, 32),
                                                    (3, 5, 48, 13, 16), (1, 1, 300, 20, 128), (2, 1, 37, 9, 64),
                                                    (1, 3, 64, 300, 64)])
@pytest.mark.parametrize("zero_points", [True, False])
def test_int8_matmul(batch, seqlen, K, N, block, zero_points):
    """Int8MatMul against the float64 product with the dequantised weight, and against ONNX Runtime's own
    MatMulNBits (bits 8, float32 activations) on the same operands, at the float32 op tolerance of the sums'
    size; without zero points the codes' middle, 128, as MatMulNBits takes it."""
    ops = int8_operands(batch, seqlen, K, N, block, seed=K + N + block)
    if not zero_points:
        del ops["zero_points"]
    (y,) = library_session(int8_matmul_model("Int8MatMul", K, N, block, zero_points)).run(None, ops)
    assert y.dtype == np.float32 and y.shape == (batch, seqlen, N)
    want = int8_matmul_ref(**ops)
    (theirs,) = ort.InferenceSession(int8_matmul_model("MatMulNBits", K, N, block, zero_points).SerializeToString(),
                                     providers=["CPUExecutionProvider"]).run(None, ops)
    atol, rtol = tolerance("float32", "op")
    # the sums' own size: a float32 sum of K products errs in proportion to the sum of their magnitudes
    weight = int8_matmul_ref(np.eye(K, dtype=np.float32), **{k: v for k, v in ops.items() if k != "a"})  # (K, N)
    size = np.abs(ops["a"]).astype(np.float64) @ np.abs(weight)
    for name, got in (("Int8MatMul", y), ("MatMulNBits", theirs)):
        err = np.abs(got - want) / np.maximum(size, 1e-30)
        assert err.max() < rtol, (name, float(err.max()))
    assert_close(torch.from_numpy(y), torch.from_numpy(theirs), atol=atol * float(size.max()), rtol=rtol,
                 name="Int8MatMul against MatMulNBits")


def threads_seen(lib, session, feeds, threads: int):
    """(the most distinct threads the library saw run pieces in one run, that run's outputs), running until it has
    seen `threads` or 20 times: the pool's second thread may find the pieces all taken in a short run."""
    best = 0
    for _ in range(20):
        lib.SsmrtPoolThreadsReset()
        outs = session.run(None, feeds)
        best = max(best, lib.SsmrtPoolThreadsSeen())
        if best >= threads:
            break
    return best, outs


def test_int8_matmul_threads():
    """Int8MatMul's column runs spread over the session's threads (counted by the library), each column's sum one
    thread's in a fixed order: a pool of one and of two give the reference's values and the same bits."""
    import ctypes

    lib = ctypes.CDLL(str(native_library()))
    ops = int8_operands(4, 1, 1536, 3352, 32, seed=1)  # runs long enough for the pool's second thread to join
    model = int8_matmul_model("Int8MatMul", 1536, 3352, 32, True)
    want = int8_matmul_ref(**ops)
    results, seen = [], {}
    for threads in (1, 2):
        session = library_session(model, threads)
        seen[threads], (y,) = threads_seen(lib, session, ops, threads)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
        results.append(y)
    assert seen == {1: 1, 2: 2}, seen
    assert np.array_equal(*results)


def test_int8_matmul_takes_flat_scales():
    """Scales and zero points flat, (N * blocks,), as older quantisers packed MatMulNBits' and it still takes them:
    the same values as the (N, blocks) ones."""
    ops = int8_operands(1, 1, 100, 37, 32, seed=4)
    flat = {**ops, "scales": ops["scales"].reshape(-1), "zero_points": ops["zero_points"].reshape(-1)}
    session = library_session(int8_matmul_model("Int8MatMul", 100, 37, 32, True))
    (y,), (y_flat,) = session.run(None, ops), session.run(None, flat)
    assert np.array_equal(y, y_flat)
    with pytest.raises(Exception, match=r"Int8MatMul: scales must be \(37, 4\) or flat"):
        session.run(None, {**ops, "scales": ops["scales"].reshape(-1)[:-1]})


def test_int8_matmul_errors():
    ops = int8_operands(1, 1, 64, 8, 32)
    with pytest.raises(Exception, match=r"Int8MatMul: B must be \(9, 2, 32\) \(N 9, K 64, block_size 32\), got "
                                        r"\(8, 2, 32\)"):
        library_session(int8_matmul_model("Int8MatMul", 64, 9, 32, True)).run(None, ops)
    with pytest.raises(Exception, match=r"Int8MatMul: A \(1, 1, 64\) must end in K 63"):
        library_session(int8_matmul_model("Int8MatMul", 63, 8, 32, True)).run(None, ops)
    with pytest.raises(Exception, match="Int8MatMul: attribute block_size must be 1 or more, got 0"):
        library_session(int8_matmul_model("Int8MatMul", 64, 8, 32, True, block_size=0))


def int_dot_model(op: str, K: int, N: int, block: int, bits: int, weights: dict, **attrs) -> onnx.ModelProto:
    """One op node (ssmrt.cpu::IntDotMatMul, or com.microsoft::MatMulNBits at accuracy level 4) over the graph
    input a and the weights as initializers: ONNX Runtime's kernel quantises the activations only where its
    weights are constant (given as graph inputs it computes in float32)."""
    f32 = onnx.TensorProto.FLOAT
    names = ["b", "scales", "zero_points"][:len(weights)]
    domain = ort_ops.CPU_DOMAIN if op == "IntDotMatMul" else "com.microsoft"
    extra = {"bits": bits} if op == "IntDotMatMul" else {"bits": bits, "accuracy_level": 4}
    node = helper.make_node(op, ["a", *names], ["y"], domain=domain,
                            **{"K": K, "N": N, "block_size": block, **extra, **attrs})
    inits = [onnx.numpy_helper.from_array(weights[k], k) for k in names]
    return helper.make_model(
        helper.make_graph([node], "g", [helper.make_tensor_value_info("a", f32, ["batch", "seq", "k"])],
                          [helper.make_tensor_value_info("y", f32, None)], inits),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(domain, 1)])


def int_dot_operands(batch, seqlen, K, N, block, bits, zero_points=True, seed=0):
    """Random activations (rows of mixed scale, a block of zeros) and MatMulNBits weights of `bits`: codes (those
    past K nonzero: unused), scales, zero points (4-bit: two a byte)."""
    g = np.random.default_rng(seed)
    blocks = -(-K // block)
    a = g.standard_normal((batch, seqlen, K)).astype(np.float32)
    a *= np.float32(10.0) ** g.integers(-3, 3, (batch, seqlen, 1))
    if K > block:  # a block of zeros (not the row's only one)
        a[0, 0, :block] = 0
    weights = {"b": g.integers(0, 256, (N, blocks, block * bits // 8), dtype=np.uint8),
               "scales": (g.random((N, blocks)) * 0.02 + 1e-3).astype(np.float32)}
    if zero_points:
        weights["zero_points"] = g.integers(0, 256, (N, blocks if bits == 8 else (blocks + 1) // 2), dtype=np.uint8)
    return a, weights


def int_dot_ref(a, bits, b, scales, zero_points=None):
    """(the scheme's product in float64, the sum of its terms' magnitudes, the product of the float activations):
    each block of a row's K quantised as MatMulNBits at accuracy level 4 quantises it in float32 (codes
    round-half-even(a * (127 / max|a|)), scale max|a| / 127), times the weight's codes less their zero points, times
    both scales."""
    N, blocks, _ = b.shape
    K = a.shape[-1]
    block = blocks and b.shape[2] * 8 // bits
    codes_w = b if bits == 8 else np.stack([b & 0x0F, b >> 4], axis=-1).reshape(N, blocks, block)
    if zero_points is None:
        zp = np.full((N, blocks), 1 << (bits - 1))
    elif bits == 8:
        zp = zero_points.reshape(N, blocks)
    else:
        zp = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(N, -1)[:, :blocks]
    rows = np.zeros((a[..., 0].size, blocks * block), np.float32)
    rows[:, :K] = a.reshape(-1, K)
    rows = rows.reshape(-1, blocks, block)
    amax = np.abs(rows).max(-1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    codes_a = np.rint(rows * inv[..., None]).astype(np.int64)
    w = codes_w.astype(np.int64) - zp[..., None].astype(np.int64)
    scale = (amax / np.float32(127)).astype(np.float64)[:, None, :] * scales.reshape(N, blocks).astype(np.float64)
    terms = np.einsum("mbk,nbk->mnb", codes_a, w) * scale
    size = np.einsum("mbk,nbk->mnb", np.abs(codes_a), np.abs(w)) * np.abs(scale)
    shape = (*a.shape[:-1], N)
    weight = (scales.reshape(N, blocks, 1).astype(np.float64) * w).reshape(N, -1)[:, :K]
    plain = a.reshape(-1, K).astype(np.float64) @ weight.T
    return terms.sum(-1).reshape(shape), size.sum(-1).reshape(shape), plain.reshape(shape)


# (batch, seqlen, K, N, block): the 130M models' in_proj / out_proj / head sizes in a decode step; rows more than
# the four that share a pass; whole quads of 32-code chunks and then a tail of 1-3 chunks on the plain loop (K 160:
# five blocks, so 4-bit zero points end in half a byte; K 192 in blocks of 64; K 200 in one block of 512), only the
# tail (K 96, 37), K not a multiple of 32 (100, 37, 300, 1000); blocks of 64 / 128 / 256 / 512 (two, one, half and
# a quarter of a block a quad); N odd
INT_DOT_SHAPES = [(1, 1, 768, 3352, 32), (1, 1, 1536, 768, 32), (1, 1, 768, 50280, 32), (2, 1, 100, 37, 32),
                  (3, 5, 96, 13, 32), (1, 3, 300, 20, 128), (2, 1, 37, 9, 64), (1, 2, 1000, 50, 256),
                  (1, 1, 160, 37, 32), (2, 1, 192, 20, 64), (1, 1, 200, 9, 512)]


@pytest.mark.parametrize("batch,seqlen,K,N,block", INT_DOT_SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("zero_points", [True, False])
def test_int_dot_matmul(batch, seqlen, K, N, block, bits, zero_points):
    """IntDotMatMul against the scheme computed in float64 and against ONNX Runtime's own MatMulNBits at accuracy
    level 4 on the same weights, each within float32 rounding of the sums' size: both compute the same codes and,
    per block, an exact integer sum, so what is left is a float32 sum of the blocks' terms (a few ulps a term). The
    float activations' product is tens of times further, so the comparison can fail."""
    a, weights = int_dot_operands(batch, seqlen, K, N, block, bits, zero_points, seed=K + N + block + bits)
    (y,) = library_session(int_dot_model("IntDotMatMul", K, N, block, bits, weights)).run(None, {"a": a})
    assert y.dtype == np.float32 and y.shape == (batch, seqlen, N)
    (theirs,) = ort.InferenceSession(int_dot_model("MatMulNBits", K, N, block, bits, weights).SerializeToString(),
                                     providers=["CPUExecutionProvider"]).run(None, {"a": a})
    want, size, plain = int_dot_ref(a, bits, **weights)
    size = np.maximum(size, 1e-30)
    bound = 4 * (-(-K // block) + 2) * 2.0**-24
    for name, got in (("IntDotMatMul", y), ("MatMulNBits", theirs)):
        err = np.abs(got - want) / size
        assert err.max() < bound, (name, float(err.max()), bound)
    assert (np.abs(plain - want) / size).max() > 20 * bound


def test_int_dot_matmul_threads():
    """IntDotMatMul's column runs spread over the session's threads (counted by the library), each column's sum one
    thread's in a fixed order: a pool of one and of two give the same bits."""
    import ctypes

    lib = ctypes.CDLL(str(native_library()))
    a, weights = int_dot_operands(4, 1, 1536, 3352, 32, 4, seed=1)
    model = int_dot_model("IntDotMatMul", 1536, 3352, 32, 4, weights)
    results, seen = [], {}
    for threads in (1, 2):
        session = library_session(model, threads)
        seen[threads], (y,) = threads_seen(lib, session, {"a": a}, threads)
        results.append(y)
    assert seen == {1: 1, 2: 2}, seen
    assert np.array_equal(*results)


def test_int_dot_matmul_takes_flat_scales_and_zero_points():
    """Scales and zero points flat, as older quantisers packed MatMulNBits' (4-bit zero points two a byte): the
    same values as the 2-D ones."""
    a, weights = int_dot_operands(1, 1, 160, 37, 32, 4, seed=4)  # 5 blocks: 3 bytes of zero points a column
    flat = {k: v.reshape(-1) if k != "b" else v for k, v in weights.items()}
    (y,) = library_session(int_dot_model("IntDotMatMul", 160, 37, 32, 4, weights)).run(None, {"a": a})
    (y_flat,) = library_session(int_dot_model("IntDotMatMul", 160, 37, 32, 4, flat)).run(None, {"a": a})
    assert np.array_equal(y, y_flat)
    short = {**flat, "zero_points": flat["zero_points"][:-1]}
    with pytest.raises(Exception, match=r"IntDotMatMul: zero_points must be \(37, 3\) or flat \(N 37, K 160, "
                                        r"block_size 32, bits 4\), got \(110,\)"):
        library_session(int_dot_model("IntDotMatMul", 160, 37, 32, 4, short)).run(None, {"a": a})


def test_int_dot_matmul_errors():
    a, weights = int_dot_operands(1, 1, 64, 8, 32, 4)
    with pytest.raises(Exception, match=r"IntDotMatMul: B must be \(8, 2, 32\) \(N 8, K 64, block_size 32, bits 8\), "
                                        r"got \(8, 2, 16\)"):
        library_session(int_dot_model("IntDotMatMul", 64, 8, 32, 8, weights)).run(None, {"a": a})
    for attrs, why in (({"block_size": 16}, "block_size must be a power of two from 32, got 16"),
                       ({"block_size": 96}, "block_size must be a power of two from 32, got 96"),
                       ({"bits": 3}, "bits must be 4 or 8, got 3")):
        with pytest.raises(Exception, match=f"IntDotMatMul: attribute {why}"):
            library_session(int_dot_model("IntDotMatMul", 64, 8, attrs.get("block_size", 32), attrs.get("bits", 4),
                                          weights))
    with pytest.raises(Exception, match="IntDotMatMul: attribute bits must be 4 or 8, got 0"):
        library_session(int_dot_model("IntDotMatMul", 64, 8, 32, 0, weights))


def cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo to read the CPU's instruction sets from")
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def expected_int_dot_path(flags: set[str]) -> str:
    """The code IntDotMatMul's build for a CPU with these flags compiles (-march=native)."""
    if not {"avx2", "fma"} <= flags:
        return "scalar"
    if {"avx512_vnni", "avx512bw", "avx512vl"} <= flags:
        return "avx512-vnni"
    return "avx-vnni" if "avx_vnni" in flags else "avx2"


# Builds of the library for the instruction sets other CPUs have, on this one (x86-64): flags the wrapper adds,
# and the CPU flags they take away
OTHER_BUILDS = {"avx-vnni": ("-mno-avx512f", {"avx512_vnni"}),
                "avx2": ("-mno-avx512f -mno-avxvnni", {"avx512_vnni", "avx_vnni"}),
                "no-avx": ("-mno-avx", {"avx2"})}


@pytest.mark.slow
@pytest.mark.parametrize("build", list(OTHER_BUILDS))
def test_quantised_matmuls_on_other_instruction_sets(build, tmp_path):
    """test_int_dot_matmul's and test_int8_matmul's cases against a library built without AVX-512 (and AVX-VNNI,
    and AVX): the code paths this CPU's own build never takes (Int8MatMul's one row in 256-bit registers among
    them), compiled with the same compiler ($CXX through a wrapper adding the flags) into a separate cache, run in a
    child process; the build says which code it compiled."""
    import os
    import platform
    import subprocess
    import sys

    if platform.machine() != "x86_64":
        pytest.skip("the flags are x86-64 ones")
    flags, removed = OTHER_BUILDS[build]
    compiler = ort_ops._compiler()
    wrapper = tmp_path / "cxx"
    wrapper.write_text(f'#!/bin/sh\nexec "{compiler}" "$@" {flags}\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "CXX": str(wrapper), "SSMRT_CACHE_DIR": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "(test_int_dot_matmul or test_int8_matmul) and not threads and not other_instruction_sets"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and " passed" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:]
    assert "skipped" not in res.stdout.splitlines()[-1], res.stdout[-500:]
    (library,) = (tmp_path / "cache").glob(f"ort_ops/*/{ort_ops.LIBRARY}")
    assert ort_ops.int_dot_path(library) == expected_int_dot_path(cpu_flags() - removed)


def test_int_dot_path_matches_the_cpu():
    """The library's IntDotMatMul code is the one its CPU's instruction sets call for (-march=native), and the
    runner routes to it exactly where that is vector code."""
    native_library()
    path = ort_ops.int_dot_path()
    assert path == expected_int_dot_path(cpu_flags())
    assert ort_ops.int_dot_vectorised() == (path != "scalar")


@pytest.mark.parametrize("int_dot", [False, True])
@pytest.mark.parametrize("last_only", [False, True])
def test_route_decode_matmuls_int8(last_only, int_dot):
    """Routing a graph of MatMulNBits: the 8-bit ones with float32 activations (accuracy level 0) run on Int8MatMul
    in the decode step's branch and as they were in the prompt's; with int_dot the int8-activation ones (accuracy
    level 4, 8- and 4-bit; the head then too) on IntDotMatMul, else they are left alone; a bias-carrying one and one
    in blocks of 16 always are; with last_only the head (the graph's output) runs on its native op in the prompt
    too. Both branches give the graph's results."""
    V, K, N, block = 11, 64, 24, 32
    g = np.random.default_rng(2)
    emb = g.standard_normal((V, K)).astype(np.float32)
    w = {"w1": int8_operands(1, 1, K, N, block, seed=1), "w2": int8_operands(1, 1, N, K, block, seed=9),
         "w3": int8_operands(1, 1, K, K, block, seed=3), "w5": int8_operands(1, 1, K, K, block, seed=5),
         "w6": int8_operands(1, 1, K, N, block, seed=6), "w7": int8_operands(1, 1, K, K, 16, seed=7)}
    w4 = {"b": g.integers(0, 256, (K, 2, block // 2), dtype=np.uint8),  # 4-bit: two codes a byte
          "scales": (g.random((K, 2)) * 0.1).astype(np.float32), "zero_points": np.full((K, 1), 0x88, np.uint8)}
    f32 = onnx.TensorProto.FLOAT
    inits = [onnx.numpy_helper.from_array(emb, "emb"), onnx.numpy_helper.from_array(
        g.standard_normal(K).astype(np.float32), "bias")]
    for name, ops in [*w.items(), ("w4", w4)]:
        inits += [onnx.numpy_helper.from_array(ops[k], f"{name}.{k}") for k in ("b", "scales", "zero_points")]

    def nbits(name, a, y, k, n, extra=(), bits=8, block=block, **attrs):
        return helper.make_node("MatMulNBits", [a] + [f"{name}.{x}" for x in ("b", "scales", "zero_points")]
                                + list(extra), [y], domain="com.microsoft", K=k, N=n, block_size=block, bits=bits,
                                **attrs)

    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
             nbits("w1", "x", "h", K, N, accuracy_level=0),
             helper.make_node("Relu", ["h"], ["r"]),
             nbits("w2", "r", "h2", N, K),  # no accuracy_level: 0
             nbits("w3", "h2", "h3", K, K, accuracy_level=4),  # int8 activations: MatMulNBits' integer kernel
             nbits("w4", "h3", "h4", K, K, bits=4, accuracy_level=4),  # 4-bit weights, int8 activations
             nbits("w5", "h4", "h5", K, K, extra=("", "bias")),  # a bias (g_idx absent)
             nbits("w7", "h5", "h7", K, K, accuracy_level=4, block=16),  # blocks IntDotMatMul does not take
             nbits("w6", "h7", "y", K, N, accuracy_level=4 if int_dot else 0)]  # the head
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64,
                                                                         ["batch", "seq"])],
                              [helper.make_tensor_value_info("y", f32, ["batch", "seq", N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert ort_ops.route_decode_matmuls(model, last_only=last_only, int_dot=int_dot) == 3 + 2 * int_dot
    (route,) = [n for n in model.graph.node if n.op_type == "If"]
    step, prompt = ([n.op_type for n in a.g.node] for name in ("then_branch", "else_branch")
                    for a in route.attribute if a.name == name)
    dot = ["IntDotMatMul" if int_dot else "MatMulNBits"] * 2
    head = "IntDotMatMul" if int_dot else "Int8MatMul"
    assert step == ["Int8MatMul", "Relu", "Int8MatMul", *dot] + ["MatMulNBits"] * 2 + [head]
    assert prompt == ["MatMulNBits", "Relu"] + ["MatMulNBits"] * 5 + [head if last_only else "MatMulNBits"]
    if int_dot:
        routed = [n for a in route.attribute if a.name == "then_branch" for n in a.g.node
                  if n.op_type == "IntDotMatMul"]
        assert [[x.i for x in n.attribute if x.name == "bits"] for n in routed] == [[8], [4], [8]]
    sess = library_session(model)
    for shape in ((2, 1), (1, 4)):  # a decode step, a prompt
        ids = np.random.default_rng(sum(shape)).integers(0, V, shape)
        (y,) = sess.run(None, {"input_ids": ids})
        (want,) = plain.run(None, {"input_ids": ids})
        assert_close(torch.from_numpy(y), torch.from_numpy(want), atol=1e-4 * float(np.abs(want).max()), rtol=1e-4,
                     name=f"y {shape}")


def test_a_float16_input_where_the_contract_keeps_float32_is_refused():
    """A float16 SSM state matches neither registered variant: ONNX Runtime refuses the node rather than run it."""
    kw = ssd_inputs(1, 2, 4, 8, 16, dtype=F16)
    ins = {**{k: kw[k] for k in SSD_INPUTS}, "ssm_state": kw["ssm_state"].half()}
    with pytest.raises(Exception, match="(?i)type|implementation"):
        run_native(SSD_SCAN, ins, ssd_attrs(kw))


def half_convert(values: np.ndarray, direction: int, portable: int) -> np.ndarray:
    """SsmrtHalfConvert (ops.cc): direction 0 float16 bits -> float32, 1 float32 -> float16 bits."""
    import ctypes

    lib = ctypes.CDLL(str(native_library()))
    lib.SsmrtHalfConvert.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    values = np.ascontiguousarray(values)
    out = np.empty(values.shape, np.float32 if direction == 0 else np.uint16)
    lib.SsmrtHalfConvert(values.ctypes.data, out.ctypes.data, values.size, direction, portable)
    return out


@pytest.mark.parametrize("portable", [1, 0], ids=["integer", "fast"])
def test_half_conversions_round_as_numpy_does(portable):
    """Both conversion paths (the integer reference and the F16C one where built) against numpy, bit for bit:
    every float16 value widened, and narrowing of every float16 value, each halfway point between neighbours
    (ties to even), a float either side of it, subnormals, overflow, infinities and NaN."""
    every = np.arange(1 << 16, dtype=np.uint16)
    want = every.view(np.float16).astype(np.float32)
    got = half_convert(every, 0, portable)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))

    finite = want[np.isfinite(want)]
    pos = np.unique(np.abs(finite))
    mids = ((pos[:-1].astype(np.float64) + pos[1:]) / 2).astype(np.float32)  # exact: a float holds each midpoint
    near = np.concatenate([np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(0))])
    rng = np.random.default_rng(0)
    wide = (rng.standard_normal(200_000) * np.exp2(rng.uniform(-30, 18, 200_000))).astype(np.float32)
    special = np.array([65504, 65519.996, 65520, 65536, 1e30, np.inf, 2**-24, 2**-25, 2**-25 * 1.0000001, 2**-26,
                        6.1035156e-05, 6.097555e-05, 1e-30, 0.0], np.float32)
    floats = np.concatenate([finite, mids, near, wide, special])
    floats = np.concatenate([floats, -floats, np.array([np.nan], np.float32)])
    got = half_convert(floats, 1, portable)
    with np.errstate(over="ignore"):  # the floats past 65520 are there to overflow
        want = floats.astype(np.float16).view(np.uint16)
    nan = np.isnan(floats)
    assert np.isnan(got[nan].view(np.float16)).all()
    bad = np.flatnonzero(got[~nan] != want[~nan])
    assert bad.size == 0, [(floats[~nan][i], got[~nan][i], want[~nan][i]) for i in bad[:5]]


def test_shape_errors_name_the_op_and_the_input():
    kw = conv_inputs(2, 3, 8, 4)
    ins = {k: kw[k] for k in ("x", "weight", "bias", "conv_state")}
    ins["conv_state"] = ins["conv_state"][:, :, :2].contiguous()
    with pytest.raises(Exception) as e:
        run_native(CAUSAL_CONV1D, ins, {"activation": "silu"})
    print(e.value)
    assert "ssmrt::CausalConv1d: input conv_state has shape (2, 8, 2), expected (2, 8, 3)" in str(e.value)

    kw = selective_inputs(1, 4, 6, 4, ngroups=1)
    ins = {k: kw[k] for k in SCAN_INPUTS}
    ins["B"] = torch.randn(1, 4, 4, 4)  # 4 groups do not divide dim 6
    ins["C"] = ins["B"]
    with pytest.raises(Exception) as e:
        run_native(SELECTIVE_SCAN, ins, {"delta_softplus": 1})
    print(e.value)
    assert "ssmrt::SelectiveScan: ngroups (4, from B) must divide dim (6)" in str(e.value)

    kw = ssd_inputs(1, 3, 4, 8, 16)
    ins = {k: kw[k] for k in SSD_INPUTS}
    ins["D"] = torch.randn(4, 7)
    with pytest.raises(Exception) as e:
        run_native(SSD_SCAN, ins, ssd_attrs(kw))
    print(e.value)
    assert "ssmrt::SSDScan: input D has shape (4, 7), expected (4, 8) (nheads,) or (nheads, headdim)" in str(e.value)


def test_attribute_errors():
    kw = conv_inputs(1, 2, 4, 4)
    with pytest.raises(Exception, match=r'ssmrt::CausalConv1d: attribute activation must be "silu" or "none", '
                                        r'got "relu"'):
        native_session(CAUSAL_CONV1D, {k: kw[k].numpy() for k in ("x", "weight", "bias", "conv_state")},
                       {"activation": "relu"})
    kw = selective_inputs(1, 2, 4, 4)
    with pytest.raises(Exception, match="ssmrt::SelectiveScan: attribute delta_softplus must be 0 or 1, got 2"):
        native_session(SELECTIVE_SCAN, {k: kw[k].numpy() for k in SCAN_INPUTS}, {"delta_softplus": 2})
    kw = ssd_inputs(1, 2, 4, 8, 16)
    with pytest.raises(Exception, match="ssmrt::SSDScan: attributes dt_min / dt_max must satisfy"):
        native_session(SSD_SCAN, {k: kw[k].numpy() for k in SSD_INPUTS},
                       {**ssd_attrs(kw), "dt_min": 0.5, "dt_max": 0.1})


def test_library_is_built_once_per_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSMRT_CACHE_DIR", str(tmp_path))
    first = native_library()
    assert first.is_relative_to(tmp_path) and first.is_file()
    mtime = first.stat().st_mtime_ns
    assert ort_ops.library_path() == first and first.stat().st_mtime_ns == mtime
    # the library and its build record, no temporary left
    assert sorted(p.name for p in first.parent.iterdir()) == [ort_ops.LIBRARY, ort_ops.LIBRARY + ort_ops.DIGEST_SUFFIX]


def test_without_a_compiler_runners_fall_back_or_refuse(tmp_path, monkeypatch):
    from test_models import random_lm

    from ssmrt.exporter import export_model
    from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact

    art = export_model(random_lm(arch="mamba1"), tmp_path / "art")
    monkeypatch.setenv("SSMRT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(ort_ops.NativeOpsUnavailable, match="no C\\+\\+ compiler"):
        ort_ops.library_path()
    runner = OnnxRuntimeRunnerFromArtifact(art)
    print(runner.describe(), "|", runner.native_ops_note)
    assert runner.native_ops == () and "no-such-compiler" in runner.native_ops_note
    with pytest.raises(SsmrtError, match="native ops asked for, but no C\\+\\+ compiler"):
        OnnxRuntimeRunnerFromArtifact(art, native_ops="on")
    logits, _ = runner.forward(np.ones((1, 3), np.int64), runner.zero_state(1))  # the bodies run
    assert np.isfinite(logits).all()


def test_an_unwritable_cache_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("SSMRT_CACHE_DIR", str(blocker))
    with pytest.raises(ort_ops.NativeOpsUnavailable, match="cannot build into .*not-a-directory.*SSMRT_CACHE_DIR"):
        ort_ops.library_path()


def test_native_ops_apply_to_float32_and_float16_cpu_artifacts_with_a_float32_state(tmp_path):
    from test_models import random_lm

    from ssmrt.exporter import export_model
    from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact

    native_library()
    model = random_lm(arch="mamba1")
    f32 = OnnxRuntimeRunnerFromArtifact(export_model(model, tmp_path / "f32"))
    assert f32.native_ops == ("CausalConv1d", "SelectiveScan") and "native" in f32.describe()  # no SSDScan in it
    f16 = OnnxRuntimeRunnerFromArtifact(export_model(model, tmp_path / "f16", dtype="float16"), native_ops="on")
    assert f16.native_ops == ("CausalConv1d", "SelectiveScan") and "float16" in f16.describe()
    export_model(model, tmp_path / "f16-state", dtype="float16", state_dtype="float16")
    assert OnnxRuntimeRunnerFromArtifact(tmp_path / "f16-state").native_ops == ()
    with pytest.raises(SsmrtError, match="keep the SSM state float32.* this artifact's is float16"):
        OnnxRuntimeRunnerFromArtifact(tmp_path / "f16-state", native_ops="on")
    export_model(model, tmp_path / "bf16", dtype="bfloat16")
    with pytest.raises(SsmrtError, match="float32 and float16 kernels and this artifact is bfloat16"):
        OnnxRuntimeRunnerFromArtifact(tmp_path / "bf16", native_ops="on")
    m2 = OnnxRuntimeRunnerFromArtifact(export_model(random_lm(arch="mamba2"), tmp_path / "m2"))
    assert m2.native_ops == ("CausalConv1d", "SSDScan")
    with pytest.raises(SsmrtError, match="native_ops must be one of auto, on, off"):
        OnnxRuntimeRunnerFromArtifact(tmp_path / "f32", native_ops="yes")


def test_abi_slots_match_this_onnxruntime():
    """ort_abi.h numbers ONNX Runtime's function table by hand; through the same numbering, slot 254 must be
    GetBuildInfoString of the installed ONNX Runtime (and everything below it, which the op tests use, with it)."""
    import ctypes
    from pathlib import Path

    capi = Path(ort.__file__).parent / "capi"
    found = sorted(capi.glob("libonnxruntime.so*"))
    if not found:
        pytest.skip(f"this onnxruntime wheel has no libonnxruntime.so in {capi}")
    runtime = ctypes.CDLL(str(found[0]))
    runtime.OrtGetApiBase.restype = ctypes.c_void_p
    library = ctypes.CDLL(str(native_library()))
    library.SsmrtOrtAbiCheck.restype = ctypes.c_char_p
    library.SsmrtOrtAbiCheck.argtypes = [ctypes.c_void_p]
    info = library.SsmrtOrtAbiCheck(runtime.OrtGetApiBase()).decode()
    print(info)
    assert info.startswith("ORT Build Info")


def test_results_do_not_depend_on_the_thread_count():
    """The kernels split their work over ONNX Runtime's intra-op threads in pieces that never share a value: one
    thread and several give the same bits."""
    kw = ssd_inputs(2, 64, 8, 16, 32, seed=3)
    feeds = {k: kw[k].numpy() for k in SSD_INPUTS}  # 16 (batch, head) pieces of 64 x 16 x 32 updates
    outs = []
    for threads in (1, 2, 4):
        outs.append(native_session(SSD_SCAN, feeds, ssd_attrs(kw), threads=threads).run(None, feeds))
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            assert np.array_equal(a, b)


def abi_probe(threads: int, inputs: list[np.ndarray], fail: int = 0) -> np.ndarray:
    """ssmrt.abi_probe::AbiProbe (ops.cc) run once: its (8,) output."""
    names = [f"x{i}" for i in range(len(inputs))]
    node = helper.make_node("AbiProbe", names, ["y"], domain="ssmrt.abi_probe", f=1.5, i=-7, s="abc",
                            fail=fail)
    graph = helper.make_graph([node], "probe",
                              [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, list(x.shape))
                               for n, x in zip(names, inputs, strict=True)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("ssmrt.abi_probe", 1)])
    return library_session(model, threads).run(None, dict(zip(names, inputs, strict=True)))[0]


def test_every_abi_slot_the_library_calls_behaves_as_named():
    """ort_abi.h numbers ONNX Runtime's function table by hand. The probe op calls every slot the library uses
    and reports what each returned: a wrong slot number would give a wrong value (or no op at all)."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = abi_probe(2, [x, np.zeros(4, np.float32)])
    # the session found the op: CreateCustomOpDomain, CustomOpDomainAdd, AddCustomOpDomain
    f, i, slen, n_inputs, elem_type, rank, total, threads = out.tolist()
    assert (f, i, slen) == (1.5, -7.0, 3.0)          # KernelInfoGetAttribute Float / Int64 / String
    assert n_inputs == 2.0                            # KernelContext_GetInputCount
    assert elem_type == onnx.TensorProto.FLOAT        # GetTensorTypeAndShape, GetTensorElementType
    assert rank == 2.0 and total == float(x.sum())    # GetDimensionsCount, GetDimensions, GetTensorMutableData
    assert 1 <= threads <= 2                          # KernelContext_ParallelFor ran every index once
    # KernelContext_GetOutput: the (8,) output arrived; CreateStatus: an error travels back with its message
    with pytest.raises(Exception, match="ssmrt abi probe: failing as asked"):
        abi_probe(1, [x], fail=1)


def test_parallel_for_uses_the_sessions_threads():
    x = np.ones(3, np.float32)
    assert abi_probe(1, [x])[7] == 1.0  # one thread: the caller alone
    assert max(abi_probe(2, [x])[7] for _ in range(3)) == 2.0  # 64 pieces of ~1 ms: the second thread joins


def test_the_kernels_run_on_several_threads():
    """The real kernels spread their pieces over the session's threads (counted by the library itself), and
    stay on one thread when the session has one."""
    import ctypes

    lib = ctypes.CDLL(str(native_library()))
    kw = ssd_inputs(2, 512, 8, 64, 64, seed=5)  # 16 (batch, head) pieces of 512 x 64 x 64 updates
    feeds = {k: kw[k].numpy() for k in SSD_INPUTS}
    seen = {}
    for threads in (1, 2):
        session = native_session(SSD_SCAN, feeds, ssd_attrs(kw), threads=threads)
        counts = []
        for _ in range(3):
            lib.SsmrtPoolThreadsReset()
            session.run(None, feeds)
            counts.append(lib.SsmrtPoolThreadsSeen())
        seen[threads] = max(counts)
    assert seen == {1: 1, 2: 2}, seen


class ScratchPool:
    """The native library's Scratch buffers through its test hooks (ops.cc), on the calling thread."""

    def __init__(self):
        import ctypes

        self.lib = lib = ctypes.CDLL(str(native_library()))
        lib.SsmrtScratchTake.restype = ctypes.c_void_p
        lib.SsmrtScratchTake.argtypes = [ctypes.c_int64]
        for name, res in (("Data", ctypes.c_void_p), ("Capacity", ctypes.c_int64), ("Give", None)):
            getattr(lib, f"SsmrtScratch{name}").argtypes = [ctypes.c_void_p]
            getattr(lib, f"SsmrtScratch{name}").restype = res
        lib.SsmrtScratchKept.restype = ctypes.c_int64

    def take(self, n):
        s = self.lib.SsmrtScratchTake(n)
        return s, self.lib.SsmrtScratchData(s), self.lib.SsmrtScratchCapacity(s)

    def give(self, *handles):
        for s in handles:
            self.lib.SsmrtScratchGive(s)

    def kept(self):
        return self.lib.SsmrtScratchKept()


def run_in_new_thread(fn):
    """fn() on a thread of its own (a fresh thread-local pool); its result, or its exception raised here."""
    import threading

    out = {}

    def body():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001  (re-raised on the test's thread)
            out["error"] = e

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_scratch_buffers_are_kept_and_handed_out_again_by_best_fit():
    """A given-back buffer is kept by its thread and handed out again for any size it holds, the smallest that
    holds it first; capacities are powers of two from 256; the data spans the size asked for."""

    def check():
        pool = ScratchPool()
        assert pool.kept() == 0  # a fresh thread keeps nothing
        big, big_data, big_cap = pool.take(1000)
        small, small_data, small_cap = pool.take(100)
        assert (big_cap, small_cap) == (1024, 256)
        view = np.ctypeslib.as_array(ctypes_floats(big_data, 1000))
        view[:] = np.arange(1000, dtype=np.float32)  # writable over the whole size
        assert view[999] == 999.0
        pool.give(big, small)
        assert pool.kept() == 2
        s, data, cap = pool.take(50)  # both hold 50: the smaller
        assert (data, cap, pool.kept()) == (small_data, 256, 1)
        t, data2, cap2 = pool.take(300)  # only the larger holds 300
        assert (data2, cap2, pool.kept()) == (big_data, 1024, 0)
        u, data3, cap3 = pool.take(0)  # nothing kept: a new one, of at least one float
        assert cap3 == 256 and data3 not in (small_data, big_data)
        pool.give(s, t, u)
        return pool.kept()

    assert run_in_new_thread(check) == 3


def test_scratch_keeps_no_large_buffer_and_at_most_sixteen():
    """A buffer over 65536 floats (a prompt's) is freed when given back, not kept; a thread keeps at most 16
    buffers; each thread has its own."""

    def check():
        pool = ScratchPool()
        h, _, cap = pool.take(65537)
        assert cap == 0
        pool.give(h)
        assert pool.kept() == 0
        handles = [pool.take(64 * (i + 1))[0] for i in range(20)]
        pool.give(*handles)
        assert pool.kept() == 16
        assert run_in_new_thread(lambda: ScratchPool().kept()) == 0  # another thread's pool: empty
        h, _, cap = pool.take(65536)  # the largest kept size: a new buffer of exactly that capacity
        assert cap == 65536
        pool.give(h)
        return pool.kept()

    assert run_in_new_thread(check) == 16


def ctypes_floats(address, n):
    import ctypes

    return (ctypes.c_float * n).from_address(address)
