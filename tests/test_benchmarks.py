"""The benchmark scripts run (their --smoke modes: tiny shapes; the GPU one in Triton's interpreter), so a GPU
session can spend its minutes measuring, not debugging the script. No timing is asserted."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def smoke_report(script: str, out: Path, timeout: int) -> list[dict]:
    """Run benchmarks/<script> --smoke --json out; its results, after checking it ran and says it was a smoke."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--json", str(out)],
                         capture_output=True, text=True, timeout=timeout)
    print(res.stdout, res.stderr[-3000:])
    assert res.returncode == 0
    report = json.loads(out.read_text())
    assert report["env"]["smoke"] is True
    return report["results"]


@pytest.mark.slow
def test_gpu_kernel_benchmark_smoke(tmp_path):
    pytest.importorskip("triton")
    results = smoke_report("gpu_kernels.py", tmp_path / "gpu.json", timeout=900)
    assert {r["case"] for r in results} == {"ssd decode step", "selective_scan prefill", "ssd_scan prefill",
                                            "e2e prefill", "e2e decode"}
    checks = [(r["case"], k, v) for r in results for k, v in r.items() if k.endswith("_ok")]
    assert len(checks) >= 30 and all(v for *_, v in checks), checks
    prefill = [r for r in results if r["case"] == "e2e prefill"]
    decode = [r for r in results if r["case"] == "e2e decode"]
    assert [(r["arch"], r["L"]) for r in prefill] == [(a, L) for a in ("mamba1", "mamba2") for L in (8, 40)]
    assert [(r["arch"], r["batch"]) for r in decode] == [(a, b) for a in ("mamba1", "mamba2") for b in (1, 2)]
    # the prefill keeps the last position's logits only; every figure is a ratio to one measured in the run
    assert all(r["logits"][:2] == [1, 1] and r["vs_matmul_floor"] > 0 for r in prefill)
    assert all(r["graph_vs_copy_floor"] > 0 and r["step_vs_copy_floor"] > 0 for r in decode)
    assert all(r["parity_ok"] for r in decode if r["batch"] == 1)
    # no mamba_ssm (or no GPU) here: each end-to-end row says why it has no mamba_ssm figure
    assert all("vs_mamba_ssm" in r or r["mamba_ssm_skipped"] for r in prefill + decode)


def test_cpu_node_cost_benchmark_smoke(tmp_path):
    """benchmarks/cpu_ort_nodes.py (the measurements behind the fallback bodies' graph forms) runs, and each of
    its forms agrees with the other before it is timed."""
    results = smoke_report("cpu_ort_nodes.py", tmp_path / "nodes.json", timeout=300)
    assert [r["case"] for r in results] == ["node cost", "conv", "conv", "outer product"]
    assert all(r["ok"] for r in results if "ok" in r)


