"""GGUF files (llama.cpp's format) read as a Hugging Face checkpoint: config, float32 tensors, tokenizer.

The rest of the runtime speaks the HF layout (config.json keys, `model.layers.N.*` tensor names,
(out_features, in_features) matrices, a `tokenizers.Tokenizer`), so a GGUF is translated once into
that vocabulary rather than taught to every model file. `read_gguf` parses the header (the tensors
stay memory-mapped and are dequantized one at a time on demand); `convert_gguf_to_hf` writes a
regular HF folder that the safetensors loader, and transformers itself, can open.

What llama.cpp's converter does has to be undone:
- tensor shapes are stored innermost-first (ggml `ne` order); numpy's reversed order is HF's layout;
- for the llama family it interleaves the rows of each q/k head so that rotary pairs are adjacent
  (Meta's original layout); HF pairs dimension i with i + head_dim/2 instead;
- per architecture (`_ARCHS`): its own tensor names, Gemma's norms stored as 1 + w, GPT-2's Conv1D
  weights transposed, metadata keys that become config.json keys (`extra_config`; GPT-2's config
  of its own vocabulary: `own_config`), and where the file is silent, llama.cpp's own defaults;
- the tokenizer exists only as vocab/merges/scores/token-type arrays plus a `pre` name standing
  for the pre-tokenizer regex, so the `tokenizer.json` it came from is rebuilt from those (BPE
  for "gpt2" vocabularies, score-ranked BPE with byte fallback for SentencePiece-style "llama" ones).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS, ReaderTensor
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from loaders.config import MAX_LAYERS, MAX_SIZE, ModelConfig
from loaders.errors import ModelError

__all__ = ["GGUFModel", "read_gguf", "convert_gguf_to_hf", "SUPPORTED_ARCHITECTURES"]


# --------------------------------------------------------------------------------------------------
# Architectures


_LLAMA_GLOBALS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LLAMA_BLOCKS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma 2/3 wrap both sub-blocks in norms; llama.cpp calls the pre-MLP one ffn_norm like Llama's
_GEMMA_BLOCKS = {
    **{k: v for k, v in _LLAMA_BLOCKS.items() if k != "ffn_norm"},
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_PHI3_BLOCKS = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.gate_up_proj",  # gate and up fused, gate first, as in HF
    "ffn_down": "mlp.down_proj",
}
_GPT2_GLOBALS = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
                 "output_norm": "transformer.ln_f", "output": "lm_head"}
_GPT2_BLOCKS = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
                "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}


@dataclass(frozen=True)
class _Arch:
    """How llama.cpp's converter wrote one architecture, and what undoes it."""

    model_type: str
    hf_class: str
    blocks: dict[str, str]  # GGUF per-layer tensor -> HF module under `layers`
    globals: dict[str, str] = field(default_factory=lambda: dict(_LLAMA_GLOBALS))
    layers: str = "model.layers"
    permuted_qk: bool = False  # q/k rows interleaved per head (see module docstring)
    norm_shift: bool = False   # Gemma's norms were written as 1 + w
    conv1d: bool = False       # GPT-2's HF weights are (in, out); the converter transposed them
    # what its config.json holds beyond a Llama's, read from the metadata
    extra_config: Callable[[GGUFReader, "_Meta", str, dict[str, Any]], None] | None = None
    # a config.json of its own vocabulary (GPT-2's n_embd, n_layer, ...) instead of a Llama's:
    # built from (metadata, architecture name, vocab size, tied) alone, checked by its model class
    own_config: Callable[["_Meta", str, int, bool], dict[str, Any]] | None = None


_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# llama.cpp precomputes Llama-3.x RoPE scaling into this tensor instead of writing metadata.
_ROPE_FREQS = "rope_freqs.weight"

# Types that need no dequantizer, plus the block formats gguf-py can dequantize.
_PLAIN_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.F64}


def _dequantizable_types() -> set[GGMLQuantizationType]:
    from gguf import quants

    # gguf-py keeps its dequantizer table private; if it ever moves, only plain floats are accepted
    # and other files fail with a clear ModelError instead of a NotImplementedError mid-conversion.
    return _PLAIN_TYPES | set(getattr(quants, "_type_traits", {}))


_SUPPORTED_TYPES = _dequantizable_types()


# --------------------------------------------------------------------------------------------------
# Opening the file


class _TruncatedRead(Exception):
    def __init__(self, offset: int, end: int, in_tensor_data: bool) -> None:
        super().__init__(offset, end)
        self.offset, self.end, self.in_tensor_data = offset, end, in_tensor_data


_ITEMSIZES: dict[Any, int] = {}


def _itemsize(dtype: Any) -> int:
    size = _ITEMSIZES.get(dtype)
    if size is None:
        size = _ITEMSIZES[dtype] = np.dtype(dtype).itemsize
    return size


class _CheckedReader(GGUFReader):
    """GGUFReader that parses faster and stops at a read past the end of the file.

    The stock reader slices its memmap, so a truncated file yields short arrays and fails later
    with an unrelated reshape error; checking the one low-level read helper turns every
    truncation into a clear message. The overrides touch gguf-py internals: if they are renamed
    they simply stop being called and the generic "corrupt GGUF" path still applies.
    """

    _tensor_fields: list[Any] | tuple[()] = ()

    # Slicing an np.memmap builds a memmap subclass object per slice, which is most of the
    # parse time for a 50k-token vocabulary; a plain ndarray view of the same mapping is ~2x faster
    # and still reads lazily from disk.
    @property
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain = value.view(np.ndarray)

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        end = int(offset) + _itemsize(dtype) * int(count)
        if end > self.data.size:
            # data_offset is only assigned once the header is fully parsed
            raise _TruncatedRead(int(offset), end, hasattr(self, "data_offset"))
        return super()._get(offset, dtype, count, override_order)

    def _build_tensor_info(self, offs: int, count: int) -> tuple[int, list[Any]]:
        # kept so errors raised while laying out tensors can name the tensor
        offs, fields = super()._build_tensor_info(offs, count)
        self._tensor_fields = fields
        return offs, fields


