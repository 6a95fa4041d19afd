"""Parity of a candidate runner with a reference: the same prompt, prefill, then teacher-forced decode steps.

Every runner gets the reference's greedy token at every step, so an error shows where it enters instead of
compounding through diverging text. Per step, the next-token logits (max / mean / median / p99 abs error,
relative error, cosine, top-1 and top-5 agreement, KL divergence of the distributions); per layer and step,
the error of the conv and SSM states; optionally a free-running greedy continuation on both sides.

Two ways to judge:

- calibrated (the default when a baseline runner is given): the baseline is the same model in the candidate's
  precision on plain PyTorch ops, i.e. what "correct in that precision" looks like. The candidate passes when,
  at every step, its RMS error against the reference is within a factor of the baseline's RMS error plus a
  floor (CALIBRATION, by dtype), for the logits and for every layer's conv and SSM states. The verdict names the
  first step, and in it the first layer, that left the band. The states decide too because a bug of one layer
  (a perturbed A, a dropped D) can hide in the logits' rounding while the states after it grow their error.
  RMS rather than max: the largest error is one extreme value, whose ratio between two correct implementations
  swings widely; the RMS of thousands of values is steady, so the factor can be tight.
- tolerance: an absolute + relative tolerance (the table in ops/spec.py, or the one given), as before.

Who judges a candidate (`judges`):
- float weights: the reference is the model in float64, the baseline the model in the candidate's precision.
- quantised weights with float32 activations (export --weights int8|int4 --activations float32): against what its
  weights mean: the reference and the baseline are the model with every quantised matrix replaced by its
  dequantised values (ssmrt.quantize.dequantized_model; GPTQ-rounded matrices' codes read from the artifact,
  since they cannot be rounded again without the calibration text), so the verdict says whether the runtime's
  quantised matmuls compute that model, to the rounding of the candidate's precision. What quantisation costs is a
  different question, answered by the figures against the unquantised model (`original`): per step the
  candidate's KL divergence, top-1 and top-5 agreement with it, and where their free-running texts part.
- quantised weights with int8 activations (the default): the activations' codes are a rounding of float values
  that two correct implementations compute a few ulps apart, so now and then they round one activation to
  neighbouring codes, and one such flip moves a matmul's outputs by about 1e-3 of their size: measured on correct
  artifacts, their error against the exactly computed meaning reached 3000x the float32 band while wrong schemes
  (another block size, symmetric for asymmetric, float activations) reached only 2300x. So their meaning cannot
  be checked to float32 rounding. They are judged by what their scheme costs instead: the reference is the
  unquantised model, the baseline the scheme computed on plain PyTorch in float32 (dequantised weights, each
  matmul's input quantised as MatMulNBits does), the float32 band around it. That catches a scheme computed
  wrongly enough to cost more than the scheme does (a wrong scale, zero point or layout), not one that costs
  about the same.
- `band` (compare --band DTYPE): any candidate against the unquantised model, the baseline that model in DTYPE
  on plain PyTorch, DTYPE's band: "is this artifact as close to the model as a DTYPE deployment would be?", e.g.
  an int8 artifact against the float16 band.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import SsmrtError
from .ops.spec import tolerance
from .runtime.backends import Runner

REPORT_VERSION = 1

# dtype -> (factor, floor in ulps): the candidate's RMS error may be `factor` times the baseline's at the same
# step and layer, plus `floor` units in the last place of the dtype at the reference's RMS. Chosen from correct
# candidates measured against their baselines (Mamba-1 and Mamba-2, 12 layers, three seeds, prompts of 16 and 100,
# and a trained byte-level model; README's compare section). In float16 / bfloat16, rounding every activation to
# 11 / 8 bits dominates whatever the implementation: the worst ratio measured was 1.44, so 2x. In float32 the error
# is made by how each implementation evaluates exp / softplus / silu and associates its sums (a chunked scan
# differs from a sequential one, a block-quantised matmul from a dense one): ONNX Runtime's CPU kernels measured
# up to 17x PyTorch's RMS error where PyTorch's is about one ulp (while they computed softplus as log(1 + exp(x)),
# since log1p), but never above 20 ulps of the state's RMS; hence 4x plus a 64-ulp floor. A float32 bug worth
# finding (a layer's A off by 1e-3) sits 20x and more above that.
CALIBRATION = {"float32": (4.0, 64.0), "float16": (2.0, 1.0), "bfloat16": (2.0, 1.0), "float64": (4.0, 64.0)}
EPS = {"float64": 2.0 ** -52, "float32": 2.0 ** -23, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}
MODES = ("calibrated", "tolerance")
# More decode steps than any drift study needs; a bound so that a typo (1e9) is refused, not run for days.
MAX_STEPS = 1_000_000


@dataclass
class LogitStats:
    """One side's next-token logits against the reference at one step (over the step's positions)."""

    max_abs: float
    rms_abs: float  # what the calibrated verdict judges
    mean_abs: float
    median_abs: float
    p99_abs: float
    max_rel: float
    cosine: float  # the lowest over the positions
    top1: float  # fraction of positions whose argmax agrees
    top5: float  # mean overlap of the five most likely tokens
    kl_mean: float  # KL(reference || this side) of the next-token distributions, nats
    kl_max: float
    atol_needed: float  # at the report's rtol


@dataclass
class StepResult:
    step: int  # 0 = prefill, then decode steps 1..N
    positions: int
    scale: float  # RMS of the reference's logits
    candidate: LogitStats
    baseline: LogitStats | None = None
    bound: float | None = None  # calibrated: the largest RMS error that passes at this step
    original: LogitStats | None = None  # quantised candidates: against the unquantised model


@dataclass
class StateSeries:
    """One layer's conv or SSM state after every step (index 0 = after the prefill)."""

    layer: int
    kind: str  # "conv" or "ssm"
    candidate: list[float] = field(default_factory=list)  # RMS error
    candidate_max: list[float] = field(default_factory=list)  # max abs error
    baseline: list[float] | None = None  # the baseline's RMS error
    scale: list[float] = field(default_factory=list)  # RMS of the reference's state
    atol_needed: float = 0.0  # over every step, at the report's rtol

    @property
    def max_abs(self) -> float:
        return max(self.candidate_max, default=0.0)


