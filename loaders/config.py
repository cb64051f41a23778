"""config.json as a frozen dataclass whose fields are the config.json keys.

`from_dict` keeps the keys a config class declares and ignores the rest (as mlx-lm
does), fills the derived defaults HF fills (head_dim, num_key_value_heads) and
checks the sizes, so that a broken config fails here with one line instead of as
a shape error deep inside the forward pass.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loaders.errors import ModelError

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None  # transformers 5's name for theta + scaling
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in names}
        if "torch_dtype" not in values and isinstance(raw.get("dtype"), str):
            values["torch_dtype"] = raw["dtype"]  # transformers 5 renamed the key
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if values.get(k) is None]
        if missing:
            raise ModelError(f"{source}: missing required key(s): {', '.join(missing)}")
        _normalize_rope(values)
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = values["num_attention_heads"]
        if values.get("head_dim") is None:
            values["head_dim"] = _divide(values["hidden_size"], values["num_attention_heads"],
                                         "hidden_size", "num_attention_heads", source)
        config = cls(**values)
        config.validate(source)
        return config

    def validate(self, source: str) -> None:
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "vocab_size", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelError(f"{source}: {key} must be a positive integer, got {value!r}")
        _divide(self.num_attention_heads, self.num_key_value_heads,
                "num_attention_heads", "num_key_value_heads", source)
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ModelError(f"{source}: sliding_window must be positive, got {self.sliding_window!r}")
        if self.rope_theta <= 0:
            raise ModelError(f"{source}: rope_theta must be positive, got {self.rope_theta!r}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ROPE_TYPES:
                raise ModelError(f"{source}: unsupported rope_scaling type {kind!r} "
                                 f"(supported: {', '.join(ROPE_TYPES)})")

    @property
    def eos_ids(self) -> list[int]:
        return _as_list(self.eos_token_id)


def _normalize_rope(values: dict[str, Any]) -> None:
    # transformers 5 writes rope_parameters = {rope_theta, rope_type, factor, ...};
    # older configs write rope_theta and rope_scaling. The model reads the latter.
    params = values.get("rope_parameters")
    if not isinstance(params, dict) or "rope_theta" not in params:
        return
    values["rope_theta"] = params["rope_theta"]
    if params.get("rope_type", "default") != "default" and not values.get("rope_scaling"):
        values["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}


def _divide(a: int, b: int, name_a: str, name_b: str, source: str) -> int:
    if not isinstance(b, int) or b <= 0 or not isinstance(a, int) or a % b:
        raise ModelError(f"{source}: {name_a}={a!r} is not divisible by {name_b}={b!r}")
    return a // b


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a model folder, with a one-line error for a bad file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data