def _short(value: Any, limit: int = 80) -> str:
    """repr() cut to one short line: strings in a hostile file can be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _shown(name: str) -> str:
    """A tensor name as written in messages: as is when it is a plain short name, else quoted and cut."""
    return name if name.isprintable() and len(name) <= 120 else _short(name)


def _detail(e: BaseException) -> str:
    """An exception's text on one line of bounded length."""
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else f"{text[:200]}..."


def _check_preamble(path: Path) -> None:
    """Magic and version, checked by hand so the message says which one is wrong."""
    if path.is_dir():
        raise ModelError(f"{path}: is a folder, not a GGUF file")
    if not path.is_file():
        raise ModelError(f"{path}: no such GGUF file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror})") from None
    if head[:4] != b"GGUF":
        raise ModelError(f"{path}: not a GGUF file (starts with {head[:4]!r}, expected b'GGUF')")
    if len(head) < 8:
        raise ModelError(f"{path}: truncated GGUF header")
    version = int.from_bytes(head[4:], "little")
    if version & 0xFFFF == 0:  # written on a big-endian machine
        version = int.from_bytes(head[4:], "big")
    if version not in READER_SUPPORTED_VERSIONS:
        supported = ", ".join(str(v) for v in READER_SUPPORTED_VERSIONS)
        raise ModelError(f"{path}: unsupported GGUF version {version} (supported: {supported})")


def _tensor_field_name(reader: _CheckedReader, offset: int | None = None, bad_type: bool = False) -> str:
    """Best-effort name of the tensor an error is about, from the reader's tensor-info fields."""
    for f in getattr(reader, "_tensor_fields", []):
        try:
            raw_type, rel_offset = int(f.parts[4][0]), int(f.parts[5][0])
            if bad_type and raw_type not in GGMLQuantizationType._value2member_map_:
                return f.name
            if offset is not None and int(reader.data_offset) + rel_offset == offset:  # type: ignore[union-attr]
                return f.name
        except Exception:  # parts layout is gguf-py internal; a missing name only costs detail
            return ""
    return ""


def _open_reader(path: Path) -> GGUFReader:
    _check_preamble(path)
    # The constructor does all the parsing; keep a handle on the half-built object for messages.
    reader = _CheckedReader.__new__(_CheckedReader)
    try:
        reader.__init__(path)  # type: ignore[misc]
        return reader
    except _TruncatedRead as e:
        size = path.stat().st_size
        if e.in_tensor_data:
            name = _tensor_field_name(reader, offset=e.offset)
            what = f"tensor {_shown(name)}" if name else "tensor data"
            raise ModelError(f"{path}: truncated GGUF: {what} needs bytes up to {e.end}, the file has {size}") from None
        raise ModelError(f"{path}: truncated GGUF header (file has {size} bytes)") from None
    except ValueError as e:
        if "GGMLQuantizationType" in str(e):
            m = re.search(r"(\d+)\)? is not a valid", str(e))  # "np.uint32(250) is not a valid ..."
            type_id = m.group(1) if m else "?"
            name = _tensor_field_name(reader, bad_type=True)
            where = f" for tensor {_shown(name)}" if name else ""
            raise ModelError(f"{path}: unsupported tensor type id {type_id}{where} (unknown to gguf-py)") from None
        raise ModelError(f"{path}: corrupt GGUF file ({_detail(e)})") from None
    except Exception as e:  # anything else the parser trips on is still the file's fault
        raise ModelError(f"{path}: corrupt GGUF file ({type(e).__name__}: {_detail(e)})") from None


# --------------------------------------------------------------------------------------------------
# Metadata


_REQUIRED = object()


