"""Llama: RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP.

The decoder-only transformer most others are variations of, so the other
architecture files reuse its pieces. Weights keep the checkpoint's names and
(out, in) shapes; the one loader step, `load_weights`, fuses q/k/v into one
matrix and gate/up into another so that a decode step does 4 matmuls per layer,
and lets the backend choose each matrix's memory order (Backend.matrix_order).
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
    q_norm: Array | None = None  # per-head RMSNorm of queries and keys (Qwen3)
    k_norm: Array | None = None


@dataclass
class Rope:
    """Rotary cos/sin of one forward call's positions, for one rotary and one ring."""

    rotary: Rotary
    cos: Array
    sin: Array
    sink: tuple[Array, Array] | None  # what the sinks see the queries at, once the ring wrapped
    _matrix: Array | None = None
    _sink_matrix: Array | None = None

    def apply(self, q: Array, k: Array) -> tuple[Array, Array, Array | None]:
        """q and k rotated, and q as the sink slots score it (None before the ring wraps)."""
        if q.shape[1] == 1:
            # a decode step: one position, so the rotation is one (d, d) matrix,
            # made once per step and shared by every layer: one matmul per
            # tensor instead of a handful of elementwise passes
            if self._matrix is None:
                self._matrix = self.rotary.matrix(self.cos[0], self.sin[0], q.shape[-1])
                self._sink_matrix = self.rotary.matrix(self.sink[0][0], self.sink[1][0], q.shape[-1]) \
                    if self.sink else None
            q_sink = q @ self._sink_matrix if self.sink else None
            return q @ self._matrix, k @ self._matrix, q_sink
        q_sink = self.rotary.apply(q, *self.sink) if self.sink else None
        return self.rotary.apply(q, self.cos, self.sin), self.rotary.apply(k, self.cos, self.sin), q_sink


