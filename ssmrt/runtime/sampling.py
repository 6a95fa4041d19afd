"""Token selection from one position's logits: greedy, temperature, top-k, top-p (nucleus); and the checks of the
generation arguments, shared by the Python API and the CLI (which names its options, cli=True)."""

from __future__ import annotations

import math
import numbers

import numpy as np

from ..errors import SsmrtError

# A generation asking for more new tokens than this is refused: nothing ssmrt runs has a use for more in one call,
# and a typo (an extra digit or three) would otherwise run for hours with no sign of progress.
MAX_NEW_TOKENS = 1_000_000

_CLI_NAMES = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "seed": "--seed",
              "max_new_tokens": "--max-new-tokens", "stop_ids": "--stop-ids"}


def _name(arg: str, cli: bool) -> str:
    # the API's message names the keyword and the option, so one message serves a script and its CLI wrapper
    return _CLI_NAMES[arg] if cli else f"{arg} ({_CLI_NAMES[arg]})"


def is_int(x) -> bool:
    """An integer (Python or numpy), not a bool: what a token id, top_k or a seed must be."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def check_sampling(temperature, top_k, top_p, cli: bool = False) -> tuple[float, int, float]:
    """temperature a finite number >= 0, top_k an integer >= 0, top_p a number in (0, 1]; returns them as
    float, int, float."""
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise SsmrtError(f"{_name('temperature', cli)} must be a finite number >= 0 (0 is greedy), "
                         f"got {temperature!r}")
    if not is_int(top_k) or top_k < 0:
        raise SsmrtError(f"{_name('top_k', cli)} must be an integer >= 0 (0 = off), got {top_k!r}")
    if not _is_real(top_p) or not 0.0 < top_p <= 1.0:  # NaN fails the comparison too
        raise SsmrtError(f"{_name('top_p', cli)} must be in (0, 1], got {top_p!r}")
    return float(temperature), int(top_k), float(top_p)


def check_generation(max_new_tokens, temperature, top_k, top_p, seed, stop_ids, cli: bool = False) -> dict:
    """Every argument of a generation checked; returns them normalised (ints as int, stop_ids a set)."""
    temperature, top_k, top_p = check_sampling(temperature, top_k, top_p, cli)
    if not is_int(max_new_tokens) or not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise SsmrtError(f"{_name('max_new_tokens', cli)} must be an integer in [0, {MAX_NEW_TOKENS:_}], "
                         f"got {max_new_tokens!r}")
    if seed is not None and (not is_int(seed) or seed < 0):
        raise SsmrtError(f"{_name('seed', cli)} must be an integer >= 0, got {seed!r}")
    if isinstance(stop_ids, (str, bytes)) or not hasattr(stop_ids, "__iter__"):
        raise SsmrtError(f"{_name('stop_ids', cli)} must be a list of token ids, got {stop_ids!r}")
    stop_ids = list(stop_ids)
    bad = [s for s in stop_ids if not is_int(s) or s < 0]
    if bad:
        raise SsmrtError(f"{_name('stop_ids', cli)} must be token ids (integers >= 0), got {bad[0]!r}")
    return dict(max_new_tokens=int(max_new_tokens), temperature=temperature, top_k=top_k, top_p=top_p,
                seed=None if seed is None else int(seed), stop_ids={int(s) for s in stop_ids})


def sample(
    logits: np.ndarray,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    rng: np.random.Generator | None = None,
) -> int:
    """logits: (vocab,) float. temperature 0 is greedy (the lowest id among ties). -inf masks a token out; NaN,
    +inf, or no finite logit at all is refused (no token can be chosen from them)."""
    temperature, top_k, top_p = check_sampling(temperature, top_k, top_p)
    try:
        logits = np.asarray(logits, dtype=np.float64)
    except (TypeError, ValueError):
        raise SsmrtError(f"logits must be numbers, got {type(logits).__name__}") from None
    if logits.ndim != 1 or logits.size == 0:
        raise SsmrtError(f"logits must be one position's scores, shape (vocab,), got shape {logits.shape}")
    if np.isnan(logits).any() or np.isposinf(logits).any() or not np.isfinite(logits).any():
        raise SsmrtError("logits are not finite (NaN, +inf, or all -inf): no token can be sampled from them")
    if temperature <= 0.0:
        return int(np.argmax(logits))
    with np.errstate(over="ignore"):  # an overflow is dealt with here
        z = logits / temperature
        if not np.isfinite(z.max()):  # a tiny temperature overflowed the scores (and inf - inf is NaN): shift first
            z = (logits - logits.max()) / temperature
    if top_k and top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max()
    p = np.exp(z)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, top_p) + 1)]
        mask = np.zeros_like(p, dtype=bool)
        mask[keep] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    rng = rng if rng is not None else np.random.default_rng()
    return int(rng.choice(p.size, p=p))
