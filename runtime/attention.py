"""Scaled dot-product attention of new queries over the KV cache, GQA-native.

Query heads are grouped onto their KV head by a reshape, (Hq, T, d) ->
(Hkv, G*T, d), so one batched matmul per part serves a whole group and keys and
values are never repeated in memory: MHA is G = 1, MQA is Hkv = 1. Head h uses KV
head h // G, the layout of HF's repeat_kv.

The scores have two parts, the cached tokens and the tokens of this call, joined
in one softmax. Nothing is concatenated but the (small) score rows, so the cache
is read in place.
"""

from __future__ import annotations

from typing import Any

from runtime.kv_cache import KVCache

Array = Any


def attend(q: Array, k: Array, v: Array, cache: KVCache, layer: int, *, scale: float,
           softcap: float | None = None, q_sink: Array | None = None) -> Array:
    """Attention output (T, Hq*d) for queries q (Hq, T, d) and new keys/values (Hkv, T, d).

    Reads the layer's cache as it was before this call, then stores k and v.
    `q_sink`, when given, is q rotated at the positions the sink tokens should
    see it at (see Llama._sink_rope); it scores the sink slots.
    """
    xp = cache.xp
    n_q, t, d = q.shape
    n_kv = k.shape[0]
    group = n_q // n_kv
    qg = (q * scale).reshape(n_kv, group * t, d)

    k_old, v_old = cache.keys_values(layer)
    n_old = k_old.shape[1]
    new = qg @ k.transpose(0, 2, 1)  # (Hkv, G*T, T)
    parts = [new]
    if n_old:
        old = cache.scores_buffer(group * t, n_old)
        xp.matmul(qg, k_old.transpose(0, 2, 1), out=old)
        if q_sink is not None and cache.n_sink:
            s = min(cache.n_sink, n_old)
            qs = (q_sink * scale).reshape(n_kv, group * t, d)
            old[:, :, :s] = qs @ k_old[:, :s].transpose(0, 2, 1)
        parts.append(old)
    for part in parts:
        if softcap is not None:
            xp.tanh(part * (1.0 / softcap), out=part)
            part *= softcap
    _mask(xp, new, group, t, None)
    if n_old and cache.old_mask is not None:
        _mask(xp, parts[1], group, t, cache.old_mask)
    _joint_softmax(xp, parts)

    out = new @ v
    if n_old:
        out += parts[1] @ v_old
    cache.store(layer, k, v)
    # (Hkv, G*T, d) -> (Hq, T, d) -> (T, Hq*d)
    return out.reshape(n_q, t, d).transpose(1, 0, 2).reshape(t, n_q * d)


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