class _Meta:
    """Typed access to a reader's key/value metadata, raising ModelError that names the key."""

    def __init__(self, reader: GGUFReader, path: Path) -> None:
        self.fields = reader.fields
        self.path = path

    def raw(self, key: str, default: Any = _REQUIRED) -> Any:
        f = self.fields.get(key)
        if f is None:
            if default is _REQUIRED:
                raise ModelError(f"{self.path}: missing required GGUF metadata key {key!r}")
            return default
        try:
            value = f.contents()
        except UnicodeDecodeError:
            raise ModelError(f"{self.path}: metadata key {key!r} holds a string that is not valid UTF-8") from None
        except Exception as e:  # gguf-py's parts layout of a damaged field
            raise ModelError(f"{self.path}: metadata key {key!r} is corrupt ({type(e).__name__})") from None
        if f.types and f.types[0] == GGUFValueType.FLOAT32 and isinstance(value, float):
            # stored as float32: keep the short decimal the source config had (1e-05, not 9.99e-06)
            value = float(str(np.float32(value)))
        return value

    def _typed(self, key: str, default: Any, kinds: tuple[type, ...], what: str) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _REQUIRED:
            return value
        if isinstance(value, list):
            raise ModelError(f"{self.path}: metadata key {key!r} is a per-layer array; "
                             "only a single value is supported")
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            raise ModelError(f"{self.path}: metadata key {key!r} should be {what}, got {type(value).__name__}")
        return value

    def get_int(self, key: str, default: Any = _REQUIRED) -> Any:
        return self._typed(key, default, (int,), "an integer")

    def get_float(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._typed(key, default, (int, float), "a number")
        return float(value) if value is not None and value is not default else value

    def get_str(self, key: str, default: Any = _REQUIRED) -> Any:
        return self._typed(key, default, (str,), "a string")

    def get_bool(self, key: str, default: Any = _REQUIRED) -> Any:
        return self._typed(key, default, (bool,), "a boolean")

    def get_list(self, key: str, default: Any = _REQUIRED, of: type | None = None) -> Any:
        value = self.raw(key, default)
        if value is default:
            return value
        if not isinstance(value, list):
            raise ModelError(f"{self.path}: metadata key {key!r} should be an array")
        if of is not None and not all(isinstance(v, of) and not (of is int and isinstance(v, bool))
                                      for v in value):
            raise ModelError(f"{self.path}: metadata key {key!r} should be an array of "
                             f"{'strings' if of is str else 'integers'}")
        return value

    def get_size(self, key: str, default: Any = _REQUIRED, limit: int = MAX_SIZE) -> Any:
        """A positive integer no larger than `limit` (sizes a hostile file could make absurd)."""
        value = self.get_int(key, default)
        if value is not default and value is not None and not 0 < value <= limit:
            raise ModelError(f"{self.path}: metadata key {key!r} = {value} is not a valid size "
                             f"(expected 1 to {limit:,})")
        return value


def _rope_scaling(meta: _Meta, arch: str) -> dict[str, Any] | None:
    kind = meta.get_str(f"{arch}.rope.scaling.type", None)
    factor = meta.get_float(f"{arch}.rope.scaling.factor", None)
    legacy = meta.get_float(f"{arch}.rope.scale_linear", None)  # written before scaling.type existed
    if kind is None and legacy not in (None, 1.0):
        return {"rope_type": "linear", "factor": legacy}
    if kind in (None, "none"):
        return None
    if factor is None:
        raise ModelError(f"{meta.path}: missing required GGUF metadata key '{arch}.rope.scaling.factor'")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": factor}
        original = meta.get_int(f"{arch}.rope.scaling.original_context_length", None)
        if original is not None:
            scaling["original_max_position_embeddings"] = original
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            value = meta.get_float(f"{arch}.rope.scaling.{gguf_key}", None)
            if value is not None:
                scaling[hf_key] = value
        return scaling
    raise ModelError(f"{meta.path}: unsupported RoPE scaling type {_short(kind)} (key '{arch}.rope.scaling.type')")


def _llama3_rope_scaling(factors: np.ndarray, head_dim: int, theta: float, path: Path) -> dict[str, Any]:
    """Recover HF's `rope_type: llama3` parameters from llama.cpp's precomputed per-frequency divisors.

    The tensor only holds the result, so assume Meta's published constants (every Llama 3.1-3.3
    release uses them) and check they reproduce it exactly, rather than guess silently.
    """
    if factors.size == 0 or not np.isfinite(factors).all() or factors.max() <= 0:
        raise ModelError(f"{path}: tensor {_ROPE_FREQS} is not Llama-3 RoPE scaling, so it has no HF config equivalent")
    factor, low, high, original = float(factors.max()), 1.0, 4.0, 8192
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    expected = np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, medium))
    if factors.shape != expected.shape or not np.allclose(factors, expected, rtol=1e-4):
        raise ModelError(f"{path}: tensor {_ROPE_FREQS} is not Llama-3 RoPE scaling, so it has no HF config equivalent")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": original}


# llama.cpp's special ids for a SentencePiece-style vocabulary whose file names none (llama-vocab.cpp)
_SPM_DEFAULT_IDS = {"bos_token_id": 1, "eos_token_id": 2, "unknown_token_id": 0}


def _token_id(meta: _Meta, key: str, n_vocab: int) -> int | None:
    value = meta.get_int(f"tokenizer.ggml.{key}", None)
    if value is None and key in _SPM_DEFAULT_IDS and meta.raw("tokenizer.ggml.model", None) == "llama":
        value = _SPM_DEFAULT_IDS[key] if _SPM_DEFAULT_IDS[key] < n_vocab else None
    if value is not None and not 0 <= value < n_vocab:
        raise ModelError(f"{meta.path}: metadata key 'tokenizer.ggml.{key}' = {value} "
                         f"is outside the {n_vocab}-token vocabulary")
    return value


# --------------------------------------------------------------------------------------------------
# Tensors


class _TensorPlan(NamedTuple):
    hf_name: str
    shape: tuple[int, ...]       # numpy / HF order
    tensor: ReaderTensor
    unpermute_heads: int | None  # head count to undo llama.cpp's q/k row interleave with, if any
    minus_one: bool = False      # a Gemma norm written as 1 + w
    transpose: bool = False      # a GPT-2 Conv1D weight, (in, out) in HF


# Tensors that hold config rather than weights: folded into config["rope_scaling"] by _build_config.
_CONFIG_TENSORS = (_ROPE_FREQS, "rope_factors_long.weight", "rope_factors_short.weight")


def _hf_tensor_name(gguf_name: str, arch: _Arch) -> str | None:
    base, _, kind = gguf_name.rpartition(".")
    if base in arch.globals and kind in ("weight", "bias"):
        return f"{arch.globals[base]}.{kind}"
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in arch.blocks:
        return f"{arch.layers}.{int(m.group(1))}.{arch.blocks[m.group(2)]}.{m.group(3)}"
    return None


def _unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp wrote rows of each head as (half, 2) pairs: r0, r0+half, r1, r1+half, ...
    # Reading them as (half, 2) and swapping gives HF's (2, half): first halves, then second halves.
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(t: ReaderTensor, shape: tuple[int, ...], reader: GGUFReader) -> np.ndarray:
    if t.tensor_type == GGMLQuantizationType.F64:
        out = np.asarray(t.data, dtype=np.float32)
    else:
        out = dequantize(t.data, t.tensor_type)
    out = np.asarray(out, dtype=np.float32).reshape(shape)
    if np.may_share_memory(out, reader.data):
        out = out.copy()  # F32 tensors come back as read-only views of the memmap
    return out


