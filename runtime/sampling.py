"""Choosing the next token from the logits, on the device the logits live on.

Samplers compose: repetition penalty, temperature, then top-k, top-p and min-p
filters, then one draw. The random number is drawn on the host from a seeded
NumPy generator and sent to the device, so a seed gives the same text on the
CPU and the GPU and only the chosen token id ever comes back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from loaders.errors import ModelError

Array = Any


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0 = greedy
    top_k: int = 0             # 0 = off
    top_p: float = 1.0         # 1 = off
    min_p: float = 0.0         # 0 = off
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < math.inf:
            raise ModelError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.seed is not None and self.seed < 0:
            raise ModelError(f"seed must be >= 0, got {self.seed}")
        if not 0 < self.top_p <= 1:
            raise ModelError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise ModelError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.top_k < 0:
            raise ModelError(f"top_k must be >= 0, got {self.top_k}")
        if not self.repeat_penalty > 0:
            raise ModelError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")


class Sampler:
    def __init__(self, xp: Any, params: SamplingParams) -> None:
        self.xp = xp
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: Array, recent: Sequence[int] = ()) -> Array:
        """A 0-d device array holding the chosen token id, for one row of logits."""
        p = self.params
        if p.repeat_penalty != 1.0 and recent:
            logits = apply_repeat_penalty(self.xp, logits, list(recent)[-p.repeat_last_n:], p.repeat_penalty)
        if p.temperature == 0.0:
            return self.xp.argmax(logits)
        return self.draw(logits * (1.0 / p.temperature))

    def draw(self, logits: Array) -> Array:
        xp, p = self.xp, self.params
        # stable, as CuPy's argsort always is: tied logits rank alike on both devices
        order = xp.argsort(-logits, kind="stable")
        if p.top_k:
            order = order[:p.top_k]
        probs = softmax(xp, logits[order])
        keep = xp.ones(probs.shape, dtype=bool)
        if p.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p (the top token always)
            before = xp.cumsum(probs) - probs
            keep &= before < p.top_p
        if p.min_p > 0.0:
            keep &= probs >= p.min_p * probs[0]
        probs = xp.where(keep, probs, 0.0)
        cdf = xp.cumsum(probs)
        u = float(self.rng.random()) * cdf[-1]
        index = xp.minimum(xp.searchsorted(cdf, u, side="right"), len(order) - 1)
        return order[index]


def apply_repeat_penalty(xp: Any, logits: Array, recent: Sequence[int], penalty: float) -> Array:
    """llama.cpp's penalty: divide positive logits of recent tokens, multiply negative ones."""
    ids = xp.asarray(np.unique(np.asarray(recent, dtype=np.int64)))
    logits = logits.copy()
    seen = logits[ids]
    logits[ids] = xp.where(seen > 0, seen * (1.0 / penalty), seen * penalty)
    return logits


def softmax(xp: Any, x: Array) -> Array:
    e = xp.exp(x - x.max())
    return e * (1.0 / e.sum())
