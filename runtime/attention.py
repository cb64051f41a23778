"""Scaled dot-product attention of new queries over the KV cache, GQA-native.

Query heads are grouped onto their KV head by a reshape, (Hq, T, d) ->
(Hkv, G*T, d), so one batched matmul per part serves a whole group and keys and
values are never repeated in memory: MHA is G = 1, MQA is Hkv = 1. Head h uses KV
head h // G, the layout of HF's repeat_kv.

A decode step (one query) stores its key and value first and attends over the
ring as it then is: the slot it overwrites held the one token that just left
the window, so no mask is needed and the softmax has one part. A chunk of
several tokens may overwrite keys its own earlier queries still see, so it
reads the cache as it was before the call and scores it and the chunk's own
keys as two parts of one softmax. Nothing is concatenated but the (small) score
rows, so the cache is read in place.
"""

from __future__ import annotations

import math
from typing import Any

from runtime.kv_cache import KVCache

Array = Any


def attend(q: Array, k: Array, v: Array, cache: KVCache, layer: int, *, scale: float,
           softcap: float | None = None, q_sink: Array | None = None) -> Array:
    """Attention output (T, Hq*d) for queries q (Hq, T, d) and new keys/values (Hkv, T, d).

    Stores k and v in the layer's ring. `q_sink`, when given, is q rotated at
    the positions the sink tokens should see it at (see Llama._sink_rope); it
    scores the sink slots.
    """
    if cache.batched:
        # several sequences' tokens (runtime.paged_cache.SequenceBatch): each attends over its own
        # cache; when each has one token, all of them in one product
        if cache.decoding:
            return _attend_decode_batch(q, k, v, cache, layer, scale, softcap)
        return cache.xp.concatenate([attend(q[:, s:e], k[:, s:e], v[:, s:e], ring, layer, scale=scale,
                                            softcap=softcap) for ring, s, e in cache.parts(layer)])
    if q.shape[1] == 1:
        return _attend_one(q, k, v, cache, layer, scale, softcap, q_sink)
    xp = cache.xp
    n_q, t, d = q.shape
    n_kv = k.shape[0]
    group = n_q // n_kv
    k_old, v_old, widen = cache.keys_values(layer)
    old = (k_old, v_old, widen, cache.old_mask) if k_old.shape[1] else None
    qg = (q * scale).reshape(n_kv, group, t, d)
    sinks = None
    if old and q_sink is not None and cache.n_sink:
        sinks = (q_sink * (scale * widen)).reshape(n_kv, group, t, d), cache.n_sink
    out = xp.empty((n_kv, group, t, d), dtype=xp.float32)
    # Blocks of queries: block [s, e) scores only the chunk's keys up to e, so
    # the causal triangle costs about half the square, and each block's scores
    # stay small enough to live in cache.
    for s in range(0, t, QUERY_BLOCK):
        e = min(t, s + QUERY_BLOCK)
        out[:, :, s:e] = _attend_block(xp, qg[:, :, s:e], k[:, :e], v[:, :e], s, old, sinks, softcap)
    cache.store(layer, k, v)
    # (Hkv, G, T, d) -> (Hq, T, d) -> (T, Hq*d); head h uses KV head h // G
    return out.reshape(n_q, t, d).transpose(1, 0, 2).reshape(t, n_q * d)


QUERY_BLOCK = 128


def _attend_block(xp: Any, q: Array, k: Array, v: Array, s: int, old: tuple | None,
                  sinks: tuple[Array, int] | None, softcap: float | None) -> Array:
    """Queries at chunk positions s..s+b (Hkv, G, b, d) over the chunk's keys up to
    s+b (Hkv, s+b, d) and the cache before the chunk; returns (Hkv, G, b, d)."""
    n_kv, group, b, d = q.shape
    e = k.shape[1]
    rows = q.reshape(n_kv, group * b, d)
    new = rows @ k.transpose(0, 2, 1)  # (Hkv, G*b, e)
    _softcap(xp, new, softcap)
    _mask(xp, new, group, b, xp.triu(xp.ones((b, e), dtype=bool), k=s + 1))
    parts = [new]
    if old:
        k_old, v_old, widen, old_mask = old
        cached = (rows * widen) @ k_old.transpose(0, 2, 1)
        if sinks:
            q_sink, n_sink = sinks
            _score_sinks(cached, q_sink[:, :, s:s + b].reshape(n_kv, group * b, d), k_old, n_sink)
        _softcap(xp, cached, softcap)
        if old_mask is not None:
            _mask(xp, cached, group, b, old_mask[s:s + b])
        parts.append(cached)
    total = _joint_exp(xp, parts)
    out = new @ v
    if old:
        parts[1] *= widen  # the probabilities up, the widened values' 2**-112 back
        out += parts[1] @ v_old
    out /= total
    return out.reshape(n_kv, group, b, d)


