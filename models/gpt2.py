"""GPT-2: learned absolute positions, pre-LayerNorm blocks with biases, GELU MLP.

Read top to bottom as in the paper: token embedding + position embedding (wte,
wpe), then per block h += attn(ln_1(h)) and h += mlp(ln_2(h)), then ln_f and the
lm_head tied to wte. Attention is plain multi-head (one fused c_attn gives q, k
and v); the MLP is c_fc, GELU (tanh approximation, HF's "gelu_new"), c_proj.

Two things differ from the Llama family:
- HF stores GPT-2's projections as Conv1D, weight (in, out). `load_weights` (the
  one place names and layouts are mapped) views them as (out, in), the shape
  `linear` sees in every other architecture; Backend.matrix_order picks the memory order.
- Positions are a learned table of n_positions rows: there is no position past it,
  and none can be shifted. The context is capped at n_positions (see
  `GPT2Config.position_limit`), the cache never wraps, and a forward call that
  would need a position the model lacks raises a one-line ModelError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from loaders.config import (MAX_LAYERS, as_list, check_flags, check_ids_and_dtype, check_number, check_size,
                            declared_keys, divide, short)
from loaders.errors import ModelError
from loaders.safetensors import Checkpoint
from models.layers import gelu_tanh, layer_norm, linear
from models.llama import WeightReader, split_heads
from runtime.attention import attend
from runtime.backend import Backend
from runtime.kv_cache import KVCache

Array = Any

# Both names are the tanh approximation in HF (NewGELUActivation, PytorchGELUTanh).
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
_SIZES = ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size")
_FLAGS = ("tie_word_embeddings", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
          "reorder_and_upcast_attn")
PREFIX = "transformer."  # GPT2LMHeadModel's; a bare GPT2Model checkpoint has none
LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class GPT2Config:
    """config.json of a GPT-2 model; the properties give the names the runtime reads."""

    model_type: str
    n_embd: int
    n_layer: int
    n_head: int
    vocab_size: int
    n_positions: int = 1024
    n_inner: int | None = None  # None: 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    # upcasts the scores to float32 in HF's half-precision runs; ours are float32 already
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "GPT2Config":
        config = cls(**declared_keys(cls, raw, source))
        config.validate(source)
        return config

    def validate(self, source: str) -> None:
        """Every field's type and range; a ModelError naming `source` and the key otherwise."""
        if not isinstance(self.model_type, str):
            raise ModelError(f"{source}: model_type must be a string, got {short(self.model_type)}")
        for key in _SIZES:
            check_size(key, getattr(self, key), source)
        if self.n_layer > MAX_LAYERS:  # before expected_shapes builds an entry per layer
            raise ModelError(f"{source}: n_layer = {self.n_layer:,} is implausibly large (limit {MAX_LAYERS:,})")
        if self.n_inner is not None:
            check_size("n_inner", self.n_inner, source)
        divide(self.n_embd, self.n_head, "n_embd", "n_head", source)
        if self.activation_function not in ACTIVATIONS:
            raise ModelError(f"{source}: unsupported activation_function {short(self.activation_function)} "
                             f"(supported: {', '.join(ACTIVATIONS)})")
        check_number("layer_norm_epsilon", self.layer_norm_epsilon, source, positive=False)
        check_flags(self, _FLAGS, source)
        check_ids_and_dtype(self, source)

    # -- the names the rest of the runtime reads --------------------------------
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_key_value_heads(self) -> int:
        return self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def intermediate_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    @property
    def position_limit(self) -> int:
        """No context may exceed this: the position table has no row past it."""
        return self.n_positions

    @property
    def sliding_window(self) -> None:
        return None

    def layer_windows(self) -> list[int | None]:
        return [None] * self.n_layer

    @property
    def eos_ids(self) -> list[int]:
        return as_list(self.eos_token_id)


@dataclass
class Block:
    ln_1: Array
    ln_1_bias: Array
    c_attn: Array            # q, k, v stacked on the out axis, (3 n_embd, n_embd)
    c_attn_bias: Array
    attn_proj: Array         # attn.c_proj
    attn_proj_bias: Array
    ln_2: Array
    ln_2_bias: Array
    c_fc: Array
    c_fc_bias: Array
    mlp_proj: Array          # mlp.c_proj
    mlp_proj_bias: Array


