"""config.json as a frozen dataclass whose fields are the config.json keys.

`from_dict` keeps the keys a config class declares and ignores the rest (as mlx-lm
does), fills the derived defaults HF fills (head_dim, num_key_value_heads) and
checks the sizes, so that a broken config fails here with one line instead of as
a shape error deep inside the forward pass.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loaders.errors import ModelError

ROPE_TYPES = ("default", "linear", "llama3", "longrope", "su")
LONGROPE = ("longrope", "su")  # "su": the name Phi-3's first releases gave LongRoPE
_LONGROPE_LISTS = ("short_factor", "long_factor")
_ROPE_KEYS = {"default": (), "linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
              "longrope": (*_LONGROPE_LISTS, "original_max_position_embeddings")}
_ROPE_KEYS["su"] = _ROPE_KEYS["longrope"]
_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
          "max_position_embeddings")
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim")
# Far above any real model, low enough that shape products stay within int64 and that a
# config cannot make us build millions of layer entries before the checkpoint is looked at.
MAX_SIZE = 2**31 - 1
MAX_LAYERS = 65536


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
    layer_types: list[str] | None = None  # "full_attention" / "sliding_attention" per layer
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        values = declared_keys(cls, raw, source)
        # the sizes first, so that the derived defaults below only ever divide positive integers
        for key in (*_SIZES, *_OPTIONAL_SIZES):
            if values.get(key) is not None:
                check_size(key, values[key], source)
        _normalize_rope(values, source)
        _normalize_longrope(values, raw, cls.max_position_embeddings)
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = values["num_attention_heads"]
        if values.get("head_dim") is None:
            values["head_dim"] = divide(values["hidden_size"], values["num_attention_heads"],
                                         "hidden_size", "num_attention_heads", source)
        config = cls(**values)
        config.validate(source)
        return _with_longrope_attention_factor(config)

    def validate(self, source: str) -> None:
        """Every field's type and range; a ModelError naming `source` and the key otherwise."""
        if not isinstance(self.model_type, str):
            raise ModelError(f"{source}: model_type must be a string, got {short(self.model_type)}")
        for key in (*_SIZES, *_OPTIONAL_SIZES):
            check_size(key, getattr(self, key), source)
        for key in ("num_attention_heads", "num_key_value_heads"):
            if getattr(self, key) * self.head_dim > MAX_SIZE:
                raise ModelError(f"{source}: {key} x head_dim = {getattr(self, key) * self.head_dim:,} "
                                 f"is implausibly large (limit {MAX_SIZE:,})")
        divide(self.num_attention_heads, self.num_key_value_heads,
                "num_attention_heads", "num_key_value_heads", source)
        if self.sliding_window is not None:
            check_size("sliding_window", self.sliding_window, source)
        if self.layer_types is not None:
            _check_layer_types(self.layer_types, self.num_hidden_layers, self.sliding_window, source)
        check_number("rope_theta", self.rope_theta, source, positive=True)
        check_number("rms_norm_eps", self.rms_norm_eps, source, positive=False)
        check_flags(self, ("tie_word_embeddings", "attention_bias", "mlp_bias"), source)
        check_ids_and_dtype(self, source)
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling, "rope_scaling", source, self.rotary_dim)

    def layer_windows(self) -> list[int | None]:
        """Each layer's sliding window, None for a layer that sees the whole context."""
        if self.layer_types is None:
            return [self.sliding_window] * self.num_hidden_layers
        return [self.sliding_window if t == "sliding_attention" else None for t in self.layer_types]

    @property
    def rotary_dim(self) -> int:
        """How many of a head's dimensions rotate (Phi-3 rotates a fraction)."""
        return self.head_dim

    @property
    def eos_ids(self) -> list[int]:
        return as_list(self.eos_token_id)