def _hf_tensor(p: _TensorPlan, reader: GGUFReader) -> np.ndarray:
    """One tensor dequantized to float32 and put back in HF's layout and convention."""
    w = _dequantize(p.tensor, p.shape[::-1] if p.transpose else p.shape, reader)
    if p.unpermute_heads is not None:
        w = _unpermute_qk(w, p.unpermute_heads)
    if p.minus_one:
        w -= 1.0
    if p.transpose:
        w = np.ascontiguousarray(w.T)
    return w


def _plan_tensors(reader: GGUFReader, meta: _Meta, arch: _Arch, config: dict[str, Any]) -> list[_TensorPlan]:
    path = meta.path
    plans: list[_TensorPlan] = []
    heads_of = {"attn_q": config.get("num_attention_heads"), "attn_k": config.get("num_key_value_heads")}
    for t in reader.tensors:
        if t.name in _CONFIG_TENSORS:
            continue
        hf_name = _hf_tensor_name(t.name, arch)
        if hf_name is None:
            raise ModelError(f"{path}: tensor {_shown(t.name)} has no Hugging Face equivalent in a {arch.model_type!r} model")
        if t.tensor_type not in _SUPPORTED_TYPES:
            raise ModelError(f"{path}: tensor {_shown(t.name)} has unsupported tensor type {t.tensor_type.name}")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        m = _BLOCK_RE.fullmatch(t.name)
        kind = m.group(2) if m else None
        heads = heads_of.get(kind) if arch.permuted_qk else None
        if heads is not None and shape[0] % (2 * heads) != 0:
            raise ModelError(f"{path}: tensor {_shown(t.name)} has {shape[0]} rows, not a multiple of 2 x {heads} heads")
        minus_one = arch.norm_shift and t.name.endswith("norm.weight")
        transpose = arch.conv1d and len(shape) == 2 and kind in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
        plans.append(_TensorPlan(hf_name, shape[::-1] if transpose else shape, t, heads, minus_one, transpose))

    names = {p.tensor.name for p in plans}
    required = itertools.chain([f"{g}.weight" for g in arch.globals if g != "output"], (
        f"blk.{i}.{k}.weight" for i in range(_layer_count(config)) for k in arch.blocks))
    for name in required:  # a generator: stops at the first gap whatever block_count claims
        if name not in names:
            raise ModelError(f"{path}: missing tensor {name}")
    dims = _dims(config)
    for p in plans:
        expected = _expected_shape(p.hf_name, dims)
        if p.shape != expected:
            raise ModelError(f"{path}: tensor {_shown(p.tensor.name)} has shape {p.shape}, but the metadata implies {expected}")
    return plans


def _layer_count(c: dict[str, Any]) -> int:
    return c["n_layer"] if c["model_type"] == "gpt2" else c["num_hidden_layers"]


