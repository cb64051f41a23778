"""Phi-3 / Phi-3.5 / Phi-4-mini: Llama with a few changes.

- The checkpoint stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`,
  already in the fused layout Llama loads them into; no biases.
- `partial_rotary_factor` (Phi-4-mini: 0.75): only the first fraction of each
  head's dimensions rotate.
- LongRoPE (`rope_scaling` of type "longrope", "su" in the first releases): a
  short and a long set of per-frequency factors, and an attention factor that
  scales cos and sin.
- `sliding_window` (Phi-3-mini-4k: 2047) is a window on every layer, which the
  cache's ring handles as for Mistral.

When LongRoPE uses the long factors. HF's rotary forward picks one set per call:
the long one when the call's largest position reaches
original_max_position_embeddings. So a one-shot prefill of a prompt longer than
that runs every position on the long factors, while a cache filled before the
switch holds keys (and hidden states) made with the short ones. HF's `generate`
does not mix the two: when the sequence first passes the switch it drops the
cache and recomputes the whole sequence with the long factors
(Phi3ForCausalLM.prepare_inputs_for_generation). We do the same at the same
point: each cache remembers its first original_max_position_embeddings token
ids, and the call that crosses the switch first replays them with the long
factors. Every call therefore returns what one HF forward of the whole sequence
so far gives for its tokens: an HF prefill whatever the prefill chunk, and HF's
generate token for token (the raw HF forward over a cache, which keeps the
short-factor keys, is not matched past the switch). The replay costs one prefill
of original_max_position_embeddings tokens, once per sequence (and the other way
if a chat truncates a cache back below the switch). A cache no longer than the
switch (the default 4096-token context of a Phi-3 pretrained on 4096) reaches it
only by wrapping around (StreamingLLM); that call replays the remembered ids
through the ring the same way, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence
from weakref import WeakKeyDictionary

from loaders.config import ModelConfig, check_number, check_size
from loaders.errors import ModelError
from loaders.safetensors import Checkpoint
from models.llama import Layer, Llama, WeightReader
from runtime.backend import Backend
from runtime.kv_cache import KVCache

# HF's Phi-3 has no biases whatever config.json says, so these keys are not read
_IGNORED_KEYS = ("attention_bias", "mlp_bias")


@dataclass(frozen=True)
class Phi3Config(ModelConfig):
    partial_rotary_factor: float = 1.0
    original_max_position_embeddings: int = 4096  # HF's default, used by LongRoPE when config.json has none

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "Phi3Config":
        return super().from_dict(_phi3_keys(raw) if isinstance(raw, dict) else raw, source)

    def validate(self, source: str) -> None:
        check_size("head_dim", self.head_dim, source)
        # before the rope checks, which read rotary_dim
        check_number("partial_rotary_factor", self.partial_rotary_factor, source, positive=True)
        if self.partial_rotary_factor > 1.0:
            raise ModelError(f"{source}: partial_rotary_factor must be at most 1, got {self.partial_rotary_factor!r}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ModelError(f"{source}: partial_rotary_factor={self.partial_rotary_factor!r} of head_dim="
                             f"{self.head_dim} rotates {self.rotary_dim} dimensions; it must be an even number")
        check_size("original_max_position_embeddings", self.original_max_position_embeddings, source)
        super().validate(source)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)  # int(), as HF rounds


def _phi3_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """config.json as HF's Phi3Config reads it."""
    raw = {k: v for k, v in raw.items() if k not in _IGNORED_KEYS}
    # transformers 5 writes partial_rotary_factor among the rope parameters, older
    # configs at the top level; HF takes the rope parameters' one first
    rope = raw.get("rope_scaling") or raw.get("rope_parameters")
    if isinstance(rope, dict) and rope.get("partial_rotary_factor") is not None:
        raw["partial_rotary_factor"] = rope["partial_rotary_factor"]
    # HF's Phi3Config always has a top-level original_max_position_embeddings (4096
    # by default), and it wins over the rope parameters' one
    if raw.get("original_max_position_embeddings") is None:
        raw["original_max_position_embeddings"] = Phi3Config.original_max_position_embeddings
    return raw


