"""The chain ops (ssmrt.ops.spec.CHAIN_OPS): composed, each chain equals its one-node op; each chain kernel, on
the inputs its node is given, equals that node's reference (intermediates as strictly as outputs).

On the CPU the kernels run in Triton's interpreter (fp32 / fp16); on a GPU also bf16 and longer inputs, each
through Triton's launcher and through the driver-API launcher that runs the PTX a TensorRT plugin embeds."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from test_ops import selective_inputs, ssd_inputs, to64

from ssmrt.closeness import assert_close
from ssmrt.ops import chains, selective_scan_ref, ssd_scan_ref
from ssmrt.ops.spec import CHAIN_OPS, CHAINS, SELECTIVE_SCAN, SSD_SCAN, ssd_chain_chunk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def ssd_chain_ref(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, ssm_state, chunk_size):
    dt_out, dA_cumsum, states = chains.ssd_chunk_state_ref(x, dt, A, B, dt_bias, dt_softplus, dt_limit, chunk_size)
    entering, present = chains.ssd_state_passing_ref(states, dA_cumsum, ssm_state, chunk_size)
    return chains.ssd_chunk_scan_ref(x, B, C, D, dt_out, dA_cumsum, entering, chunk_size), present


def selective_chain_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, ssm_state, chunk_size):
    states, delta_sum = chains.selective_chunk_state_ref(u, delta, A, B, delta_bias, delta_softplus, chunk_size)
    entering, present = chains.selective_state_passing_ref(states, delta_sum, A, ssm_state, chunk_size)
    y = chains.selective_chunk_scan_ref(u, delta, A, B, C, D, z, delta_bias, entering, delta_softplus, chunk_size)
    return y, present


def test_every_chain_node_has_a_reference_taking_its_contract():
    for spec in CHAIN_OPS.values():
        ref = getattr(chains, f"{spec.function}_ref")
        assert tuple(inspect.signature(ref).parameters) == spec.params, spec.name
    assert {n for chain in CHAINS.values() for n in chain} == set(CHAIN_OPS)


# seqlen, chunk: one partial chunk, exact chunks, several with a partial last one, a single token
SSD_CASES = [(1, 16), (7, 16), (32, 16), (45, 16), (100, 32)]


@pytest.mark.parametrize("seqlen,chunk", SSD_CASES)
@pytest.mark.parametrize("D_per_channel,dt_limit", [(False, (0.0, math.inf)), (True, (0.05, 0.5))])
def test_ssd_chain_composes_to_the_op(seqlen, chunk, D_per_channel, dt_limit):
    kw = to64(ssd_inputs(2, seqlen, 6, 5, 7, ngroups=3, D_per_channel=D_per_channel, dt_limit=dt_limit,
                         chunk_size=chunk))
    y, s = ssd_chain_ref(**kw)
    y_ref, s_ref = ssd_scan_ref(**kw)
    assert_close(y, y_ref, dtype=torch.float64, name="chain y")
    assert_close(s, s_ref, dtype=torch.float64, name="chain state")


@pytest.mark.parametrize("seqlen,chunk", [(1, 4), (8, 4), (13, 4), (40, 16)])
@pytest.mark.parametrize("optional", [True, False])
def test_selective_chain_composes_to_the_op(seqlen, chunk, optional):
    kw = to64(selective_inputs(2, seqlen, 12, 5, ngroups=3, optional=optional))
    y, s = selective_chain_ref(**kw, chunk_size=chunk)
    y_ref, s_ref = selective_scan_ref(**kw)
    assert_close(y, y_ref, dtype=torch.float64, name="chain y")
    assert_close(s, s_ref, dtype=torch.float64, name="chain state")


def test_the_ssd_chain_chunk_rule():
    assert [ssd_chain_chunk(n) for n in (1, 16, 17, 64, 100, 256, 1000)] == [16, 16, 32, 64, 128, 256, 256]
    with pytest.raises(ValueError):
        ssd_chain_chunk(0)


def test_a_node_refuses_intermediates_of_another_chunk():
    kw = to64(ssd_inputs(1, 20, 2, 3, 4))
    dt_out, dA_cumsum, states = chains.ssd_chunk_state_ref(kw["x"], kw["dt"], kw["A"], kw["B"], chunk_size=16)
    with pytest.raises(ValueError, match="chunks of 16, chunk_size is 32"):
        chains.ssd_state_passing_ref(states, dA_cumsum, kw["ssm_state"], 32)


# ------------------------------------------------------------------------------------- each kernel, alone


LAUNCHERS = ["triton"] + (["aot"] if DEVICE == "cuda" else [])
_driver = []


@pytest.fixture(params=LAUNCHERS)
def launcher(request):
    """Every launch in the test through Triton's own launcher, or ("aot") through the driver-API launcher."""
    if request.param == "triton":
        yield
        return
    from ssmrt.plugins.launch import use_launcher
    from ssmrt.plugins.launcher import DriverLauncher

    if not _driver:
        _driver.append(DriverLauncher())
    with use_launcher(_driver[0]):
        yield


def on_device(kw):
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def poisoned_like(t, dtype=None):
    return torch.full_like(t, float("nan"), dtype=dtype or t.dtype, device=DEVICE)


def check(got, want, dtype, name):
    assert_close(got.cpu().double(), want.double(), dtype=dtype, name=name)