def _dims(c: dict[str, Any]) -> dict[str, int]:
    """The sizes every tensor shape is made of, from either config vocabulary (GPT-2 has its own)."""
    if c["model_type"] == "gpt2":
        h = c["n_embd"]
        return dict(h=h, i=c["n_inner"], v=c["vocab_size"], q=h, kv=h, hd=h // c["n_head"], pos=c["n_positions"])
    hd = c["head_dim"]
    return dict(h=c["hidden_size"], i=c["intermediate_size"], v=c["vocab_size"], q=c["num_attention_heads"] * hd,
                kv=c["num_key_value_heads"] * hd, hd=hd, pos=c["max_position_embeddings"])


def _expected_shape(hf_name: str, d: dict[str, int]) -> tuple[int, ...]:
    """The HF shape the config implies, so inconsistent metadata fails here rather than mid-forward."""
    h, i, v, q, kv = d["h"], d["i"], d["v"], d["q"], d["kv"]
    module, kind = hf_name.rsplit(".", 1)
    parent, _, leaf = module.rpartition(".")
    leaf = f"{parent.rpartition('.')[2]}.{leaf}" if leaf in ("c_proj", "c_attn", "c_fc") else leaf
    weights = {"embed_tokens": (v, h), "lm_head": (v, h), "wte": (v, h), "wpe": (d["pos"], h),
               "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q), "qkv_proj": (q + 2 * kv, h),
               "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i), "gate_up_proj": (2 * i, h),
               "q_norm": (d["hd"],), "k_norm": (d["hd"],),
               # GPT-2's Conv1D: (in, out), and a bias of the output size
               "attn.c_attn": (h, 3 * h), "attn.c_proj": (h, h), "mlp.c_fc": (h, i), "mlp.c_proj": (i, h)}
    shape = weights.get(leaf, (h,))  # the rest are norms over the hidden size
    if kind == "bias":
        return shape[-1:] if "." in leaf else shape[:1]
    return shape


# --------------------------------------------------------------------------------------------------
# Tokenizer

# Pre-tokenizer split patterns of the tokenizer.json files llama.cpp names by `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTok:
    build: Callable[[], pre_tokenizers.PreTokenizer]
    nfc: bool = False            # HF's tokenizer.json normalizes to NFC first
    ignore_merges: bool = False  # whole words found in the vocab skip BPE (Llama 3's tokenizer.json)


def _gpt2_pre() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_pre() -> pre_tokenizers.PreTokenizer:
    digits = pre_tokenizers.Digits(individual_digits=True)
    return pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def _split_pre(pattern: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    def build() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        )

    return build


_PRE_TOKENIZERS: dict[str, _PreTok] = {
    "default": _PreTok(_gpt2_pre),
    "gpt2": _PreTok(_gpt2_pre),
    "smollm": _PreTok(_digits_pre),
    "starcoder": _PreTok(_digits_pre),
    "refact": _PreTok(_digits_pre),
    "llama-bpe": _PreTok(_split_pre(_LLAMA3_SPLIT), ignore_merges=True),
    "llama3": _PreTok(_split_pre(_LLAMA3_SPLIT), ignore_merges=True),
    "llama-v3": _PreTok(_split_pre(_LLAMA3_SPLIT), ignore_merges=True),
    "qwen2": _PreTok(_split_pre(_QWEN2_SPLIT), nfc=True),
    "deepseek-r1-qwen": _PreTok(_split_pre(_QWEN2_SPLIT), nfc=True),
}

_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4  # gguf.TokenType values


def _build_tokenizer(meta: _Meta, tokenizer_config: dict[str, Any]) -> Tokenizer:
    path = meta.path
    embedded = meta.get_str("tokenizer.huggingface.json", None)
    if embedded is not None:  # some converters ship the original tokenizer.json verbatim
        try:
            return Tokenizer.from_str(embedded)
        except Exception as e:
            raise ModelError(f"{path}: metadata key 'tokenizer.huggingface.json' is not a tokenizer ({_detail(e)})") from None

    kind = meta.get_str("tokenizer.ggml.model")
    if kind == "llama":
        return _spm_tokenizer(meta, tokenizer_config)
    if kind != "gpt2":
        raise ModelError(f"{path}: unsupported tokenizer model {_short(kind)} "
                         "(key 'tokenizer.ggml.model'; supported: 'gpt2', 'llama')")
    pre_name = meta.get_str("tokenizer.ggml.pre", "default")
    pre = _PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        supported = ", ".join(_PRE_TOKENIZERS)
        raise ModelError(f"{path}: unsupported pre-tokenizer {_short(pre_name)} "
                         f"(key 'tokenizer.ggml.pre'; supported: {supported})")

    tokens: list[str] = meta.get_list("tokenizer.ggml.tokens", of=str)
    types: list[int] = meta.get_list("tokenizer.ggml.token_type", [1] * len(tokens), of=int)
    merges = []
    for m in meta.get_list("tokenizer.ggml.merges", of=str):
        left, sep, right = m.partition(" ")
        if not sep:
            raise ModelError(f"{path}: malformed merge {_short(m)} in 'tokenizer.ggml.merges'")
        merges.append((left, right))
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)  # duplicates (padding fillers) keep their first id

    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                                   ignore_merges=pre.ignore_merges))
    except Exception as e:
        raise ModelError(f"{path}: cannot build a BPE tokenizer from 'tokenizer.ggml.tokens'/'merges' ({_detail(e)})") from None
    if pre.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre.build()
    tok.decoder = decoders.ByteLevel()

    try:
        # llama.cpp marks special tokens CONTROL and other added tokens USER_DEFINED; both are matched
        # whole in raw text, as HF's added_tokens are.
        tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k in (_CONTROL, _UNKNOWN)])
        tok.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])
        tok.post_processor = _post_processor(tok, tokenizer_config)
    except Exception as e:  # the Rust library's errors: a special token it cannot use
        raise ModelError(f"{path}: cannot build the tokenizer from 'tokenizer.ggml.*' ({_detail(e)})") from None
    return tok


_NORMAL = 1  # gguf.TokenType


def _spm_tokenizer(meta: _Meta, tokenizer_config: dict[str, Any]) -> Tokenizer:
    """A SentencePiece-style vocabulary (tokenizer model "llama": Llama 2, Mistral, Gemma, Phi-3).

    llama.cpp tokenizes it by merging the adjacent pair whose union is the highest-scored token,
    falling back to <0xNN> byte tokens for what no token covers. That is BPE with merges ranked by
    the merged token's score, which is how HF's own converter rebuilds these vocabularies.
    """
    path = meta.path
    tokens: list[str] = meta.get_list("tokenizer.ggml.tokens", of=str)
    scores: list[float] = meta.get_list("tokenizer.ggml.scores", [0.0] * len(tokens))
    types: list[int] = meta.get_list("tokenizer.ggml.token_type", [_NORMAL] * len(tokens), of=int)
    if not len(tokens) == len(scores) == len(types):
        raise ModelError(f"{path}: 'tokenizer.ggml.tokens', 'scores' and 'token_type' have different lengths")
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    unk_id = _token_id(meta, "unknown_token_id", len(tokens))
    unk = tokens[unk_id] if unk_id is not None else None
    # every way to split a normal token into two tokens is a merge, ranked by the token's score
    ranked = []
    for i, (token, score, kind) in enumerate(zip(tokens, scores, types)):
        if kind != _NORMAL or len(token) < 2 or vocab[token] != i:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(score), i, vocab[left], left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    except Exception as e:
        raise ModelError(f"{path}: cannot build a SentencePiece-style tokenizer from 'tokenizer.ggml.*' ({_detail(e)})") from None
    # llama.cpp's default for this tokenizer model is a leading space; Gemma's files turn it off
    prefix = meta.get_bool("tokenizer.ggml.add_space_prefix", True)
    steps = [normalizers.Prepend("\u2581")] if prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    decode = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence([*decode, decoders.Strip(" ", 1, 0)] if prefix else decode)
    try:
        tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k in (_CONTROL, _UNKNOWN)])
        tok.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])
        post = _post_processor(tok, tokenizer_config, byte_level=False)
        if post is not None:
            tok.post_processor = post
    except Exception as e:
        raise ModelError(f"{path}: cannot build the tokenizer from 'tokenizer.ggml.*' ({_detail(e)})") from None
    return tok


