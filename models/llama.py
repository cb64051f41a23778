"""Llama: RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP.

The decoder-only transformer most others are variations of, so the other
architecture files reuse its pieces. Weights keep the checkpoint's names and
(out, in) layout; the one loader step, `load_weights`, fuses q/k/v into one
matrix and gate/up into another so that a decode step does 4 matmuls per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from loaders.config import ModelConfig
from loaders.safetensors import Checkpoint
from models.layers import Rotary, linear, rms_norm, silu
from runtime.attention import attend
from runtime.backend import Backend
from runtime.kv_cache import KVCache

Array = Any


@dataclass
class Layer:
    input_layernorm: Array
    qkv_proj: Array          # q_proj, k_proj, v_proj stacked on the out axis
    qkv_bias: Array | None
    o_proj: Array
    o_bias: Array | None
    post_attention_layernorm: Array
    gate_up_proj: Array      # gate_proj, up_proj stacked on the out axis
    gate_up_bias: Array | None
    down_proj: Array
    down_bias: Array | None


class Llama:
    """A Llama-family decoder; `forward` runs tokens through it and its KV cache."""

    config_class = ModelConfig

    def __init__(self, config: ModelConfig, backend: Backend, weights: dict[str, Any]) -> None:
        self.config = config
        self.backend = backend
        self.xp = backend.xp
        self.embed_tokens: Array = weights["embed_tokens"]
        self.layers: list[Layer] = weights["layers"]
        self.norm: Array = weights["norm"]
        self.lm_head: Array = weights["lm_head"]
        self.rotary = Rotary(self.xp, config.head_dim, config.rope_theta, config.rope_scaling)
        self.shift_sink_positions = True

    # -- loading --------------------------------------------------------------
    @classmethod
    def expected_shapes(cls, c: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Every checkpoint tensor this architecture reads, with its shape."""
        q, kv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        h, i = c.hidden_size, c.intermediate_size
        shapes = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,)}
        if not c.tie_word_embeddings:
            shapes["lm_head.weight"] = (c.vocab_size, h)
        for n in range(c.num_hidden_layers):
            p = f"model.layers.{n}."
            shapes.update({
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q * d, h), p + "self_attn.k_proj.weight": (kv * d, h),
                p + "self_attn.v_proj.weight": (kv * d, h), p + "self_attn.o_proj.weight": (h, q * d),
                p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            })
            if c.attention_bias:
                shapes.update({p + "self_attn.q_proj.bias": (q * d,), p + "self_attn.k_proj.bias": (kv * d,),
                               p + "self_attn.v_proj.bias": (kv * d,), p + "self_attn.o_proj.bias": (h,)})
            if c.mlp_bias:
                shapes.update({p + "mlp.gate_proj.bias": (i,), p + "mlp.up_proj.bias": (i,),
                               p + "mlp.down_proj.bias": (h,)})
        return shapes

    @classmethod
    def load(cls, config: ModelConfig, checkpoint: Checkpoint, backend: Backend) -> "Llama":
        return cls(config, backend, load_weights(config, checkpoint, backend, cls.expected_shapes(config)))

    # -- the forward pass -----------------------------------------------------
    def forward(self, tokens: np.ndarray, cache: KVCache, all_logits: bool = False) -> Array:
        """Logits (T, vocab) float32 (last row only unless all_logits) for tokens (T,)."""
        xp = self.xp
        positions = cache.begin(len(tokens))
        cos, sin = self.rotary.cos_sin(xp.asarray(positions))
        sink_rope = self._sink_rope(positions, cache)
        h = self.embed_tokens[xp.asarray(tokens)].astype(xp.float32)
        for n, layer in enumerate(self.layers):
            h = self.block(h, layer, n, cache, cos, sin, sink_rope)
        cache.end()
        if not all_logits:
            h = h[-1:]
        return linear(rms_norm(h, self.norm, self.config.rms_norm_eps), self.lm_head)

    def block(self, h: Array, layer: Layer, n: int, cache: KVCache, cos: Array, sin: Array,
              sink_rope: tuple[Array, Array] | None) -> Array:
        eps = self.config.rms_norm_eps
        h = h + self.attention(rms_norm(h, layer.input_layernorm, eps), layer, n, cache, cos, sin, sink_rope)
        return h + self.mlp(rms_norm(h, layer.post_attention_layernorm, eps), layer)

    def attention(self, x: Array, layer: Layer, n: int, cache: KVCache, cos: Array, sin: Array,
                  sink_rope: tuple[Array, Array] | None) -> Array:
        c = self.config
        q, k, v = split_heads(linear(x, layer.qkv_proj, layer.qkv_bias),
                              c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        q_sink = self.rotary.apply(q, *sink_rope) if sink_rope else None
        q, k = self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin)
        out = attend(q, k, v, cache, n, scale=c.head_dim ** -0.5, q_sink=q_sink)
        return linear(out, layer.o_proj, layer.o_bias)

    def mlp(self, x: Array, layer: Layer) -> Array:
        gate_up = linear(x, layer.gate_up_proj, layer.gate_up_bias)
        i = self.config.intermediate_size
        return linear(silu(gate_up[:, :i]) * gate_up[:, i:], layer.down_proj, layer.down_bias)

    def _sink_rope(self, positions: np.ndarray, cache: KVCache) -> tuple[Array, Array] | None:
        # Once the ring has evicted tokens, the sinks are scored as if they sat
        # just before the window (StreamingLLM's positions within the cache):
        # a query never sees a sink further away than the cache is long.
        if not (self.shift_sink_positions and cache.n_sink and positions[-1] >= cache.capacity):
            return None
        return self.rotary.cos_sin(self.xp.asarray(np.minimum(positions, cache.capacity - 1)))


