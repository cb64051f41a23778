"""The KV cache: ring buffer with sinks, sliding windows, storage dtypes, memory accounting."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import decode_logits, greedy, hf_greedy, hf_logits, load_net, prefill_logits, save_tiny
from runtime import kv_cache
from runtime.backend import get_backend
from runtime.kv_cache import KV_DTYPES, WIDEN_BLOCK, CacheSpec, KVCache

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIG = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    return save_tiny(model, tmp_path_factory.mktemp("llama")), model


def reference_logits(model, ids: list[int], visible, query_pos_for_key) -> np.ndarray:
    """A plain full-sequence Llama forward in NumPy with an explicit attention pattern.

    visible(i, j): may query i see key j; query_pos_for_key(i, j): the position query i
    is rotated at when it scores key j (its own position, except for shifted sinks).
    """
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    c = model.config
    hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    inv_freq = 1.0 / (c.rope_parameters["rope_theta"] ** (np.arange(0, d, 2) / d))

    def rope(x, pos):  # x (..., d) at integer position pos
        ang = np.concatenate([pos * inv_freq, pos * inv_freq])
        return x * np.cos(ang) + np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1) * np.sin(ang)

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c.rms_norm_eps) * w

    n = len(ids)
    h = sd["model.embed_tokens.weight"][ids].astype(np.float64)
    for layer in range(c.num_hidden_layers):
        p = f"model.layers.{layer}."
        x = norm(h, sd[p + "input_layernorm.weight"])
        q = (x @ sd[p + "self_attn.q_proj.weight"].T).reshape(n, hq, d)
        k = (x @ sd[p + "self_attn.k_proj.weight"].T).reshape(n, hkv, d)
        v = (x @ sd[p + "self_attn.v_proj.weight"].T).reshape(n, hkv, d)
        k_rot = np.stack([rope(k[j], j) for j in range(n)])
        out = np.zeros((n, hq, d))
        for i in range(n):
            keys = [j for j in range(n) if j <= i and visible(i, j)]
            for head in range(hq):
                kv = head // (hq // hkv)
                s = np.array([rope(q[i, head], query_pos_for_key(i, j)) @ k_rot[j, kv] for j in keys]) / np.sqrt(d)
                w = np.exp(s - s.max())
                out[i, head] = (w / w.sum()) @ v[keys, kv]
        h = h + out.reshape(n, hq * d) @ sd[p + "self_attn.o_proj.weight"].T
        x = norm(h, sd[p + "post_attention_layernorm.weight"])
        g, u = x @ sd[p + "mlp.gate_proj.weight"].T, x @ sd[p + "mlp.up_proj.weight"].T
        h = h + (g / (1 + np.exp(-g)) * u) @ sd[p + "mlp.down_proj.weight"].T
    return (norm(h, sd["model.norm.weight"]) @ sd["lm_head.weight"].T).astype(np.float32)


CAP, SINKS, N = 64, 4, 200


def ring_visible(i: int, j: int) -> bool:
    return j < SINKS or i - j < CAP - SINKS


def ids_for(n: int, seed: int = 3) -> list[int]:
    return np.random.default_rng(seed).integers(0, CONFIG["vocab_size"], n).tolist()


@pytest.mark.parametrize("shift", [False, True], ids=["absolute", "shifted-sinks"])
def test_ring_buffer_equals_masked_full_forward(tiny, shift):
    folder, model = tiny
    net, spec = load_net(folder, max_context=CAP, n_sink=SINKS)
    net.shift_sink_positions = shift
    ids = ids_for(N)

    def query_pos(i: int, j: int) -> int:
        return min(i, CAP - 1) if shift and j < SINKS else i

    expected = reference_logits(model, ids, ring_visible, query_pos)
    stepped = decode_logits(net, spec, ids)
    assert np.abs(stepped - expected).max() <= 1e-4
    # a prompt longer than the ring, prefilled in chunks, rides it the same way
    for chunk in (60, 17):
        assert np.abs(prefill_logits(net, spec, ids, chunk=chunk) - expected).max() <= 1e-4


def test_no_wrap_is_plain_causal_attention(tiny):
    folder, model = tiny
    net, spec = load_net(folder, max_context=CAP)
    ids = ids_for(CAP)
    assert np.abs(decode_logits(net, spec, ids) - hf_logits(model, ids)).max() <= 1e-4


def test_sliding_window_matches_hf_mistral(tmp_path):
    torch.manual_seed(1)
    config = transformers.MistralConfig(**{**CONFIG, "sliding_window": 16})
    model = transformers.MistralForCausalLM(config).eval()
    folder = save_tiny(model, tmp_path / "mistral")
    net, spec = load_net(folder)
    assert spec.capacity == 16 and spec.n_sink == 0
    ids = ids_for(96)
    expected = hf_logits(model, ids)
    assert np.abs(decode_logits(net, spec, ids) - expected).max() <= 1e-4
    assert np.abs(prefill_logits(net, spec, ids, chunk=16) - expected).max() <= 1e-4
    assert np.abs(prefill_logits(net, spec, ids, chunk=5) - expected).max() <= 1e-4
    assert greedy(net, spec, ids[:20], 32) == hf_greedy(model, ids[:20], 32)


@pytest.mark.parametrize("kv_dtype,tol", [("float16", 2e-3), ("int8", 3e-2)])
def test_low_precision_caches_stay_close(tiny, kv_dtype, tol):
    folder, model = tiny
    net, spec = load_net(folder, kv_dtype=kv_dtype)
    ids = ids_for(96)
    expected = hf_logits(model, ids)
    got = decode_logits(net, spec, ids)
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() <= tol
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.95


@pytest.mark.parametrize("span", [None, 300])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_decode_products_equal_the_formula_over_several_blocks(kv_dtype, span, monkeypatch):
    """score_keys and weigh_values, which read a float16 or int8 cache WIDEN_BLOCK slots
    at a time (few slots) or one head's PER_QUERY_SPAN slots at a time (many), give
    q . K and p @ V over the cache as keys_values dequantizes it whole, for slot
    counts within one block and across three; span=300 splits each head in several."""
    if span:
        monkeypatch.setattr(kv_cache, "PER_QUERY_SPAN", span)
    n_kv, group, d, n = 3, 3, 64, 2 * WIDEN_BLOCK + 77
    spec = CacheSpec(num_layers=2, num_kv_heads=n_kv, head_dim=d, capacity=n + 8, kv_dtype=kv_dtype)
    cache = KVCache(get_backend("cpu"), spec)
    rng = np.random.default_rng(0)
    for chunk in (n - 100, 100):
        cache.begin(chunk)
        for layer in range(2):
            k, v = (rng.standard_normal((n_kv, chunk, d), dtype=np.float32) * 3 for _ in range(2))
            cache.store(layer, k, v)
        cache.end()
    for layer in range(2):
        keys, values, widen = (a.astype(np.float64) if hasattr(a, "shape") else a
                               for a in cache.keys_values(layer, n))
        q = rng.standard_normal((n_kv, group, d), dtype=np.float32)
        for m in (n, WIDEN_BLOCK, 5):
            scores = np.empty((n_kv, group, m), dtype=np.float32)
            cache.score_keys(layer, q, scores)
            expected = q @ keys[:, :m].transpose(0, 2, 1)
            assert np.abs(scores - expected).max() <= 1e-5 * np.abs(expected).max()
            p = rng.random((n_kv, group, m), dtype=np.float32)
            out = cache.weigh_values(layer, p)
            expected = p @ values[:, :m]
            assert out.shape == (n_kv, group, d) and out.dtype == np.float32
            assert np.abs(out - expected).max() <= 1e-5 * np.abs(expected).max()
        assert widen == (1.0 if kv_dtype == "float32" else 2.0 ** 112)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_nbytes_match_allocated_arrays(kv_dtype):
    spec = CacheSpec(num_layers=3, num_kv_heads=2, head_dim=64, capacity=100, kv_dtype=kv_dtype)
    cache = KVCache(get_backend("cpu"), spec)
    arrays = [cache.k, cache.v] + ([cache.k_scale, cache.v_scale] if kv_dtype == "int8" else [])
    assert spec.nbytes == cache.nbytes == sum(a.nbytes for a in arrays)
    assert spec.bytes_per_token * spec.capacity == spec.nbytes


def test_int8_bytes_per_token_at_most_0_3_of_float32():
    f32 = CacheSpec(30, 3, 64, 4096, "float32").bytes_per_token
    i8 = CacheSpec(30, 3, 64, 4096, "int8").bytes_per_token
    assert i8 <= 0.3 * f32


def test_int8_dequantize_is_exactly_values_times_their_group_scales():
    """The scales widened by their bits and spread by a matmul give q * scale exactly
    (times widen_factor), for a zero scale, float16 subnormals and the largest."""
    spec = CacheSpec(1, 2, 64, 8, "int8", n_sink=0)
    cache = KVCache(get_backend("cpu"), spec)
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (2, 8, 64)).astype(np.int8)
    scale = rng.random((2, 8, 64 // spec.int8_group)).astype(np.float16)
    scale[0, 0] = [0.0, 6e-8, 3e-5, 65504.0]
    expected = q.astype(np.float64) * np.repeat(scale.astype(np.float64), spec.int8_group, axis=-1)
    got = cache._dequantize(q, scale)
    assert got.dtype == np.float32
    assert np.array_equal(got.astype(np.float64) * cache.widen_factor, expected)


def test_int8_round_trip_error_is_bounded():
    spec = CacheSpec(1, 2, 64, 8, "int8", n_sink=0)
    cache = KVCache(get_backend("cpu"), spec)
    x = np.random.default_rng(0).standard_normal((2, 8, 64)).astype(np.float32)
    x[:, :, 5] *= 20  # an outlier channel, as keys have
    q, scale = cache._quantize(x)
    assert q.dtype == np.int8 and scale.dtype == np.float16
    back = cache._dequantize(q, scale) * cache.widen_factor
    g = spec.int8_group
    grouped = (2, 8, 64 // g, g)
    group_max = np.abs(x.reshape(grouped)).max(-1, keepdims=True)
    # half a quantization step, the step being max/127 rounded to float16
    assert np.all(np.abs(back - x).reshape(grouped) <= group_max / 254 * (1 + 2**-10) + 1e-7)
    # the outlier only coarsens its own group
    others = np.abs(back - x)[:, :, 16:]
    assert others.max() <= np.abs(x[:, :, 16:]).max() / 254 * (1 + 2**-10)


def test_truncate_and_reset_keep_buffers(tiny):
    folder, _ = tiny
    net, spec = load_net(folder, max_context=CAP)
    cache = KVCache(net.backend, spec)
    k_buffer = cache.k
    ids = ids_for(40)
    full = [net.forward(np.array([t]), cache) for t in ids]
    cache.truncate(25)
    again = [net.forward(np.array([t]), cache) for t in ids[25:]]
    assert np.abs(np.concatenate(again) - np.concatenate(full[25:])).max() <= 1e-5
    cache.reset()
    assert cache.offset == 0 and cache.k is k_buffer