@pytest.mark.slow
def test_cpu_onnxruntime_benchmark_smoke(tmp_path):
    """benchmarks/cpu_onnxruntime.py (issue 3's table) runs end to end on a one-layer model: both families, each
    summary figure agrees with the per-block times it summarises, and the decode floor is the hand-counted bytes
    at the measured bandwidth."""
    pytest.importorskip("transformers")
    results = smoke_report("cpu_onnxruntime.py", tmp_path / "cpu.json", timeout=600)
    assert [r["arch"] for r in results] == ["mamba1", "mamba2"]
    # a decode step's bytes, counted by hand for the smoke's one-layer 130M-class configs (d_model 768, d_inner
    # 1536, conv width 4, vocab 50280 tied), float32: weights (the layer's matmuls + lm_head 768 x 50280) and the
    # state read and written
    lm_head = 768 * 50280
    step_bytes = {
        # in_proj 768 x 3072, x_proj 1536 x (48 + 2*16), dt_proj 48 x 1536, out_proj 1536 x 768; state conv 1536 x 3
        # + ssm 1536 x 16
        "mamba1": 4 * (768 * 3072 + 1536 * 80 + 48 * 1536 + 1536 * 768 + lm_head) + 2 * 4 * (1536 * 3 + 1536 * 16),
        # in_proj 768 x (2*1536 + 2*128 + 24), out_proj 1536 x 768; state conv (1536 + 2*128) x 3 + ssm 24 x 64 x 128
        "mamba2": 4 * (768 * 3352 + 1536 * 768 + lm_head) + 2 * 4 * (1792 * 3 + 24 * 64 * 128),
    }
    exact = dict(rel=1e-9, abs=0)
    for r in results:
        print(r["arch"], r["decode_ms"], r["prefill_tokens_per_s"])
        d, p, blocks = r["decode_ms"], r["prefill_tokens_per_s"], r["decode_ms_blocks"]
        assert {k: len(v) for k, v in blocks.items()} == {"ssmrt_onnxruntime": 2, "ssmrt_onnxruntime_bodies": 2,
                                                          "onnxruntime_matmuls_only": 2, "hf_eager": 2}  # --smoke
        for name in ("ssmrt_onnxruntime", "hf_eager"):
            assert d[name] == pytest.approx(statistics.median(blocks[name]), **exact), name
            assert r["decode_ms_best"][name] == pytest.approx(min(blocks[name]), **exact), name
        assert d["ssmrt_onnxruntime_bodies"] == pytest.approx(statistics.median(blocks["ssmrt_onnxruntime_bodies"]),
                                                              **exact)
        pairs = list(zip(blocks["hf_eager"], blocks["ssmrt_onnxruntime"], strict=True))
        assert r["decode_speedup_vs_hf_paired"] == pytest.approx(statistics.median(h / o for h, o in pairs), **exact)
        assert r["decode_speedup_vs_hf"] == pytest.approx(d["hf_eager"] / d["ssmrt_onnxruntime"], **exact)
        assert r["decode_vs_floor"] == pytest.approx(d["ssmrt_onnxruntime"] / d["floor"], **exact)
        assert r["prefill_vs_floor"] == pytest.approx(p["floor"] / p["ssmrt_onnxruntime"], **exact)
        assert 1e6 * d["floor"] * r["copy_bandwidth_GBps"] == pytest.approx(step_bytes[r["arch"]], rel=1e-9)


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_cpu_benchmark_matmul_chain_is_the_models_matmuls(arch):
    """The matmul-only graph the CPU benchmark times beside the model holds exactly the weights of the model's
    Linear layers (lm_head included), which are what ssmrt.bench.step_read_bytes counts less the state, and ONNX
    Runtime runs it."""
    import importlib.util

    import numpy as np
    import onnxruntime
    import torch
    from onnx import numpy_helper
    from test_models import random_lm

    from ssmrt.bench import step_read_bytes
    from ssmrt.runtime import TorchRunner

    spec = importlib.util.spec_from_file_location("cpu_onnxruntime", ROOT / "benchmarks" / "cpu_onnxruntime.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = random_lm(arch=arch)  # Mamba-2 with ngroups 2
    runner = TorchRunner(model)
    chain = bench.matmul_chain_onnx(runner.config)
    matmul_weights = {n.input[1] for n in chain.graph.node if n.op_type == "MatMul"}
    weight_bytes = sum(numpy_helper.to_array(t).nbytes for t in chain.graph.initializer if t.name in matmul_weights)
    state_bytes = sum(t.numel() * t.element_size() for pair in model.zero_state(1) for t in pair)
    linear_bytes = sum(m.weight.nbytes for m in model.modules() if isinstance(m, torch.nn.Linear))
    print(arch, weight_bytes, linear_bytes, step_read_bytes(runner) - 2 * state_bytes)
    assert weight_bytes == linear_bytes == step_read_bytes(runner) - 2 * state_bytes
    sess = onnxruntime.InferenceSession(chain.SerializeToString(), providers=["CPUExecutionProvider"])
    h = np.ones((1, 1, runner.config.d_model), np.float32)
    (logits,) = sess.run(None, {"h": h})
    assert logits.shape == (1, 1, runner.config.padded_vocab_size) and np.isfinite(logits).all()


@pytest.mark.slow
def test_gpu_plugin_check_smoke():
    """benchmarks/gpu_plugins.py --smoke: without a GPU it compiles a launch spec and says what is left."""
    pytest.importorskip("triton")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_plugins.py"), "--smoke"],
                         capture_output=True, text=True, timeout=600)
    print(res.stdout, res.stderr[-2000:])
    assert res.returncode == 0
    entry, block, shared, ptx_chars = res.stdout.splitlines()[0].split()
    assert entry == "_ssd_scan_kernel" and int(block) % 32 == 0 and int(ptx_chars) > 1000
    assert "no GPU here" in res.stdout


