"""Gemma 2 and Gemma 3 (text): Llama with Gemma's changes.

- The embeddings are multiplied by sqrt(hidden_size), rounded to float32 as HF
  rounds it (a buffer in the activation dtype); the tied lm_head reads them unscaled.
- RMSNorm multiplies by (1 + weight), and there are four norms per layer: the
  attention and MLP outputs are normalized again before their residual adds.
- GeGLU MLP with tanh GELU.
- Scores are scaled by query_pre_attn_scalar ** -0.5, not head_dim ** -0.5.
- Layers alternate between a sliding window and global attention (`layer_types`;
  older config.json files leave it to a fixed pattern), so the cache keeps a
  window-sized ring for the sliding layers.
- Gemma 2: attention scores and final logits are soft-capped, cap * tanh(x / cap).
- Gemma 3: per-head (1 + w) RMSNorm of queries and keys, and another rope base
  (rope_local_base_freq) for the sliding layers; its attention is never
  soft-capped (HF passes no cap, whatever config.json says), its final logits
  only where final_logit_softcapping is set.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from loaders.config import LAYER_TYPES, ModelConfig, check_number, check_rope_scaling, short
from loaders.errors import ModelError
from loaders.safetensors import Checkpoint
from models.layers import Rotary, gelu_tanh, rms_norm
from models.llama import Layer, Llama, Rope, WeightReader, load_weights
from runtime.backend import Backend
from runtime.kv_cache import KVCache

Array = Any
# the activations HF's Gemma MLP may name that are GELU's tanh approximation
GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")


@dataclass(frozen=True)
class Gemma2Config(ModelConfig):
    # HF's Gemma 2 defaults where they differ from ModelConfig's, for keys config.json leaves out
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    sliding_window: int | None = 4096
    hidden_activation: str = "gelu_pytorch_tanh"
    query_pre_attn_scalar: float = 256
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    use_bidirectional_attention: bool | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "Gemma2Config":
        if isinstance(raw, dict):
            raw = cls.normalize(dict(raw), source)
        config = super().from_dict(raw, source)
        if config.layer_types is None:
            # written before transformers listed layer_types: the family's fixed pattern
            config = dataclasses.replace(config, layer_types=config.default_layer_types())
            config.validate(source)
        return config

    @classmethod
    def normalize(cls, raw: dict[str, Any], source: str) -> dict[str, Any]:
        """The raw config.json with the keys ModelConfig derives otherwise set as HF sets them."""
        raw.setdefault("head_dim", 256)  # HF's default, not hidden_size / heads
        return raw

    def default_layer_types(self) -> list[str]:
        return _every_nth_global(self.num_hidden_layers, 2)  # even layers slide, as HF's Gemma2Config

    def validate(self, source: str) -> None:
        super().validate(source)
        if self.use_bidirectional_attention:
            raise ModelError(f"{source}: use_bidirectional_attention is set: an encoder (EmbeddingGemma), "
                             "not a causal language model")
        if self.hidden_activation not in GELU_TANH:
            raise ModelError(f"{source}: unsupported hidden_activation {short(self.hidden_activation)} "
                             f"(supported: {', '.join(GELU_TANH)})")
        check_number("query_pre_attn_scalar", self.query_pre_attn_scalar, source, positive=True)
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(self, key) is not None:
                check_number(key, getattr(self, key), source, positive=True)


@dataclass(frozen=True)
class Gemma3TextConfig(Gemma2Config):
    max_position_embeddings: int = 131072
    rope_theta: float = 1_000_000.0  # the global layers'
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    use_bidirectional_attention: bool | None = False
    rope_local_base_freq: float = 10_000.0  # the sliding layers' rope base
    rope_local_scaling: dict[str, Any] | None = None  # theirs, from rope_parameters.sliding_attention
    sliding_window_pattern: int = 6  # without layer_types: every n-th layer is global

    @classmethod
    def normalize(cls, raw: dict[str, Any], source: str) -> dict[str, Any]:
        # transformers 5 writes rope_parameters keyed by layer type; older files write
        # rope_theta + rope_scaling (global) and rope_local_base_freq. The model reads the latter.
        raw = super().normalize(raw, source)
        params = raw.get("rope_parameters")
        if not isinstance(params, dict) or not set(params) & set(LAYER_TYPES):
            return raw  # the flat form (or none), which ModelConfig reads as the global layers'
        full, local = (_rope_block(params, kind, source) for kind in ("full_attention", "sliding_attention"))
        raw["rope_parameters"] = None
        if "rope_theta" in full:
            raw["rope_theta"] = full["rope_theta"]
        if "rope_theta" in local:
            raw["rope_local_base_freq"] = local["rope_theta"]
        raw["rope_scaling"] = _scaling(full)
        raw["rope_local_scaling"] = _scaling(local)
        return raw

    def default_layer_types(self) -> list[str]:
        return _every_nth_global(self.num_hidden_layers, self.sliding_window_pattern)

    def validate(self, source: str) -> None:
        super().validate(source)
        check_number("rope_local_base_freq", self.rope_local_base_freq, source, positive=True)
        if self.rope_local_scaling is not None:
            check_rope_scaling(self.rope_local_scaling, "rope_parameters.sliding_attention", source)
        pattern = self.sliding_window_pattern
        if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern < 1:
            raise ModelError(f"{source}: sliding_window_pattern must be a positive integer, got {short(pattern)}")


def _every_nth_global(layers: int, n: int) -> list[str]:
    """Layer i global when (i + 1) % n == 0, sliding otherwise (HF's rule for old configs)."""
    return ["sliding_attention" if (i + 1) % n else "full_attention" for i in range(layers)]


def _rope_block(params: dict[str, Any], kind: str, source: str) -> dict[str, Any]:
    block = params.get(kind)
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise ModelError(f"{source}: rope_parameters.{kind} must be an object, got {short(block)}")
    return block


def _scaling(block: dict[str, Any]) -> dict[str, Any] | None:
    """A rope block's scaling (what Rotary reads as rope_scaling), None for plain rope."""
    if block.get("rope_type", block.get("type", "default")) == "default":
        return None
    return {k: v for k, v in block.items() if k != "rope_theta"}


@dataclass
class GemmaLayer(Layer):
    # Every norm weight of a Gemma layer is held as (1 + w) in float32: see gemma_norm.
    pre_feedforward_layernorm: Array = None
    post_feedforward_layernorm: Array = None


def gemma_norm(read: WeightReader, name: str) -> Array:
    # HF computes (1.0 + w.float()) on every call; computed once here, bit for bit
    # the same, so Llama's plain rms_norm applies it (q_norm/k_norm in
    # Llama.attention included). Float32 whatever the weight policy: in float16,
    # 1 + w would be rounded to steps of 2**-10.
    return read.backend.asarray(read.host(name).astype("float32") + 1.0, "float32")


def gemma_layer(layer: Layer, prefix: str, norm: Callable[[str], Array]) -> GemmaLayer:
    """Llama's layer with Gemma's norms, as (1 + w), and the two feed-forward norms added."""
    fields = {f.name: getattr(layer, f.name) for f in dataclasses.fields(Layer)}
    for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"):
        fields[name] = norm(f"{prefix}{name}.weight")
    if layer.q_norm is not None:
        fields.update(q_norm=norm(prefix + "self_attn.q_norm.weight"), k_norm=norm(prefix + "self_attn.k_norm.weight"))
    return GemmaLayer(**fields)


class Gemma2(Llama):
    config_class = Gemma2Config
    activation = staticmethod(gelu_tanh)  # GeGLU

    def __init__(self, config: Gemma2Config, backend: Backend, weights: dict[str, Any]) -> None:
        super().__init__(config, backend, weights)
        self.attn_scale = float(config.query_pre_attn_scalar) ** -0.5
        self.attn_softcap = _optional_float(config.attn_logit_softcapping)
        self.final_softcap = _optional_float(config.final_logit_softcapping)
        # HF multiplies by a float32 buffer: sqrt(hidden_size) rounded to float32
        self.embed_scale = _float32(config.hidden_size ** 0.5)

    @classmethod
    def expected_shapes(cls, c: ModelConfig) -> dict[str, tuple[int, ...]]:
        shapes = super().expected_shapes(c)
        for n in range(c.num_hidden_layers):
            p = f"model.layers.{n}."
            shapes.update({p + "pre_feedforward_layernorm.weight": (c.hidden_size,),
                           p + "post_feedforward_layernorm.weight": (c.hidden_size,)})
        return shapes

    @classmethod
    def load(cls, config: ModelConfig, checkpoint: Checkpoint, backend: Backend) -> "Gemma2":
        shapes = cls.expected_shapes(config)
        weights = load_weights(config, checkpoint, backend, shapes)  # its norms are replaced below
        read = WeightReader(checkpoint, backend, shapes)

        def norm(name: str) -> Array:
            return gemma_norm(read, name)

        weights["layers"] = [gemma_layer(layer, f"model.layers.{n}.", norm)
                             for n, layer in enumerate(weights["layers"])]
        weights["norm"] = norm("model.norm.weight")
        return cls(config, backend, weights)

    # -- the forward pass -----------------------------------------------------
    def embed(self, tokens: np.ndarray) -> Array:
        h = super().embed(tokens)
        h *= self.embed_scale
        return h

    def logits(self, h: Array) -> Array:
        logits = super().logits(h)
        if self.final_softcap is not None:
            # as HF orders it: divide, tanh, multiply
            logits /= self.final_softcap
            self.xp.tanh(logits, out=logits)
            logits *= self.final_softcap
        return logits

    def block(self, h: Array, layer: GemmaLayer, n: int, cache: KVCache, rope: Rope) -> Array:
        eps = self.config.rms_norm_eps
        attn = self.attention(rms_norm(h, layer.input_layernorm, eps), layer, n, cache, rope)
        h = h + rms_norm(attn, layer.post_attention_layernorm, eps)
        mlp = self.mlp(rms_norm(h, layer.pre_feedforward_layernorm, eps), layer)
        return h + rms_norm(mlp, layer.post_feedforward_layernorm, eps)


class Gemma3Text(Gemma2):
    config_class = Gemma3TextConfig
    qk_norm = True

    def __init__(self, config: Gemma3TextConfig, backend: Backend, weights: dict[str, Any]) -> None:
        super().__init__(config, backend, weights)
        self.attn_softcap = None  # HF's Gemma 3 attention passes no cap, whatever config.json says
        local = Rotary(self.xp, config.head_dim, config.rope_local_base_freq, config.rope_local_scaling)
        self.rotaries = [local if t == "sliding_attention" else self.rotary for t in config.layer_types]


def _optional_float(value: float | None) -> float | None:
    return None if value is None else float(value)


def _float32(value: float) -> float:
    """value rounded to float32, as a Python float."""
    return struct.unpack("f", struct.pack("f", value))[0]
