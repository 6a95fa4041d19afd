"""Bad inputs to running a model: generation arguments (API and CLI), prompts, non-finite logits, a Session used
from two threads, foreign snapshots. Each is refused in one line naming what was wrong; the valid neighbours
still work."""

from __future__ import annotations

import json
import threading
import types

import numpy as np
import onnx
import pytest
from bad_inputs import assert_refused, ssmrt, tree
from onnx import numpy_helper
from test_models import random_lm

from ssmrt import SsmrtError
from ssmrt.exporter import export_model
from ssmrt.models.checkpoints import save_model
from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact, Runner, Session, Snapshot, TorchRunner, sample
from ssmrt.runtime.sampling import MAX_NEW_TOKENS

MAMBA2 = dict(arch="mamba2", d_model=48, n_layer=2, d_state=16, headdim=16, ngroups=2, chunk_size=4)
MAMBA1 = dict(arch="mamba1", d_model=32, n_layer=2, d_state=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """root with ckpt/ (a tiny Mamba-2), art/ (its artifact) and nan/ (an artifact whose logits are all NaN)."""
    root = tmp_path_factory.mktemp("run")
    model = random_lm(**MAMBA2)
    save_model(model, root / "ckpt")
    export_model(model, root / "art")
    # export refuses a model with NaN weights, so the artifact is broken afterwards, as a damaged file would be
    export_model(model, root / "nan")
    graph = onnx.load(str(root / "nan" / "model.onnx"))
    norm = next(t for t in graph.graph.initializer if t.name.endswith("norm_f.weight"))
    values = numpy_helper.to_array(norm).copy()
    values[0] = np.nan  # every logit sums over this channel
    norm.CopyFrom(numpy_helper.from_array(values, norm.name))
    onnx.save(graph, str(root / "nan" / "model.onnx"))
    return types.SimpleNamespace(root=root, ckpt=root / "ckpt", art=root / "art", nan=root / "nan", model=model)


@pytest.fixture(scope="module")
def runner(tiny):
    return OnnxRuntimeRunnerFromArtifact(tiny.art, native_ops="off")


# ------------------------------------------------------------------------------------------------ the CLI

GEN = ["generate", "{art}", "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]

CLI_CASES = [
    (GEN + ["--temperature", "nan"], ["--temperature", "nan"]),
    (GEN + ["--temperature", "-1"], ["--temperature", "-1"]),
    (GEN + ["--top-k", "a"], ["--top-k", "'a'"]),
    (GEN + ["--top-k", "-3"], ["--top-k", "-3"]),
    (GEN + ["--top-p", "1.5"], ["--top-p", "(0, 1]"]),
    (GEN + ["--seed", "-1"], ["--seed", ">= 0"]),
    (["generate", "{art}", "--prompt-ids", "1", "--max-new-tokens", "-1"], ["--max-new-tokens", "-1"]),
    (["generate", "{art}", "--prompt-ids", "1", "--max-new-tokens", "10000000"], ["--max-new-tokens", "1_000_000"]),
    (["generate", "{art}", "--prompt-ids", "1.5,2"], ["--prompt-ids", "'1.5,2'"]),
    (GEN + ["--stop-ids", "abc"], ["--stop-ids", "'abc'"]),
    (["compare", "{ckpt}", "{art}", "--atol", "-1"], ["--atol", "-1"]),
    (["compare", "{ckpt}", "{art}", "--rtol", "-1"], ["--rtol", "-1"]),
    (["bench", "{art}", "--prompt-len", "0", "--no-floors"], ["--prompt-len", "0"]),
    (["bench", "{art}", "--prompt-len", "-5", "--no-floors"], ["--prompt-len", "-5"]),
    (["generate", "{nan}", "--prompt-ids", "1,2", "--max-new-tokens", "3"], ["not finite", "after prefill"]),
    (GEN + ["--stop-ids", "97"], ["stop id 97", "outside the vocabulary"]),
    (["generate", "", "--prompt-ids", "1"], ["PATH", "is empty"]),  # not the current directory
    (GEN + ["--threads", "-1"], ["--threads", "-1"]),
    (GEN + ["--threads", "100000"], ["--threads", "100000", "this machine's CPUs"]),
    (["generate", "{ckpt}", "--prompt-ids", "1", "--provider", "cpu"], ["--provider applies to an artifact"]),
    (["generate", "{ckpt}", "--prompt-ids", "1", "--opt-level", "basic"], ["--opt-level applies to an artifact"]),
    (["bench", "{art}", "--prompt-len", "1000000001"], ["--prompt-len", "1_000_000"]),
    (["bench", "{art}", "--prompt-len", "99999999999999999999"], ["--prompt-len"]),
    (["bench", "{art}", "--decode-steps", "1000000001"], ["--decode-steps", "1_000_000"]),
    (["bench", "{art}", "--batch", "0"], ["--batch", "0"]),
    (["bench", "{art}", "--batch", "100000000"], ["--batch", "65_536"]),
    (["bench", "{art}", "--repeat", "1000000000"], ["--repeat", "1_000"]),
    # within every bound, and still more than any machine has: refused before a token is fed
    (["bench", "{art}", "--batch", "65536", "--prompt-len", "1000000"], ["--batch x --prompt-len", "65,536 x 1,000,000",
                                                                         "needs at least"]),
    (["demo", "--train-seconds", "nan"], ["--train-seconds", "nan"]),
    (["demo", "--train-seconds", "-1"], ["--train-seconds", "-1"]),
    (["demo", "--train-seconds", "inf"], ["--train-seconds", "inf"]),
    (["demo", "--train-seconds", "1e9"], ["--train-seconds", "86_400"]),
    (["demo", "--prompt", ""], ["--prompt", "''"]),
    (["demo", "--top-k", "-1"], ["--top-k", "-1"]),
]


@pytest.mark.parametrize("args,fragments", CLI_CASES, ids=[" ".join(x for x in a if "{" not in x) for a, _ in
                                                           CLI_CASES])
def test_cli_refuses(tiny, tmp_path, args, fragments):
    before = tree(tiny.root)
    res = ssmrt(*[a.format(art=tiny.art, ckpt=tiny.ckpt, nan=tiny.nan) for a in args], cwd=tmp_path)
    line = assert_refused(res, *fragments)
    if "--stop-ids" in fragments:
        assert "--prompt-ids" not in line  # the option at fault, not its neighbour
    assert tree(tiny.root) == before
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran


def test_cli_valid_arguments_still_generate(tiny, tmp_path):
    before = tree(tiny.root)
    res = ssmrt("generate", tiny.art, "--prompt-ids", "1, 2,3", "--max-new-tokens", "5", "--temperature", "0.7",
                "--top-k", "5", "--top-p", "0.9", "--seed", "0", "--stop-ids", "96", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["prompt_ids"] == [1, 2, 3] and 1 <= len(out["generated_ids"]) <= 5
    assert tree(tiny.root) == before


# ------------------------------------------------------------------------------------ generation arguments

BAD_KWARGS = [
    (dict(temperature=float("nan")), r"temperature \(--temperature\) must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(top_k="a"), r"top_k \(--top-k\) must be an integer >= 0"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), r"top_p \(--top-p\) must be in \(0, 1\]"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(seed=-1), r"seed \(--seed\) must be an integer >= 0"),
    (dict(seed=1.5), "seed"),
    (dict(max_new_tokens=-1), r"max_new_tokens \(--max-new-tokens\) must be an integer in \[0, 1_000_000\]"),
    (dict(max_new_tokens=MAX_NEW_TOKENS + 1), "max_new_tokens"),
    (dict(max_new_tokens=4.0), "max_new_tokens"),
    (dict(stop_ids="12"), r"stop_ids \(--stop-ids\) must be a list"),
    (dict(stop_ids=[1.5]), "stop_ids"),
    (dict(stop_ids=[-1]), "stop_ids"),
]


@pytest.mark.parametrize("kwargs,match", BAD_KWARGS, ids=[repr(k) for k, _ in BAD_KWARGS])
def test_generate_refuses_bad_arguments(runner, kwargs, match):
    session = Session(runner)
    with pytest.raises(SsmrtError, match=match):
        session.generate([1, 2, 3], **{"max_new_tokens": 4, **kwargs})
    with pytest.raises(SsmrtError, match=match):
        session.stream([1, 2, 3], **{"max_new_tokens": 4, **kwargs})  # at the call, not at the first token
    assert session.state is None  # refused before the prompt was fed


BAD_PROMPTS = [
    ([[[1, 2]]], r"prompt_ids\[0\]\[0\] must be a token id \(int\), got \[1, 2\]"),
    ([1, [2]], r"prompt_ids\[1\] must be a token id"),
    ([[1], 2], r"prompt_ids\[1\] must be a list of token ids"),
    ([3.7, 1], r"prompt_ids\[0\] must be a token id \(int\), got 3.7"),
    ([[1, 2], [3, 4.0]], r"prompt_ids\[1\]\[1\] must be a token id"),
    ([True, 2], r"prompt_ids\[0\] must be a token id"),
    ("hello", "encode text with the tokenizer"),
    (7, "must be a list of token ids"),
    (np.array([1.0, 2.0]), "float64 array"),
    (np.zeros((1, 1, 2), dtype=np.int64), "shape"),
]


@pytest.mark.parametrize("prompt,match", BAD_PROMPTS, ids=[repr(p).replace(" ", "") for p, _ in BAD_PROMPTS])
def test_prompts_must_be_ints(runner, prompt, match):
    session = Session(runner)
    with pytest.raises(SsmrtError, match=match):
        session.prefill(prompt)
    with pytest.raises(SsmrtError, match=match):
        session.generate(prompt, 2)
    assert session.state is None


def test_valid_arguments_and_numpy_ids_still_work(runner):
    session = Session(runner)
    want = session.generate([1, 2, 3], 6)
    assert session.generate(np.array([1, 2, 3]), np.int64(6)) == want
    assert session.generate((np.int32(1), 2, 3), 6, temperature=0, top_k=0, top_p=1, seed=0) == want
    assert session.generate(np.array([[1, 2, 3], [1, 2, 3]]), 6) == [want, want]
    assert session.generate([1, 2, 3], 0) == []
    kw = dict(temperature=0.8, top_k=np.int64(10), top_p=0.9, seed=np.uint8(3), stop_ids=np.array([5]))
    assert session.generate([1, 2, 3], 8, **kw) == session.generate([1, 2, 3], 8, **kw)
    with pytest.raises(SsmrtError, match=r"step\(\) tokens must be token ids \(ints\), got 1.5"):
        session.step(1.5)
    session.step(np.int64(4))  # numpy ints are ints


def test_sample_refuses_bad_arguments_and_logits():
    logits = np.array([0.0, 1.0, 2.0])
    with pytest.raises(SsmrtError, match="temperature"):
        sample(logits, temperature=float("nan"))
    with pytest.raises(SsmrtError, match="top_k"):
        sample(logits, temperature=1.0, top_k="a")
    with pytest.raises(SsmrtError, match="not finite"):
        sample(np.array([0.0, np.nan, 1.0]))
    with pytest.raises(SsmrtError, match="not finite"):
        sample(np.array([-np.inf, -np.inf]), temperature=1.0)
    assert sample(np.array([-np.inf, 0.0, -np.inf]), temperature=1.0, rng=np.random.default_rng(0)) == 1  # a mask
    assert sample(logits, temperature=1e-308, rng=np.random.default_rng(0)) == 2  # no overflow to NaN


def test_runner_calls_refuse_what_is_not_their_arguments(tiny, runner):
    from ssmrt.runtime import TorchRunnerFromCheckpoint

    state = runner.zero_state(1)
    with pytest.raises(SsmrtError, match="input_ids must be token ids .integers., got a float64 array"):
        runner.forward(np.array([[1.5]]), state)  # would run token 1
    with pytest.raises(SsmrtError, match=r"token id 97 is outside the vocabulary \[0, 97\)"):
        runner.forward(np.array([[97]]), state)
    with pytest.raises(SsmrtError, match=r"input_ids must be \(batch, seqlen\)"):
        runner.forward(np.array([1, 2]), state)
    with pytest.raises(SsmrtError, match="state must be 4 arrays"):
        runner.forward(np.array([[1]]), state[:1])
    with pytest.raises(SsmrtError, match="batch must be an integer >= 0, got -1"):
        runner.zero_state(-1)
    with pytest.raises(SsmrtError, match="threads .--threads. must be an integer from 0"):
        OnnxRuntimeRunnerFromArtifact(tiny.art, threads=-1)
    with pytest.raises(SsmrtError, match="got '2'"):
        OnnxRuntimeRunnerFromArtifact(tiny.art, threads="2")
    with pytest.raises(SsmrtError, match=r"Session\(runner\) takes a runner .*got str"):
        Session("runner")
    with pytest.raises(SsmrtError, match=r"TorchRunner\(model\) takes an ssmrt model .*got str"):
        TorchRunner("model")
    with pytest.raises(SsmrtError, match="logits must be numbers"):
        sample(["a", "b"])
    with pytest.raises(SsmrtError, match="dtype must be one of float32, float16, bfloat16, float64 .*'int8'"):
        TorchRunnerFromCheckpoint(tiny.ckpt, dtype="int8")
    with pytest.raises(SsmrtError, match="device must be 'cpu' or 'cuda'.*'tpu'"):
        TorchRunnerFromCheckpoint(tiny.ckpt, device="tpu")
    logits, _ = runner.forward(np.array([[1, 2]], dtype=np.int32), runner.zero_state(1))  # any integer dtype
    assert logits.shape[:2] == (1, 2)


def test_requests_that_cannot_fit_in_memory_are_refused_before_they_run(runner, monkeypatch):
    from ssmrt.bench import bench_runner
    from ssmrt.runtime import limits

    session = Session(runner)
    session.prefill([1, 2, 3])
    with pytest.raises(SsmrtError, match=r"restore\(fork=...\): a batch of 1,000,000,000 sequences needs at least"):
        session.restore(session.snapshot(), fork=10**9)  # a billion states, not a billion-entry index first
    with pytest.raises(SsmrtError, match=r"prompt_len \(--prompt-len\) must be an integer from 1 to 1_000_000"):
        bench_runner(runner, prompt_len=10**9, progress=False)
    # a prompt this machine could hold, on a machine that has 100 MiB free
    monkeypatch.setattr(limits, "available_memory", lambda device: 100 << 20)
    with pytest.raises(SsmrtError, match=r"prompt_ids: a prefill of 1 x 100,000 tokens needs at least .* MiB, and "
                                         r"cpu memory has 100.0 MiB free"):
        Session(runner).generate([1] * 100_000, 1)
    assert Session(runner).generate([1, 2, 3], 2)  # small ones are not even measured


# ------------------------------------------------------------------------------------ a stub runner


class StubRunner(Runner):
    """Counts tokens: the logits after token t favour t + 1. nan_at: the forward call (1 = the prefill) from which
    the logits are NaN; gate: (entered, release) events the first forward call sets and waits on."""

    name = "stub"

    def __init__(self, vocab=16, nan_at=None, gate=None):
        self.config = types.SimpleNamespace(vocab_size=vocab, padded_vocab_size=vocab,
                                            to_dict=lambda: {"arch": "stub", "vocab_size": vocab})
        self.nan_at, self.gate, self.calls = nan_at, gate, 0

    def zero_state(self, batch):
        return [np.zeros((batch, 1), np.float32)]

    def forward(self, input_ids, state):
        self.calls += 1
        if self.gate is not None and self.calls == 1:
            self.gate[0].set()
            assert self.gate[1].wait(30)
        v = self.config.vocab_size
        logits = np.eye(v, dtype=np.float32)[(input_ids[:, -1] + 1) % v][:, None, :]
        if self.nan_at is not None and self.calls >= self.nan_at:
            logits[-1] = np.nan  # the last sequence of the batch breaks
        return logits, [state[0] + input_ids.shape[1]]


@pytest.mark.parametrize("nan_at,batch,where", [(1, 1, "after prefill"), (4, 1, "after decode step 3"),
                                                (3, 2, "of sequence 1 are not finite .* after decode step 2")])
def test_non_finite_logits_stop_generation(nan_at, batch, where):
    session = Session(StubRunner(nan_at=nan_at))
    prompt = [1, 2] if batch == 1 else [[1, 2], [5, 6]]
    with pytest.raises(SsmrtError, match=where):
        session.generate(prompt, 10)
    session = Session(StubRunner(nan_at=nan_at))
    got = []
    with pytest.raises(SsmrtError, match=where):
        for t in session.stream(prompt, 10):
            got.append(t)
    assert len(got) == nan_at - 1  # every token before the break came out


def test_finite_stub_counts_up():
    assert Session(StubRunner()).generate([1, 2], 4) == [3, 4, 5, 6]


# -------------------------------------------------------------------------------------------- threads


def _in_thread(fn):
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the test's thread
            out["error"] = e

    t = threading.Thread(target=target)
    t.start()
    return t, out


def test_a_session_in_use_by_another_thread_is_refused():
    entered, release = threading.Event(), threading.Event()
    runner = StubRunner(gate=(entered, release))
    session = Session(runner)
    t, out = _in_thread(lambda: session.generate([1, 2], 3))
    try:
        assert entered.wait(30)  # the other thread is inside generate(), held in the runner
        calls = [lambda: session.generate([3], 2), lambda: session.prefill([3]), lambda: session.step(3),
                 session.snapshot, session.reset, lambda: session.stream([3], 2)]
        for call in calls:
            with pytest.raises(SsmrtError, match=r"^this Session is in use by another thread; use one Session per "
                                                 r"thread \(they can share a runner\)$"):
                call()
        assert Session(runner).generate([7], 2) == [8, 9]  # another Session over the same runner runs meanwhile
    finally:
        release.set()
        t.join(30)
    assert "error" not in out and out["value"] == [3, 4, 5]  # the first caller was not disturbed
    assert session.generate(None, 2) == [6, 7]  # free again once that thread left, its state whole


def test_sessions_sharing_a_runner_across_threads(runner):
    prompts = [[1, 2, 3], [9, 8], [4, 4, 4, 4], [7]]
    want = [Session(runner).generate(p, 12) for p in prompts]
    threads = [_in_thread(lambda p=p: Session(runner).generate(p, 12)) for p in prompts]
    for t, _ in threads:
        t.join(60)
    assert [out.get("value", out.get("error")) for _, out in threads] == want


def test_a_paused_stream_refuses_to_continue_from_another_state():
    session = Session(StubRunner())
    it = session.stream([1, 2], 5)
    assert next(it) == 3
    session.generate([10], 1)
    with pytest.raises(SsmrtError, match="changed by another call since its last token"):
        next(it)
    it = session.stream([1, 2], 3)  # a stream used alone runs to the end, other streams after it
    assert list(it) == [3, 4, 5] and session.generate(None, 1) == [6]


# ------------------------------------------------------------------------------------------- snapshots


def test_restore_refuses_a_foreign_snapshot(tiny, runner):
    session = Session(runner)
    session.prefill([1, 2, 3])
    other_arch = Session(TorchRunner(random_lm(**MAMBA1)))
    other_arch.prefill([1, 2, 3])
    with pytest.raises(SsmrtError, match=r"^restore\(\): the snapshot was taken over another model \(arch 'mamba1', "
                                         r"this Session's is 'mamba2'\)"):
        session.restore(other_arch.snapshot())
    other_size = Session(TorchRunner(random_lm(**{**MAMBA2, "d_model": 32})))
    other_size.prefill([1, 2, 3])
    with pytest.raises(SsmrtError, match="another model .d_model 32"):
        session.restore(other_size.snapshot())
    other_backend = Session(TorchRunner(tiny.model))  # the same model, its state as torch tensors
    other_backend.prefill([1, 2, 3])
    with pytest.raises(SsmrtError, match=r"holds state array 0 as Tensor .*keeps ndarray float32"):
        session.restore(other_backend.snapshot())
    snap = session.snapshot()
    with pytest.raises(SsmrtError, match="not all of its batch of 2"):
        session.restore(Snapshot(snap.state, np.concatenate([snap.last_logits] * 2), [3, 3], runner))
    with pytest.raises(SsmrtError, match=r"restore\(\) takes a Snapshot"):
        session.restore(snap.state)
    with pytest.raises(SsmrtError, match="fork must be an integer >= 1"):
        session.restore(snap, fork=1.5)


def test_restore_takes_a_snapshot_of_the_same_model(tiny, runner):
    session = Session(runner)
    session.prefill([1, 2, 3])
    snap = session.snapshot()
    want = session.generate(None, 6)
    twin = Session(OnnxRuntimeRunnerFromArtifact(tiny.art, native_ops="off"))  # another runner, same artifact
    twin.restore(snap, fork=2)
    assert twin.generate(None, 6) == [want, want]
    shared = Session(runner)  # another Session over the same runner
    shared.restore(snap)
    assert shared.generate(None, 6) == want


def test_physical_cores_counts_cores_not_hyperthreads(tmp_path, monkeypatch):
    """The pool size the float16 decode matmuls are told when the session's threads are left to ONNX Runtime: one
    a physical core among the CPUs the process may run on; 0 (not known) where /sys has no topology."""
    from ssmrt.runtime import limits

    for cpu, (package, core) in enumerate([(0, 0), (0, 0), (0, 1), (0, 1), (1, 0), (1, 0)]):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    monkeypatch.setattr(limits.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    assert limits.physical_cores(str(tmp_path)) == 3
    monkeypatch.setattr(limits.os, "sched_getaffinity", lambda pid: {2, 3, 4})
    assert limits.physical_cores(str(tmp_path)) == 2
    monkeypatch.setattr(limits.os, "sched_getaffinity", lambda pid: {6})
    assert limits.physical_cores(str(tmp_path)) == 0