class Llama:
    """A Llama-family decoder; `forward` runs tokens through it and its KV cache."""

    config_class = ModelConfig
    qk_norm = False  # per-head RMSNorm of queries and keys (Qwen3, Gemma 3)
    activation = staticmethod(silu)  # of the gated MLP: SwiGLU; Gemma's GeGLU swaps it

    def __init__(self, config: ModelConfig, backend: Backend, weights: dict[str, Any]) -> None:
        self.config = config
        self.backend = backend
        self.xp = backend.xp
        self.embed_tokens: Array = weights["embed_tokens"]
        self.layers: list[Layer] = weights["layers"]
        self.norm: Array = weights["norm"]
        self.lm_head: Array = weights["lm_head"]
        self.rotary = Rotary(self.xp, config.head_dim, config.rope_theta, config.rope_scaling, config.rotary_dim)
        self.rotaries = [self.rotary] * config.num_hidden_layers  # per layer: Gemma 3 has two
        self.attn_scale = config.head_dim ** -0.5
        self.attn_softcap: float | None = None
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
            if cls.qk_norm:
                shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
            if c.mlp_bias:
                shapes.update({p + "mlp.gate_proj.bias": (i,), p + "mlp.up_proj.bias": (i,),
                               p + "mlp.down_proj.bias": (h,)})
        return shapes

    @classmethod
    def load(cls, config: ModelConfig, checkpoint: Checkpoint, backend: Backend) -> "Llama":
        return cls(config, backend, load_weights(config, checkpoint, backend, cls.expected_shapes(config)))

    # -- the forward pass -----------------------------------------------------
    def forward(self, tokens: np.ndarray, cache: KVCache, all_logits: bool = False) -> Array:
        """Logits (T, vocab) float32 for tokens (T,): only the last row (each sequence's
        last, for a batch: cache.logit_rows) unless all_logits."""
        ropes = self.ropes(cache.begin(len(tokens)), cache)
        h = self.embed(tokens)
        for n, layer in enumerate(self.layers):
            h = self.block(h, layer, n, cache, ropes[n])
        cache.end()
        return self.logits(h if all_logits else h[cache.logit_rows])

    def embed(self, tokens: np.ndarray) -> Array:
        return self.embed_tokens[self.xp.asarray(tokens)].astype(self.xp.float32)

    def logits(self, h: Array) -> Array:
        return linear(rms_norm(h, self.norm, self.config.rms_norm_eps), self.lm_head)

    def block(self, h: Array, layer: Layer, n: int, cache: KVCache, rope: Rope) -> Array:
        eps = self.config.rms_norm_eps
        h = h + self.attention(rms_norm(h, layer.input_layernorm, eps), layer, n, cache, rope)
        return h + self.mlp(rms_norm(h, layer.post_attention_layernorm, eps), layer)

    def attention(self, x: Array, layer: Layer, n: int, cache: KVCache, rope: Rope) -> Array:
        c = self.config
        q, k, v = split_heads(linear(x, layer.qkv_proj, layer.qkv_bias),
                              c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        if layer.q_norm is not None:
            q, k = rms_norm(q, layer.q_norm, c.rms_norm_eps), rms_norm(k, layer.k_norm, c.rms_norm_eps)
        q, k, q_sink = rope.apply(q, k)
        ring, index = cache.ring(n)
        out = attend(q, k, v, ring, index, scale=self.attn_scale, softcap=self.attn_softcap, q_sink=q_sink)
        return linear(out, layer.o_proj, layer.o_bias)

    def mlp(self, x: Array, layer: Layer) -> Array:
        gate_up = linear(x, layer.gate_up_proj, layer.gate_up_bias)
        i = self.config.intermediate_size
        act = self.activation(gate_up[:, :i])
        act *= gate_up[:, i:]
        return linear(act, layer.down_proj, layer.down_bias)

    def ropes(self, positions: np.ndarray, cache: KVCache) -> list[Rope]:
        """Each layer's Rope for this call; layers sharing a rotary and a ring share one."""
        made: dict[tuple[int, int], Rope] = {}
        out = []
        for n, rotary in enumerate(self.rotaries):
            ring, _ = cache.ring(n)
            key = (id(rotary), id(ring))
            if key not in made:
                cos, sin = rotary.cos_sin(self.xp.asarray(positions))
                made[key] = Rope(rotary, cos, sin, self._sink_rope(rotary, positions, ring))
            out.append(made[key])
        return out

    def _sink_rope(self, rotary: Rotary, positions: np.ndarray, ring: KVCache) -> tuple[Array, Array] | None:
        # Once the ring has evicted tokens, the sinks are scored as if they sat
        # just before the window (StreamingLLM's positions within the cache):
        # a query never sees a sink further away than the cache is long.
        if not (self.shift_sink_positions and ring.n_sink and positions[-1] >= ring.capacity):
            return None
        return rotary.cos_sin(self.xp.asarray(np.minimum(positions, ring.capacity - 1)))


def split_heads(qkv: Array, n_q: int, n_kv: int, d: int) -> tuple[Array, Array, Array]:
    """(T, (n_q + 2 n_kv) d) -> q (n_q, T, d), k and v (n_kv, T, d)."""
    t = qkv.shape[0]
    heads = qkv.reshape(t, n_q + 2 * n_kv, d).transpose(1, 0, 2)
    return heads[:n_q], heads[n_q:n_q + n_kv], heads[n_q + n_kv:]


class WeightReader:
    """Reads checkpoint tensors at the shapes `expected_shapes` lists, fusing and
    uploading them; matrices are read straight into the memory order the backend
    multiplies fastest (Backend.matrix_order)."""

    def __init__(self, ckpt: Checkpoint, backend: Backend, shapes: dict[str, tuple[int, ...]]) -> None:
        self.ckpt, self.backend, self.shapes = ckpt, backend, shapes

    def host(self, name: str) -> np.ndarray:
        return self.ckpt.get(name, self.shapes[name])

    def __call__(self, *names: str) -> Array:
        """The tensors stacked on axis 0 (one name: the tensor itself), on the device."""
        if len(self.shapes[names[0]]) == 2:
            return self.matrix(names)
        parts = [self.host(n) for n in names]
        host = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        return self.backend.asarray(host, self.backend.weight_dtype)

    def matrix(self, names: tuple[str, ...] | list[str], transposed: bool = False) -> Array:
        """Matrices stacked on axis 0 as one (out, in) weight; `transposed`: one tensor
        stored (in, out) (GPT-2's Conv1D), read as its transpose."""
        shapes = [self.shapes[n][::-1] if transposed else self.shapes[n] for n in names]
        shape = (sum(s[0] for s in shapes), shapes[0][1])
        dtype = self.backend.weight_dtype
        host = np.empty(shape, dtype=dtype, order=self.backend.matrix_order(shape, dtype))
        start = 0
        for name, (rows, _) in zip(names, shapes):
            part = host[start:start + rows]
            self.ckpt.read_into(name, part.T if transposed else part, self.shapes[name])
            start += rows
        return self.backend.asarray(host)

    def maybe(self, *names: str) -> Array | None:
        """As __call__, or None when the architecture does not have the first tensor."""
        return self(*names) if names[0] in self.shapes else None


def load_weights(c: ModelConfig, ckpt: Checkpoint, backend: Backend,
                 shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Read, check, fuse and upload the weights; the one place names are mapped."""
    read = WeightReader(ckpt, backend, shapes)
    layers = []
    for n in range(c.num_hidden_layers):
        p = f"model.layers.{n}."
        attn, mlp = p + "self_attn.", p + "mlp."
        layers.append(Layer(
            input_layernorm=read(p + "input_layernorm.weight"),
            qkv_proj=read(attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
            qkv_bias=read.maybe(attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"),
            o_proj=read(attn + "o_proj.weight"),
            o_bias=read.maybe(attn + "o_proj.bias"),
            post_attention_layernorm=read(p + "post_attention_layernorm.weight"),
            gate_up_proj=read(mlp + "gate_proj.weight", mlp + "up_proj.weight"),
            gate_up_bias=read.maybe(mlp + "gate_proj.bias", mlp + "up_proj.bias"),
            down_proj=read(mlp + "down_proj.weight"),
            down_bias=read.maybe(mlp + "down_proj.bias"),
            q_norm=read.maybe(attn + "q_norm.weight"),
            k_norm=read.maybe(attn + "k_norm.weight"),
        ))
    embed = read("model.embed_tokens.weight")
    lm_head = embed if c.tie_word_embeddings else read("lm_head.weight")
    return {"embed_tokens": embed, "layers": layers, "norm": read("model.norm.weight"), "lm_head": lm_head}