def _gpu_session(*args, env=None, cwd=None):
    # No care for SIGINT needed even where this test run has it ignored: `timeout` catches SIGINT itself, so the
    # part it starts has it at its default after exec, and the time limit's interrupt reaches it.
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_gpu_session_script_refuses_bad_arguments(tmp_path):
    """benchmarks/gpu_session.sh: every bad argument is one line naming it, exit 2, and nothing is written."""
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("not ours")
    not_peer = tmp_path / "not_peer"
    not_peer.mkdir()
    cases = [((), {}, "usage"), ((taken,), {}, "not an empty directory"), ((taken / "keep.txt",), {}, "not an empty"),
             ((tmp_path / "o1", not_peer), {}, "PEER_SRC"), ((tmp_path / "o2",), {"TESTS_S": "ten"}, "TESTS_S must"),
             ((tmp_path / "o3",), {"BENCH_S": "-5"}, "BENCH_S must"), ((tmp_path / "o4",), {"TESTS_S": "0"}, "from 1")]
    for args, env, says in cases:
        res = _gpu_session(*args, env=env)
        assert res.returncode == 2 and says in res.stderr and len(res.stderr.splitlines()) == 1, (args, res.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_peer", "taken"]
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]


def _fake_peer(root: Path) -> Path:
    """A mamba_ssm source tree whose import, as the real one's does, needs selective_scan_cuda; its version says
    whether the module it got is a built one (fwd a string) or the script's stand-in (fwd raises ImportError)."""
    peer = root / "mamba_ssm"
    peer.mkdir(parents=True)
    (peer / "__init__.py").write_text(
        "import selective_scan_cuda\n"
        "try:\n    __version__ = 'built: ' + selective_scan_cuda.fwd\n"
        "except ImportError as e:\n    __version__ = 'stand-in: ' + str(e)\n")
    return root


