"""`ssmrt compare` on tiny models: the report's machinery (verdict order, modes, JSON, progress, plot, long runs,
bad arguments). The calibration itself is proven on real sizes in test_compare_calibrated.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from bad_inputs import assert_refused, ssmrt
from hf_models import hf_model, save_hf
from planted_bugs import _Wrapped

from ssmrt.compare import (
    LogitStats,
    Report,
    StateSeries,
    StepResult,
    baseline_runner,
    check_plot_path,
    compare_runners,
    plot_drift,
    reference_runner,
)
from ssmrt.errors import SsmrtError
from ssmrt.exporter import export


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    ckpt = save_hf(hf_model("mamba2-g1"), root / "ckpt")
    art = export(ckpt, root / "art16", dtype="float16")
    return ckpt, art


def _stats(rms: float) -> LogitStats:
    return LogitStats(max_abs=rms * 3, rms_abs=rms, mean_abs=rms, median_abs=rms, p99_abs=rms, max_rel=0.0,
                      cosine=1.0, top1=1.0, top5=1.0, kl_mean=0.0, kl_max=0.0, atol_needed=0.0)


def _report(logits: list[float], states: dict[tuple[int, str], list[float]]) -> Report:
    """A calibrated float16 report whose baseline errors are all 1.0 (so the band is 2 + a tiny floor)."""
    r = Report("ref", "cand", "float16", 0.05, 0.05, 4, mode="calibrated", baseline="base")
    for t, e in enumerate(logits):
        s = StepResult(t, 1, 1e-6, _stats(e), _stats(1.0))
        s.bound = r.bound(1.0, 1e-6)
        r.steps.append(s)
    for (layer, kind), errs in states.items():
        r.states.append(StateSeries(layer, kind, list(errs), list(errs), [1.0] * len(errs), [1e-6] * len(errs)))
    return r


def test_verdict_names_the_first_step_then_the_first_layer():
    r = _report([0.5, 0.5, 3.0], {(0, "conv"): [0.1, 0.1, 0.1], (0, "ssm"): [0.1, 0.1, 0.1],
                                  (3, "conv"): [0.1, 2.5, 9.0], (3, "ssm"): [0.1, 0.1, 9.0],
                                  (1, "ssm"): [0.1, 0.1, 5.0]})
    v = r.verdict
    assert not v.passed and (v.metric, v.layer, v.kind, v.step) == ("state", 3, "conv", 1), v
    assert v.line.startswith("FAILED (calibrated): layer 3 conv state at step 1 leaves the band first")
    r = _report([0.5, 2.1], {(0, "ssm"): [0.1, 1.9]})
    assert (r.verdict.metric, r.verdict.step) == ("logits", 1)
    r = _report([0.5, 1.9], {(0, "ssm"): [0.1, 1.5]})
    v = r.verdict
    assert v.passed and (v.metric, v.step) == ("logits", 1) and "closest: the logits at step 1" in v.line


def test_non_finite_candidate_fails_and_the_json_still_parses():
    r = _report([0.5, float("nan")], {(0, "ssm"): [0.1, float("inf")]})
    assert not r.passed
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["states"][0]["candidate"][1] == "inf" and d["steps"][1]["candidate"]["rms_abs"] == "nan"


def test_calibrated_and_tolerance_modes(tiny):
    ckpt, art = tiny
    from ssmrt.runtime import OnnxRuntimeRunner

    cand = OnnxRuntimeRunner(art / "model.onnx")
    ref = reference_runner(ckpt)
    prompt = [1, 2, 3, 4, 5]
    rep = compare_runners(ref, cand, prompt, steps=3, baseline=baseline_runner(ckpt, cand))
    assert rep.mode == "calibrated" and rep.passed and rep.baseline == "torch (float16, cpu)"
    assert rep.reference == "torch (float64, cpu)" and rep.factor == 2.0
    # any tolerance given forces the fixed-tolerance mode (and the baseline is not run)
    for kw in ({"atol": 1e-9}, {"rtol": 0.0}, {"dtype": "float32"}):
        rep = compare_runners(ref, cand, prompt, steps=1, baseline=baseline_runner(ckpt, cand), **kw)
        assert rep.mode == "tolerance" and rep.baseline is None and rep.verdict.line.startswith(
            ("FAILED (tolerance)", "PASSED (tolerance)"))
    assert not compare_runners(ref, cand, prompt, steps=1, atol=1e-9, rtol=0.0).passed
    # no baseline: the tolerance table, as the report always judged
    assert compare_runners(ref, cand, prompt, steps=1).mode == "tolerance"


class _NaNAfter(_Wrapped):
    def forward(self, ids, state):
        logits, new = self.inner.forward(ids, state)
        return (logits * np.nan if np.asarray(ids).shape[1] == 1 else logits), new


def test_a_candidate_turning_nan_fails(tiny):
    ckpt, art = tiny
    from ssmrt.runtime import OnnxRuntimeRunner

    cand = OnnxRuntimeRunner(art / "model.onnx")
    rep = compare_runners(reference_runner(ckpt), _NaNAfter(cand, "NaN logits"), [1, 2, 3], steps=2,
                          baseline=baseline_runner(ckpt, cand))
    assert not rep.passed and (rep.verdict.metric, rep.verdict.step) == ("logits", 1)


def test_long_run_keeps_figures_only_and_reports_progress(tiny):
    """Hundreds of steps: per-step figures (floats) are all that is kept, whatever the length, and progress is
    reported after every step up to the total."""
    ckpt, art = tiny
    from ssmrt.runtime import OnnxRuntimeRunner

    cand = OnnxRuntimeRunner(art / "model.onnx")
    seen = []
    rep = compare_runners(reference_runner(ckpt), cand, [7, 8, 9], steps=300, baseline=baseline_runner(ckpt, cand),
                          free_steps=20, progress=lambda n, total: seen.append((n, total)))
    assert seen[-1] == (321, 321) and [n for n, _ in seen] == sorted(n for n, _ in seen)
    assert rep.passed and len(rep.steps) == 301 and rep.free_run.steps == 20

    def only_scalars(x):
        if isinstance(x, dict):
            return all(only_scalars(v) for v in x.values())
        if isinstance(x, list):
            return all(only_scalars(v) for v in x)
        return x is None or isinstance(x, bool | int | float | str)

    assert only_scalars(rep.to_dict())
    assert len(rep.format().splitlines()) < 120  # a long run prints a sampled step table


def test_plot(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    ckpt, art = tiny
    from ssmrt.runtime import OnnxRuntimeRunner

    cand = OnnxRuntimeRunner(art / "model.onnx")
    rep = compare_runners(reference_runner(ckpt), cand, [1, 2], steps=5, baseline=baseline_runner(ckpt, cand))
    out = tmp_path / "drift.png"
    check_plot_path(out)
    plot_drift(rep, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drift.png"]


def test_plot_path_refused_before_any_work(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    (tmp_path / "d.png").mkdir()
    for path, why in ((tmp_path / "d.png", "is a directory"), (tmp_path / "x.txt", "name a .png, .pdf or .svg"),
                      (tmp_path / "no" / "x.png", "does not exist")):
        with pytest.raises(SsmrtError, match=why):
            check_plot_path(path)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SsmrtError, match=r"needs matplotlib.*ssmrt\[plot\]"):
        check_plot_path(tmp_path / "x.png")


@pytest.mark.parametrize("kw,why", [
    (dict(atol=-1.0), "atol must be a finite number >= 0"),
    (dict(rtol=float("nan")), "rtol must be a finite number >= 0"),
    (dict(atol="a"), "atol must be a finite number"),
    (dict(steps=-1), "steps must be an integer from 0"),
    (dict(steps=True), "steps must be an integer"),
    (dict(steps=2.5), "steps must be an integer"),
    (dict(free_steps=10 ** 9), "free_steps must be an integer from 0 to"),
    (dict(prompt_ids=[1.5, 2]), "prompt_ids must be a non-empty list of integer"),
    (dict(prompt_ids=[]), "prompt_ids must be a non-empty list"),
    (dict(prompt_ids="abc"), "prompt_ids must be a non-empty list"),
    (dict(prompt_ids=[[1, 2]]), "prompt_ids must be a non-empty list of integer"),
    (dict(prompt_ids=[10 ** 6]), "outside the vocabulary"),
])
def test_api_arguments_refused(tiny, kw, why):
    ckpt, _ = tiny
    ref = reference_runner(ckpt)
    args = dict(prompt_ids=[1, 2]) | kw
    with pytest.raises(SsmrtError, match=why):
        compare_runners(ref, ref, **args)


def test_cli_calibrated_json_and_exit_codes(tiny, tmp_path):
    ckpt, art = tiny
    res = ssmrt("compare", ckpt, art, "--steps", "70", "--free-steps", "4", "--json", "--plot", tmp_path / "d.svg")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)  # the progress bar went to stderr
    assert rep["version"] == 1 and rep["mode"] == "calibrated" and rep["passed"] and len(rep["steps"]) == 71
    assert rep["free_run"]["steps"] == 4 and (tmp_path / "d.svg").stat().st_size > 0
    assert "compare" in res.stderr and "Traceback" not in res.stderr
    res = ssmrt("compare", ckpt, art, "--steps", "2", "--atol", "1e-9", "--rtol", "0")
    assert res.returncode == 1 and res.stdout.strip().splitlines()[-1].startswith("FAILED (tolerance)")
    res = ssmrt("compare", ckpt, art, "--steps", "2", "--reference-dtype", "float32")
    assert res.returncode == 0 and "reference: torch (float32, cpu)" in res.stdout
    assert res.stdout.strip().splitlines()[-1].startswith("PASSED (calibrated)")


@pytest.mark.parametrize("args,why", [
    (["--free-steps", "-1"], "--free-steps must be between 0 and"),
    (["--steps", str(10 ** 7)], "--steps must be between 0 and"),
    (["--plot", "{tmp}"], "is a directory"),
    (["--plot", "{tmp}/missing/d.png"], "does not exist"),
    (["--plot", "{tmp}/d.jpg2"], "name a .png, .pdf or .svg"),
    (["--atol", "-1"], "--atol must be a finite number >= 0"),
])
def test_cli_bad_arguments_refused_before_work(tiny, tmp_path, args, why):
    ckpt, art = tiny
    before = sorted(p.name for p in tmp_path.iterdir())
    res = ssmrt("compare", ckpt, art, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert_refused(res, why)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_reference_is_float64_and_exact_for_float32_weights(tiny):
    """The float64 reference computes the float32 checkpoint's weights exactly (only A = -exp(A_log) stays the
    float32 the contract defines), its states float64 too; it agrees with the float32 reference to float32
    rounding."""
    ckpt, _ = tiny
    r64, r32 = reference_runner(ckpt), reference_runner(ckpt, "float32")
    ids = np.asarray([[3, 1, 4, 1, 5]])
    l64, s64 = r64.forward(ids, r64.zero_state(1))
    l32, s32 = r32.forward(ids, r32.zero_state(1))
    assert l64.dtype == np.float64 and all(s.dtype == np.float64 for s in r64.to_numpy(s64))
    err = float(np.abs(l64 - l32).max())
    assert 0 < err < 1e-4 * max(1.0, float(np.abs(l64).max())), err
    assert math.isfinite(err)