@dataclass
class _Seen:
    """What a cache holds, for a LongRoPE replay: its first token ids and which factors made it."""

    tokens: list[int]  # host-side ids, up to original_max_position_embeddings of them
    long: bool


class Phi3(Llama):
    config_class = Phi3Config

    def __init__(self, config: Phi3Config, backend: Backend, weights: dict[str, Any]) -> None:
        super().__init__(config, backend, weights)
        self.longrope = self.rotary.long_inv_freq is not None
        self.regimes = {long: self.rotary.fixed(long) for long in (False, True)}
        self._seen: WeakKeyDictionary[KVCache, _Seen] = WeakKeyDictionary()

    # -- loading --------------------------------------------------------------
    @classmethod
    def expected_shapes(cls, c: ModelConfig) -> dict[str, tuple[int, ...]]:
        shapes = super().expected_shapes(c)
        qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
        for n in range(c.num_hidden_layers):
            p = f"model.layers.{n}."
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
                del shapes[f"{p}{name}.weight"]
            shapes[p + "self_attn.qkv_proj.weight"] = (qkv, c.hidden_size)
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * c.intermediate_size, c.hidden_size)
        return shapes

    @classmethod
    def load(cls, config: Phi3Config, checkpoint: Checkpoint, backend: Backend) -> "Phi3":
        read = WeightReader(checkpoint, backend, cls.expected_shapes(config))
        layers = [_read_layer(read, f"model.layers.{n}.") for n in range(config.num_hidden_layers)]
        embed = read("model.embed_tokens.weight")
        lm_head = embed if config.tie_word_embeddings else read("lm_head.weight")
        weights = {"embed_tokens": embed, "layers": layers, "norm": read("model.norm.weight"), "lm_head": lm_head}
        return cls(config, backend, weights)

    # -- the forward pass -----------------------------------------------------
    @property
    def batch_context_limit(self) -> int | None:
        """Sequences batched together share one rotary, so they must stay in LongRoPE's
        short regime: the engine caps their context at the switch."""
        return self.rotary.original_max if self.longrope else None

    def forward(self, tokens: Sequence[int], cache: KVCache, all_logits: bool = False) -> Any:
        if self.longrope and cache.batched:
            self.rotaries = [self.regimes[False]] * self.config.num_hidden_layers
        elif self.longrope:
            self._pick_longrope_factors(tokens, cache)
        return super().forward(tokens, cache, all_logits)

    def _pick_longrope_factors(self, tokens: Sequence[int], cache: KVCache) -> None:
        """Set this call's rotary (short or long factors), replaying the cache when they change."""
        start, switch = cache.offset, self.rotary.original_max
        long = start + len(tokens) > switch  # HF: largest position + 1 > original_max_position_embeddings
        if start == 0:
            self._seen[cache] = _Seen([], long)
        seen = self._seen.get(cache)
        if seen is not None:  # None: a cache this model did not fill from its start keeps what it holds
            if seen.long != long:
                # only ever with start <= switch: a cache past the switch was filled by long calls
                self._replay(cache, seen.tokens[:start], long)
            seen.long = long
            del seen.tokens[start:]  # a truncated cache: what followed is gone
            seen.tokens += [int(t) for t in tokens[:max(0, switch - start)]]
        self.rotaries = [self.regimes[long]] * self.config.num_hidden_layers

    def _replay(self, cache: KVCache, tokens: list[int], long: bool) -> None:
        # what HF's generate does at the switch: the cache recomputed with the new factors
        cache.reset()
        self.rotaries = [self.regimes[long]] * self.config.num_hidden_layers
        for start in range(0, len(tokens), cache.max_chunk):
            super().forward(tokens[start:start + cache.max_chunk], cache)


def _read_layer(read: WeightReader, p: str) -> Layer:
    attn, mlp = p + "self_attn.", p + "mlp."
    return Layer(
        input_layernorm=read(p + "input_layernorm.weight"),
        qkv_proj=read(attn + "qkv_proj.weight"), qkv_bias=None,
        o_proj=read(attn + "o_proj.weight"), o_bias=None,
        post_attention_layernorm=read(p + "post_attention_layernorm.weight"),
        gate_up_proj=read(mlp + "gate_up_proj.weight"), gate_up_bias=None,
        down_proj=read(mlp + "down_proj.weight"), down_bias=None,
    )