def split_heads(qkv: Array, n_q: int, n_kv: int, d: int) -> tuple[Array, Array, Array]:
    """(T, (n_q + 2 n_kv) d) -> q (n_q, T, d), k and v (n_kv, T, d)."""
    t = qkv.shape[0]
    heads = qkv.reshape(t, n_q + 2 * n_kv, d).transpose(1, 0, 2)
    return heads[:n_q], heads[n_q:n_q + n_kv], heads[n_q + n_kv:]


def load_weights(c: ModelConfig, ckpt: Checkpoint, backend: Backend,
                 shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Read, check, fuse and upload the weights; the one place names are mapped."""
    dtype = backend.weight_dtype

    def get(name: str) -> np.ndarray:
        return ckpt.get(name, shapes[name])

    def upload(*names: str) -> Array:
        parts = [get(n) for n in names]
        host = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        return backend.asarray(host, dtype)

    def maybe(*names: str) -> Array | None:
        return upload(*names) if names[0] in shapes else None

    layers = []
    for n in range(c.num_hidden_layers):
        p = f"model.layers.{n}."
        attn, mlp = p + "self_attn.", p + "mlp."
        layers.append(Layer(
            input_layernorm=upload(p + "input_layernorm.weight"),
            qkv_proj=upload(attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
            qkv_bias=maybe(attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"),
            o_proj=upload(attn + "o_proj.weight"),
            o_bias=maybe(attn + "o_proj.bias"),
            post_attention_layernorm=upload(p + "post_attention_layernorm.weight"),
            gate_up_proj=upload(mlp + "gate_proj.weight", mlp + "up_proj.weight"),
            gate_up_bias=maybe(mlp + "gate_proj.bias", mlp + "up_proj.bias"),
            down_proj=upload(mlp + "down_proj.weight"),
            down_bias=maybe(mlp + "down_proj.bias"),
        ))
    embed = upload("model.embed_tokens.weight")
    lm_head = embed if c.tie_word_embeddings else upload("lm_head.weight")
    return {"embed_tokens": embed, "layers": layers, "norm": upload("model.norm.weight"), "lm_head": lm_head}