def declared_keys(cls: type, raw: Any, source: str) -> dict[str, Any]:
    """The config.json keys a config dataclass declares (the rest ignored, as
    mlx-lm does), with transformers 5's `dtype` read as torch_dtype; a
    ModelError when a required one is missing."""
    if not isinstance(raw, dict):
        raise ModelError(f"{source}: expected a JSON object")
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in raw.items() if k in names}
    if "torch_dtype" not in values and isinstance(raw.get("dtype"), str):
        values["torch_dtype"] = raw["dtype"]  # transformers 5 renamed the key
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if values.get(k) is None]
    if missing:
        raise ModelError(f"{source}: missing required key(s): {', '.join(missing)}")
    return values


def _normalize_rope(values: dict[str, Any], source: str) -> None:
    # transformers 5 writes rope_parameters = {rope_theta, rope_type, factor, ...};
    # older configs write rope_theta and rope_scaling. The model reads the latter.
    params = values.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ModelError(f"{source}: rope_parameters must be an object, got {short(params)}")
    if not params or "rope_theta" not in params:
        return
    values["rope_theta"] = params["rope_theta"]
    if _rope_type(params, "rope_parameters", source) != "default" and not values.get("rope_scaling"):
        values["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}


def _rope_type(scaling: Any, key: str, source: str) -> str:
    if not isinstance(scaling, dict):
        raise ModelError(f"{source}: {key} must be an object, got {short(scaling)}")
    field = "rope_type" if "rope_type" in scaling else "type"
    kind = scaling.get(field, "default")
    if kind not in ROPE_TYPES:  # a list or a dict is simply not in the tuple
        raise ModelError(f"{source}: unsupported {key} type {short(kind)} "
                         f"(key '{key}.{field}'; supported: {', '.join(ROPE_TYPES)})")
    return kind


def check_rope_scaling(scaling: Any, key: str, source: str, rotary_dim: int | None = None) -> None:
    """The parameters the rotary embedding reads: present, numbers, and sane."""
    kind = _rope_type(scaling, key, source)
    for name in _ROPE_KEYS[kind]:
        if name not in scaling:
            raise ModelError(f"{source}: {key} of type {kind!r} needs '{name}'")
        if name not in _LONGROPE_LISTS:
            check_number(f"{key}.{name}", scaling[name], source, positive=True)
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ModelError(f"{source}: {key}.high_freq_factor ({scaling['high_freq_factor']!r}) must be greater "
                         f"than {key}.low_freq_factor ({scaling['low_freq_factor']!r})")
    if kind in LONGROPE:
        _check_longrope(scaling, key, source, rotary_dim)


def _check_longrope(scaling: dict[str, Any], key: str, source: str, rotary_dim: int | None) -> None:
    original = scaling["original_max_position_embeddings"]
    if not is_int(original) or original < 2:  # its log divides the default attention factor
        raise ModelError(f"{source}: {key}.original_max_position_embeddings must be an integer >= 2, "
                         f"got {short(original)}")
    for name in ("factor", "attention_factor"):  # optional: null is the same as absent, as in HF
        if scaling.get(name) is not None:
            check_number(f"{key}.{name}", scaling[name], source, positive=True)
    for name in _LONGROPE_LISTS:
        factors = scaling[name]
        size = len(factors) if isinstance(factors, list) else -1
        numbers = size > 0 and all(isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f)
                                   and f > 0 for f in factors)
        if not numbers or (rotary_dim is not None and size != rotary_dim // 2):
            count = "" if rotary_dim is None else f"{rotary_dim // 2} "
            raise ModelError(f"{source}: {key}.{name} must be a list of {count}positive numbers "
                             f"(one per rotary frequency), got {short(factors)}")


def _normalize_longrope(values: dict[str, Any], raw: dict[str, Any], default_max_positions: int) -> None:
    # As HF: a top-level original_max_position_embeddings (where Phi-3 writes it)
    # wins over the one in the rope parameters; with neither, max_position_embeddings.
    scaling = values.get("rope_scaling")
    if not isinstance(scaling, dict) or scaling.get("rope_type", scaling.get("type")) not in LONGROPE:
        return
    scaling = dict(scaling)
    if raw.get("original_max_position_embeddings") is not None:
        scaling["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
    elif scaling.get("original_max_position_embeddings") is None:
        scaling["original_max_position_embeddings"] = values.get("max_position_embeddings", default_max_positions)
    values["rope_scaling"] = scaling


def _with_longrope_attention_factor(config: "ModelConfig") -> "ModelConfig":
    """The config with LongRoPE's attention factor (what cos and sin are scaled by)
    filled in as HF derives it when config.json gives none: from `factor`, else from
    max_position_embeddings / original_max_position_embeddings."""
    scaling = config.rope_scaling
    if not scaling or _rope_type(scaling, "rope_scaling", "") not in LONGROPE or \
            scaling.get("attention_factor") is not None:
        return config
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or config.max_position_embeddings / original
    attention = 1.0 if factor <= 1.0 else math.sqrt(1.0 + math.log(factor) / math.log(original))
    return dataclasses.replace(config, rope_scaling={**scaling, "attention_factor": attention})


LAYER_TYPES = ("full_attention", "sliding_attention")


def _check_layer_types(types: Any, layers: int, window: int | None, source: str) -> None:
    if not isinstance(types, list) or len(types) != layers:
        raise ModelError(f"{source}: layer_types must be a list of {layers} entries (one per layer), "
                         f"got {short(types)}")
    for t in types:
        if t not in LAYER_TYPES:
            raise ModelError(f"{source}: unsupported layer type {short(t)} in layer_types "
                             f"(supported: {', '.join(LAYER_TYPES)})")
    if "sliding_attention" in types and window is None:
        raise ModelError(f"{source}: layer_types has sliding_attention layers but sliding_window is not set")


def check_flags(config: Any, keys: tuple[str, ...], source: str) -> None:
    for key in keys:
        if not isinstance(getattr(config, key), bool):
            raise ModelError(f"{source}: {key} must be true or false, got {short(getattr(config, key))}")


def check_ids_and_dtype(config: Any, source: str) -> None:
    """bos/eos_token_id (an id or a list of ids) and torch_dtype (a string), where set."""
    for key in ("bos_token_id", "eos_token_id"):
        value = getattr(config, key)
        ids = value if isinstance(value, list) else [] if value is None else [value]
        if not all(is_int(i) for i in ids):
            raise ModelError(f"{source}: {key} must be a token id or a list of token ids, got {short(value)}")
    if config.torch_dtype is not None and not isinstance(config.torch_dtype, str):
        raise ModelError(f"{source}: torch_dtype must be a string, got {short(config.torch_dtype)}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_size(key: str, value: Any, source: str) -> None:
    if not is_int(value) or value <= 0:
        raise ModelError(f"{source}: {key} must be a positive integer, got {short(value)}")
    limit = MAX_LAYERS if key == "num_hidden_layers" else MAX_SIZE
    if value > limit:
        raise ModelError(f"{source}: {key} = {value:,} is implausibly large (limit {limit:,})")


def check_number(key: str, value: Any, source: str, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        what = "a positive number" if positive else "a non-negative number"
        raise ModelError(f"{source}: {key} must be {what}, got {short(value)}")


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def divide(a: int, b: int, name_a: str, name_b: str, source: str) -> int:
    if a % b:  # both already checked to be positive integers
        raise ModelError(f"{source}: {name_a}={a!r} is not divisible by {name_b}={b!r}")
    return a // b


def as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a model folder, with a one-line error for a bad file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: file not found") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ModelError(f"{path}: not a readable JSON file (not UTF-8)") from None
    except RecursionError:
        raise ModelError(f"{path}: not a readable JSON file (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, or a number with thousands of digits
        raise ModelError(f"{path}: not a readable JSON file ({short(' '.join(str(exc).split()), 200)})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data
