"""`ssmrt build` and the TensorRT runner, as far as they can be proven without TensorRT: the profiles, the
sidecar and its round trip, the refusals (TensorRT missing or too old, no GPU, not an artifact, bad profile
values, a foreign file in the output, an engine for another TensorRT or GPU), and the build logic against a
recording stand-in for TensorRT's API (tests/fake_tensorrt.py says what that proves): the network flags, what
the parser gets (the plugin attributes gone with --plugins none), each engine's profiles, the timing cache,
and an engine directory that appears whole or not at all, also when the build is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import fake_tensorrt
import pytest
from click.testing import CliRunner
from test_models import random_lm

from ssmrt import SsmrtError
from ssmrt.cli import main
from ssmrt.engine import (
    ENGINE_FILE,
    PREFILL_ENGINE_FILE,
    SIDECAR_FILE,
    Profile,
    check_compatible,
    profiles,
    read_sidecar,
    recognise_engine_dir,
)
from ssmrt.engine import build as build_mod
from ssmrt.exporter import export_model

FAMILIES = {
    "mamba1": dict(arch="mamba1", d_model=32, n_layer=2, d_state=8),
    "mamba2": dict(arch="mamba2", d_model=48, n_layer=2, d_state=16, headdim=16, ngroups=2, chunk_size=4),
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """family -> {"portable": dir, "tensorrt": dir}, exported once."""
    out = {}
    for family, kw in FAMILIES.items():
        root = tmp_path_factory.mktemp(family)
        model = random_lm(**kw)
        out[family] = {"portable": export_model(model, root / "portable"),
                       "tensorrt": export_model(model, root / "tensorrt", target="tensorrt")}
        (out[family]["tensorrt"] / "tokenizer.json").write_text("{}")  # carried into the engine directory
    return out


@pytest.fixture
def fake_trt(monkeypatch):
    """The recording TensorRT stand-in in sys.modules, a GPU that says sm_90, and plugin registration stubbed."""
    for name in ("tensorrt", "tensorrt_rtx"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    module = fake_tensorrt.install()
    monkeypatch.setattr(build_mod, "gpu_info", lambda: ("Fake H200", "sm_90"))
    import ssmrt.plugins

    registered = []
    monkeypatch.setattr(ssmrt.plugins, "register", lambda: registered.append(True))
    module.registered = registered
    yield module
    for name in ("tensorrt", "tensorrt_rtx"):
        sys.modules.pop(name, None)


# ------------------------------------------------------------------------------------------- profiles


def test_profiles_one_per_engine():
    p = profiles(8, 2048)
    assert p == {ENGINE_FILE: [Profile("decode", (1, 1, 8), (1, 1, 1))],
                 PREFILL_ENGINE_FILE: [Profile("prefill", (1, 1, 8), (2, 512, 2048))]}
    p = profiles(4, 300, opt_batch=2, opt_seq=100)
    assert p == {ENGINE_FILE: [Profile("decode", (1, 2, 4), (1, 1, 1))],
                 PREFILL_ENGINE_FILE: [Profile("prefill", (1, 2, 4), (2, 100, 300))]}
    specs = [{"name": "conv_state.0", "shape": ["batch", 96, 3]}, {"name": "ssm_state.0", "shape": ["batch", 96, 8]}]
    assert p[PREFILL_ENGINE_FILE][0].shapes(specs) == {
        "input_ids": ((1, 2), (2, 100), (4, 300)),
        "conv_state.0": ((1, 96, 3), (2, 96, 3), (4, 96, 3)),
        "ssm_state.0": ((1, 96, 8), (2, 96, 8), (4, 96, 8))}
    assert Profile("decode", (1, 1, 8), (1, 1, 1)).covers(8, 1) and not Profile("d", (1, 1, 8), (1, 1, 1)).covers(9, 1)


@pytest.mark.parametrize("kw,fragment", [
    (dict(max_batch=0, max_seq=64), "--max-batch must be a positive integer, got 0"),
    (dict(max_batch=2, max_seq=1), "--max-seq must be at least 2"),
    (dict(max_batch=2, max_seq=64, opt_batch=3), "--opt-batch must be between 1 and --max-batch (2), got 3"),
    (dict(max_batch=2, max_seq=64, opt_seq=65), "--opt-seq must be between 2 and --max-seq (64), got 65"),
    (dict(max_batch=2, max_seq=64, opt_seq=1), "--opt-seq must be between 2 and --max-seq (64), got 1"),
])
def test_profile_values_that_make_no_profile_are_refused(kw, fragment):
    with pytest.raises(SsmrtError) as e:
        profiles(**kw)
    assert fragment in str(e.value)


# ------------------------------------------------------------------------------------ refusals, no TRT


def run(args):
    res = CliRunner().invoke(main, args)
    print(res.output)
    return res


def test_build_without_tensorrt_is_one_line_exit_2(artifacts, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # hidden, even where it is installed
    res = run(["build", str(artifacts["mamba2"]["portable"]), "-o", str(tmp_path / "e")])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert "tensorrt is not installed (pip install tensorrt)" in res.output
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("args,fragment", [
    (["--max-seq", "1"], "--max-seq must be at least 2"),
    (["--max-batch", "4", "--opt-batch", "5"], "--opt-batch must be between 1 and --max-batch (4), got 5"),
    (["--workspace", "0"], "--workspace must be positive, got 0"),
])
def test_bad_build_options_are_refused_before_tensorrt(artifacts, tmp_path, monkeypatch, args, fragment):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    res = run(["build", str(artifacts["mamba2"]["portable"]), "-o", str(tmp_path / "e"), *args])
    assert res.exit_code == 2 and fragment in res.output, res.output


def test_build_refuses_what_is_not_an_artifact(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    res = run(["build", str(tmp_path), "-o", str(tmp_path / "e")])
    assert res.exit_code == 2 and "not an ssmrt export" in res.output
    res = run(["build", str(tmp_path / "missing"), "-o", str(tmp_path / "e")])
    assert res.exit_code == 2 and "not found" in res.output


def test_build_refuses_a_foreign_file_in_the_output(artifacts, tmp_path, fake_trt):
    out = tmp_path / "e"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = run(["build", str(artifacts["mamba2"]["portable"]), "-o", str(out), "--overwrite"])
    assert res.exit_code == 2 and "notes.txt" in res.output
    assert (out / "notes.txt").read_text() == "mine" and fake_tensorrt.CALLS == []


def test_plugins_need_a_new_enough_tensorrt_and_a_gpu(artifacts, tmp_path, fake_trt, monkeypatch):
    fake_trt.__version__ = "10.3.0"  # JetPack 6
    art = artifacts["mamba2"]["portable"]
    res = run(["build", str(art), "-o", str(tmp_path / "e")])
    assert res.exit_code == 2 and "TensorRT 10.3.0 has no AOT plugin support (needs >= 10.9); build with " \
                                  "--plugins none" in res.output
    assert run(["build", str(art), "-o", str(tmp_path / "e"), "--plugins", "none"]).exit_code == 0
    monkeypatch.setattr(build_mod, "gpu_info", lambda: (None, None))
    res = run(["build", str(art), "-o", str(tmp_path / "f"), "--plugins", "none"])
    assert res.exit_code == 2 and "no CUDA GPU here" in res.output


def test_plugins_refuse_a_low_precision_state(tmp_path, fake_trt):
    art = export_model(random_lm(**FAMILIES["mamba2"]), tmp_path / "a", state_dtype="float16")
    res = run(["build", str(art), "-o", str(tmp_path / "e")])
    assert res.exit_code == 2 and "its SSM state is float16; the plugins keep it float32" in res.output
    assert run(["build", str(art), "-o", str(tmp_path / "e"), "--plugins", "none"]).exit_code == 0


# -------------------------------------------------------------------------------- the build's logic


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("plugins", ["aot", "jit", "none"])
def test_build_calls_tensorrt_as_documented(artifacts, tmp_path, fake_trt, family, plugins):
    """model.engine decodes, prefill.engine takes prompts, each profile over every input: with plugins from a
    tensorrt-target artifact (prefill.engine from prefill.onnx's chains); with --plugins none both from
    model.onnx's bodies, every plugin attribute gone."""
    kind = "portable" if plugins == "none" else "tensorrt"
    art = artifacts[family][kind]
    out = tmp_path / "engine"
    res = run(["build", str(art), "-o", str(out), "--max-batch", "4", "--max-seq", "300", "--opt-seq", "64",
               "--plugins", plugins, "--workspace", "64"])
    assert res.exit_code == 0, res.output
    assert "parse model.onnx for model.engine" in res.output and "build model.engine (decode" in res.output
    assert "serialise" in res.output
    flags = 1 << fake_trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    if plugins != "none":
        flags |= 1 << getattr(fake_trt.NetworkDefinitionCreationFlag, f"PREFER_{plugins.upper()}_PYTHON_PLUGINS")
    engines = {name: json.loads((out / name).read_bytes()) for name in (ENGINE_FILE, PREFILL_ENGINE_FILE)
               if (out / name).exists()}
    doc = read_sidecar(out)
    n = FAMILIES[family]["n_layer"]
    for name, rec in engines.items():
        assert rec["flags"] == flags and rec["pools"] == {"WORKSPACE": 64 << 20}
        assert rec["parsed"]["plugin_attrs"] == ([] if plugins == "none" else ["plugin_namespace", "plugin_version"])
        chains = name == PREFILL_ENGINE_FILE and plugins != "none"
        assert rec["parsed"]["path"] == str(art / ("prefill.onnx" if chains else "model.onnx"))
        assert len(rec["profiles"]) == len(doc["engines"][name])
        for shapes, profile in zip(rec["profiles"], doc["engines"][name], strict=True):
            assert shapes["input_ids"] == [[1, profile.seqlen[0]], [1, profile.seqlen[1]], [4, profile.seqlen[2]]]
            assert len(shapes) == 1 + 2 * n and shapes["ssm_state.1"][2][0] == 4
    assert engines[ENGINE_FILE]["profiles"][0]["input_ids"] == [[1, 1], [1, 1], [4, 1]]
    assert [p.name for p in doc["engines"][ENGINE_FILE]] == ["decode"]
    assert [p.name for p in doc["engines"][PREFILL_ENGINE_FILE]] == ["prefill"]
    if plugins == "none":  # both engines on model.onnx's bodies (the decode one on their step branch)
        scan = "SelectiveScan" if family == "mamba1" else "SSDScan"
        assert engines[PREFILL_ENGINE_FILE]["parsed"]["ops"] == ["CausalConv1d", scan]
        assert fake_trt.registered == []
    else:
        assert sorted(engines) == sorted([ENGINE_FILE, PREFILL_ENGINE_FILE]) and fake_trt.registered
        assert engines[PREFILL_ENGINE_FILE]["parsed"]["ops"] == sorted(
            ["CausalConv1d", *(("SelectiveChunkScan", "SelectiveChunkState", "SelectiveStatePassing")
                               if family == "mamba1" else ("SSDChunkScan", "SSDChunkState", "SSDStatePassing"))])
        assert (out / "tokenizer.json").is_file()
    assert doc["tensorrt"] == "10.13.0" and doc["sm"] == "sm_90" and doc["plugins"] == plugins
    assert doc["config"]["arch"] == family and doc["build"]["max_seq"] == 300 and doc["build"]["opt_seq"] == 64


def test_parser_and_builder_errors_are_one_line(artifacts, tmp_path, fake_trt):
    art = artifacts["mamba1"]["portable"]
    fake_tensorrt.BEHAVIOUR["parse_error"] = "In node 3 (SelectiveScan): unsupported\nmore"
    res = run(["build", str(art), "-o", str(tmp_path / "e"), "--plugins", "none"])
    assert res.exit_code == 2 and "TensorRT's ONNX parser refused it (In node 3 (SelectiveScan): unsupported;" \
        in res.output and res.output.count("\n") == 1
    fake_tensorrt.BEHAVIOUR.clear()
    fake_tensorrt.BEHAVIOUR["build_error"] = "Requested amount of GPU memory could not be allocated: out of memory"
    res = run(["build", str(art), "-o", str(tmp_path / "e"), "--plugins", "none", "--max-batch", "64"])
    assert res.exit_code == 2 and "do not fit the GPU's memory; lower --max-batch / --max-seq" in res.output
    assert "batch up to 64" in res.output and not (tmp_path / "e").exists()


def test_timing_cache_is_created_read_and_written_back(artifacts, tmp_path, fake_trt):
    cache = tmp_path / "timing.cache"
    art = artifacts["mamba2"]["portable"]
    assert run(["build", str(art), "-o", str(tmp_path / "e"), "--plugins", "none",
                "--timing-cache", str(cache)]).exit_code == 0
    assert cache.read_bytes() == b"++"  # a new cache, updated by each of the two builds in turn
    assert run(["build", str(art), "-o", str(tmp_path / "f"), "--plugins", "none",
                "--timing-cache", str(cache)]).exit_code == 0
    assert cache.read_bytes() == b"++++"  # read, and written back
    assert read_sidecar(tmp_path / "e")["build"]["timing_cache"] == str(cache)
    assert sorted(os.listdir(tmp_path)) == ["e", "f", "timing.cache"]  # no temporary file left beside it


def test_rebuild_over_an_engine_directory_and_inspect_it(artifacts, tmp_path, fake_trt):
    art, out = artifacts["mamba2"]["tensorrt"], tmp_path / "e"
    assert run(["build", str(art), "-o", str(out)]).exit_code == 0
    res = run(["build", str(art), "-o", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert run(["build", str(art), "-o", str(out), "--overwrite", "--plugins", "none"]).exit_code == 0
    assert sorted(os.listdir(out)) == sorted([ENGINE_FILE, PREFILL_ENGINE_FILE, SIDECAR_FILE, "tokenizer.json"])
    res = run(["inspect", str(out)])
    assert res.exit_code == 0 and "plugins none" in res.output and "decode batch 1..8, tokens 1..1" in res.output
    doc = json.loads(run(["inspect", str(out), "--json"]).output)
    assert doc["engines"][PREFILL_ENGINE_FILE] == [{"name": "prefill", "batch": [1, 1, 8], "seqlen": [2, 512, 2048]}]


KILL_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import fake_tensorrt
fake_tensorrt.install(sleep=60)
from ssmrt.engine import build as b
b.gpu_info = lambda: ("Fake", "sm_90")
b.build(sys.argv[2], sys.argv[3], plugins="none", echo=print)
"""


def test_a_build_killed_midway_leaves_no_engine_directory(artifacts, tmp_path):
    out = tmp_path / "e"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, os.path.dirname(__file__),
                             str(artifacts["mamba1"]["portable"]), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip().startswith("parse model.onnx for model.engine")
        assert proc.stdout.readline().strip() == "building"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    assert not out.exists() and os.listdir(tmp_path) == []


def test_a_failure_while_writing_leaves_no_engine_directory(artifacts, tmp_path, fake_trt, monkeypatch):
    import ssmrt.engine.build as b

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(b, "write_sidecar", broken)
    with pytest.raises(OSError):
        b.build(artifacts["mamba1"]["portable"], tmp_path / "e", plugins="none", echo=lambda line: None)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------- sidecar, runner


def test_sidecar_round_trip_and_refusals(artifacts, tmp_path, fake_trt):
    out = tmp_path / "e"
    build_mod.build(artifacts["mamba1"]["portable"], out, plugins="none", max_batch=2, max_seq=64,
                    echo=lambda line: None)
    doc = read_sidecar(out)
    assert doc["engines"] == profiles(2, 64)
    check_compatible(doc, "10.13.0", "sm_90", out)  # the same: accepted
    with pytest.raises(SsmrtError, match="built with TensorRT 10.13.0, this is TensorRT 10.14.1; rebuild it here"):
        check_compatible(doc, "10.14.1", "sm_90", out)
    with pytest.raises(SsmrtError, match=r"built for sm_90 \(Fake H200\), this GPU is sm_87; rebuild it here"):
        check_compatible(doc, "10.13.0", "sm_87", out)
    assert recognise_engine_dir(out, os.listdir(out)) is None
    (out / SIDECAR_FILE).write_text("{")
    with pytest.raises(SsmrtError, match="not a valid engine sidecar"):
        read_sidecar(out)
    (out / SIDECAR_FILE).write_text(json.dumps({"format": 99}))
    with pytest.raises(SsmrtError, match="not an engine sidecar of format 1"):
        read_sidecar(out)
    os.remove(out / SIDECAR_FILE)
    with pytest.raises(SsmrtError, match="engine.json: not found"):
        read_sidecar(out)


def test_the_runner_refuses_an_engine_for_another_tensorrt_in_one_line(artifacts, tmp_path, fake_trt, monkeypatch):
    from ssmrt.engine import runner as runner_mod

    out = tmp_path / "e"
    build_mod.build(artifacts["mamba2"]["portable"], out, plugins="none", echo=lambda line: None)
    fake_trt.__version__ = "10.14.0"
    monkeypatch.setattr(runner_mod, "gpu_info", lambda: ("Fake H200", "sm_90"))
    res = run(["generate", str(out), "--prompt-ids", "1,2"])
    assert res.exit_code == 2 and "built with TensorRT 10.13.0, this is TensorRT 10.14.0" in res.output
    monkeypatch.setattr(runner_mod, "gpu_info", lambda: (None, None))
    res = run(["generate", str(out), "--prompt-ids", "1,2", "--backend", "tensorrt"])
    assert res.exit_code == 2 and "a TensorRT engine runs on a CUDA GPU, and there is none here" in res.output
    res = run(["generate", str(out), "--prompt-ids", "1,2", "--device", "cuda"])
    assert res.exit_code == 2 and "--device applies to the torch backend" in res.output
    os.remove(out / ENGINE_FILE)
    res = run(["generate", str(out), "--prompt-ids", "1,2"])
    assert res.exit_code == 2 and "model.engine: missing; the sidecar names it" in res.output


def test_the_tensorrt_backend_on_what_is_not_an_engine(tmp_path):
    res = run(["generate", str(tmp_path), "--prompt-ids", "1", "--backend", "tensorrt"])
    assert res.exit_code == 2 and "engine.json: not found" in res.output


def test_selftest_runs_what_this_machine_can_and_skips_the_rest_with_a_reason(tmp_path):
    res = run(["selftest", "--json", "--workdir", str(tmp_path)])
    report = json.loads(res.output)
    print(json.dumps(report["checks"], indent=1))
    assert res.exit_code == (0 if report["passed"] else 1)
    by = {(c["family"], c["check"]): c for c in report["checks"]}
    for family in FAMILIES:
        assert by[family, "onnxruntime, fallback bodies"]["status"] == "pass"
        assert by[family, "onnxruntime, prefill graph (chains' bodies)"]["status"] == "pass"
        assert all(c["detail"] for c in report["checks"] if c["status"] == "skip")
    assert report["passed"]


# ------------------------------------------------------------------------------ the bodies, one branch


@pytest.mark.parametrize("family", list(FAMILIES))
def test_an_engine_graph_on_the_bodies_takes_one_branch_and_still_computes_the_op(artifacts, tmp_path, family):
    """--plugins none: the decode engine's graph takes the bodies' step branch, the prompt engine's the prefill
    branch, and no ssmrt body branches any more; on ONNX Runtime each gives the artifact's own results for the
    lengths its profile takes (the step: one token; the prefill: any)."""
    import numpy as np
    import onnx

    from ssmrt.engine.build import graph_bytes
    from ssmrt.runtime import OnnxRuntimeRunner

    art = artifacts[family]["portable"]
    original = OnnxRuntimeRunner(art / "model.onnx", native_ops="off")
    for branch, lengths in (("step", [1]), ("prefill", [1, 5, 37])):
        m = onnx.ModelProto()
        m.ParseFromString(graph_bytes(art / "model.onnx", "none", branch))
        assert not [n for f in m.functions for n in f.node if n.op_type == "If"]
        assert not [a for n in m.graph.node for a in n.attribute if a.name.startswith("plugin_")]
        path = art / f"{branch}.onnx"  # beside model.onnx, so its external data resolves
        path.write_bytes(m.SerializeToString())
        try:
            runner = OnnxRuntimeRunner(path, native_ops="off")
            for n in lengths:
                ids = np.random.default_rng(n).integers(0, 97, (2, n))
                want, want_state = original.forward(ids, original.zero_state(2))
                got, got_state = runner.forward(ids, runner.zero_state(2))
                np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=f"{branch} L {n}")
                for g, w in zip(got_state, want_state, strict=True):
                    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5)
        finally:
            os.remove(path)


RTX_SCRIPT = r"""
import json, sys
from ssmrt.engine.build import build
out = build(sys.argv[1], sys.argv[2], plugins="none", engine="tensorrt-rtx", max_batch=2, max_seq=64,
            echo=lambda line: print(line, file=sys.stderr))
print(json.dumps(sorted(p.name for p in out.iterdir())))
"""


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tensorrt_rtx_builds_the_artifact_from_its_bodies(artifacts, tmp_path, family):
    """TensorRT-RTX's parser and builder, which run with no GPU, take both families' artifacts on the fallback
    bodies: a decode engine and a prompt engine, serialised (running them needs an RTX GPU). In a subprocess, so a
    crash of the builder cannot take the test run down."""
    import importlib.util

    if importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.skip("tensorrt-rtx is not installed (pip install tensorrt-rtx)")
    out = tmp_path / "engine"
    res = subprocess.run([sys.executable, "-c", RTX_SCRIPT, str(artifacts[family]["portable"]), str(out)],
                         capture_output=True, text=True, timeout=600)
    print(res.stderr[-3000:])
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == sorted([ENGINE_FILE, PREFILL_ENGINE_FILE, SIDECAR_FILE])
    doc = read_sidecar(out)
    assert doc["engine"] == "tensorrt-rtx" and doc["plugins"] == "none" and doc["sm"] is None
    assert [p.name for ps in doc["engines"].values() for p in ps] == ["decode", "prefill"]
    assert all((out / name).stat().st_size > 1000 for name in (ENGINE_FILE, PREFILL_ENGINE_FILE))
