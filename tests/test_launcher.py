"""The AOT path a TensorRT plugin takes, without TensorRT: every kernel launch goes through
ssmrt.plugins.launch, and on a GPU through the CUDA driver from the kernels' AOT PTX (ssmrt.plugins.launcher).

On the CPU: the wrappers route every launch through the launch layer (a recording launcher sees each kernel
with the tensors the table names), and a LaunchSpec compiles for sm_80 / sm_90 with the parameters TensorRT
passes. On a GPU (`gpu`): each op through the driver launcher against its float64 reference, fp32 / fp16 / bf16,
decode and prefill, odd shapes, outputs poisoned first; whole models on kernels="aot" against the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_ops import conv_inputs, selective_inputs, ssd_inputs, to64

from ssmrt.closeness import assert_close
from ssmrt.errors import SsmrtError
from ssmrt.ops import causal_conv1d_ref, selective_scan_ref, ssd_scan_ref
from ssmrt.plugins.launch import KERNELS, use_launcher

GPU = torch.cuda.is_available()


class Recorder:
    """A launcher that records what it is asked to launch (and launches nothing)."""

    def __init__(self):
        self.calls = []

    def __call__(self, name, tensors, meta):
        self.calls.append((name, sorted(tensors), dict(meta)))


@pytest.mark.triton
@pytest.mark.parametrize("op,seqlen,kernels", [
    ("conv", 5, ["causal_conv1d"]),
    ("selective", 1, ["selective_scan"]),
    ("selective", 40, ["selective_chunk_state", "selective_state_passing", "selective_chunk_scan"]),
    ("ssd", 1, ["ssd_scan"]),
    ("ssd", 40, ["ssd_chunk_state", "ssd_state_passing", "ssd_chunk_scan"]),
])
def test_every_launch_goes_through_the_launch_layer(op, seqlen, kernels):
    from ssmrt.kernels.causal_conv1d import causal_conv1d
    from ssmrt.kernels.selective_scan import selective_scan
    from ssmrt.kernels.ssd_scan import ssd_scan

    recorder = Recorder()
    with use_launcher(recorder):
        if op == "conv":
            causal_conv1d(**conv_inputs(2, seqlen, 8, 4))
        elif op == "selective":
            selective_scan(**selective_inputs(2, seqlen, 16, 8))
        else:
            ssd_scan(**ssd_inputs(2, seqlen, 4, 8, 16))
    assert [c[0] for c in recorder.calls] == kernels
    for name, tensors, _ in recorder.calls:
        assert tensors == sorted(p.name for p in KERNELS[name].pointers)


def test_kernels_aot_needs_a_gpu():
    from test_models import random_lm

    from ssmrt.runtime import TorchRunner

    if GPU:
        pytest.skip("this machine has a GPU")
    with pytest.raises(SsmrtError, match="kernels 'aot' launches PTX on a CUDA GPU; the model is on cpu"):
        TorchRunner(random_lm(), kernels="aot")
    with pytest.raises(SsmrtError, match="kernels must be True, False or 'aot'"):
        TorchRunner(random_lm(), kernels="fast")


@pytest.mark.triton
def test_launch_specs_compile_with_tensorrts_parameters():
    """What aot_impl returns, for a decode kernel and a chain kernel, two targets and two type pairs (in a
    process without Triton's interpreter, which cannot compile)."""
    code = """
import json
from ssmrt.kernels import ssd_chunked, ssd_scan
from ssmrt.plugins.launcher import launch_spec
import torch
out = []
for kernel, sm, act, state, meta in [
        ("ssd_scan", 90, "fp16", "fp32", ssd_scan.constexprs(64, 128)),
        ("ssd_scan", 80, "bf16", "fp16", ssd_scan.constexprs(64, 128, dt_limit=(0.0, 0.1))),
        ("ssd_chunk_scan", 87, "fp16", "fp32", ssd_chunked.constexprs(64, 128, torch.float16, 256)["ssd_chunk_scan"])]:
    s = launch_spec(kernel, sm, act, state, meta)
    sizes = {"batch": 2, "seqlen": 300, "nheads": 24, "headdim": 64, "dstate": 128, "ngroups": 1}
    out.append({"kernel": kernel, "sm": sm, "entry": s.entry, "block": s.block, "warps": s.num_warps,
                "shared": s.shared, "grid": list(s.grid(sizes)), "target": f".target sm_{sm}" in s.ptx,
                "entry_in_ptx": f".entry {s.entry}(" in s.ptx,
                "params": s.ptx[s.ptx.index(".entry"):s.ptx.index(")", s.ptx.index(".entry"))].count(".param")})
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    specs = json.loads(res.stdout.strip().splitlines()[-1])
    for s in specs:
        print(s)
        assert s["target"] and s["entry_in_ptx"] and s["block"] == 32 * s["warps"], s
        assert s["params"] == len(KERNELS[s["kernel"]].parameters), s
    assert specs[0]["grid"] == [4, 48, 1]
    assert specs[2]["grid"] == [1 * 8, 2 * 2 * 24, 1]  # (headdim / 64) * (256 / 32), batch * chunks * heads


VECTOR_SCRIPT = r"""
import json, re
import torch
from ssmrt.kernels import ssd_chunked
from ssmrt.plugins.launch import KERNELS
from ssmrt.plugins.launcher import launch_spec

k = KERNELS["ssd_chunk_scan"]
meta = ssd_chunked.constexprs(64, 128, torch.float16, 256)["ssd_chunk_scan"]
sizes = k.resolve({"x": (1, 300, 24, 64), "B": (1, 300, 1, 128)})
out = {}
for name, divisible in (("none", ()), ("aligned", k.divisible(sizes)), ("unaligned", k.divisible(sizes, False))):
    ptx = launch_spec("ssd_chunk_scan", 90, "fp16", "fp32", meta, divisible).ptx
    out[name] = len(re.findall(r"ld\.global[^\n]*\.v4", ptx))
print(json.dumps(out))
"""


@pytest.mark.triton
def test_an_aligned_compile_loads_16_bytes_at_a_time():
    """Compiled for 16-byte aligned buffers and the model's dimensions (headdim 64, dstate 128), the chunk scan's
    tiles are read with 16-byte vector loads, as Triton's own launcher specialises; without the alignment (a
    buffer at an odd offset), or without the sizes, it cannot."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", VECTOR_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["aligned"] > 0 and got["none"] == got["unaligned"] == 0, got


