"""The generation loop: chunked prefill, then one token per decode step.

Layered as in mlx-lm: `prefill` fills the cache, `decode_tokens` yields token ids
one step at a time, and the Model's `stream` / `generate` turn them into text.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from loaders.errors import ModelError
from runtime.kv_cache import KVCache
from runtime.sampling import Sampler

DEFAULT_PREFILL_CHUNK = 512


class NonFiniteLogits(ModelError):
    """The logits to sample from hold NaN or Inf: the weights or an activation are broken."""


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    first_token_seconds: float = 0.0
    stop_reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0


def prefill(net: Any, cache: KVCache, ids: Sequence[int], chunk: int = DEFAULT_PREFILL_CHUNK,
            all_logits: bool = False) -> Any:
    """Run ids through the model in chunks; logits of the last token (or of all)."""
    chunk = max(1, min(chunk, cache.max_chunk))
    tokens = np.asarray(ids, dtype=np.int64)
    outputs = []
    for start in range(0, len(tokens), chunk):
        logits = net.forward(tokens[start:start + chunk], cache, all_logits=all_logits)
        if all_logits:
            outputs.append(logits)
    if all_logits:
        return outputs[0] if len(outputs) == 1 else net.xp.concatenate(outputs, axis=0)
    return logits


def draw(backend: Any, sampler: Sampler, row: Any, history: Sequence[int], n_seen: int) -> int:
    """The next token id from one row of logits; NonFiniteLogits if the row holds NaN or
    Inf. The check rides on the one device-to-host transfer: -1 comes back instead."""
    xp = backend.xp
    token = backend.to_int(xp.where(xp.isfinite(row).all(), sampler(row, history), -1))
    if token < 0:
        raise NonFiniteLogits(f"the logits are not finite (NaN or Inf) after {n_seen} tokens")
    return token


def decode_tokens(net: Any, cache: KVCache, prompt: Sequence[int], sampler: Sampler, *,
                  max_tokens: int, stop_ids: set[int], stats: GenerationStats,
                  prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> Iterator[int]:
    """Prefill `prompt` (tokens not yet in the cache) and yield up to max_tokens new ids.

    A stop id ends the loop and is not yielded. Only the chosen id crosses from
    the device to the host each step: it is -1 when the row it was drawn from is
    not finite, which raises NonFiniteLogits (the check costs one pass over one
    row of logits, not one over every activation).
    """
    backend = net.backend
    # what the repetition penalty looks back on, bounded: nothing in the loop grows
    history = deque(prompt[-sampler.params.repeat_last_n:], maxlen=sampler.params.repeat_last_n)
    start = time.perf_counter()
    logits = prefill(net, cache, prompt, prefill_chunk)
    backend.synchronize()
    stats.prompt_tokens = len(prompt)
    stats.prefill_seconds = time.perf_counter() - start
    stats.stop_reason = "length"
    decode_start = time.perf_counter()
    for n in range(max_tokens):
        token = draw(backend, sampler, logits[-1], history, len(prompt) + n)
        if n == 0:
            stats.first_token_seconds = time.perf_counter() - start
            decode_start = time.perf_counter()
        if token in stop_ids:
            stats.stop_reason = "stop"
            break
        stats.generated_tokens += 1
        history.append(token)
        yield token
        if n + 1 < max_tokens:
            logits = net.forward(np.asarray([token], dtype=np.int64), cache)
            stats.decode_steps += 1
            stats.decode_seconds = time.perf_counter() - decode_start