@dataclass
class FreeRun:
    """Greedy continuations from the prompt, each side on its own tokens."""

    steps: int
    first_difference: int | None  # the first generated position where candidate and reference differ
    baseline_first_difference: int | None = None
    agreement: float = 1.0  # fraction of positions equal
    original_first_difference: int | None = None  # quantised candidates: against the unquantised model's text
    original_agreement: float | None = None


@dataclass
class Verdict:
    passed: bool
    mode: str
    metric: str  # "logits", "state" or "" when passed
    step: int | None = None
    layer: int | None = None
    kind: str | None = None
    error: float = 0.0
    bound: float = 0.0
    line: str = ""


@dataclass
class Report:
    reference: str
    candidate: str
    dtype: str  # the candidate's precision (the tolerance row in tolerance mode)
    atol: float
    rtol: float
    prompt_len: int
    mode: str = "tolerance"
    baseline: str | None = None
    original: str | None = None  # quantised candidates: the unquantised model the cost figures are against
    factor: float | None = None  # default: CALIBRATION[dtype]
    floor_ulps: float | None = None
    steps: list[StepResult] = field(default_factory=list)
    states: list[StateSeries] = field(default_factory=list)
    free_run: FreeRun | None = None

    def __post_init__(self):
        factor, floor = CALIBRATION.get(self.dtype, CALIBRATION["float32"])
        self.factor = factor if self.factor is None else self.factor
        self.floor_ulps = floor if self.floor_ulps is None else self.floor_ulps

    @property
    def atol_needed(self) -> float:
        return max([s.candidate.atol_needed for s in self.steps] + [s.atol_needed for s in self.states])

    @property
    def verdict(self) -> Verdict:
        return self._calibrated() if self.mode == "calibrated" else self._tolerance()

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    def floor(self, scale: float) -> float:
        return self.floor_ulps * EPS.get(self.dtype, EPS["float32"]) * scale

    def bound(self, baseline_error: float, scale: float) -> float:
        return self.factor * baseline_error + self.floor(scale)

    def _calibrated(self) -> Verdict:
        """The first step (then the first layer, conv before ssm, then the logits) out of the band; or the closest
        to its bound when all pass."""
        closest = None
        for t, s in enumerate(self.steps):
            for st in self.states:
                b = self.bound(st.baseline[t], st.scale[t])
                e = st.candidate[t]
                if not e <= b:  # NaN fails
                    return self._out(Verdict(False, "calibrated", "state", s.step, st.layer, st.kind, e, b))
                if closest is None or e / b > closest.error / closest.bound:
                    closest = Verdict(True, "calibrated", "state", s.step, st.layer, st.kind, e, b)
            b = s.bound
            e = s.candidate.rms_abs
            if not e <= b:
                return self._out(Verdict(False, "calibrated", "logits", s.step, error=e, bound=b))
            if closest is None or e / b > closest.error / closest.bound:
                closest = Verdict(True, "calibrated", "logits", s.step, error=e, bound=b)
        return self._out(closest or Verdict(True, "calibrated", "", line="nothing compared"))

    def _tolerance(self) -> Verdict:
        worst_step = max(self.steps, key=lambda s: s.candidate.atol_needed)
        worst_state = max(self.states, key=lambda s: s.atol_needed, default=None)
        if worst_state is not None and worst_state.atol_needed > worst_step.candidate.atol_needed:
            step = int(np.argmax(worst_state.candidate)) if worst_state.candidate else 0
            v = Verdict(False, "tolerance", "state", self.steps[step].step, worst_state.layer, worst_state.kind,
                        worst_state.atol_needed, self.atol)
        else:
            v = Verdict(False, "tolerance", "logits", worst_step.step, error=worst_step.candidate.atol_needed,
                        bound=self.atol)
        v.passed = v.error <= self.atol
        return self._out(v)

    def _out(self, v: Verdict) -> Verdict:
        if v.line:
            return v
        word = "PASSED" if v.passed else "FAILED"
        at = _step_name(v.step)
        if v.metric == "state":
            what = f"layer {v.layer} {v.kind} state at {at}"
        else:
            what = f"the logits at {at}"
        if v.mode == "calibrated":
            band = f"{self.factor:g} x the {self.dtype} baseline's + {self.floor_ulps:g} ulp"
            if v.passed:
                v.line = (f"{word} (calibrated): every step's logits and layer states within {band} (RMS error); "
                          f"closest: {what}, {v.error:.3e} of {v.bound:.3e} allowed")
            else:
                v.line = (f"{word} (calibrated): {what} leaves the band first: RMS error {v.error:.3e} > "
                          f"{v.bound:.3e} ({band})")
        else:
            v.line = (f"{word} (tolerance): the largest error is at {what}; atol {self.atol_needed:.3e} at rtol "
                      f"{self.rtol:g} would have passed (allowed {self.atol:g})")
        return v

    def to_dict(self) -> dict:
        v = self.verdict
        d = {"version": REPORT_VERSION, "mode": self.mode, "reference": self.reference, "baseline": self.baseline,
             "candidate": self.candidate, "original": self.original, "dtype": self.dtype, "prompt_len": self.prompt_len,
             "decode_steps": len(self.steps) - 1, "atol": self.atol, "rtol": self.rtol,
             "calibration": {"factor": self.factor, "floor_ulps": self.floor_ulps},
             "passed": v.passed, "atol_needed": self.atol_needed, "verdict": asdict(v),
             "steps": [{"step": s.step, "positions": s.positions, "scale": s.scale, "bound": s.bound,
                        "candidate": asdict(s.candidate),
                        "baseline": asdict(s.baseline) if s.baseline is not None else None,
                        "original": asdict(s.original) if s.original is not None else None} for s in self.steps],
             "states": [asdict(s) for s in self.states],
             "free_run": asdict(self.free_run) if self.free_run is not None else None}
        return _finite_json(d)

    def format(self, max_rows: int = 40) -> str:
        cal = self.mode == "calibrated"
        lines = [f"reference: {self.reference}"]
        if self.baseline:
            lines.append(f"baseline:  {self.baseline}")
        lines += [f"candidate: {self.candidate}",
                  f"prompt {self.prompt_len} tokens, {len(self.steps) - 1} teacher-forced decode steps"]
        if cal:
            lines.append(f"judged calibrated: RMS error <= {self.factor:g} x the baseline's + {self.floor_ulps:g} ulp "
                         f"of {self.dtype} at the reference's RMS, every step's logits and layer states")
        else:
            lines.append(f"judged by tolerance ({self.dtype}): atol {self.atol:g} + rtol {self.rtol:g} * |ref|")
        head = (f"{'step':>7} {'pos':>4} {'max abs':>9} {'rms':>9} {'mean':>9} {'median':>9} {'p99':>9} {'cosine':>10} "
                f"{'top-1':>5} {'top-5':>5} {'KL mean':>9} {'KL max':>9}")
        head += f" {'baseline':>9} {'allowed':>9}" if cal else f" {'atol need':>9}"
        lines += ["", head]
        for s in _rows(self.steps, max_rows, key=lambda s: s.candidate.rms_abs / (s.bound or 1.0)):
            if s is None:
                lines.append(f"{'...':>7}")
                continue
            c = s.candidate
            row = (f"{_step_name(s.step, short=True):>7} {s.positions:>4} {c.max_abs:9.2e} {c.rms_abs:9.2e} "
                   f"{c.mean_abs:9.2e} "
                   f"{c.median_abs:9.2e} {c.p99_abs:9.2e} {c.cosine:10.7f} {c.top1:5.2f} {c.top5:5.2f} "
                   f"{c.kl_mean:9.2e} {c.kl_max:9.2e}")
            row += f" {s.baseline.rms_abs:9.2e} {s.bound:9.2e}" if cal else f" {c.atol_needed:9.2e}"
            lines.append(row)
        if self.states:
            head = f"{'layer':>6} {'state':>6} {'max abs':>10} {'rms':>10}"
            head += f" {'baseline':>10} {'worst/allowed':>13} {'first out':>10}" if cal else f" {'atol need':>10}"
            lines += ["", head]
            for st in self.states:
                row = f"{st.layer:>6} {st.kind:>6} {st.max_abs:10.3e} {max(st.candidate, default=0.0):10.3e}"
                if cal:
                    ratios = [e / self.bound(b, sc) for e, b, sc in zip(st.candidate, st.baseline, st.scale,
                                                                        strict=True)]
                    out = next((i for i, r in enumerate(ratios) if not r <= 1.0), None)
                    worst = max(ratios, default=0.0)
                    row += (f" {max(st.baseline, default=0.0):10.3e} {worst:13.2f} "
                            f"{_step_name(self.steps[out].step, short=True) if out is not None else '-':>10}")
                else:
                    row += f" {st.atol_needed:10.3e}"
                lines.append(row)
        if self.free_run is not None:
            f = self.free_run
            lines += ["", f"free-running greedy, {f.steps} tokens each: " + (
                "candidate and reference agree on every token" if f.first_difference is None else
                f"first difference at generated token {f.first_difference} (agreement {f.agreement:.2f})")]
            if self.baseline:
                lines[-1] += ("; the baseline agrees on every token" if f.baseline_first_difference is None else
                              f"; the baseline first differs at {f.baseline_first_difference}")
        if self.original:
            lines += ["", f"what the quantised weights cost, against the unquantised model ({self.original}):"]
            quality = [s.original for s in self.steps if s.original is not None]
            if quality:
                top1, top5 = np.mean([q.top1 for q in quality]), np.mean([q.top5 for q in quality])
                lines.append(f"  over {len(quality)} steps: KL mean {np.mean([q.kl_mean for q in quality]):.3e} "
                             f"(max {max(q.kl_max for q in quality):.3e}), top-1 {top1:.3f}, top-5 {top5:.3f}")
            if self.free_run is not None and self.free_run.original_agreement is not None:
                f = self.free_run
                lines.append(f"  free-running greedy, {f.steps} tokens: " + (
                    "the same text" if f.original_first_difference is None else
                    f"first difference at generated token {f.original_first_difference} "
                    f"(agreement {f.original_agreement:.2f})"))
        lines += ["", self.verdict.line]
        return "\n".join(lines)