SSD_KERNEL_CASES = [(1, 16), (45, 16)] + ([(300, 64), (1000, 256)] if DEVICE == "cuda" else [])


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seqlen,chunk", SSD_KERNEL_CASES)
@pytest.mark.parametrize("D_per_channel,dt_limit", [(False, (0.0, math.inf)), (True, (0.05, 0.5))])
def test_ssd_chain_kernels_match_their_nodes(launcher, dtype, seqlen, chunk, D_per_channel, dt_limit):
    """Each node's kernel gets exactly its node's inputs (the previous node's reference outputs), writes into
    poisoned outputs, and matches its node's float64 reference: dt_out, dA_cumsum, chunk states, entering
    states, the final state and y."""
    from ssmrt.kernels import ssd_chunked

    kw = ssd_inputs(2, seqlen, 4, 24, 16, ngroups=2, D_per_channel=D_per_channel, dt_limit=dt_limit, dtype=dtype)
    k64 = to64(kw)
    x, dt, A, B, C, D, dt_bias = (k64[n] for n in ("x", "dt", "A", "B", "C", "D", "dt_bias"))
    dt_out, dA_cumsum, states = chains.ssd_chunk_state_ref(x, dt, A, B, dt_bias, True, dt_limit, chunk)
    entering, present = chains.ssd_state_passing_ref(states, dA_cumsum, k64["ssm_state"], chunk)
    y = chains.ssd_chunk_scan_ref(x, B, C, D, dt_out, dA_cumsum, entering, chunk)

    d = on_device(kw)
    f32 = lambda t: t.float().to(DEVICE)  # noqa: E731  (the intermediates a node is given are float32)
    got = ssd_chunked.ssd_chunk_state(d["x"], d["dt"], d["A"], d["B"], d["dt_bias"], True, dt_limit, chunk,
                                      dt_out=poisoned_like(dt_out, torch.float32),
                                      dA_cumsum=poisoned_like(dA_cumsum, torch.float32),
                                      chunk_states=poisoned_like(states, torch.float32))
    for g, w, name in zip(got, (dt_out, dA_cumsum, states), ("dt_out", "dA_cumsum", "chunk_states"), strict=True):
        check(g, w, dtype, f"SSDChunkState {name}")
    got = ssd_chunked.ssd_state_passing(f32(states), f32(dA_cumsum), d["ssm_state"], chunk,
                                        entering_states=poisoned_like(entering, torch.float32),
                                        state_out=poisoned_like(d["ssm_state"]))
    check(got[0], entering, dtype, "SSDStatePassing entering_states")
    check(got[1], present, dtype, "SSDStatePassing present_ssm_state")
    got = ssd_chunked.ssd_chunk_scan(d["x"], d["B"], d["C"], d["D"], f32(dt_out), f32(dA_cumsum), f32(entering),
                                     chunk, out=poisoned_like(d["x"]))
    check(got, y, dtype, "SSDChunkScan y")


SEL_KERNEL_CASES = [(1, 4), (13, 4)] + ([(300, 64), (1000, 256)] if DEVICE == "cuda" else [])


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seqlen,chunk", SEL_KERNEL_CASES)
@pytest.mark.parametrize("optional", [True, False])
def test_selective_chain_kernels_match_their_nodes(launcher, dtype, seqlen, chunk, optional):
    from ssmrt.kernels import selective_chunked

    kw = selective_inputs(2, seqlen, 20, 7, ngroups=2, optional=optional, dtype=dtype)
    k64 = to64(kw)
    u, delta, A, B, C, D, z, db = (k64[n] for n in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    states, delta_sum = chains.selective_chunk_state_ref(u, delta, A, B, db, True, chunk)
    entering, present = chains.selective_state_passing_ref(states, delta_sum, A, k64["ssm_state"], chunk)
    y = chains.selective_chunk_scan_ref(u, delta, A, B, C, D, z, db, entering, True, chunk)

    d = on_device(kw)
    f32 = lambda t: t.float().to(DEVICE)  # noqa: E731
    got = selective_chunked.selective_chunk_state(d["u"], d["delta"], d["A"], d["B"], d["delta_bias"], True, chunk,
                                                  chunk_states=poisoned_like(states, torch.float32),
                                                  delta_sum=poisoned_like(delta_sum, torch.float32))
    check(got[0], states, dtype, "SelectiveChunkState chunk_states")
    check(got[1], delta_sum, dtype, "SelectiveChunkState delta_sum")
    got = selective_chunked.selective_state_passing(f32(states), f32(delta_sum), d["A"], d["ssm_state"], chunk,
                                                    entering_states=poisoned_like(entering, torch.float32),
                                                    state_out=poisoned_like(d["ssm_state"]))
    check(got[0], entering, dtype, "SelectiveStatePassing entering_states")
    check(got[1], present, dtype, "SelectiveStatePassing present_ssm_state")
    got = selective_chunked.selective_chunk_scan(d["u"], d["delta"], d["A"], d["B"], d["C"], d["D"], d["z"],
                                                 d["delta_bias"], f32(entering), True, chunk,
                                                 out=poisoned_like(d["u"]))
    check(got, y, dtype, "SelectiveChunkScan y")


def test_the_chain_ops_keep_their_one_node_ops_tensors():
    """A chain node's copy of a one-node op's tensor (x, B, A, the state...) is that tensor's spec, unchanged."""
    parent = {**{t.name: t for t in SSD_SCAN.inputs + SSD_SCAN.outputs}}
    for name in CHAINS[SSD_SCAN.name]:
        for t in CHAIN_OPS[name].inputs + CHAIN_OPS[name].outputs:
            assert t.name not in parent or parent[t.name] == t, (name, t)
    parent = {t.name: t for t in SELECTIVE_SCAN.inputs + SELECTIVE_SCAN.outputs}
    for name in CHAINS[SELECTIVE_SCAN.name]:
        for t in CHAIN_OPS[name].inputs + CHAIN_OPS[name].outputs:
            assert t.name not in parent or parent[t.name] == t, (name, t)