# ------------------------------------------------------------------------------------------------- GPU

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def poisoned(t):
    return torch.full_like(t, float("nan"))


def on_cuda(kw):
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


@pytest.fixture(scope="module")
def driver():
    from ssmrt.plugins.launcher import DriverLauncher

    return DriverLauncher()


def through_the_driver(driver, wrapper, reference, kw, y_name, state_name, dtype, name):
    """wrapper(**kw) with every launch through the driver, outputs poisoned first, against reference in float64."""
    kw = on_cuda(kw)
    y_out, s_out = poisoned(kw[y_name]), poisoned(kw[state_name])
    with use_launcher(driver):
        y, s = wrapper(**kw, out=y_out, state_out=s_out)
    torch.cuda.synchronize()
    assert y.data_ptr() == y_out.data_ptr() and s.data_ptr() == s_out.data_ptr()
    y_ref, s_ref = reference(**to64(kw))
    assert_close(y, y_ref.to(y.dtype), dtype=dtype, name=f"{name} aot y {dtype}")
    assert_close(s, s_ref.to(s.dtype), dtype=dtype, name=f"{name} aot state {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seqlen", [1, 7, 300])
@pytest.mark.parametrize("batch,nheads,headdim,dstate,ngroups", [(1, 24, 64, 128, 1), (3, 6, 20, 7, 3)])
def test_ssd_through_the_driver(driver, dtype, seqlen, batch, nheads, headdim, dstate, ngroups):
    from ssmrt.kernels.ssd_scan import ssd_scan

    kw = ssd_inputs(batch, seqlen, nheads, headdim, dstate, ngroups, dtype=dtype, chunk_size=64)
    through_the_driver(driver, ssd_scan, ssd_scan_ref, kw, "x", "ssm_state", dtype, "ssd")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seqlen", [1, 5, 300])
@pytest.mark.parametrize("batch,dim,dstate,ngroups", [(1, 1536, 16, 1), (2, 36, 7, 3)])
def test_selective_through_the_driver(driver, dtype, seqlen, batch, dim, dstate, ngroups):
    from ssmrt.kernels.selective_scan import selective_scan

    kw = selective_inputs(batch, seqlen, dim, dstate, ngroups, dtype=dtype)
    through_the_driver(driver, selective_scan, selective_scan_ref, kw, "u", "ssm_state", dtype, "selective")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seqlen", [1, 13, 300])
@pytest.mark.parametrize("dim,width", [(1792, 4), (13, 3)])
def test_conv_through_the_driver(driver, dtype, seqlen, dim, width):
    from ssmrt.kernels.causal_conv1d import causal_conv1d

    kw = conv_inputs(2, seqlen, dim, width, dtype=dtype)
    through_the_driver(driver, causal_conv1d, causal_conv1d_ref, kw, "x", "conv_state", dtype, "conv")


@pytest.mark.gpu
@pytest.mark.parametrize("seqlen", [1, 300])
def test_a_buffer_at_an_odd_offset_takes_the_unaligned_compile(driver, seqlen):
    """x as a view 2 bytes into its storage: the driver launcher compiles for unaligned buffers (an aligned
    compile would read it with misaligned vector loads) and the result is still the reference's."""
    from ssmrt.kernels.ssd_scan import ssd_scan

    kw = on_cuda(ssd_inputs(1, seqlen, 4, 64, 128, dtype=torch.float16, chunk_size=64))
    x = torch.empty(kw["x"].numel() + 1, dtype=torch.float16, device="cuda")[1:].view_as(kw["x"])
    x.copy_(kw["x"])
    assert x.data_ptr() % 16 and x.is_contiguous()
    with use_launcher(driver):
        y, s = ssd_scan(**{**kw, "x": x})
    y_ref, s_ref = ssd_scan_ref(**to64(kw))
    assert_close(y, y_ref.to(y.dtype), dtype=torch.float16, name="odd offset y")
    assert_close(s, s_ref.to(s.dtype), dtype=torch.float16, name="odd offset state")
    assert any(not spec.divisible or "x_ptr" not in spec.divisible for spec, _ in driver._loaded.values())


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_whole_models_on_the_aot_kernels(arch):
    """Prefill then 32 teacher-forced steps on kernels="aot" (eager decode and a CUDA graph) against the fp32
    reference, logits and every layer's state."""
    from test_models import random_lm

    from ssmrt.compare import compare_runners
    from ssmrt.runtime import TorchRunner

    model = random_lm(arch=arch, d_model=64, n_layer=2)
    reference = TorchRunner(model)
    prompt = np.random.default_rng(0).integers(0, 97, 40).tolist()
    for decode in ("eager", "cuda_graph"):
        candidate = TorchRunner(random_lm(arch=arch, d_model=64, n_layer=2).cuda(), kernels="aot", decode=decode)
        report = compare_runners(reference, candidate, prompt, steps=32)
        print(report.format())
        assert report.passed and "aot kernels" in candidate.describe()
