"""The generation loop: chunked prefill, then one token per decode step.

Layered as in mlx-lm: `prefill` fills the cache, a `Generation` is one sequence's
decode state, runtime.engine steps sequences (one, for `generate` and `chat`, in
engine.decode_tokens; many, for the server), and the Model's `stream` / `generate`
turn the token ids into text.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

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
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
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


class Generation:
    """One sequence's decode state, the same whether it runs alone (engine.decode_tokens)
    or in a batch (runtime.engine): the tokens to feed next, and what a row of logits
    after them yields. Feeding `pending` and calling `fed` until `done` is the whole
    loop; prefill is feeding the prompt in chunks, a decode step feeding one token.
    """

    def __init__(self, prompt: Sequence[int], sampler: Sampler, max_tokens: int, stop_ids: Iterable[int],
                 context: int | None = None, logprobs: int | None = None) -> None:
        self.prompt = [int(t) for t in prompt]
        self.sampler = sampler
        self.max_tokens = max_tokens
        self.stop_ids = frozenset(stop_ids)
        self.context = context
        self.logprobs = logprobs
        n = sampler.params.history_length(context or len(self.prompt) + max(max_tokens, 0))
        # what the penalties look back on, bounded: nothing in the loop grows
        self.history: deque[int] = deque(self.prompt[-n:], maxlen=n)
        self.generated: list[int] = []
        self.pending: list[int] = list(self.prompt)
        self.finish_reason: str | None = None
        self.last_logprobs: tuple[float, list[tuple[int, float]]] | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def seen(self) -> int:
        return len(self.prompt) + len(self.generated)

    def fed(self, n: int, row: Any, backend: Any) -> int | None:
        """n tokens of `pending` went through the model and `row` is the logits after
        them: the next token, or None (more of the prompt to feed, or finished)."""
        del self.pending[:n]
        if self.pending:
            return None
        if len(self.generated) >= self.max_tokens:
            self.finish_reason = "length"
            return None
        token = draw(backend, self.sampler, row, self.history, self.seen)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return None
        self.generated.append(token)
        self.history.append(token)
        if self.logprobs is not None:
            self.last_logprobs = token_logprobs(backend.to_host(row), token, self.logprobs)
        if len(self.generated) >= self.max_tokens or (self.context is not None and self.seen >= self.context):
            self.finish_reason = "length"
        else:
            self.pending = [token]
        return token

    def restart(self) -> None:
        """Everything fed again (a preempted sequence whose cache was dropped)."""
        self.pending = self.prompt + self.generated


def token_logprobs(row: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """log softmax of the raw logits at `token`, and the `top` most likely ids with theirs."""
    row = row.astype(np.float64)
    peak = float(row.max())
    log_z = peak + math.log(float(np.exp(row - peak).sum()))
    best: list[tuple[int, float]] = []
    if top > 0:
        ids = np.argpartition(-row, min(top, len(row) - 1))[:top]
        ids = ids[np.argsort(-row[ids], kind="stable")]
        best = [(int(i), float(row[i] - log_z)) for i in ids]
    return float(row[token] - log_z), best