def _post_processor(tok: Tokenizer, tokenizer_config: dict[str, Any], byte_level: bool = True) -> processors.PostProcessor | None:
    bos = tokenizer_config.get("bos_token") if tokenizer_config.get("add_bos_token") else None
    eos = tokenizer_config.get("eos_token") if tokenizer_config.get("add_eos_token") else None
    if bos is None and eos is None:
        return processors.ByteLevel(trim_offsets=False) if byte_level else None
    prefix, suffix = ([bos] if bos else []), ([eos] if eos else [])
    single = " ".join([*prefix, "$A:0", *suffix])
    pair = " ".join([*prefix, "$A:0", *suffix, *(f"{t}:1" for t in prefix), "$B:1", *(f"{t}:1" for t in suffix)])
    return processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys([*prefix, *suffix])]
    )


# --------------------------------------------------------------------------------------------------
# The model


@dataclass
class GGUFModel:
    """A parsed GGUF: HF-style config dicts now, tensors and tokenizer on demand."""

    path: Path
    config: dict[str, Any]
    tokenizer_config: dict[str, Any]
    generation_config: dict[str, Any]
    _reader: GGUFReader = field(repr=False)
    _meta: _Meta = field(repr=False)
    _plans: list[_TensorPlan] = field(repr=False)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF name -> float32 shape of every tensor `tensors()` yields, in the same order."""
        return {p.hf_name: p.shape for p in self._plans}

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(HF name, float32 array in HF layout), dequantized one at a time so memory stays at one tensor."""
        for p in self._plans:
            yield p.hf_name, _hf_tensor(p, self._reader)

    def source(self) -> dict[str, Any]:
        """What the file was: its name, size, quantization and tensor count per type (for `info`)."""
        counts: dict[str, int] = {}
        for p in self._plans:
            counts[p.tensor.tensor_type.name] = counts.get(p.tensor.tensor_type.name, 0) + 1
        return {"file": self.path.name, "bytes": self.path.stat().st_size, "quantization": _file_type(self._meta, counts),
                "tensor_types": dict(sorted(counts.items(), key=lambda kv: -kv[1]))}

    def tokenizer(self) -> Tokenizer:
        """A fresh `tokenizers.Tokenizer` equivalent to the model's original tokenizer.json."""
        return _build_tokenizer(self._meta, self.tokenizer_config)

    def save_hf(self, out_dir: str | os.PathLike[str], progress: bool = True) -> Path:
        """Write an HF model folder; see `convert_gguf_to_hf`."""
        return _write_hf_folder(self, Path(out_dir), progress)


def _file_type(meta: _Meta, counts: dict[str, int]) -> str:
    """The file's quantization as llama.cpp names it (Q4_K_M, ...): general.file_type, else the
    type most of its matrices have."""
    value = meta.raw("general.file_type", None)
    try:
        from gguf import LlamaFileType

        name = LlamaFileType(value).name
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (ValueError, TypeError):
        return max(counts, key=counts.get) if counts else "unknown"


SOURCE_FILE = "gguf_source.json"  # written beside config.json: what the folder was converted from


def read_gguf(path: str | os.PathLike[str]) -> GGUFModel:
    """Parse a GGUF's header into HF-style configs; tensor data stays on disk until `tensors()`."""
    path = Path(path)
    reader = _open_reader(path)
    meta = _Meta(reader, path)

    arch_name = meta.get_str("general.architecture")
    arch = _ARCHS.get(arch_name)
    if arch is None:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise ModelError(f"{path}: unsupported architecture {_short(arch_name)} (supported: {supported})")

    config = _build_config(reader, meta, arch_name, arch)
    tokenizer_config, generation_config = _build_tokenizer_configs(meta, config)
    plans = _plan_tensors(reader, meta, arch, config)
    if arch.own_config is None:  # an own config is checked by its model's config class at load
        ModelConfig.from_dict(config, source=f"{path} (metadata as config.json)")  # eps, theta, ... as load() will
    return GGUFModel(path, config, tokenizer_config, generation_config, reader, meta, plans)


def _build_config(reader: GGUFReader, meta: _Meta, a: str, arch: _Arch) -> dict[str, Any]:
    tensor_names = {t.name for t in reader.tensors}
    tokens = meta.get_list("tokenizer.ggml.tokens", None, of=str)
    # HF's vocab_size is the embedding's row count, which can exceed the real token count (Qwen pads it)
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = int(embd.shape[-1]) if embd is not None else meta.get_int(f"{a}.vocab_size", None)
    if vocab is None:
        vocab = len(tokens) if tokens is not None else 0  # no embedding: _plan_tensors reports it
    tied = "output.weight" not in tensor_names
    if arch.own_config is not None:
        config = arch.own_config(meta, a, vocab, tied)
    else:
        config = _decoder_config(reader, meta, a, arch, vocab, tied)
        (arch.extra_config or _bias_flags)(reader, meta, a, config)

    n_vocab = len(tokens) if tokens is not None else vocab
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):
        value = _token_id(meta, key, n_vocab)
        if value is not None:
            config[hf_key] = value
    return config


