"""ssmrt.bench: the floors a benchmark is reported against (what the model's step must read, what its prefill
must compute) are the model's own, whatever the backend. No timing is asserted."""

from __future__ import annotations

import pytest
import torch
from test_models import MAMBA_SSM_ONLY, random_lm

from ssmrt.bench import bench_floors, bench_runner, matmul_shapes, step_read_bytes
from ssmrt.exporter import export_model
from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact, TorchRunner

CONFIGS = {
    "mamba1": dict(arch="mamba1", d_model=40, d_state=8, dt_rank=5),
    "falcon_mamba": dict(arch="mamba1", d_model=32, d_state=16, mixer_rms_eps=1e-6),
    "mamba2-g2": dict(arch="mamba2"),
    "mamba2-d_ssm-mlp": dict(arch="mamba2", **MAMBA_SSM_ONLY["d_ssm-mlp"]),
    "mamba2-untied": dict(arch="mamba2", **MAMBA_SSM_ONLY["padded-vocab-untied"]),
}


def linear_shapes(module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("name", CONFIGS)
def test_matmul_shapes_are_the_models_linears(name):
    """The shapes bench counts from the config are the Linear layers the model runs, layer by layer."""
    model = random_lm(**CONFIGS[name])
    layer, head = matmul_shapes(model.config)
    print(name, layer, head)
    for block in model.backbone.layers:
        assert linear_shapes(block) == layer
    assert (model.lm_head.in_features, model.lm_head.out_features) == head


@pytest.mark.parametrize("name", ["mamba1", "mamba2-untied"])
def test_step_read_bytes_is_the_same_for_every_backend(name, tmp_path):
    """Weights once (a tied embedding is the lm_head, an untied one is read a row at a time) plus the state
    read and written: the same figure from the checkpoint's runner and from the artifact's."""
    model = random_lm(**CONFIGS[name])
    torch_runner = TorchRunner(model)
    ort_runner = OnnxRuntimeRunnerFromArtifact(export_model(model, tmp_path / "art"))
    lm_head = model.lm_head.weight.numel()
    mixers = sum(m.weight.numel() for b in model.backbone.layers for m in b.modules()
                 if isinstance(m, torch.nn.Linear))
    state = sum(t.numel() * t.element_size() for pair in model.zero_state(3) for t in pair)
    want = 4 * (mixers + lm_head) + 2 * state
    got = {r.name: step_read_bytes(r, batch=3) for r in (torch_runner, ort_runner)}
    print(got, want)
    assert got == {"torch": want, "onnxruntime": want}


# The floors' inputs for random_lm()'s config, counted by hand (d_model 48, d_inner 96, 6 heads of 16, 2 groups,
# d_state 16, conv width 4, 2 layers, vocab 97 tied), float32:
#   matmul weights: 2 layers x (in_proj 48 x (2*96 + 2*2*16 + 6) + out_proj 96 x 48) + lm_head 48 x 97 = 39024
#   state a layer: conv (96 + 2*2*16) x 3 + ssm 6 x 16 x 16 = 2016 floats, 2 layers, read and written
RANDOM_LM_STEP_BYTES = 4 * 39024 + 2 * 4 * 2 * 2016  # 188352
RANDOM_LM_PREFILL_FLOPS_16 = 2 * 16 * 39024  # 16 tokens, logits for every one


def test_bench_reports_its_times_against_the_floors(tmp_path):
    """Every figure of the report is consistent with the others it is derived from, and the floors' byte and FLOP
    counts are the hand-counted ones: what the benchmark's numbers mean, not their (machine-dependent) size."""
    runner = OnnxRuntimeRunnerFromArtifact(export_model(random_lm(), tmp_path / "art"))
    res = bench_runner(runner, prompt_len=16, decode_steps=3, repeat=1, progress=False, floors=True, logits="all")
    f = res["floors"]
    print(res)
    exact = dict(rel=1e-9, abs=0)
    assert f["device"] == "cpu" and f["step_read_bytes"] == RANDOM_LM_STEP_BYTES
    assert f["decode_floor_ms"] == pytest.approx(1e3 * RANDOM_LM_STEP_BYTES / (f["copy_bandwidth_GBps"] * 1e9),
                                                 **exact)
    assert f["prefill_floor_tokens_per_s"] == pytest.approx(16 * f["gemm_GFLOPps"] * 1e9 / RANDOM_LM_PREFILL_FLOPS_16,
                                                            **exact)
    assert (res["batch"], res["prefill_tokens"], res["decode_steps"], res["decode_blocks"]) == (1, 16, 3, 1)
    assert res["prefill_tokens_per_s"] == pytest.approx(16 / res["prefill_s"], **exact)
    assert res["decode_ms_best_block"] == res["decode_ms_per_token"]  # one block: its median step is both
    assert res["decode_vs_floor"] == pytest.approx(res["decode_ms_per_token"] / f["decode_floor_ms"], **exact)
    assert res["prefill_vs_floor"] == pytest.approx(f["prefill_floor_tokens_per_s"] / res["prefill_tokens_per_s"],
                                                    **exact)
    assert "floors" not in bench_runner(runner, prompt_len=4, decode_steps=1, repeat=1, progress=False)


def test_no_floors_for_a_device_this_process_cannot_time(monkeypatch):
    runner = TorchRunner(random_lm())
    runner.device_kind = "cuda"  # as an ONNX Runtime session on the CUDA provider beside a CPU-only torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_floors(runner, prompt_len=8) is None
    res = bench_runner(runner, prompt_len=4, decode_steps=1, repeat=1, progress=False, floors=True)
    assert res["floors"] is None and res["decode_vs_floor"] is None


@pytest.mark.parametrize("logits", ["last", "all"])
def test_bench_prefill_asks_for_the_last_positions_logits_only(logits):
    """By default the prefill's lm_head sees the last position only (what generation asks for), so neither its
    FLOPs nor a (batch, prompt, vocab) copy to the host is paid; every position only when asked; the floor counts
    the lm_head for the positions asked."""
    runner = TorchRunner(random_lm())
    seen = []
    hook = runner.model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    try:
        res = bench_runner(runner, prompt_len=16, decode_steps=2, batch=3, repeat=1, warmup=0, progress=False,
                           floors=True, logits=logits)
    finally:
        hook.remove()
    prefill_positions = 1 if logits == "last" else 16
    assert seen == [(3, prefill_positions, 48)] + [(3, 1, 48)] * 2, seen
    assert res["prefill_logits"] == logits
    f = res["floors"]
    layer, head = matmul_shapes(runner.config)
    flops = 2 * 3 * (16 * runner.config.n_layer * sum(i * o for i, o in layer) + prefill_positions * head[0] * head[1])
    assert f["prefill_floor_tokens_per_s"] == pytest.approx(3 * 16 * f["gemm_GFLOPps"] * 1e9 / flops, rel=1e-9)
    with pytest.raises(Exception, match="logits must be"):
        bench_runner(runner, prompt_len=4, decode_steps=1, repeat=1, progress=False, logits="first")