def _step_name(step: int | None, short: bool = False) -> str:
    if step is None:
        return "-"
    if step == 0:
        return "prefill" if short else "step 0 (prefill)"
    return str(step) if short else f"step {step}"


def _rows(steps: list, max_rows: int, key) -> list:
    """All steps when few; else evenly spaced ones plus the worst, with None where rows were left out."""
    if len(steps) <= max_rows:
        return steps
    keep = set(np.linspace(0, len(steps) - 1, max_rows - 1).round().astype(int).tolist())
    keep.add(max(range(len(steps)), key=lambda i: key(steps[i])))
    out, prev = [], -1
    for i in sorted(keep):
        if i != prev + 1:
            out.append(None)
        out.append(steps[i])
        prev = i
    return out


def _finite_json(x):
    """JSON has no NaN / Infinity: such floats become strings ("nan", "inf") so the report always parses."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite_json(v) for v in x]
    return x


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def logit_stats(actual: np.ndarray, expected: np.ndarray, atol: float, rtol: float) -> LogitStats:
    """actual, expected: (positions, vocab) logits."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if not np.isfinite(a).all():
        nan = float("nan")
        return LogitStats(*(float("inf"),) * 6, cosine=nan, top1=0.0, top5=0.0, kl_mean=float("inf"),
                          kl_max=float("inf"), atol_needed=float("inf"))
    err = np.abs(a - e)
    mag = np.abs(e)
    flat = err.ravel()
    k99 = min(flat.size - 1, int(math.ceil(0.99 * flat.size)) - 1)
    part = np.partition(flat, [flat.size // 2, k99])
    num = (a * e).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(e, axis=-1)
    cos = float(np.min(np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)))
    k = min(5, e.shape[-1])
    top_a = np.argpartition(-a, k - 1, axis=-1)[:, :k]
    top_e = np.argpartition(-e, k - 1, axis=-1)[:, :k]
    top5 = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(top_a.tolist(), top_e.tolist(), strict=True)]))
    lp_e, lp_a = _log_softmax(e), _log_softmax(a)
    kl = np.maximum((np.exp(lp_e) * (lp_e - lp_a)).sum(-1), 0.0)
    return LogitStats(
        max_abs=float(err.max()), rms_abs=float(np.sqrt((err ** 2).mean())), mean_abs=float(err.mean()),
        median_abs=float(part[flat.size // 2]),
        p99_abs=float(part[k99]), max_rel=float((err / np.maximum(mag, 1e-12)).max()), cosine=cos,
        top1=float(np.mean(a.argmax(-1) == e.argmax(-1))), top5=top5, kl_mean=float(kl.mean()),
        kl_max=float(kl.max()), atol_needed=float(np.maximum(err - rtol * mag, 0.0).max()))


def _state_error(a: np.ndarray, e: np.ndarray, rtol: float) -> tuple[float, float, float, float]:
    """(RMS error, max abs error, RMS of the reference, atol needed at rtol); infinite errors where the candidate
    is not finite."""
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    if a.shape != e.shape:
        raise SsmrtError(f"a state of shape {a.shape} where the reference's is {e.shape}")
    if a.size == 0:
        return 0.0, 0.0, 0.0, 0.0
    err = np.abs(a - e)
    scale = float(np.sqrt((e ** 2).mean()))
    if not np.isfinite(err).all():
        inf = float("inf")
        return inf, inf, scale, inf
    mag = np.abs(e)
    return (float(np.sqrt((err ** 2).mean())), float(err.max()), scale,
            float(np.maximum(err - rtol * mag, 0.0).max()))


def _check_tolerance(name: str, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value >= 0):
        raise SsmrtError(f"{name} must be a finite number >= 0, got {value!r}")


def compare_runners(
    reference: Runner,
    candidate: Runner,
    prompt_ids: list[int],
    steps: int = 16,
    atol: float | None = None,
    rtol: float | None = None,
    dtype: str | None = None,
    baseline: Runner | None = None,
    free_steps: int = 0,
    progress: Callable[[int, int], None] | None = None,
    original: Runner | None = None,
    band: str | None = None,
) -> Report:
    """Prefill prompt_ids on every runner, then `steps` decode steps fed with the reference's greedy tokens.

    baseline: the candidate's precision on plain PyTorch ops (see `baseline_runner`); with it and without atol,
    rtol or dtype the verdict is calibrated, else by tolerance (dtype: the row of the table, default the
    candidate's; atol / rtol override it).
    free_steps: then this many greedy tokens generated by each side from the prompt, on its own tokens.
    progress: called with (steps done, steps in all) after every step.
    original: for a candidate with quantised weights (the reference then being its dequantised model), the
        unquantised model: fed the same tokens, for the candidate's KL / top-1 / top-5 against it per step and
        the free-running texts' first difference (the report's `original` figures; they never judge).
    band: in calibrated mode, the precision whose band (CALIBRATION) judges, when the baseline is not in the
        candidate's (see `judges`).
    Memory stays flat in `steps`: only per-step figures are kept.
    """
    _check_tolerance("atol", atol)
    _check_tolerance("rtol", rtol)
    for name, v in (("steps", steps), ("free_steps", free_steps)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or not 0 <= v <= MAX_STEPS:
            raise SsmrtError(f"{name} must be an integer from 0 to {MAX_STEPS}, got {v!r}")
    if (isinstance(prompt_ids, str | bytes) or not hasattr(prompt_ids, "__len__") or len(prompt_ids) == 0
            or not all(isinstance(t, int | np.integer) and not isinstance(t, bool) for t in prompt_ids)):
        raise SsmrtError("prompt_ids must be a non-empty list of integer token ids")
    vocab = reference.config.vocab_size
    bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
    if bad:
        raise SsmrtError(f"prompt_ids: token id {int(bad[0])} outside the vocabulary [0, {vocab})")
    mode = "calibrated" if baseline is not None and atol is None and rtol is None and dtype is None else "tolerance"
    dtype = dtype or candidate.dtype
    d_atol, d_rtol = tolerance(dtype, "model")
    atol = d_atol if atol is None else float(atol)
    rtol = d_rtol if rtol is None else float(rtol)
    if mode == "tolerance":
        baseline = None
    elif band is not None:
        if band not in CALIBRATION:
            raise SsmrtError(f"band must be one of {', '.join(CALIBRATION)}, got {band!r}")
        dtype = band
    report = Report(reference.describe(), candidate.describe(), dtype, atol, rtol, len(prompt_ids), mode=mode,
                    baseline=baseline.describe() if baseline is not None else None,
                    original=original.describe() if original is not None else None)
    sides = [candidate] + ([baseline] if baseline is not None else [])
    last_only = "last" in tuple(r.logits_mode for r in [reference, *sides])
    total = steps + 1 + (free_steps if free_steps else 0)

    def record(step, ref_out, outs, orig_out=None):
        lr, sr = ref_out
        if last_only:
            lr = lr[:, -1:]
        lr = lr[0, :, :vocab]
        stats = []
        for runner, (lc, _) in zip(sides, outs, strict=True):
            lc = (lc[:, -1:] if last_only else lc)[0, :, :vocab]
            if lc.shape != lr.shape:
                raise SsmrtError(f"{runner.describe()}: logits of shape {lc.shape} at step {step} where the "
                                 f"reference's are {lr.shape}")
            stats.append(logit_stats(lc, lr, atol, rtol))
        res = StepResult(step, lr.shape[0], float(np.sqrt((np.asarray(lr, np.float64) ** 2).mean())), stats[0],
                         stats[1] if baseline is not None else None)
        if baseline is not None:
            res.bound = report.bound(res.baseline.rms_abs, res.scale)
        if orig_out is not None:
            lo = (orig_out[0][:, -1:] if last_only else orig_out[0])[0, :, :vocab]
            lc = (outs[0][0][:, -1:] if last_only else outs[0][0])[0, :, :vocab]
            res.original = logit_stats(lc, lo, atol, rtol)
        report.steps.append(res)
        ref_states = reference.to_numpy(sr)
        side_states = [runner.to_numpy(sc) for runner, (_, sc) in zip(sides, outs, strict=True)]
        if not report.states:
            report.states = [StateSeries(j // 2, "conv" if j % 2 == 0 else "ssm",
                                         baseline=[] if baseline is not None else None)
                             for j in range(len(ref_states))]
        for j, series in enumerate(report.states):
            rms, mx, scale, need = _state_error(side_states[0][j], ref_states[j], rtol)
            series.candidate.append(rms)
            series.candidate_max.append(mx)
            series.scale.append(scale)
            series.atol_needed = max(series.atol_needed, need)
            if baseline is not None:
                series.baseline.append(_state_error(side_states[1][j], ref_states[j], rtol)[0])
        if progress is not None:
            progress(step + 1, total)
        return int(lr[-1].argmax())

    ids = np.asarray([list(map(int, prompt_ids))], dtype=np.int64)
    ref_out = reference.forward(ids, reference.zero_state(1))
    outs = [r.forward(ids, r.zero_state(1)) for r in sides]
    orig_out = original.forward(ids, original.zero_state(1)) if original is not None else None
    tok = record(0, ref_out, outs, orig_out)
    for k in range(1, steps + 1):
        step_ids = np.asarray([[tok]], dtype=np.int64)
        ref_out = reference.forward(step_ids, ref_out[1])
        outs = [r.forward(step_ids, out[1]) for r, out in zip(sides, outs, strict=True)]
        orig_out = original.forward(step_ids, orig_out[1]) if original is not None else None
        tok = record(k, ref_out, outs, orig_out)
    if free_steps:
        done = steps + 1
        runs = [_greedy(r, ids, free_steps, vocab) for r in [reference, *sides]]
        if progress is not None:
            progress(done + free_steps, total)
        ref_tokens = runs[0]

        def first_diff(tokens):
            return next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens, strict=True)) if a != b), None)

        agree = float(np.mean(np.asarray(runs[1]) == np.asarray(ref_tokens)))
        report.free_run = FreeRun(free_steps, first_diff(runs[1]),
                                  first_diff(runs[2]) if baseline is not None else None, agree)
        if original is not None:
            orig_tokens = _greedy(original, ids, free_steps, vocab)
            report.free_run.original_first_difference = next(
                (i for i, (a, b) in enumerate(zip(runs[1], orig_tokens, strict=True)) if a != b), None)
            report.free_run.original_agreement = float(np.mean(np.asarray(runs[1]) == np.asarray(orig_tokens)))
    return report


