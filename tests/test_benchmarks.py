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
    # the layer's mixer runs as one fused node: no SSDScan or CausalConv1d node of its own is left
    assert {"HalfMatMul", "SSDMixer"} <= set(r["profile_ms_per_step"]["f16"])
    assert not {"SSDScan", "CausalConv1d"} & set(r["profile_ms_per_step"]["f16"])
    assert r["half_matmuls_f16"] == 2 * 1 + 1  # a Mamba-2 layer's in_proj and out_proj, and the lm_head
    assert r["fused_mixers_f16"] == 1 and r["fused_step_mixers_f16"] == 0  # Mamba-2: no SelectiveMixer
    assert r["fused_norms_f16"] == 1  # the final norm: the one layer's own has no residual to add
    assert r["decode_f16_fused_over_unfused_paired"] == pytest.approx(
        statistics.median(a / b for a, b in zip(blocks["f16"], blocks["f16_unfused"], strict=True)))


@pytest.mark.slow
def test_cpu_quantize_benchmark_runs(tmp_path):
    """benchmarks/cpu_quantize.py on a one-layer decode model and a byte model trained for a second: a quality row
    and a decode ratio for every artifact, float32 judged passing against itself."""
    out = tmp_path / "quant.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_quantize.py"), "--layers", "1", "--blocks",
                          "1", "--block-steps", "2", "--train-seconds", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    names = ["float32", "float16", "int8", "int8, float32 activations", "int4", "int4, float32 activations"]
    assert [r["artifact"] for r in report["quality"]] == names
    assert report["quality"][0]["float16_band_passed"] and report["quality"][0]["kl_mean"] < 1e-9
    assert all(r["kl_mean"] > 0 for r in report["quality"][1:])
    assert set(report["decode"]["ratio_to_float32"]) == set(names)
    assert all(v > 0 for v in report["decode"]["ms_per_token_median"].values())


def test_cpu_vs_llamacpp_benchmark_smoke(tmp_path):
    """benchmarks/cpu_vs_llamacpp.py --smoke (ssmrt alone, no llama.cpp): each family's checkpoint exported at
    every precision and timed, each figure finite and positive."""
    import math

    pytest.importorskip("transformers")
    results = smoke_report("cpu_vs_llamacpp.py", tmp_path / "llamacpp.json", timeout=300)
    assert [(r["arch"], r["precision"]) for r in results] == [
        (arch, p) for arch in ("mamba1", "mamba2") for p in ("fp32", "fp16", "int8", "int4")]
    for r in results:
        s = r["ssmrt"]
        assert len(s["decode_ms_blocks"]) == len(s["prefill_tok_s_blocks"]) == 1  # --smoke: one block
        for v in (s["decode_ms_per_token"], s["prefill_tokens_per_s"], s["file_MB"]):
            assert math.isfinite(v) and v > 0, r
        assert "llama_cpp" not in r and "decode_time_ratio" not in r
    exports = {r["precision"]: r["ssmrt"]["export"] for r in results}
    assert exports["int8"]["weights"] == "int8" and exports["int4"]["weights"] == "int4"
    assert exports["fp16"]["dtype"] == "float16" and {e["logits"] for e in exports.values()} == {"last"}


def test_cpu_vs_llamacpp_refuses_bad_arguments():
    """A bad argument: one line on stderr, exit 2, before anything is built or downloaded."""
    for args in (["--threads", "0"], ["--llama-cpp", "/nonexistent/llama.cpp"], ["--arch", "rwkv"],
                 ["--work", str(ROOT / "build")]):
        res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_vs_llamacpp.py"), *args],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "error" in res.stderr, (args, res.stderr)
        assert res.stdout == ""
