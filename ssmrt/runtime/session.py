"""Session: stateful decoding over any runner. prefill(prompts) -> step(tokens) -> ...; generate(); stream().

The state lives in the runner's own arrays between calls. Prompts of different lengths are prefilled in
groups of equal length (an SSM has no attention mask: a pad token would enter the state), then decoded
together, so each sequence gets exactly what it gets alone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ..errors import SsmrtError
from .backends import Runner
from .limits import check_batch_fits, check_prefill_fits
from .sampling import check_generation, is_int, sample


@dataclass
class Snapshot:
    state: list
    last_logits: np.ndarray
    lengths: list[int]
    # the runner the state was taken over: its arrays belong to that runner (a TensorRT state is its device
    # memory), so restore() into a Session over another runner checks that they fit first
    runner: Runner | None = field(default=None, repr=False, compare=False)


def _prompt_ids(p, where: str) -> list[int]:
    """One prompt as a list of ints; a float, bool, string or list inside it is refused, not truncated."""
    if isinstance(p, np.ndarray):
        if p.ndim != 1 or p.dtype.kind not in "iu":
            raise SsmrtError(f"{where} must be token ids (ints), got a {p.dtype} array of shape {p.shape}")
        return p.tolist()
    for j, t in enumerate(p):
        if not is_int(t):
            raise SsmrtError(f"{where}[{j}] must be a token id (int), got {t!r}")
    return [int(t) for t in p]


def _as_batch(prompt_ids) -> tuple[list[list[int]], bool]:
    """Accepts one prompt (list of ints) or several (list of lists); returns (prompts, was_single)."""
    if isinstance(prompt_ids, np.ndarray):
        if prompt_ids.ndim not in (1, 2):
            raise SsmrtError(f"prompt_ids must be one prompt (1-D) or a batch (2-D), got an array of shape "
                             f"{prompt_ids.shape}")
        prompt_ids = list(prompt_ids) if prompt_ids.ndim == 2 else prompt_ids
    elif not isinstance(prompt_ids, (list, tuple)):
        hint = " (encode text with the tokenizer first)" if isinstance(prompt_ids, str) else ""
        raise SsmrtError(f"prompt_ids must be a list of token ids (ints) or a list of such lists, got "
                         f"{type(prompt_ids).__name__}{hint}")
    if len(prompt_ids) == 0:
        raise SsmrtError("prompt is empty: give at least one token id")
    single = not isinstance(prompt_ids[0], (list, tuple, np.ndarray))
    if single:
        prompts = [_prompt_ids(prompt_ids, "prompt_ids")]
    else:
        prompts = []
        for i, p in enumerate(prompt_ids):
            if not isinstance(p, (list, tuple, np.ndarray)):
                raise SsmrtError(f"prompt_ids[{i}] must be a list of token ids like prompt_ids[0], got {p!r}")
            prompts.append(_prompt_ids(p, f"prompt_ids[{i}]"))
    for i, p in enumerate(prompts):
        if not p:
            raise SsmrtError(f"prompt {i} is empty: give at least one token id")
    return prompts, single


def _signature(a) -> tuple:
    """What must match for a state array to stand in for another: its kind, dtype, per-sequence shape, device."""
    shape = tuple(getattr(a, "shape", ()))
    return type(a).__name__, str(getattr(a, "dtype", "?")), shape[1:], str(getattr(a, "device", ""))


def _fmt(sig: tuple) -> str:
    kind, dtype, shape, device = sig
    return f"{kind} {dtype} (batch, {', '.join(map(str, shape))})" + (f" on {device}" if device else "")


def _model_key(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k != "source"}


class Session:
    """One decoding state over a runner, for one thread at a time.

    Concurrent use is refused rather than serialised: the state is one sequence of calls (prefill, then
    steps), so two threads taking turns would still feed each other's tokens into one state and get wrong
    tokens back; a lock would only hide that. Each thread makes its own Session; Sessions can share a runner.
    """

    def __init__(self, runner: Runner):
        if not isinstance(runner, Runner):
            raise SsmrtError(f"Session(runner) takes a runner (ssmrt.runtime.runner_from_path, TorchRunner, ...), "
                             f"got {type(runner).__name__}")
        self.runner = runner
        self.config = runner.config
        self.state: list | None = None
        self.last_logits: np.ndarray | None = None  # (batch, vocab) at the last position fed
        self.lengths: list[int] = []
        self._lock = threading.RLock()  # reentrant: generate() calls prefill() and step() on its own thread
        self._version = 0  # counts changes of the state, so a paused stream() sees another call's change
        self._state_signature: list | None = None

    @contextmanager
    def _exclusive(self):
        if not self._lock.acquire(blocking=False):
            raise SsmrtError("this Session is in use by another thread; use one Session per thread "
                             "(they can share a runner)")
        try:
            yield
        finally:
            self._lock.release()

    def _set(self, state, last_logits, lengths):
        self.state, self.last_logits, self.lengths = state, last_logits, lengths
        self._version += 1

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def _check_ids(self, ids: list[int]):
        v = self.config.padded_vocab_size
        bad = [t for t in ids if not 0 <= t < v]
        if bad:
            raise SsmrtError(f"token id {bad[0]} is outside the vocabulary [0, {v})")

    def reset(self):
        with self._exclusive():
            self._set(None, None, [])

    def prefill(self, prompt_ids) -> np.ndarray:
        """Feed one prompt or a batch of prompts (any lengths) from the empty state.

        Returns the last position's logits, (vocab,) for one prompt or (batch, vocab) for several.
        """
        with self._exclusive():
            return self._prefill(prompt_ids)

    def _prefill(self, prompt_ids) -> np.ndarray:
        prompts, single = _as_batch(prompt_ids)
        for p in prompts:
            self._check_ids(p)
        last = self._prefill_batch(prompts)
        return last[0] if single else last

    def _prefill_batch(self, prompts: list[list[int]]) -> np.ndarray:
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_len.setdefault(len(p), []).append(i)
        order, states, logits = [], [], []
        for length, idx in by_len.items():
            check_prefill_fits(self.runner, len(idx), length, "prompt_ids")
        for idx in by_len.values():
            ids = np.array([prompts[i] for i in idx], dtype=np.int64)
            out, st = self.runner.forward_last(ids, self.runner.zero_state(len(idx)))
            order += idx
            states.append(st)
            logits.append(out[:, -1])
        state = states[0] if len(states) == 1 else self.runner.concat(states)
        last = np.concatenate(logits, 0)
        if order != sorted(order):
            inverse = list(np.argsort(order))
            state, last = self.runner.take(state, inverse), last[inverse]
        self._set(state, last, [len(p) for p in prompts])
        return last

    def step(self, tokens) -> np.ndarray:
        """Feed one token per sequence; returns the new logits, (vocab,) or (batch, vocab)."""
        with self._exclusive():
            return self._step(tokens)

    def _step(self, tokens) -> np.ndarray:
        if self.state is None:
            raise SsmrtError("step() before prefill(): feed a prompt first")
        single = np.ndim(tokens) == 0
        toks = [tokens] if single else list(tokens)
        bad = [t for t in toks if not is_int(t)]
        if bad:
            raise SsmrtError(f"step() tokens must be token ids (ints), got {bad[0]!r}")
        toks = [int(t) for t in toks]
        if len(toks) != self.batch_size:
            raise SsmrtError(f"step() got {len(toks)} tokens for a batch of {self.batch_size}")
        self._check_ids(toks)
        out, state = self.runner.forward(np.array(toks, dtype=np.int64)[:, None], self.state)
        self._set(state, out[:, -1], [n + 1 for n in self.lengths])
        return self.last_logits[0] if single else self.last_logits

    def snapshot(self) -> Snapshot:
        with self._exclusive():
            if self.state is None:
                raise SsmrtError("nothing to snapshot: prefill first")
            return Snapshot(self.runner.copy(self.state), self.last_logits.copy(), list(self.lengths), self.runner)

    def restore(self, snap: Snapshot, fork: int = 1):
        """Continue from a snapshot; fork > 1 repeats every sequence that many times (a shared prefix).

        A snapshot from a Session over another runner is taken only if its model and state arrays are those this
        runner uses (the same model on the same backend, dtype and device); anything else is refused here rather
        than failing inside the runner later, or decoding another model's state."""
        with self._exclusive():
            if not isinstance(snap, Snapshot):
                raise SsmrtError(f"restore() takes a Snapshot from Session.snapshot(), got {type(snap).__name__}")
            if not is_int(fork) or fork < 1:
                raise SsmrtError(f"fork must be an integer >= 1, got {fork!r}")
            self._check_snapshot(snap)
            check_batch_fits(self.runner, len(snap.lengths) * fork, "restore(fork=...)")
            index = [i for i in range(len(snap.lengths)) for _ in range(fork)]
            state = self.runner.take(snap.state, index) if fork > 1 else self.runner.copy(snap.state)
            self._set(state, snap.last_logits[index], [snap.lengths[i] for i in index])

    def _check_snapshot(self, snap: Snapshot):
        batch = len(snap.lengths)
        logits = snap.last_logits
        if batch == 0 or np.ndim(logits) != 2 or logits.shape[0] != batch:
            raise SsmrtError(f"restore(): the snapshot is inconsistent: {batch} sequence lengths, logits of shape "
                             f"{np.shape(logits)}")
        rows = {tuple(getattr(s, "shape", ()))[:1] for s in snap.state}
        if rows != {(batch,)}:
            raise SsmrtError(f"restore(): the snapshot's state arrays are not all of its batch of {batch} "
                             f"(first dimensions {sorted(r[0] if r else None for r in rows)})")
        if snap.runner is self.runner:
            return
        origin = snap.runner.describe() if snap.runner is not None else "an unknown runner"
        if snap.runner is not None:
            ours, theirs = _model_key(self.config), _model_key(snap.runner.config)
            diff = [k for k in ours if ours[k] != theirs.get(k)]
            if diff:
                k = diff[0]
                raise SsmrtError(f"restore(): the snapshot was taken over another model ({k} {theirs.get(k)!r}, this "
                                 f"Session's is {ours[k]!r}); restore it into a Session over the same model")
        if self._state_signature is None:
            self._state_signature = [_signature(a) for a in self.runner.zero_state(1)]
        want = self._state_signature
        got = [_signature(a) for a in snap.state]
        if len(got) != len(want):
            raise SsmrtError(f"restore(): the snapshot (from {origin}) holds {len(got)} state arrays, this Session's "
                             f"runner ({self.runner.describe()}) keeps {len(want)}; restore it into a Session over "
                             "the same model")
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            if g != w:
                raise SsmrtError(f"restore(): the snapshot (from {origin}) holds state array {i} as {_fmt(g)}, this "
                                 f"Session's runner ({self.runner.describe()}) keeps {_fmt(w)}; restore it into a "
                                 "Session over the same model and backend")
        if logits.shape[1] < self.config.vocab_size:
            raise SsmrtError(f"restore(): the snapshot's logits cover {logits.shape[1]} tokens, this model's "
                             f"vocabulary {self.config.vocab_size}")

    # ------------------------------------------------------------------------------------ generation

    def _begin(self, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids):
        """Every argument checked before anything runs: (checked arguments, prompts or None, one prompt?)."""
        args = check_generation(max_new_tokens, temperature, top_k, top_p, seed, stop_ids)
        v = self.config.padded_vocab_size
        outside = sorted(s for s in args["stop_ids"] if s >= v)
        if outside:  # it could never be sampled, so it would never stop anything
            raise SsmrtError(f"stop id {outside[0]} (stop_ids, --stop-ids) is outside the vocabulary [0, {v})")
        if prompt_ids is None:
            if self.state is None:
                raise SsmrtError("nothing to continue from: give prompt_ids")
            return args, None, self.batch_size == 1
        prompts, single = _as_batch(prompt_ids)
        for p in prompts:
            self._check_ids(p)
        return args, prompts, single

    def _rows(self, prompts, args) -> Iterator[list]:
        """Per step, the new token of every sequence (None once it has stopped). Afterwards the state covers
        the prompt and every emitted token, so a later call with prompt_ids=None continues the text."""
        if prompts is not None:
            self._prefill_batch(prompts)
            where = "prefill"
        elif self.state is None:
            raise SsmrtError("nothing to continue from: give prompt_ids")
        else:
            where = "the state it continued from"
        vocab = self.config.vocab_size
        # One generator per sequence, each from the same seed: a sequence samples the same in any batch.
        rngs = [np.random.default_rng(args["seed"]) for _ in range(self.batch_size)]
        stops = args["stop_ids"]
        done = [False] * self.batch_size
        last = [0] * self.batch_size
        for k in range(args["max_new_tokens"]):
            if all(done):
                break
            new = []
            for i in range(self.batch_size):
                if done[i]:  # a stopped sequence keeps being fed its stop token; its output is ignored
                    new.append(None)
                    continue
                logits = self.last_logits[i, :vocab]
                # argmax of NaNs is token 0, every step after: stop instead, naming where the numbers broke
                if not np.isfinite(logits).all():
                    seq = f" of sequence {i}" if self.batch_size > 1 else ""
                    raise SsmrtError(f"the logits{seq} are not finite (NaN or Inf) after {where}: generation stopped "
                                     "(the model overflows in its dtype, or its weights hold NaN/Inf)")
                last[i] = sample(logits, args["temperature"], args["top_k"], args["top_p"], rngs[i])
                done[i] = last[i] in stops
                new.append(last[i])
            yield new
            self._step(last)
            where = f"decode step {k + 1}"

    def stream(
        self,
        prompt_ids=None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_ids: Sequence[int] = (),
    ) -> Iterator:
        """Yield the new tokens one step at a time: an int for one prompt, a list (None once a sequence has
        stopped) for a batch. prompt_ids=None continues from the current state.

        The arguments are checked here; the prompt is fed on the first next(). Between two tokens the Session is
        free, but a call that changes its state meanwhile (prefill, step, generate, restore, reset) ends the
        stream with an error at its next token rather than let it continue from another state."""
        with self._exclusive():
            args, prompts, single = self._begin(prompt_ids, max_new_tokens, temperature, top_k, top_p, seed,
                                                stop_ids)
            version = None if prompts is not None else self._version
        return self._stream(self._rows(prompts, args), single, version)

    def _stream(self, rows, single: bool, version: int | None) -> Iterator:
        while True:
            with self._exclusive():
                if version is not None and self._version != version:
                    rows.close()
                    raise SsmrtError("this stream's Session was changed by another call since its last token; "
                                     "finish (or close) a stream before using its Session otherwise")
                row = next(rows, None)
                version = self._version
            if row is None:
                return
            yield row[0] if single else row

    def generate(
        self,
        prompt_ids=None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_ids: Sequence[int] = (),
    ):
        """The new token ids: a list for one prompt, a list of lists for a batch (stop ids included).
        prompt_ids=None continues from the current state."""
        with self._exclusive():
            args, prompts, single = self._begin(prompt_ids, max_new_tokens, temperature, top_k, top_p, seed,
                                                stop_ids)
            outs = [[] for _ in (prompts if prompts is not None else self.lengths)]
            for row in self._rows(prompts, args):
                for o, t in zip(outs, row, strict=True):
                    if t is not None:
                        o.append(t)
            return outs[0] if single else outs
