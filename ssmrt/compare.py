"""Parity between two runners: the same prompt, prefill, then teacher-forced decode steps.

Both runners get the reference's greedy token at every step, so an error shows where it enters instead
of compounding through diverging text. Per step: max abs / rel error, cosine similarity, top-1 agreement;
per layer: the state error. The report gives the smallest tolerance that would have passed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .ops.spec import tolerance
from .runtime.backends import Runner


@dataclass
class StepResult:
    step: int  # 0 = prefill, then decode steps 1..N
    positions: int
    max_abs: float
    max_rel: float
    cosine: float  # the lowest over the step's positions
    top1: float  # fraction of positions whose argmax agrees
    atol_needed: float


@dataclass
class StateResult:
    layer: int
    kind: str  # "conv" or "ssm"
    max_abs: float  # the largest over prefill and every step
    max_rel: float
    atol_needed: float


@dataclass
class Report:
    reference: str
    candidate: str
    dtype: str
    atol: float
    rtol: float
    prompt_len: int
    steps: list[StepResult] = field(default_factory=list)
    states: list[StateResult] = field(default_factory=list)

    @property
    def atol_needed(self) -> float:
        return max([s.atol_needed for s in self.steps] + [s.atol_needed for s in self.states])

    @property
    def passed(self) -> bool:
        return self.atol_needed <= self.atol

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(passed=self.passed, atol_needed=self.atol_needed)
        return d

    def format(self) -> str:
        lines = [
            f"reference: {self.reference}",
            f"candidate: {self.candidate}",
            f"prompt {self.prompt_len} tokens, {len(self.steps) - 1} teacher-forced decode steps, "
            f"tolerance ({self.dtype}): atol {self.atol:g} + rtol {self.rtol:g} * |ref|",
            "",
            f"{'step':>6} {'pos':>4} {'max abs':>10} {'max rel':>10} {'cosine':>10} {'top-1':>6} {'atol needed':>12}",
        ]
        for s in self.steps:
            name = "prefill" if s.step == 0 else str(s.step)
            lines.append(f"{name:>6} {s.positions:>4} {s.max_abs:10.3e} {s.max_rel:10.3e} {s.cosine:10.7f} "
                         f"{s.top1:6.2f} {s.atol_needed:12.3e}")
        lines += ["", f"{'layer':>6} {'state':>6} {'max abs':>10} {'max rel':>10} {'atol needed':>12}"]
        for s in self.states:
            lines.append(f"{s.layer:>6} {s.kind:>6} {s.max_abs:10.3e} {s.max_rel:10.3e} {s.atol_needed:12.3e}")
        worst = max(self.steps + self.states, key=lambda s: s.atol_needed)
        where = (f"step {worst.step}" if isinstance(worst, StepResult) else f"layer {worst.layer} {worst.kind} state")
        verdict = "PASSED" if self.passed else "FAILED"
        lines += ["", f"{verdict}: the largest error is at {where}; atol {self.atol_needed:.3e} at rtol {self.rtol:g} "
                      f"would have passed (allowed {self.atol:g})"]
        return "\n".join(lines)


def _metrics(a: np.ndarray, e: np.ndarray, atol: float, rtol: float):
    from .closeness import diff

    d = diff(a, e, atol, rtol)
    return d.max_abs, d.max_rel, d.atol_needed


def compare_runners(
    reference: Runner,
    candidate: Runner,
    prompt_ids: list[int],
    steps: int = 16,
    atol: float | None = None,
    rtol: float | None = None,
    dtype: str | None = None,
) -> Report:
    """Prefill prompt_ids on both, then `steps` decode steps fed with the reference's greedy tokens."""
    dtype = dtype or candidate.dtype
    d_atol, d_rtol = tolerance(dtype, "model")
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    report = Report(reference.describe(), candidate.describe(), dtype, atol, rtol, len(prompt_ids))
    vocab = reference.config.vocab_size
    last_only = "last" in (reference.logits_mode, candidate.logits_mode)
    state_err: dict[tuple[int, str], list[float]] = {}

    def record(step, lr, lc, sr, sc):
        if last_only:
            lr, lc = lr[:, -1:], lc[:, -1:]
        lr, lc = lr[0, :, :vocab], lc[0, :, :vocab]
        mx, rel, need = _metrics(lc, lr, atol, rtol)
        num = (lr * lc).sum(-1)
        den = np.linalg.norm(lr, axis=-1) * np.linalg.norm(lc, axis=-1)
        cos = float(np.min(num / np.maximum(den, 1e-30)))
        top1 = float(np.mean(lr.argmax(-1) == lc.argmax(-1)))
        report.steps.append(StepResult(step, lr.shape[0], mx, rel, cos, top1, need))
        for j, (a, e) in enumerate(zip(candidate.to_numpy(sc), reference.to_numpy(sr), strict=True)):
            key = (j // 2, "conv" if j % 2 == 0 else "ssm")
            prev = state_err.get(key, [0.0, 0.0, 0.0])
            state_err[key] = [max(p, m) for p, m in zip(prev, _metrics(a, e, atol, rtol), strict=True)]
        return int(lr[-1].argmax())

    ids = np.asarray([prompt_ids], dtype=np.int64)
    lr, sr = reference.forward(ids, reference.zero_state(1))
    lc, sc = candidate.forward(ids, candidate.zero_state(1))
    tok = record(0, lr, lc, sr, sc)
    for k in range(1, steps + 1):
        step_ids = np.asarray([[tok]], dtype=np.int64)
        lr, sr = reference.forward(step_ids, sr)
        lc, sc = candidate.forward(step_ids, sc)
        tok = record(k, lr, lc, sr, sc)
    report.states = [StateResult(layer, kind, *vals) for (layer, kind), vals in sorted(state_err.items())]
    return report