def test_gpu_session_script_plumbing(tmp_path):
    """benchmarks/gpu_session.sh, the one command a GPU session runs, here without a GPU and with time limits too
    short for its tests: it still writes who / what / when, each part's exit status, the logs, and exits with the
    first failing part's status; mamba_ssm's source tree (given relative to the caller's directory) goes on the
    path with its compiled extension's stand-in, which imports and raises ImportError only when used, and a built
    extension is never hidden by it."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("on a GPU the script measures for real (minutes): run it by hand")
    _fake_peer(tmp_path / "peer")
    res = _gpu_session("out", "peer", env={"TESTS_S": "1", "BENCH_S": "120"}, cwd=tmp_path)
    print(res.stdout, res.stderr)
    out = tmp_path / "out"
    assert res.returncode == 124  # the tests' part ran out of time first
    env = (out / "env.txt").read_text()
    for key in ("date: ", "command: ", "commit: ", "gpu: ", "python: ", "torch: ", "triton: ", "onnxruntime: "):
        assert key in env, key
    assert "mamba_ssm: stand-in: selective_scan_cuda.fwd: mamba_ssm's CUDA extension is not built" in env
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split(",")[0] for line in summary] == ["tests: exit 124", "gpu_kernels: exit 1"]
    assert "no CUDA device" in (out / "gpu_kernels.log").read_text()

    built = tmp_path / "built"
    built.mkdir()
    (built / "selective_scan_cuda.py").write_text("fwd = 'the real one'\n")
    res = _gpu_session(tmp_path / "out2", tmp_path / "peer", env={"TESTS_S": "1", "BENCH_S": "1",
                                                                  "PYTHONPATH": str(built)})
    assert res.returncode == 124, res.stderr
    assert "mamba_ssm: built: the real one" in (tmp_path / "out2" / "env.txt").read_text()


def test_cpu_kernel_benchmark_smoke(tmp_path):
    results = smoke_report("cpu_kernels.py", tmp_path / "kernels.json", timeout=300)
    assert [r["case"] for r in results] == ["half_matmul projections", "half_matmul tied lm_head", "ssd decode step"]
    assert all(r["ok"] for r in results), results
    # every figure is a ratio to one measured in the same run
    assert all(r["time_float16_over_float32"] > 0 and r["time_float16_over_dealt_out"] > 0 for r in results[:2])
    assert results[2]["time_step_over_copy"] > 0


@pytest.mark.slow
def test_cpu_precision_benchmark_smoke(tmp_path):
    """benchmarks/cpu_precision.py (float16 against float32 decode, --logits last prefill) runs on a one-layer model:
    the float16 artifact runs the native ops, and each paired ratio is the median of its per-block ratios."""
    from test_ort_ops import native_library

    native_library()  # the script runs the native ops; skips where they cannot be built
    (r,) = smoke_report("cpu_precision.py", tmp_path / "precision.json", timeout=600)
    assert r["native_ops_f16"] == ["CausalConv1d", "SSDScan"]
    blocks = r["decode_ms_blocks"]
    assert r["decode_f16_over_f32_paired"] == pytest.approx(
        statistics.median(a / b for a, b in zip(blocks["f16"], blocks["f32"], strict=True)))
    # the decode step's layer runs as one fused node: no SSDScan, CausalConv1d or SSDMixer node of its own is left
    assert {"HalfMatMul", "SSDBlock"} <= set(r["profile_ms_per_step"]["f16"])
    assert not {"SSDScan", "CausalConv1d", "SSDMixer"} & set(r["profile_ms_per_step"]["f16"])
    assert r["decode_matmuls_f16"] == 2 * 1 + 1  # a Mamba-2 layer's in_proj and out_proj, and the lm_head
    assert r["fused_mixers_f16"] == 1 and r["fused_step_mixers_f16"] == 0  # Mamba-2: no SelectiveMixer
    assert r["fused_norms_f16"] == 1  # the final norm: the one layer's own has no residual to add
    assert r["fused_blocks_f16"] == 1  # the decode step's in_proj, mixer, out_proj and final norm as one node
    assert r["decode_f16_fused_over_unfused_paired"] == pytest.approx(
        statistics.median(a / b for a, b in zip(blocks["f16"], blocks["f16_unfused"], strict=True)))


@pytest.mark.slow
def test_cpu_quantize_benchmark_runs(tmp_path):
    """benchmarks/cpu_quantize.py on a one-layer decode model and a byte model trained for a second: a quality row
    for every artifact (GPTQ-rounded and float-table ones too, each passing its own verdict) and a decode ratio for
    every one of the decode table, float32 judged passing against itself."""
    pytest.importorskip("gguf")  # the formats table's llama.cpp arithmetic
    out = tmp_path / "quant.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_quantize.py"), "--layers", "1", "--blocks",
                          "1", "--block-steps", "2", "--train-seconds", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    names = ["float32", "float16", "int8", "int8, float32 activations", "int4", "int4, float32 activations"]
    quality = ["float32", "float16"] + [f"{w}{kind}" for w in ("int8", "int4") for kind in (
        "", ", float32 activations", ", GPTQ", ", float32 activations, GPTQ")]
    quality.append("int8, float32 activations, GPTQ, float32 embedding")
    assert [r["artifact"] for r in report["quality"]] == quality
    assert all(r["own_verdict"].startswith("PASSED") for r in report["quality"]), report["quality"]
    assert report["quality"][0]["float16_band_passed"] and report["quality"][0]["kl_mean"] < 1e-9
    assert all(r["kl_mean"] > 0 for r in report["quality"][1:])
    assert [r["format"] for r in report["formats"]["rows"]] == [
        "ssmrt int8, block 32", "llama.cpp q8_0", "ssmrt int4, block 32", "llama.cpp q4_0"]
    assert set(report["decode"]["ratio_to_float32"]) == set(names)
    assert all(v > 0 for v in report["decode"]["ms_per_token_median"].values())


def _bench_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _blocks_of(x, size: int):
    """x (..., K) as (rows, K // size, size)."""
    return x.reshape(-1, x.shape[-1] // size, size)


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("fmt", [("ssmrt", 8, 32), ("ssmrt", 4, 16), ("ggml", 8), ("ggml", 4)])
def test_cpu_quantize_formats_compute_each_format(arch, fmt):
    """The formats table's model: every layer projection's weight is its format's round trip (ggml's q8_0: codes
    within +-127 of a float16 scale, the block's largest magnitude at 127; q4_0: codes -8..7, the block's signed
    extreme at -8; a matrix whose input width is not a multiple of 32 float16, as llama.cpp keeps it), each
    projection's input quantised as its matmul quantises it, and nothing else changed."""
    pytest.importorskip("gguf")
    import torch
    from test_models import random_lm

    from ssmrt.quantize import LAYER_LINEARS, SYMMETRIC, dequantize_ref, quantize_activations_ref, quantize_ref

    bench = _bench_module("cpu_quantize")
    base = random_lm(arch=arch)  # d_model 48: in_proj (and Mamba-1's dt_proj) have widths no 32 divides
    model = bench.format_model(base, arch, fmt)
    fallbacks = 0
    for i, layer in enumerate(model.backbone.layers):
        for name in LAYER_LINEARS[arch]:
            lin, w = getattr(layer.mixer, name), getattr(base.backbone.layers[i].mixer, name).weight.detach()
            K = w.shape[1]
            x = torch.randn(3, 5, K, generator=torch.Generator().manual_seed(i)) * 2
            got = lin(x)
            if fmt[0] == "ssmrt":
                w_q = dequantize_ref(*quantize_ref(w.t(), fmt[1], fmt[2], SYMMETRIC), K).t()
                x_q = quantize_activations_ref(x, fmt[2])
            elif K % 32:
                fallbacks += 1
                w_q, x_q = w.half().float(), x.half().float()
            else:
                w_q, x_q = lin.weight.detach(), bench.ggml_round_trip(x, "Q8_0")
                if fmt[1] == 8:
                    scale = (_blocks_of(w, 32).abs().amax(-1, keepdim=True) / 127).half().float()
                    codes = _blocks_of(w_q, 32) / scale
                    assert codes.abs().amax(-1).eq(127).all()
                else:
                    blocks = _blocks_of(w, 32)
                    extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
                    scale = (extreme / -8).half().float()
                    codes = _blocks_of(w_q, 32) / scale
                    assert codes.amin(-1).eq(-8).all() and codes.amax(-1).le(7).all()
                assert torch.equal(codes, codes.round()) and codes.abs().le(127).all()
                # half a step (q4_0: a whole one, where a value at minus the extreme clips to code 7), plus what
                # the scale's rounding to float16 (2^-11) moves the largest code
                steps = 0.5 + 128 / 2048 if fmt[1] == 8 else 1 + 8 / 2048
                assert (_blocks_of(w_q, 32) - _blocks_of(w, 32)).abs().le(scale.abs() * steps).all()
                a_scale = (_blocks_of(x, 32).abs().amax(-1, keepdim=True) / 127).half().float()
                a_codes = _blocks_of(x_q, 32) / a_scale
                assert torch.allclose(a_codes, a_codes.round(), atol=1e-4) and a_codes.abs().amax(-1).round().eq(
                    127).all()
            assert torch.equal(lin.weight.detach(), w_q.to(torch.float32))
            bias = None if lin.bias is None else lin.bias.detach()
            torch.testing.assert_close(got, torch.nn.functional.linear(x_q, w_q, bias), rtol=1e-5, atol=1e-5)
            assert not torch.equal(got, torch.nn.functional.linear(x, w, bias))
    assert fallbacks == (0 if fmt[0] == "ssmrt" else base.config.n_layer * (2 if arch == "mamba1" else 1))
    projections = {f"backbone.layers.{i}.mixer.{n}.weight" for i in range(base.config.n_layer)
                   for n in LAYER_LINEARS[arch]}
    theirs = dict(base.named_parameters())
    for name, p in model.named_parameters():
        assert name in projections or torch.equal(p, theirs[name]), name


@pytest.mark.slow
def test_cpu_quantize_formats_table(tmp_path):
    """The formats section on a byte model trained for a second: each format's row, q8_0 / q4_0 beside ssmrt's
    blocks, int4 further from the model than int8 in both families of formats."""
    pytest.importorskip("gguf")
    from ssmrt.demo import train_char_model

    bench = _bench_module("cpu_quantize")
    train_char_model(tmp_path / "char", seconds=1, log=lambda *a: None)
    report = bench.formats(tmp_path / "char", [32, 64], windows=2, length=64)
    rows = {r["format"]: r for r in report["rows"]}
    assert list(rows) == ["ssmrt int8, block 32", "ssmrt int8, block 64", "llama.cpp q8_0", "ssmrt int4, block 32",
                          "ssmrt int4, block 64", "llama.cpp q4_0"]
    assert report["positions"] == 128
    assert rows["ssmrt int8, block 32"]["bytes_per_weight"] == 37 / 32 and rows["llama.cpp q4_0"][
        "bytes_per_weight"] == 18 / 32
    for r in rows.values():
        assert 0 < r["kl_mean"] <= r["kl_max"] and 0 < r["top1"] <= 1 and 0 < r["top5"] <= 1, r
    assert rows["ssmrt int4, block 32"]["kl_mean"] > rows["ssmrt int8, block 32"]["kl_mean"]
    assert rows["llama.cpp q4_0"]["kl_mean"] > rows["llama.cpp q8_0"]["kl_mean"]


def test_cpu_vs_llamacpp_benchmark_smoke(tmp_path):
    """benchmarks/cpu_vs_llamacpp.py --smoke (ssmrt alone, no llama.cpp): each family's checkpoint exported at
    every precision and timed, each figure finite and positive."""
    import math

    pytest.importorskip("transformers")
    results = smoke_report("cpu_vs_llamacpp.py", tmp_path / "llamacpp.json", timeout=300)
    assert [(r["arch"], r["precision"]) for r in results] == [
        (arch, p) for arch in ("mamba1", "mamba2") for p in ("fp32", "fp16", "int8", "int8-f32act", "int4")]
    for r in results:
        s = r["ssmrt"]
        assert len(s["decode_ms_blocks"]) == len(s["prefill_tok_s_blocks"]) == 1  # --smoke: one block
        for v in (s["decode_ms_per_token"], s["prefill_tokens_per_s"], s["file_MB"]):
            assert math.isfinite(v) and v > 0, r
        assert "llama_cpp" not in r and "decode_time_ratio" not in r
    exports = {r["precision"]: r["ssmrt"]["export"] for r in results}
    assert exports["int8"]["weights"] == "int8" and exports["int4"]["weights"] == "int4"
    assert exports["int8-f32act"] == {"weights": "int8", "activations": "float32", "logits": "last"}
    assert exports["fp16"]["dtype"] == "float16" and {e["logits"] for e in exports.values()} == {"last"}
    # the record says which vector instructions the host has (they decide the kernels) and when the run ended
    env = json.loads((tmp_path / "llamacpp.json").read_text())["env"]
    cpuinfo = Path("/proc/cpuinfo")
    line = next((ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")), None) \
        if cpuinfo.is_file() else None
    if line is None:  # no x86 flags line (Arm lists "Features"): nothing to name
        assert env["cpu_vector_flags"] in (None, [])
    else:
        flags = set(line.split(":")[1].split())
        assert set(env["cpu_vector_flags"]) <= flags  # the host's own flags
        assert {"avx2", "f16c", "avx512f", "avx512_vnni"} & flags <= set(env["cpu_vector_flags"])
    assert env["date_end"] >= env["date"]


def test_cpu_vs_llamacpp_refuses_bad_arguments():
    """A bad argument: one line on stderr, exit 2, before anything is built or downloaded."""
    for args in (["--threads", "0"], ["--llama-cpp", "/nonexistent/llama.cpp"], ["--arch", "rwkv"],
                 ["--work", str(ROOT / "build")]):
        res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_vs_llamacpp.py"), *args],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "error" in res.stderr, (args, res.stderr)
        assert res.stdout == ""
