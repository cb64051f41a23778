"""Perplexity of a text, the way llama-perplexity measures it, plus a rolling mode.

- windows (default): the text is cut into windows of `ctx` tokens; each is run
  through a fresh cache and only its second half is scored, so every scored token
  has at least ctx/2 tokens of context.
- rolling: the whole text is one sequence through a cache of `ctx` slots; past the
  capacity it rides the ring buffer (sinks + window). This is what measures how
  well eviction and position handling hold up on texts longer than the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from loaders.errors import ModelError
from runtime.generate import prefill


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    scored_tokens: int
    windows: int


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target under its row of logits (float64 sums)."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=-1))
    return log_z - shifted[np.arange(len(targets)), targets]


def _finite(model: Any, nll: np.ndarray, start: int) -> np.ndarray:
    if not np.isfinite(nll).all():
        raise ModelError(f"the logits are not finite (NaN or Inf) in the window at token {start}: "
                         f"{model.nonfinite_weight_report()}")
    return nll


def windowed(model: Any, ids: Sequence[int], ctx: int,
             progress: Callable[[int, int, float], None] | None = None) -> PerplexityResult:
    if len(ids) < 2 * 2 or ctx < 4:
        raise ModelError(f"need a context of at least 4 tokens and a text of at least 4 tokens "
                         f"(got ctx={ctx}, {len(ids)} tokens)")
    ctx = min(ctx, len(ids))
    first = ctx // 2
    total, count, n_windows = 0.0, 0, 0
    for start in range(0, len(ids) - ctx + 1, ctx):
        window = list(ids[start:start + ctx])
        logits = model.backend.to_host(prefill(model.net, model.new_cache(), window, model.options.prefill_chunk,
                                               all_logits=True))
        nll = _finite(model, token_nll(logits[first - 1:-1], np.asarray(window[first:])), start)
        total, count, n_windows = total + float(nll.sum()), count + len(nll), n_windows + 1
        if progress:
            progress(n_windows, (len(ids) - ctx) // ctx + 1, math.exp(total / count))
    return PerplexityResult(math.exp(total / count), total / count, count, n_windows)


def rolling(model: Any, ids: Sequence[int], skip: int = 0,
            progress: Callable[[int, int, float], None] | None = None) -> PerplexityResult:
    """The whole text as one sequence through the model's (ring-buffer) cache.

    The first `skip` predictions are not scored, so that two runs with different
    caches can be compared on exactly the same tokens.
    """
    cache = model.new_cache()
    chunk = min(model.options.prefill_chunk, cache.max_chunk)
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, chunk):
        part = list(ids[start:start + chunk])
        logits = model.backend.to_host(prefill(model.net, cache, part, chunk, all_logits=True))
        targets = np.asarray(ids[start + 1:start + 1 + len(part)])
        nll = _finite(model, token_nll(logits[:len(targets)], targets), start)
        keep = np.arange(start, start + len(targets)) >= skip
        total, count = total + float(nll[keep].sum()), count + int(keep.sum())
        if progress and count:
            progress(start + len(part), len(ids), math.exp(total / count))
    if not count:
        raise ModelError(f"nothing to score: the text has {len(ids)} tokens and skip is {skip}")
    return PerplexityResult(math.exp(total / count), total / count, count, 1)