def _greedy(runner: Runner, ids: np.ndarray, n: int, vocab: int) -> list[int]:
    logits, state = runner.forward_last(ids, runner.zero_state(1))
    out = []
    for i in range(n):
        tok = int(np.asarray(logits)[0, -1, :vocab].argmax())
        out.append(tok)
        if i + 1 < n:
            logits, state = runner.forward(np.asarray([[tok]], dtype=np.int64), state)
    return out


BANDS = ("float32", "float16", "bfloat16")


def judges(model_dir, candidate: Runner, reference_dtype: str = "float64", band: str | None = None) -> dict:
    """The runners that judge `candidate` (see the module's docstring): {"reference", "baseline", "original" (the
    unquantised model when the reference is not it, else None), "band" (the precision whose band applies when it
    is not the candidate's, else None)}; compare_runners(**judges(...)-ish) takes them as they are."""
    if band is not None and band not in BANDS:
        raise SsmrtError(f"--band must be one of {', '.join(BANDS)}, got {band!r}")
    model = reference_runner(model_dir, reference_dtype)
    if band is not None:
        return {"reference": model, "baseline": _plain_runner(model_dir, band, candidate), "original": None,
                "band": band}
    weights = candidate.weights
    if weights is None or weights["activations"] == "int8":
        # int8 activations: the scheme in float32 (baseline_runner), judged by its cost against the model
        return {"reference": model, "baseline": baseline_runner(model_dir, candidate), "original": None,
                "band": None}
    return {"reference": reference_runner(model_dir, reference_dtype, weights=weights,
                                          artifact=getattr(candidate, "path", None)),
            "baseline": baseline_runner(model_dir, candidate), "original": model, "band": None}


