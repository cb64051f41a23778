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
    if q.shape[1] == 1:
        return _attend_one(q, k, v, cache, layer, scale, softcap, q_sink)
    xp = cache.xp
    n_q, t, d = q.shape
    n_kv = k.shape[0]
    group = n_q // n_kv
    k_old, v_old, widen = cache.keys_values(layer)
    n_old = k_old.shape[1]
    qg = (q * scale).reshape(n_kv, group * t, d)
    new = qg @ k.transpose(0, 2, 1)  # (Hkv, G*T, T)
    parts = [new]
    if n_old:
        old = cache.scores_buffer(group * t, n_old)
        xp.matmul(qg * widen, k_old.transpose(0, 2, 1), out=old)
        if q_sink is not None and cache.n_sink:
            _score_sinks(old, q_sink, k_old, scale * widen, cache.n_sink)
        parts.append(old)
    for part in parts:
        _softcap(xp, part, softcap)
    _mask(xp, new, group, t, None)
    if n_old and cache.old_mask is not None:
        _mask(xp, parts[1], group, t, cache.old_mask)
    _joint_softmax(xp, parts)

    out = new @ v
    if n_old:
        parts[1] *= widen
        out += parts[1] @ v_old
    cache.store(layer, k, v)
    # (Hkv, G*T, d) -> (Hq, T, d) -> (T, Hq*d)
    return out.reshape(n_q, t, d).transpose(1, 0, 2).reshape(t, n_q * d)


def _attend_one(q: Array, k: Array, v: Array, cache: KVCache, layer: int, scale: float,
                softcap: float | None, q_sink: Array | None) -> Array:
    """One query per head: store first, then one softmax over the whole ring."""
    xp = cache.xp
    n_q, _, d = q.shape
    n_kv = k.shape[0]
    group = n_q // n_kv
    cache.store(layer, k, v)
    keys, values, widen = cache.keys_values(layer, cache.n_after)
    n = keys.shape[1]
    scores = cache.scores_buffer(group, n)
    xp.matmul(q.reshape(n_kv, group, d) * (scale * widen), keys.transpose(0, 2, 1), out=scores)
    if q_sink is not None and cache.n_sink:
        _score_sinks(scores, q_sink, keys, scale * widen, cache.n_sink)
    _softcap(xp, scores, softcap)
    # exp(s - max) * widen: values scaled down by 2**-112 times weights scaled
    # up by as much keep every product a normal float32 (no denormals)
    peak = scores.max(axis=-1, keepdims=True)
    peak -= math.log(widen)
    scores -= peak
    xp.exp(scores, out=scores)
    # normalize the (Hkv, G, d) output rather than the n scores
    total = scores.sum(axis=-1, keepdims=True)
    out = scores @ values
    out *= widen / total
    return out.reshape(1, n_q * d)


def _score_sinks(scores: Array, q_sink: Array, keys: Array, scale: float, n_sink: int) -> None:
    """Overwrite the sink columns with the scores of the sink-rotated queries."""
    n_kv, rows, _ = scores.shape
    s = min(n_sink, keys.shape[1])
    qs = (q_sink * scale).reshape(n_kv, rows, q_sink.shape[-1])
    scores[:, :, :s] = qs @ keys[:, :s].transpose(0, 2, 1)


def _softcap(xp: Any, scores: Array, softcap: float | None) -> None:
    """cap * tanh(scores / cap), in place (Gemma 2)."""
    if softcap is not None:
        xp.tanh(scores * (1.0 / softcap), out=scores)
        scores *= softcap


def _mask(xp: Any, scores: Array, group: int, t: int, hidden: Array | None) -> None:
    """-inf where a query may not look: the future of this call's own tokens (hidden
    None), or the (T, n_old) `hidden` slots of the cache."""
    if hidden is None:
        if t == 1:
            return
        hidden = xp.triu(xp.ones((t, t), dtype=bool), k=1)
    view = scores.reshape(scores.shape[0], group, t, scores.shape[-1])
    # copyto(where=) rather than boolean indexing: CuPy sizes a boolean index on
    # the host, which would make every layer wait for the GPU
    xp.copyto(view, -float("inf"), where=hidden)


def _joint_softmax(xp: Any, parts: list[Array]) -> None:
    """Softmax over the last axis of several score blocks as if concatenated, in place."""
    peak = parts[0].max(axis=-1, keepdims=True)
    for part in parts[1:]:
        xp.maximum(peak, part.max(axis=-1, keepdims=True), out=peak)
    total = xp.zeros_like(peak)
    for part in parts:
        part -= peak
        xp.exp(part, out=part)
        total += part.sum(axis=-1, keepdims=True)
    xp.divide(1.0, total, out=total)
    for part in parts:
        part *= total
