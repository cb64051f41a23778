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
    see it at (see Model docs on position shifting); it scores the sink slots.
    """
    xp = cache.xp
    n_q, t, d = q.shape
    n_kv = k.shape[0]
    group = n_q // n_kv
    qg = (q * scale).reshape(n_kv, group * t, d)

    k_old, v_old = cache.keys_values(layer)
    n_old = k_old.shape[1]
    scores = xp.empty((n_kv, group * t, n_old + t), dtype=xp.float32)
    if n_old:
        xp.matmul(qg, k_old.transpose(0, 2, 1), out=scores[:, :, :n_old])
        if q_sink is not None and cache.n_sink:
            s = min(cache.n_sink, n_old)
            qs = (q_sink * scale).reshape(n_kv, group * t, d)
            xp.matmul(qs, k_old[:, :s].transpose(0, 2, 1), out=scores[:, :, :s])
    xp.matmul(qg, k.transpose(0, 2, 1), out=scores[:, :, n_old:])
    if softcap is not None:
        scores = xp.tanh(scores * (1.0 / softcap)) * softcap

    scores = scores.reshape(n_kv, group, t, n_old + t)
    _apply_masks(xp, scores, n_old, t, cache.old_mask)
    probs = _softmax(xp, scores).reshape(n_kv, group * t, n_old + t)

    out = probs[:, :, n_old:] @ v
    if n_old:
        out += probs[:, :, :n_old] @ v_old
    cache.store(layer, k, v)
    # (Hkv, G*T, d) -> (Hq, T, d) -> (T, Hq*d)
    return out.reshape(n_q, t, d).transpose(1, 0, 2).reshape(t, n_q * d)


def _apply_masks(xp: Any, scores: Array, n_old: int, t: int, old_mask: Array | None) -> None:
    """Causal mask on this call's own tokens; window mask on old slots if any."""
    neg_inf = -float("inf")
    if t > 1:
        future = xp.triu(xp.ones((t, t), dtype=bool), k=1)
        scores[..., n_old:][..., future] = neg_inf
    if old_mask is not None:
        scores[..., :n_old][..., old_mask] = neg_inf


def _softmax(xp: Any, x: Array) -> Array:
    x = x - x.max(axis=-1, keepdims=True)
    xp.exp(x, out=x)
    x *= 1.0 / x.sum(axis=-1, keepdims=True)
    return x