class GPT2:
    """A GPT-2 decoder; `forward` runs tokens through it and its KV cache."""

    config_class = GPT2Config

    def __init__(self, config: GPT2Config, backend: Backend, weights: dict[str, Any]) -> None:
        self.config = config
        self.backend = backend
        self.xp = backend.xp
        self.wte: Array = weights["wte"]
        self.wpe: Array = weights["wpe"]
        self.blocks: list[Block] = weights["blocks"]
        self.ln_f: Array = weights["ln_f"]
        self.ln_f_bias: Array = weights["ln_f_bias"]
        self.lm_head: Array = weights["lm_head"]
        self.attn_scales = [attention_scale(config, n) for n in range(config.n_layer)]

    # -- loading --------------------------------------------------------------
    @classmethod
    def expected_shapes(cls, c: GPT2Config) -> dict[str, tuple[int, ...]]:
        """Every checkpoint tensor this architecture reads, with its shape as stored
        (Conv1D weights (in, out)), under GPT2LMHeadModel's names."""
        h, i = c.n_embd, c.intermediate_size
        p = PREFIX
        shapes = {p + "wte.weight": (c.vocab_size, h), p + "wpe.weight": (c.n_positions, h),
                  p + "ln_f.weight": (h,), p + "ln_f.bias": (h,)}
        if not c.tie_word_embeddings:
            shapes[LM_HEAD] = (c.vocab_size, h)
        for n in range(c.n_layer):
            b = f"{p}h.{n}."
            shapes.update({
                b + "ln_1.weight": (h,), b + "ln_1.bias": (h,), b + "ln_2.weight": (h,), b + "ln_2.bias": (h,),
                b + "attn.c_attn.weight": (h, 3 * h), b + "attn.c_attn.bias": (3 * h,),
                b + "attn.c_proj.weight": (h, h), b + "attn.c_proj.bias": (h,),
                b + "mlp.c_fc.weight": (h, i), b + "mlp.c_fc.bias": (i,),
                b + "mlp.c_proj.weight": (i, h), b + "mlp.c_proj.bias": (h,),
            })
        return shapes

    @classmethod
    def load(cls, config: GPT2Config, checkpoint: Checkpoint, backend: Backend) -> "GPT2":
        return cls(config, backend, load_weights(config, checkpoint, backend, cls.expected_shapes(config)))

    # -- the forward pass -----------------------------------------------------
    def forward(self, tokens: np.ndarray, cache: KVCache, all_logits: bool = False) -> Array:
        """Logits (T, vocab) float32 (last row only unless all_logits) for tokens (T,)."""
        positions = cache.begin(len(tokens))
        self.check_positions(cache, positions)
        h = self.embed(tokens, positions)
        for n, block in enumerate(self.blocks):
            h = self.block(h, block, n, cache)
        cache.end()
        if not all_logits:
            h = h[cache.logit_rows]
        return linear(layer_norm(h, self.ln_f, self.ln_f_bias, self.config.layer_norm_epsilon), self.lm_head)

    def embed(self, tokens: np.ndarray, positions: np.ndarray) -> Array:
        xp = self.xp
        # one sequence's positions are a run (a slice of the table); a batch's are not
        run = positions[-1] - positions[0] == len(positions) - 1
        learned = self.wpe[int(positions[0]):int(positions[-1]) + 1] if run else self.wpe[xp.asarray(positions)]
        return self.wte[xp.asarray(tokens)].astype(xp.float32) + learned.astype(xp.float32)

    def block(self, h: Array, b: Block, n: int, cache: KVCache) -> Array:
        eps = self.config.layer_norm_epsilon
        h = h + self.attention(layer_norm(h, b.ln_1, b.ln_1_bias, eps), b, n, cache)
        return h + self.mlp(layer_norm(h, b.ln_2, b.ln_2_bias, eps), b)

    def attention(self, x: Array, b: Block, n: int, cache: KVCache) -> Array:
        c = self.config
        q, k, v = split_heads(linear(x, b.c_attn, b.c_attn_bias), c.n_head, c.n_head, c.head_dim)
        ring, index = cache.ring(n)
        out = attend(q, k, v, ring, index, scale=self.attn_scales[n])
        return linear(out, b.attn_proj, b.attn_proj_bias)

    def mlp(self, x: Array, b: Block) -> Array:
        return linear(gelu_tanh(linear(x, b.c_fc, b.c_fc_bias)), b.mlp_proj, b.mlp_proj_bias)

    def check_positions(self, cache: KVCache, positions: np.ndarray) -> None:
        """ModelError if the call needs a position the model lacks.

        The ring must not wrap either (only a --ctx below n_positions lets it):
        Llama's sinks are re-rotated to sit next to the window once tokens are
        evicted, but a learned absolute position cannot be moved.
        """
        end = int(positions.max()) + 1
        limit = self.config.n_positions
        if end > limit:
            raise ModelError(f"gpt2: {end} tokens do not fit: the model has learned positions for only "
                             f"n_positions={limit} tokens (prompt plus generated tokens must fit in {limit})")
        if end > cache.capacity:
            raise ModelError(f"gpt2: {end} tokens do not fit in the context of {cache.capacity} tokens; "
                             f"learned positions cannot slide, so raise --ctx (at most n_positions={limit})")