def _decoder_config(reader: GGUFReader, meta: _Meta, a: str, arch: _Arch, vocab: int, tied: bool) -> dict[str, Any]:
    """The keys every Llama-like architecture shares."""
    hidden = meta.get_size(f"{a}.embedding_length")
    heads = meta.get_size(f"{a}.attention.head_count")
    head_dim = meta.get_size(f"{a}.attention.key_length", None)
    if head_dim is None:  # absent unless it differs from hidden / heads
        if hidden % heads:
            raise ModelError(f"{meta.path}: '{a}.attention.head_count' = {heads} "
                             f"does not divide the hidden size {hidden}")
        head_dim = hidden // heads
    theta = meta.get_float(f"{a}.rope.freq_base", 10000.0)  # llama.cpp's default when absent
    config: dict[str, Any] = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "intermediate_size": meta.get_size(f"{a}.feed_forward_length"),
        "num_hidden_layers": meta.get_size(f"{a}.block_count", limit=MAX_LAYERS),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get_size(f"{a}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": meta.get_float(f"{a}.attention.layer_norm_rms_epsilon"),
        "rope_theta": theta,
        "max_position_embeddings": meta.get_size(f"{a}.context_length"),
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    kv_heads = config["num_key_value_heads"]
    if heads % kv_heads:
        raise ModelError(f"{meta.path}: '{a}.attention.head_count_kv' = {kv_heads} does not divide {heads} heads")

    scaling = _rope_scaling(meta, a)
    freqs = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
    if freqs is not None:
        scaling = _llama3_rope_scaling(np.asarray(freqs.data, dtype=np.float64).reshape(-1), head_dim, theta, meta.path)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def _bias_flags(reader: GGUFReader, meta: _Meta, a: str, config: dict[str, Any]) -> None:
    # Llama and Qwen3 have biases only where the checkpoint has them
    config["attention_bias"] = any(t.name == "blk.0.attn_q.bias" for t in reader.tensors)
    config["mlp_bias"] = False


def _qwen2_config(reader: GGUFReader, meta: _Meta, a: str, config: dict[str, Any]) -> None:
    config["use_sliding_window"] = False  # llama.cpp runs Qwen2 with full attention on every layer


def _phi3_config(reader: GGUFReader, meta: _Meta, a: str, config: dict[str, Any]) -> None:
    head_dim = config["head_dim"]
    rotary = meta.get_size(f"{a}.rope.dimension_count", head_dim)
    config["partial_rotary_factor"] = rotary / head_dim
    original = meta.get_size(f"{a}.rope.scaling.original_context_length", None)
    if original is not None:
        config["original_max_position_embeddings"] = original
    config["sliding_window"] = meta.get_int(f"{a}.attention.sliding_window", 0) or None  # 0: none (Phi-4)
    factors = {t.name: t for t in reader.tensors if t.name.startswith("rope_factors_")}
    if factors:  # LongRoPE (the 128k models): per-frequency divisors, short and long
        def read(name: str) -> list[float]:
            t = factors.get(f"rope_factors_{name}.weight")
            if t is None:
                raise ModelError(f"{meta.path}: missing tensor rope_factors_{name}.weight (LongRoPE needs both)")
            # stored as float32: keep the short decimals config.json had (1.1, not 1.100000023841858)
            return [float(str(x)) for x in np.asarray(t.data, dtype=np.float32).reshape(-1)]

        config["rope_scaling"] = {"rope_type": "longrope", "short_factor": read("short"), "long_factor": read("long")}


# llama.cpp's Gemma constants where the file is silent (src/models/gemma2.cpp, gemma3.cpp):
# Gemma 2 slides every other layer (window 4096), Gemma 3 five of every six; both scale queries
# by 1/sqrt(head_dim), except the 27B models (told apart by layer count) by 1/sqrt(hidden / heads).
_GEMMA_PATTERN = {"gemma2": 2, "gemma3_text": 6}
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}


def _gemma_config(reader: GGUFReader, meta: _Meta, a: str, config: dict[str, Any]) -> None:
    kind, layers = config["model_type"], config["num_hidden_layers"]
    config["hidden_act"] = config["hidden_activation"] = "gelu_pytorch_tanh"
    big = layers == _GEMMA_27B_LAYERS[kind]
    config["query_pre_attn_scalar"] = config["hidden_size"] // config["num_attention_heads"] if big else config["head_dim"]
    gemma2 = kind == "gemma2"
    config["attn_logit_softcapping"] = meta.get_float(f"{a}.attn_logit_softcapping", 50.0) if gemma2 else None
    config["final_logit_softcapping"] = meta.get_float(f"{a}.final_logit_softcapping", 30.0 if gemma2 else None)
    window = meta.get_int(f"{a}.attention.sliding_window", 4096 if gemma2 else 0)
    pattern = meta.raw(f"{a}.attention.sliding_window_pattern", _GEMMA_PATTERN[kind])
    if not window:
        types = ["full_attention"] * layers
    elif isinstance(pattern, list):  # one flag per layer: true where the layer slides
        if len(pattern) != layers or not all(isinstance(p, bool) for p in pattern):
            raise ModelError(f"{meta.path}: metadata key '{a}.attention.sliding_window_pattern' should hold "
                             f"{layers} booleans")
        types = ["sliding_attention" if p else "full_attention" for p in pattern]
    elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 1:
        types = ["sliding_attention" if i % pattern < pattern - 1 else "full_attention" for i in range(layers)]
    else:
        raise ModelError(f"{meta.path}: metadata key '{a}.attention.sliding_window_pattern' should be a positive "
                         f"integer or a list of booleans, got {_short(pattern)}")
    config["sliding_window"] = window or None
    config["layer_types"] = types
    if not gemma2:
        config["rope_local_base_freq"] = meta.get_float(f"{a}.rope.freq_base_swa", 10000.0)