def _plain_runner(model_dir, dtype: str, candidate: Runner) -> Runner:
    """MODEL_DIR in dtype on plain PyTorch ops (eager, no kernels), on the candidate's GPU when it is on one."""
    import torch

    from .runtime import TorchRunnerFromCheckpoint

    device = "cuda" if candidate.device_kind == "cuda" and torch.cuda.is_available() else "cpu"
    return TorchRunnerFromCheckpoint(model_dir, dtype=dtype, device=device, kernels=False, decode="eager")


def baseline_runner(model_dir, candidate: Runner) -> Runner:
    """The same model in the candidate's precision on plain PyTorch ops (eager, no kernels): on the candidate's
    device when that is CUDA and this PyTorch sees one, else on the CPU. For a candidate with quantised weights,
    the model those weights mean (its quantised matrices dequantised, int8 activations quantised), in float32."""
    if candidate.weights is not None:
        return _dequantized_runner(model_dir, candidate.weights, candidate.dtype, "cpu",
                                   getattr(candidate, "path", None))
    return _plain_runner(model_dir, candidate.dtype, candidate)


def reference_runner(model_dir, dtype: str = "float64", weights: dict | None = None, artifact=None) -> Runner:
    """The reference: plain PyTorch ops on the CPU, float64 by default (float32 weights computed exactly in
    float64, so that a float32 candidate has a float32 baseline to be judged against). weights: a quantised
    artifact's scheme (its metadata export.weights): the model its quantised weights mean; artifact: that
    artifact's .onnx file, where its GPTQ-rounded codes are read from."""
    from .runtime import TorchRunnerFromCheckpoint

    if weights is not None:
        return _dequantized_runner(model_dir, weights, dtype, "cpu", artifact)
    return TorchRunnerFromCheckpoint(model_dir, dtype=dtype, device="cpu", kernels=False, decode="eager")


