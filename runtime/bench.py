"""llama-bench style measurements: prefill and decode tokens/s, repeated, with spread.

Token ids are random (speed does not depend on them); decode runs the forward
pass plus greedy argmax on the device, so only the token id comes back per step.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from runtime.generate import prefill


@dataclass
class BenchResult:
    prompt_tokens: int
    gen_tokens: int
    depth: int
    kv_dtype: str
    context: int
    prefill_tps: list[float] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)
    first_token_s: list[float] = field(default_factory=list)
    load_s: float = 0.0
    peak_rss_mb: float = 0.0

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("prefill_tps", "decode_tps", "first_token_s"):
            values = getattr(self, key)
            out[key + "_mean"] = statistics.fmean(values) if values else 0.0
            out[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_bench(model: Any, prompt_tokens: int, gen_tokens: int, repetitions: int, depth: int = 0,
              seed: int = 0) -> BenchResult:
    net, backend, xp = model.net, model.backend, model.backend.xp
    vocab = model.config.vocab_size
    rng = np.random.default_rng(seed)
    result = BenchResult(prompt_tokens, gen_tokens, depth, model.cache_spec.kv_dtype, model.cache_spec.capacity)
    cache = model.new_cache()
    # one untimed pass first, as llama-bench does: the first prefill pays for
    # fresh pages of its large temporaries, which later ones reuse
    prefill(net, cache, rng.integers(0, vocab, max(prompt_tokens, 8)).tolist(), model.options.prefill_chunk)
    for _ in range(min(gen_tokens, 4)):
        net.forward(np.asarray([1], dtype=np.int64), cache)
    backend.synchronize()
    for _ in range(repetitions):
        if prompt_tokens:
            cache.reset()
            ids = rng.integers(0, vocab, prompt_tokens).tolist()
            start = time.perf_counter()
            logits = prefill(net, cache, ids, model.options.prefill_chunk)
            token = backend.to_int(xp.argmax(logits[-1]))
            elapsed = time.perf_counter() - start
            result.prefill_tps.append(prompt_tokens / elapsed)
            result.first_token_s.append(elapsed)
        if gen_tokens:
            cache.reset()
            if depth:
                prefill(net, cache, rng.integers(0, vocab, depth).tolist(), model.options.prefill_chunk)
            token = int(rng.integers(0, vocab))
            backend.synchronize()
            start = time.perf_counter()
            for _ in range(gen_tokens):
                logits = net.forward(np.asarray([token], dtype=np.int64), cache)
                token = backend.to_int(xp.argmax(logits[-1]))
            result.decode_tps.append(gen_tokens / (time.perf_counter() - start))
    result.peak_rss_mb = peak_rss_mb()
    return result
