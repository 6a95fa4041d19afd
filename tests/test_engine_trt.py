"""TensorRT engines built and run (marked `trt` and `gpu`: skipped with the reason where TensorRT or a GPU is
missing). For each family and each plugin mode this TensorRT allows: `ssmrt build`, then the engine against the
PyTorch reference over a prompt and 32 decode steps (logits and every state), the CUDA-graph decode equal to
the eager one, a mixed-length batch equal to each sequence alone, snapshot / fork, and `ssmrt bench`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from test_models import random_lm

from ssmrt.cli import main
from ssmrt.compare import compare_runners
from ssmrt.exporter import export_model
from ssmrt.runtime import Session, TorchRunner

pytestmark = [pytest.mark.trt, pytest.mark.gpu]

FAMILIES = {
    "mamba1": dict(arch="mamba1", d_model=32, n_layer=2, d_state=8),
    "mamba2": dict(arch="mamba2", d_model=48, n_layer=2, d_state=16, headdim=16, ngroups=2, chunk_size=16),
}
MODES = ["aot", "jit", "none"]


def _mode_reason(mode: str) -> str | None:
    import tensorrt

    from ssmrt.engine.build import MIN_TENSORRT_PLUGINS, version_tuple

    if mode != "none" and version_tuple(tensorrt.__version__) < MIN_TENSORRT_PLUGINS:
        return f"TensorRT {tensorrt.__version__} has no AOT plugins"
    return None


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """(family, mode) -> (model, engine dir), built once per module."""
    cache = {}

    def get(family, mode):
        why = _mode_reason(mode)
        if why:
            pytest.skip(why)
        if (family, mode) not in cache:
            from ssmrt.engine.build import build

            root = tmp_path_factory.mktemp(f"{family}-{mode}")
            model = random_lm(**FAMILIES[family])
            art = export_model(model, root / "art", target="tensorrt" if mode != "none" else "portable")
            cache[family, mode] = model, build(art, root / "engine", max_batch=4, max_seq=128, plugins=mode,
                                               echo=print)
        return cache[family, mode]

    return get


def runner(engine_dir, decode="cuda_graph"):
    from ssmrt.engine.runner import TensorRTRunner

    return TensorRTRunner(engine_dir, decode=decode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("decode", ["cuda_graph", "eager"])
def test_prefill_then_32_steps_match_the_reference(engines, family, mode, decode):
    model, out = engines(family, mode)
    prompt = np.random.default_rng(1).integers(0, 97, 40).tolist()
    report = compare_runners(TorchRunner(model), runner(out, decode), prompt, steps=32)
    print(report.format())
    assert report.passed and len(report.steps) == 33 and len(report.states) == 2 * model.config.n_layer


@pytest.mark.parametrize("mode", ["aot", "none"])
def test_cuda_graph_decode_equals_eager_and_refuses_stale_states(engines, mode):
    _, out = engines("mamba2", mode)
    graph, eager = runner(out, "cuda_graph"), runner(out, "eager")
    ids = np.array([[3, 5, 7, 11]])
    results = {}
    for name, r in (("graph", graph), ("eager", eager)):
        _, state = r.forward(ids, r.zero_state(1))
        logits = []
        for token in (2, 4, 6, 8):
            step, state = r.forward(np.array([[token]]), state)
            logits.append(step)
        results[name] = np.concatenate(logits, axis=1)
    np.testing.assert_array_equal(results["graph"], results["eager"])
    _, s0 = graph.forward(ids, graph.zero_state(1))
    _, s1 = graph.forward(np.array([[1]]), s0)
    kept = graph.copy(s1)
    _, s2 = graph.forward(np.array([[2]]), s1)
    _, _ = graph.forward(np.array([[3]]), s2)  # writes s1's buffers again
    with pytest.raises(RuntimeError, match="stale"):
        graph.forward(np.array([[4]]), s1)
    a, _ = graph.forward(np.array([[2]]), kept)
    b, _ = eager.forward(np.array([[2]]), eager.copy(kept))
    np.testing.assert_allclose(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["aot", "none"])
def test_mixed_length_batch_equals_each_alone_and_fork(engines, mode):
    _, out = engines("mamba1", mode)
    r = runner(out)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    s = Session(r)
    s.prefill(prompts)
    together = s.generate(None, max_new_tokens=6, temperature=0.0)
    alone = []
    for p in prompts:
        one = Session(runner(out))
        one.prefill([p])
        alone.append(one.generate(None, max_new_tokens=6, temperature=0.0)[0])
    assert together == alone
    s = Session(r)
    s.prefill([prompts[1]])
    snap = s.snapshot()
    first = s.generate(None, max_new_tokens=4, temperature=0.0)
    s.restore(snap, fork=2)
    forked = s.generate(None, max_new_tokens=4, temperature=0.0)
    assert forked == [first[0], first[0]]


def test_bench_and_inspect_run(engines):
    _, out = engines("mamba2", "aot")
    res = CliRunner().invoke(main, ["bench", str(out), "--prompt-len", "64", "--decode-steps", "8", "--repeat", "1",
                                    "--json"])
    assert res.exit_code == 0, res.output
    b = json.loads(res.output)
    assert b["backend"].startswith("tensorrt") and b["decode_ms_per_token"] > 0
    res = CliRunner().invoke(main, ["inspect", str(out)])
    assert res.exit_code == 0 and "plugins aot" in res.output