def _attend_one(q: Array, k: Array, v: Array, cache: KVCache, layer: int, scale: float,
                softcap: float | None, q_sink: Array | None) -> Array:
    """One query per head: store first, then one softmax over the whole ring. The
    products with the cache are the cache's (KVCache.score_keys/weigh_values),
    which knows how its keys and values are stored."""
    xp = cache.xp
    n_q, _, d = q.shape
    n_kv = k.shape[0]
    group = n_q // n_kv
    cache.store(layer, k, v)
    n = cache.n_after
    widen = cache.widen_factor
    scores = cache.scores_buffer(group, n)
    cache.score_keys(layer, q.reshape(n_kv, group, d) * (scale * widen), scores)
    if q_sink is not None and cache.n_sink:
        sinks = scores[:, :, :min(cache.n_sink, n)]
        cache.score_keys(layer, (q_sink * (scale * widen)).reshape(n_kv, group, d), sinks)
    _softcap(xp, scores, softcap)
    # exp(s - max) * widen: values scaled down by 2**-112 times weights scaled
    # up by as much keep every product a normal float32 (no denormals)
    peak = scores.max(axis=-1, keepdims=True)
    if widen != 1.0:
        peak -= math.log(widen)
    scores -= peak
    xp.exp(scores, out=scores)
    # normalize the (Hkv, G, d) output rather than the n scores
    total = scores.sum(axis=-1, keepdims=True)
    out = cache.weigh_values(layer, scores)
    out /= total if widen == 1.0 else total * (1.0 / widen)
    return out.reshape(1, n_q * d)


def _attend_decode_batch(q: Array, k: Array, v: Array, cache: Any, layer: int, scale: float,
                         softcap: float | None) -> Array:
    """One query per sequence (Hq, B, d) over each sequence's own keys: the caches are
    gathered into (Hkv, B, m, d), padded to the longest with the padding masked, so the
    batch costs a handful of calls per layer instead of a handful per sequence."""
    xp = cache.xp
    n_q, b, d = q.shape
    n_kv = k.shape[0]
    group = n_q // n_kv
    cache.store_decode(layer, k, v)
    keys, values, hidden = cache.decode_keys_values(layer)
    widen = cache.widen_factor
    qg = (q * (scale * widen)).reshape(n_kv, group, b, d).transpose(0, 2, 3, 1)  # (Hkv, B, d, G)
    # keys @ q, then the (small) scores made contiguous: OpenBLAS multiplies the gathered
    # keys as they lie faster than their transpose (16 sequences: 133 + 15 against 217 us)
    scores = xp.ascontiguousarray((keys @ qg).transpose(0, 1, 3, 2))             # (Hkv, B, G, m)
    _softcap(xp, scores, softcap)
    if hidden is not None:
        xp.copyto(scores, -float("inf"), where=hidden[None, :, None, :])
    peak = scores.max(axis=-1, keepdims=True)
    if widen != 1.0:
        peak -= math.log(widen)  # as in _attend_one: the widened values' 2**-112 folded in
    scores -= peak
    xp.exp(scores, out=scores)
    total = scores.sum(axis=-1, keepdims=True)
    out = scores @ values                                                        # (Hkv, B, G, d)
    out /= total if widen == 1.0 else total * (1.0 / widen)
    return out.transpose(1, 0, 2, 3).reshape(b, n_q * d)


def _score_sinks(scores: Array, q_sink: Array, keys: Array, n_sink: int) -> None:
    """Overwrite the sink columns with the scores of the sink-rotated (and scaled) queries."""
    s = min(n_sink, keys.shape[1])
    scores[:, :, :s] = q_sink @ keys[:, :s].transpose(0, 2, 1)


def _softcap(xp: Any, scores: Array, softcap: float | None) -> None:
    """cap * tanh(scores / cap), in place (Gemma 2)."""
    if softcap is not None:
        xp.tanh(scores * (1.0 / softcap), out=scores)
        scores *= softcap


def _mask(xp: Any, scores: Array, group: int, t: int, hidden: Array) -> None:
    """-inf where a query may not look: `hidden` (t, cols) True, for each of the group's heads."""
    view = scores.reshape(scores.shape[0], group, t, scores.shape[-1])
    # copyto(where=) rather than boolean indexing: CuPy sizes a boolean index on
    # the host, which would make every layer wait for the GPU
    xp.copyto(view, -float("inf"), where=hidden)


def _joint_exp(xp: Any, parts: list[Array]) -> Array:
    """exp(score - row max) in place over several score blocks as if concatenated;
    returns the row sums, which the caller divides the (smaller) output by."""
    peak = parts[0].max(axis=-1, keepdims=True)
    for part in parts[1:]:
        xp.maximum(peak, part.max(axis=-1, keepdims=True), out=peak)
    total = xp.zeros_like(peak)
    for part in parts:
        part -= peak
        xp.exp(part, out=part)
        total += part.sum(axis=-1, keepdims=True)
    return total
