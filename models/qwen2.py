"""Qwen2 / Qwen2.5 and Qwen3: Llama with a few changes.

- Qwen2: biases on the q, k and v projections (none on o_proj).
- Qwen3: RMSNorm over each query and key head before the rotation (q_norm,
  k_norm), and head_dim given in config.json rather than hidden_size / heads.
- Both write `sliding_window` into config.json even when `use_sliding_window`
  is false; only then does the window apply (to the layers from
  `max_window_layers` on, as in HF).
"""

from __future__ import annotations

from dataclasses import dataclass

from loaders.config import ModelConfig
from models.llama import Llama


@dataclass(frozen=True)
class Qwen2Config(ModelConfig):
    use_sliding_window: bool = False
    max_window_layers: int | None = None

    def layer_windows(self) -> list[int | None]:
        if not self.use_sliding_window:
            return [None] * self.num_hidden_layers
        if self.layer_types is not None:
            return super().layer_windows()
        first = self.max_window_layers if self.max_window_layers is not None else 0
        return [self.sliding_window if n >= first else None for n in range(self.num_hidden_layers)]


class Qwen2(Llama):
    config_class = Qwen2Config

    @classmethod
    def expected_shapes(cls, c: ModelConfig) -> dict[str, tuple[int, ...]]:
        shapes = super().expected_shapes(c)
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        for n in range(c.num_hidden_layers):
            p = f"model.layers.{n}.self_attn."
            shapes.update({p + "q_proj.bias": (q,), p + "k_proj.bias": (kv,), p + "v_proj.bias": (kv,)})
        return shapes


class Qwen3(Llama):
    config_class = Qwen2Config
    qk_norm = True
