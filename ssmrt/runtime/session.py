"""Session: stateful decoding over any runner. prefill(prompts) -> step(tokens) -> ...; generate(); stream().

The state lives in the runner's own arrays between calls. Prompts of different lengths are prefilled in
groups of equal length (an SSM has no attention mask: a pad token would enter the state), then decoded
together, so each sequence gets exactly what it gets alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import SsmrtError
from .backends import Runner
from .sampling import check_sampling, sample


@dataclass
class Snapshot:
    state: list
    last_logits: np.ndarray
    lengths: list[int]


def _as_batch(prompt_ids) -> tuple[list[list[int]], bool]:
    """Accepts one prompt (list of ints) or several (list of lists); returns (prompts, was_single)."""
    if len(prompt_ids) == 0:
        raise SsmrtError("prompt is empty: give at least one token id")
    single = not isinstance(prompt_ids[0], (list, tuple, np.ndarray))
    prompts = [list(prompt_ids)] if single else [list(p) for p in prompt_ids]
    for i, p in enumerate(prompts):
        if not p:
            raise SsmrtError(f"prompt {i} is empty: give at least one token id")
    return prompts, single


class Session:
    def __init__(self, runner: Runner):
        self.runner = runner
        self.config = runner.config
        self.state: list | None = None
        self.last_logits: np.ndarray | None = None  # (batch, vocab) at the last position fed
        self.lengths: list[int] = []

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def _check_ids(self, ids: list[int]):
        v = self.config.padded_vocab_size
        bad = [t for t in ids if not 0 <= int(t) < v]
        if bad:
            raise SsmrtError(f"token id {bad[0]} is outside the vocabulary [0, {v})")

    def reset(self):
        self.state, self.last_logits, self.lengths = None, None, []

    def prefill(self, prompt_ids) -> np.ndarray:
        """Feed one prompt or a batch of prompts (any lengths) from the empty state.

        Returns the last position's logits, (vocab,) for one prompt or (batch, vocab) for several.
        """
        prompts, single = _as_batch(prompt_ids)
        for p in prompts:
            self._check_ids(p)
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_len.setdefault(len(p), []).append(i)
        order, states, logits = [], [], []
        for idx in by_len.values():
            ids = np.array([prompts[i] for i in idx], dtype=np.int64)
            out, st = self.runner.forward(ids, self.runner.zero_state(len(idx)))
            order += idx
            states.append(st)
            logits.append(out[:, -1])
        state = states[0] if len(states) == 1 else self.runner.concat(states)
        last = np.concatenate(logits, 0)
        if order != sorted(order):
            inverse = list(np.argsort(order))
            state, last = self.runner.take(state, inverse), last[inverse]
        self.state, self.last_logits, self.lengths = state, last, [len(p) for p in prompts]
        return last[0] if single else last

    def step(self, tokens) -> np.ndarray:
        """Feed one token per sequence; returns the new logits, (vocab,) or (batch, vocab)."""
        if self.state is None:
            raise SsmrtError("step() before prefill(): feed a prompt first")
        single = np.ndim(tokens) == 0
        toks = [int(tokens)] if single else [int(t) for t in tokens]
        if len(toks) != self.batch_size:
            raise SsmrtError(f"step() got {len(toks)} tokens for a batch of {self.batch_size}")
        self._check_ids(toks)
        out, self.state = self.runner.forward(np.array(toks, dtype=np.int64)[:, None], self.state)
        self.last_logits = out[:, -1]
        self.lengths = [n + 1 for n in self.lengths]
        return self.last_logits[0] if single else self.last_logits

    def snapshot(self) -> Snapshot:
        if self.state is None:
            raise SsmrtError("nothing to snapshot: prefill first")
        return Snapshot(self.runner.copy(self.state), self.last_logits.copy(), list(self.lengths))

    def restore(self, snap: Snapshot, fork: int = 1):
        """Continue from a snapshot; fork > 1 repeats every sequence that many times (a shared prefix)."""
        if fork < 1:
            raise SsmrtError(f"fork must be >= 1, got {fork}")
        index = [i for i in range(len(snap.lengths)) for _ in range(fork)]
        self.state = self.runner.take(snap.state, index) if fork > 1 else self.runner.copy(snap.state)
        self.last_logits = snap.last_logits[index]
        self.lengths = [snap.lengths[i] for i in index]

    # ------------------------------------------------------------------------------------ generation

    def _rows(self, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids) -> Iterator[list]:
        """Per step, the new token of every sequence (None once it has stopped). Afterwards the state covers
        the prompt and every emitted token, so a later call with prompt_ids=None continues the text."""
        check_sampling(temperature, top_k, top_p)
        if max_new_tokens < 0:
            raise SsmrtError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if prompt_ids is not None:
            self.prefill(prompt_ids)
        elif self.state is None:
            raise SsmrtError("nothing to continue from: give prompt_ids")
        vocab = self.config.vocab_size
        # One generator per sequence, each from the same seed: a sequence samples the same in any batch.
        rngs = [np.random.default_rng(seed) for _ in range(self.batch_size)]
        stops = {int(s) for s in stop_ids}
        done = [False] * self.batch_size
        last = [0] * self.batch_size
        for _ in range(max_new_tokens):
            if all(done):
                break
            new = []
            for i in range(self.batch_size):
                if done[i]:  # a stopped sequence keeps being fed its stop token; its output is ignored
                    new.append(None)
                    continue
                last[i] = sample(self.last_logits[i, :vocab], temperature, top_k, top_p, rngs[i])
                done[i] = last[i] in stops
                new.append(last[i])
            yield new
            self.step(last)

    def _is_single(self, prompt_ids) -> bool:
        return self.batch_size == 1 if prompt_ids is None else _as_batch(prompt_ids)[1]

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
        stopped) for a batch. prompt_ids=None continues from the current state."""
        rows = self._rows(prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids)
        single = None
        for row in rows:
            single = self._is_single(prompt_ids) if single is None else single
            yield row[0] if single else row

    def generate(self, prompt_ids=None, max_new_tokens: int = 32, **kwargs):
        """The new token ids: a list for one prompt, a list of lists for a batch (stop ids included)."""
        outs = None
        for row in self._rows(prompt_ids, max_new_tokens, **{**_SAMPLING_DEFAULTS, **kwargs}):
            outs = outs if outs is not None else [[] for _ in row]
            for o, t in zip(outs, row, strict=True):
                if t is not None:
                    o.append(t)
        outs = outs if outs is not None else [[] for _ in range(self.batch_size)]
        return outs[0] if self._is_single(prompt_ids) else outs


_SAMPLING_DEFAULTS = dict(temperature=0.0, top_k=0, top_p=1.0, seed=None, stop_ids=())