def _gpt2_config(meta: _Meta, a: str, vocab: int, tied: bool) -> dict[str, Any]:
    """GPT-2 keeps its own config.json vocabulary (n_embd, n_layer, ...)."""
    heads, hidden = meta.get_size(f"{a}.attention.head_count"), meta.get_size(f"{a}.embedding_length")
    if hidden % heads:
        raise ModelError(f"{meta.path}: '{a}.attention.head_count' = {heads} does not divide the hidden size {hidden}")
    positions = meta.get_size(f"{a}.context_length")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": hidden,
        "n_layer": meta.get_size(f"{a}.block_count", limit=MAX_LAYERS),
        "n_head": heads,
        "n_inner": meta.get_size(f"{a}.feed_forward_length"),
        "n_positions": positions,
        "n_ctx": positions,
        "layer_norm_epsilon": meta.get_float(f"{a}.attention.layer_norm_epsilon"),
        "activation_function": "gelu_new",  # llama.cpp's GPT-2 uses the tanh approximation
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "use_cache": True,
    }


_ARCHS: dict[str, _Arch] = {
    "llama": _Arch("llama", "LlamaForCausalLM", _LLAMA_BLOCKS, permuted_qk=True),
    # Qwen2's HF class always has q/k/v biases: no bias flags in its config
    "qwen2": _Arch("qwen2", "Qwen2ForCausalLM", _LLAMA_BLOCKS, extra_config=_qwen2_config),
    "qwen3": _Arch("qwen3", "Qwen3ForCausalLM", {**_LLAMA_BLOCKS, **_QK_NORMS}),
    "gemma2": _Arch("gemma2", "Gemma2ForCausalLM", _GEMMA_BLOCKS, norm_shift=True, extra_config=_gemma_config),
    "gemma3": _Arch("gemma3_text", "Gemma3ForCausalLM", {**_GEMMA_BLOCKS, **_QK_NORMS}, norm_shift=True,
                     extra_config=_gemma_config),
    "phi3": _Arch("phi3", "Phi3ForCausalLM", _PHI3_BLOCKS, extra_config=_phi3_config),
    "gpt2": _Arch("gpt2", "GPT2LMHeadModel", _GPT2_BLOCKS, _GPT2_GLOBALS, layers="transformer.h", conv1d=True,
                   own_config=_gpt2_config),
}
# Mistral has no architecture of its own in GGUF: llama.cpp's converter writes it as "llama".
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_ARCHS)


def _build_tokenizer_configs(meta: _Meta, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    tokens = meta.get_list("tokenizer.ggml.tokens", None, of=str) or []
    n = len(tokens)

    def token(key: str) -> str | None:
        i = _token_id(meta, key, n) if n else None
        return tokens[i] if i is not None else None

    tok_cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        # llama.cpp's default: a BOS for SentencePiece-style vocabularies, none for GPT-2-style ones
        "add_bos_token": meta.get_bool("tokenizer.ggml.add_bos_token", meta.raw("tokenizer.ggml.model", None) == "llama"),
        "add_eos_token": meta.get_bool("tokenizer.ggml.add_eos_token", False),
        "model_max_length": _dims(config)["pos"],
        "clean_up_tokenization_spaces": False,
    }
    template = meta.get_str("tokenizer.chat_template", None)
    if template is not None:
        tok_cfg["chat_template"] = template

    gen: dict[str, Any] = {k: config[k] for k in ("bos_token_id", "pad_token_id") if k in config}
    # llama.cpp also stops on end-of-turn / end-of-message tokens; HF lists every stop id in eos_token_id
    stops = [config.get("eos_token_id"), _token_id(meta, "eot_token_id", n or config["vocab_size"]),
             _token_id(meta, "eom_token_id", n or config["vocab_size"])]
    stops = list(dict.fromkeys(s for s in stops if s is not None))
    if stops:
        gen["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    for gguf_key, hf_key in (("temp", "temperature"), ("top_k", "top_k"), ("top_p", "top_p")):
        value = meta.raw(f"general.sampling.{gguf_key}", None)
        if value is not None:
            gen[hf_key] = value
            gen["do_sample"] = True
    return tok_cfg, gen


# --------------------------------------------------------------------------------------------------
# Writing an HF folder


def _safetensors_header(shapes: dict[str, tuple[int, ...]]) -> bytes:
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        entries[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(entries, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format wants the data section 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob


def _write_safetensors(model: GGUFModel, path: Path, progress: bool) -> None:
    # Written by hand rather than with safetensors.numpy.save_file, which needs every tensor in
    # memory at once: the header only needs shapes, so tensors can stream in one by one.
    from tqdm import tqdm

    shapes = model.tensor_shapes()
    with open(path, "wb") as f:
        f.write(_safetensors_header(shapes))
        bar = tqdm(model.tensors(), total=len(shapes), desc=f"Converting {model.path.name}", unit="tensor",
                   file=sys.stderr, disable=not progress)
        for name, array in bar:
            assert array.shape == shapes[name], (name, array.shape)
            f.write(np.ascontiguousarray(array, dtype="<f4").data)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_hf_folder(model: GGUFModel, out_dir: Path, progress: bool) -> Path:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ModelError(f"{out_dir}: output folder already exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = model.tokenizer()  # fail on a bad tokenizer before spending time on tensors
    # Build next to the target and rename at the end: an interrupted run leaves only a hidden
    # *.partial folder, never a half-written folder that looks like a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        _write_json(tmp / "config.json", model.config)
        _write_json(tmp / "generation_config.json", model.generation_config)
        _write_json(tmp / "tokenizer_config.json", model.tokenizer_config)
        _write_json(tmp / SOURCE_FILE, model.source())
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_safetensors(model, tmp / "model.safetensors", progress)
        tmp.chmod(0o755)  # mkdtemp's 0700 would make the model private to this user
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename cannot replace it portably
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def convert_gguf_to_hf(
    gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], progress: bool = True
) -> Path:
    """Convert a GGUF into an HF folder (config.json, float32 model.safetensors, tokenizer files).

    The folder appears atomically when complete; `out_dir` must not exist or be empty.
    """
    return read_gguf(gguf_path).save_hf(out_dir, progress=progress)