def attention_scale(c: GPT2Config, layer: int) -> float:
    """HF's per-layer score scale: 1/sqrt(head_dim), optionally divided by the layer number."""
    scale = c.head_dim ** -0.5 if c.scale_attn_weights else 1.0
    return scale / float(layer + 1) if c.scale_attn_by_inverse_layer_idx else scale


class _ConvReader(WeightReader):
    """WeightReader by names without the "transformer." prefix, whether or not the
    checkpoint has it, that also reads Conv1D weights."""

    def __init__(self, ckpt: Checkpoint, backend: Backend, shapes: dict[str, tuple[int, ...]]) -> None:
        # a bare GPT2Model checkpoint (the hub's gpt2) has no prefix; anything else
        # is read with it, so that a missing tensor is reported under its usual name
        self.prefix = "" if "wte.weight" in ckpt and PREFIX + "wte.weight" not in ckpt else PREFIX
        super().__init__(ckpt, backend, {self.name(_unprefixed(k)): shape for k, shape in shapes.items()})

    def __call__(self, *names: str) -> Array:
        return super().__call__(*map(self.name, names))

    def conv(self, name: str) -> Array:
        """A Conv1D weight (in, out) as (out, in), in the backend's matrix order (made once here)."""
        return self.matrix([self.name(name)], transposed=True)

    def name(self, name: str) -> str:
        # lm_head sits outside the transformer in GPT2LMHeadModel: never prefixed
        return name if name == LM_HEAD else self.prefix + name


def _unprefixed(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def load_weights(c: GPT2Config, ckpt: Checkpoint, backend: Backend,
                 shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Read, check, transpose and upload the weights; the one place names and layouts are mapped.

    `attn.bias` / `attn.masked_bias`, causal-mask buffers some checkpoints carry,
    are never read.
    """
    read = _ConvReader(ckpt, backend, shapes)
    blocks = []
    for n in range(c.n_layer):
        p = f"h.{n}."
        blocks.append(Block(
            ln_1=read(p + "ln_1.weight"), ln_1_bias=read(p + "ln_1.bias"),
            c_attn=read.conv(p + "attn.c_attn.weight"), c_attn_bias=read(p + "attn.c_attn.bias"),
            attn_proj=read.conv(p + "attn.c_proj.weight"), attn_proj_bias=read(p + "attn.c_proj.bias"),
            ln_2=read(p + "ln_2.weight"), ln_2_bias=read(p + "ln_2.bias"),
            c_fc=read.conv(p + "mlp.c_fc.weight"), c_fc_bias=read(p + "mlp.c_fc.bias"),
            mlp_proj=read.conv(p + "mlp.c_proj.weight"), mlp_proj_bias=read(p + "mlp.c_proj.bias"),
        ))
    wte = read("wte.weight")
    return {"wte": wte, "wpe": read("wpe.weight"), "blocks": blocks, "ln_f": read("ln_f.weight"),
            "ln_f_bias": read("ln_f.bias"), "lm_head": wte if c.tie_word_embeddings else read(LM_HEAD)}