def _dequantized_runner(model_dir, weights: dict, dtype: str, device: str, artifact=None) -> Runner:
    """MODEL_DIR with its quantised matrices dequantised (from its float32 weights, as the export quantised them;
    GPTQ-rounded ones from the codes in `artifact`, the .onnx file), then in `dtype` on `device`, on plain
    PyTorch ops."""
    import torch

    from .models.checkpoints import load_model
    from .quantize import artifact_codes, dequantized_model
    from .runtime import TorchRunner

    codes = None
    if weights.get("rounding") == "gptq":
        if artifact is None:
            raise SsmrtError("GPTQ-rounded weights are judged against their codes; name the artifact they are in")
        codes = artifact_codes(artifact, weights)
    model = dequantized_model(load_model(model_dir, dtype="float32"), weights, codes)
    model = model.cast(getattr(torch, dtype)).to(device)
    runner = TorchRunner(model, kernels=False, decode="eager")
    acts = ", int8 activations" if weights.get("activations") == "int8" else ""
    runner.describe = lambda: f"torch ({dtype}, {device}, {weights['scheme']} weights dequantized{acts})"
    return runner


def check_plot_path(path) -> None:
    """Refuses, before any work, a --plot that cannot be drawn or written: matplotlib missing, a directory, or a
    parent directory that does not exist or cannot be written."""
    import importlib.util
    import os
    from pathlib import Path

    if importlib.util.find_spec("matplotlib") is None:
        raise SsmrtError("--plot needs matplotlib, which is not installed: pip install 'ssmrt[plot]'")
    path = Path(path)
    if path.is_dir():
        raise SsmrtError(f"--plot {path}: is a directory; name the image file to write")
    if path.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise SsmrtError(f"--plot {path}: name a .png, .pdf or .svg file")
    parent = path.parent
    if not parent.is_dir():
        raise SsmrtError(f"--plot {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise SsmrtError(f"--plot {path}: cannot write there (permission denied)")


def plot_drift(report: Report, path) -> None:
    """Error against the reference vs decode step: the logits and each state family (the RMS over the family's
    layers), the candidate as lines, the baseline's band (its error x the factor + floor) shaded behind."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")  # files only, whatever display this machine has
    import matplotlib.pyplot as plt

    steps = [s.step for s in report.steps]
    cal = report.mode == "calibrated"
    panels = [("logits", [s.candidate.rms_abs for s in report.steps],
               ([s.baseline.rms_abs for s in report.steps], [s.bound for s in report.steps]) if cal else None)]
    for kind in ("conv", "ssm"):
        fam = [st for st in report.states if st.kind == kind]
        if not fam:
            continue
        cand = np.sqrt(np.mean([np.square(st.candidate) for st in fam], axis=0))
        band = None
        if cal:
            base = np.sqrt(np.mean([np.square(st.baseline) for st in fam], axis=0))
            upper = np.sqrt(np.mean([np.square([report.bound(b, sc) for b, sc in zip(st.baseline, st.scale,
                                                                                       strict=True)])
                                     for st in fam], axis=0))
            band = (base, upper)
        panels.append((f"{kind} states (RMS over {len(fam)} layers)", cand, band))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (title, cand, band) in zip(axes[:, 0], panels, strict=True):
        if band is not None:
            base, upper = band
            ax.plot(steps, base, color="tab:green", lw=1, ls="--", label="baseline")
            ax.fill_between(steps, base, upper, color="tab:green", alpha=0.2, label="allowed")
        ax.plot(steps, cand, color="tab:blue", lw=1, label="candidate")
        ax.set_yscale("log")
        ax.set_ylabel("RMS error")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("decode step (0 = prefill)")
    title = textwrap.fill(f"{report.candidate} vs {report.reference}. {report.verdict.line}", 120)
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
