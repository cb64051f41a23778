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
    # llama.cpp's DRY ("don't repeat yourself"): a token that would extend a sequence
    # already seen at least dry_allowed_length long loses dry_multiplier * dry_base **
    # (length - dry_allowed_length) of logit; 0 = off; the last dry_penalty_last_n
    # tokens are scanned (-1: all of them)
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64

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
        if not 0 <= self.dry_multiplier < math.inf:
            raise ModelError(f"dry_multiplier must be a finite number >= 0, got {self.dry_multiplier}")
        if not 1 <= self.dry_base < math.inf:
            raise ModelError(f"dry_base must be >= 1, got {self.dry_base}")
        if self.dry_allowed_length < 1:
            raise ModelError(f"dry_allowed_length must be >= 1, got {self.dry_allowed_length}")
        if self.dry_penalty_last_n < -1:
            raise ModelError(f"dry_penalty_last_n must be >= -1, got {self.dry_penalty_last_n}")

    def history_length(self, context: int) -> int:
        """How many recent tokens the penalties look back on (the decode loop keeps that many)."""
        dry = 0
        if self.dry_multiplier > 0:
            dry = context if self.dry_penalty_last_n == -1 else self.dry_penalty_last_n
        return max(self.repeat_last_n, dry)


class Sampler:
    def __init__(self, xp: Any, params: SamplingParams, dry_breakers: frozenset[int] = frozenset()) -> None:
        self.xp = xp
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.dry_breakers = dry_breakers  # token ids that end a repetition (DRY's sequence breakers)

    def __call__(self, logits: Array, recent: Sequence[int] = ()) -> Array:
        """A 0-d device array holding the chosen token id, for one row of logits."""
        p = self.params
        if p.repeat_penalty != 1.0 and recent:
            logits = apply_repeat_penalty(self.xp, logits, list(recent)[-p.repeat_last_n:], p.repeat_penalty)
        if p.dry_multiplier > 0 and p.dry_penalty_last_n != 0 and recent:
            window = list(recent) if p.dry_penalty_last_n == -1 else list(recent)[-p.dry_penalty_last_n:]
            penalties = dry_penalties(window, p.dry_multiplier, p.dry_base, p.dry_allowed_length,
                                      self.dry_breakers)
            if penalties:
                ids = np.fromiter(penalties, dtype=np.int64, count=len(penalties))
                logits = logits.copy()
                logits[self.xp.asarray(ids)] -= self.xp.asarray(
                    np.fromiter(penalties.values(), dtype=np.float32, count=len(penalties)))
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


# exp(88.72) is the largest float32: DRY's exponent is clamped below it, as in llama.cpp
_FLOAT32_MAX_LOG = 88.7228391


def dry_penalties(tokens: Sequence[int], multiplier: float, base: float, allowed_length: int,
                  breakers: frozenset[int]) -> dict[int, float]:
    """DRY's logit penalty for each token that would extend a repetition of `tokens`.

    A repetition is a suffix of `tokens` that also occurs earlier; the token that
    followed that earlier occurrence would extend it. For each such token, the
    longest such suffix (n tokens) gives multiplier * base ** (n - allowed_length)
    when n >= allowed_length. No suffix reaches back past the last sequence breaker,
    and a breaker itself is never penalized (llama.cpp's llama_sampler_dry, with
    breakers as single tokens). Vectorized over the earlier positions: one pass per
    token of match length, not per position.
    """
    n = len(tokens)
    if n < 2:
        return {}
    limit = 0  # suffix tokens since the last breaker: scanned back, usually a few steps
    while limit < n and tokens[n - 1 - limit] not in breakers:
        limit += 1
    if limit < allowed_length:
        return {}
    ctx = np.asarray(tokens, dtype=np.int64)
    # ends[j]: an earlier position whose token equals the last one; length[j] grows while
    # the tokens before both keep agreeing
    ends = np.nonzero(ctx[:-1] == ctx[-1])[0]
    length = np.ones(len(ends), dtype=np.int64)
    alive = np.ones(len(ends), dtype=bool)
    for k in range(1, limit):
        idx = np.nonzero(alive)[0]
        if not len(idx):
            break
        back = ends[idx] - k
        ok = back >= 0
        ok[ok] = ctx[back[ok]] == ctx[n - 1 - k]
        length[idx[ok]] += 1
        alive[idx[~ok]] = False
    keep = length >= allowed_length
    best: dict[int, int] = {}
    for token, run in zip(map(int, ctx[ends[keep] + 1]), map(int, length[keep])):  # host arrays
        if token not in breakers and run > best.get(token, 0):
            best[token] = run
    max_exponent = int(_FLOAT32_MAX_LOG / math.log(base)) if base > 1.000001 else 0
    return {t: multiplier * base ** min(run - allowed_length, max_exponent) for t, run in best.items()}


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
