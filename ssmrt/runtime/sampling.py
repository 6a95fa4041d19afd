"""Token selection from one position's logits: greedy, temperature, top-k, top-p (nucleus)."""

from __future__ import annotations

import numpy as np

from ..errors import SsmrtError


def check_sampling(temperature: float, top_k: int, top_p: float):
    if temperature < 0:
        raise SsmrtError(f"--temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise SsmrtError(f"--top-k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise SsmrtError(f"--top-p must be in (0, 1], got {top_p}")


def sample(
    logits: np.ndarray,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    rng: np.random.Generator | None = None,
) -> int:
    """logits: (vocab,) float. temperature 0 is greedy (the lowest id among ties)."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature <= 0.0:
        return int(np.argmax(logits))
    z = logits / temperature
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
