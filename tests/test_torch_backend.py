"""The torch backend on the kernels, with the decode step from static buffers (a CUDA graph on a GPU):
prefill then teacher-forced steps against the fp32 CPU reference, logits and states.

On the CPU the kernels run in Triton's interpreter and the step runs from the same static buffers without
the capture ("static"); on a GPU (marked gpu) the captured CUDA graph runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_models import random_lm

from ssmrt import SsmrtError
from ssmrt.closeness import assert_close
from ssmrt.compare import compare_runners
from ssmrt.runtime import Session, TorchRunner
from ssmrt.runtime.decode_graph import StaticState

# The kernels run where the tests can run them: on the GPU when there is one, else on the CPU in Triton's
# interpreter (conftest.py sets it only where there is no GPU).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The tests on the kernels are marked triton (skipped without it, conftest.py); the decode-mode errors and the
# per-thread op choice need no kernels and run without it.
FAMILIES = {
    "mamba1": dict(arch="mamba1", d_model=32, d_state=8),
    "mamba2": dict(arch="mamba2", d_model=32, d_state=16, headdim=8, ngroups=2),
}


def prompt(n, seed=0):
    return np.random.default_rng(seed).integers(0, 97, n).tolist()


@pytest.mark.triton
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prefill", [3, 40])
def test_static_decode_on_kernels_matches_reference(family, prefill):
    """Prefill (a 40-token Mamba-2 prefill takes the chunked SSD chain), then 6 steps from static buffers
    that the kernels update in place: the compare report passes at the fp32 tolerance."""
    model = random_lm(**FAMILIES[family])
    reference = TorchRunner(model)
    candidate = TorchRunner(random_lm(**FAMILIES[family]).to(DEVICE), kernels=True, decode="static")
    report = compare_runners(reference, candidate, prompt(prefill), steps=6)
    print(report.format())
    assert report.passed and len(report.steps) == 7
    assert list(candidate._graphs) == [1]


@pytest.mark.triton
@pytest.mark.parametrize("family", FAMILIES)
def test_kernels_update_the_state_in_place(family):
    """With inplace_state every op writes its new state over the one given: a step needs no copies."""
    from ssmrt.kernels.dispatch import use_kernels

    model = random_lm(**FAMILIES[family]).to(DEVICE)
    state = model.zero_state(2, DEVICE)
    ptrs = [t.data_ptr() for pair in state for t in pair]
    with torch.no_grad(), use_kernels(force=True, inplace_state=True):
        _, new = model(torch.tensor([[5], [7]], device=DEVICE), state)
    assert [t.data_ptr() for pair in new for t in pair] == ptrs
    assert any(t.abs().sum() > 0 for pair in state for t in pair)


@pytest.mark.triton
def test_static_state_is_fed_back_without_copies_and_stale_states_are_refused():
    runner = TorchRunner(random_lm(**FAMILIES["mamba2"]).to(DEVICE), kernels=True, decode="static")
    _, state = runner.forward(np.array([prompt(5)]), runner.zero_state(1))
    _, s1 = runner.forward(np.array([[3]]), state)
    assert isinstance(s1, StaticState)
    buffers = [t.data_ptr() for t in s1]
    kept = runner.copy(s1)
    _, s2 = runner.forward(np.array([[4]]), s1)
    assert [t.data_ptr() for t in s2] == buffers
    with pytest.raises(RuntimeError, match="stale"):
        runner.forward(np.array([[4]]), s1)
    # a copy taken in time still continues the sequence, and equals the eager step from it
    logits, _ = runner.forward(np.array([[4]]), kept)
    eager = TorchRunner(runner.model)
    want, _ = eager.forward(np.array([[4]]), kept)
    assert_close(logits, want, name="step from a kept copy")


@pytest.mark.triton
def test_session_on_static_decode_equals_eager():
    """Mixed-length batch, snapshot / fork and sampling go through the static step as through the eager one."""
    model = random_lm(**FAMILIES["mamba1"]).to(DEVICE)
    outs = []
    eager = TorchRunner(model, kernels=False, decode="eager")
    for runner in (eager, TorchRunner(model, kernels=True, decode="static")):
        s = Session(runner)
        s.prefill([prompt(4, 1), prompt(7, 2)])
        snap = s.snapshot()
        a = s.generate(None, max_new_tokens=5, temperature=0.0)
        s.restore(snap, fork=2)
        b = s.generate(None, max_new_tokens=4, temperature=1.0, top_k=5, seed=3)
        outs.append((a, b))
    assert outs[0] == outs[1]


def test_decode_mode_errors():
    model = random_lm(**FAMILIES["mamba1"])
    with pytest.raises(SsmrtError, match="needs the model on a CUDA device"):
        TorchRunner(model, decode="cuda_graph")
    with pytest.raises(SsmrtError, match="decode must be one of"):
        TorchRunner(model, decode="graph")


@pytest.mark.triton
@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_graph_decode_matches_cpu_reference(family, dtype):
    model = random_lm(**FAMILIES[family])
    reference = TorchRunner(model)
    gpu = TorchRunner(random_lm(**FAMILIES[family]).cast(dtype).cuda())
    assert gpu.decode == "cuda_graph" and gpu.kernels
    for prefill in (3, 70):
        report = compare_runners(reference, gpu, prompt(prefill), steps=16)
        print(report.format())
        assert report.passed
    assert list(gpu._graphs) == [1]


def test_op_choice_is_per_thread():
    """An override in one thread is invisible to another: two runners in two threads keep their own ops."""
    import threading

    from ssmrt.ops import dispatch

    entered, checked = threading.Event(), threading.Event()
    seen = {}

    def kernels_thread():
        with dispatch.override(ssd_scan=lambda *a: "kernel"):
            entered.set()
            checked.wait(10)
            seen["inside"] = dispatch.current()["ssd_scan"]

    t = threading.Thread(target=kernels_thread)
    t.start()
    entered.wait(10)
    seen["other thread"] = dispatch.current()["ssd_scan"]
    checked.set()
    t.join()
    assert seen["other thread"] is dispatch.REFERENCES["ssd_scan"]
    assert seen["inside"] is not dispatch.REFERENCES["ssd_scan"]
    assert dispatch.current() == dispatch.REFERENCES


@pytest.mark.triton
@pytest.mark.parametrize("family", FAMILIES)
def test_two_runners_in_two_threads_give_what_each_gives_alone(family):
    """A runner on the kernels and one on the references, called in turn from two threads: each returns,
    bit for bit, what it returns alone (with the op choice process-wide, the reference runner would run
    kernels whenever the other thread was inside its call, and its logits would move)."""
    import threading

    model = random_lm(**FAMILIES[family])
    runners = {"kernels": TorchRunner(random_lm(**FAMILIES[family]).to(DEVICE), kernels=True, decode="eager"),
               "reference": TorchRunner(model)}
    ids = np.array([prompt(7)])
    alone = {k: r.forward(ids, r.zero_state(1))[0] for k, r in runners.items()}
    assert not np.array_equal(alone["kernels"], alone["reference"])  # else the test could not see a mix-up
    barrier = threading.Barrier(2)
    got = {k: [] for k in runners}

    def work(kind):
        r = runners[kind]
        for _ in range(4):
            barrier.wait(30)
            got[kind].append(r.forward(ids, r.zero_state(1))[0])

    threads = [threading.Thread(target=work, args=(k,)) for k in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for kind in runners:
        assert len(got[kind]) == 4 and all(np.array_equal(g, alone[kind]) for g in got[kind]), kind


def test_kernels_on_cpu_tensors_need_the_interpreter(monkeypatch):
    """Outside Triton's interpreter a kernel cannot read CPU tensors: the runner says so in one line, up front,
    rather than failing inside Triton's launcher at the first call."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SsmrtError, match="runs only in Triton's interpreter"):
        TorchRunner(random_lm(**FAMILIES["mamba1"]), kernels=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert TorchRunner(random_lm(**FAMILIES["mamba1"]), kernels=True).kernels
