"""Fuzzing the file loaders: whatever the bytes, nothing but ModelError escapes.

Random and mutated safetensors files (bytes, the header's length field, its JSON fields) and
random and mutated GGUF files (bytes, integer fields, metadata values of any type) go through
the loaders' entry points: `read_header` and `Checkpoint(folder).get`, and `read_gguf` followed
by `.tensors()`, `.tokenizer()` and `.save_hf()`. An IndexError, ValueError, struct.error,
MemoryError, UnicodeDecodeError, OverflowError, RecursionError... is a loader bug; so is a
ModelError message on several lines or naming neither the file nor its folder. When a file is
accepted, what it yields must agree with its header.

Quick by default (the `fuzz-ci` profile, 100 examples per test); for a long run:

    FUZZ_EXAMPLES=5000 python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import gguf
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as T
from loaders.errors import ModelError
from loaders.gguf import read_gguf
from loaders.safetensors import DTYPES, Checkpoint, read_header

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES") or 0)
settings.register_profile("fuzz-ci", max_examples=100, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz-long", settings.get_profile("fuzz-ci"), max_examples=FUZZ_EXAMPLES or 100)
# applied per test rather than loaded, so other test files keep their own hypothesis settings
FUZZ = settings.get_profile("fuzz-long" if FUZZ_EXAMPLES else "fuzz-ci")

logging.getLogger("gguf").setLevel(logging.ERROR)  # GGUFWriter warns about every overridden key


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    """One folder per test module, rewritten by every example (hypothesis reruns a test many times)."""
    folder = Path(tempfile.mkdtemp(prefix="nprt-fuzz-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _fresh(work: Path, name: str) -> Path:
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


def _check_error(error: ModelError, *names: str) -> None:
    message = str(error)
    assert "\n" not in message and "\r" not in message, message
    assert len(message) < 2000, message[:300]
    assert any(name in message for name in names), message


# --------------------------------------------------------------------------------------------------
# safetensors

def _tensors() -> dict[str, tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return {
        "w": ("F32", rng.standard_normal((2, 3)).astype(np.float32)),
        "h": ("F16", np.arange(4, dtype=np.float16)),
        "b": ("BF16", np.array([1.5, -2.0, 3.25], dtype=ml_dtypes.bfloat16)),
        "i": ("I64", np.array([7, -7], dtype=np.int64)),
        "empty": ("U8", np.zeros((0, 5), dtype=np.uint8)),
        "scalar": ("F64", np.array(2.5)),
        "flags": ("BOOL", np.array([True, False, True])),
    }


def _safetensors_bytes(header: dict[str, Any], body: bytes) -> bytes:
    blob = json.dumps(header, allow_nan=True).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + body


def _valid_safetensors() -> tuple[dict[str, Any], bytes]:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    body = b""
    for name, (dtype, array) in _tensors().items():
        raw = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    return header, body


VALID_HEADER, VALID_BODY = _valid_safetensors()
VALID_ST = _safetensors_bytes(VALID_HEADER, VALID_BODY)


def test_valid_safetensors_reads_back(work: Path) -> None:
    # the seed of every mutation below is a correct file
    folder = _fresh(work, "valid")
    (folder / "model.safetensors").write_bytes(VALID_ST)
    ckpt = Checkpoint(folder)
    for name, (_, array) in _tensors().items():
        got = ckpt.get(name)
        expected = array.astype(np.float32) if array.dtype == ml_dtypes.bfloat16 else array
        assert got.shape == array.shape and got.dtype == expected.dtype, name
        np.testing.assert_array_equal(got, expected)


def _load_safetensors(work: Path, data: bytes) -> None:
    """The entry points on one file; anything accepted must agree with its header."""
    folder = _fresh(work, "st")
    path = folder / "model.safetensors"
    path.write_bytes(data)
    try:
        infos = read_header(path)
    except ModelError as e:
        _check_error(e, str(path))
        return
    for info in infos.values():
        assert 0 <= info.start <= info.end <= len(data)
        assert info.end - info.start == math.prod(info.shape) * DTYPES[info.dtype].itemsize
    try:
        ckpt = Checkpoint(folder)
    except ModelError as e:
        _check_error(e, str(path), str(folder))
        return
    for name, info in ckpt.tensors.items():
        try:
            array = ckpt.get(name)
        except ModelError as e:
            _check_error(e, str(path))
            continue
        assert array.shape == info.shape, name
        try:
            ckpt.get(name, tuple(d + 1 for d in info.shape) or (1,))
            raise AssertionError("a shape other than the header's was accepted")
        except ModelError as e:
            _check_error(e, str(path))


# -- strategies -----------------------------------------------------------------------------------

_BOUNDARY_INTS = [0, 1, -1, 7, 8, 2**31 - 1, 2**31, 2**32, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
                  10**12, -(2**63), 10**30]
json_scalars = (st.none() | st.booleans() | st.integers() | st.sampled_from(_BOUNDARY_INTS)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
                | st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "F8_E4M3", "Q4_0", ""]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
small_ints = st.integers(-3, 70) | st.sampled_from(_BOUNDARY_INTS)
shapes = st.lists(small_ints, max_size=5) | json_values
offsets = st.lists(small_ints, min_size=2, max_size=2) | st.lists(small_ints, max_size=3) | json_values


@st.composite
def byte_mutations(draw: st.DrawFn, data: bytes, hot: int) -> bytes:
    """Flip, overwrite, insert, delete or cut bytes; most positions fall in bytes 8 to `hot`.

    (The first 8 bytes, magic and version or the header length, get a share of their own: a
    mutation there is rejected at once and would otherwise use up most examples.)
    """
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if len(out) <= 8:
            break
        # (sampled_from, not integers(0, 9) == 0: hypothesis draws 0 far more often than 1 in 10)
        where = draw(st.sampled_from(["hot"] * 8 + ["anywhere", "start"]))
        low, high = {"start": (0, 8), "anywhere": (8, len(out)), "hot": (8, min(hot, len(out)))}[where]
        pos = draw(st.integers(low, max(low, high - 1)))
        op = draw(st.sampled_from(["flip"] * 3 + ["byte"] * 3 + ["u32"] * 2 + ["u64", "insert", "delete", "cut"]))
        if op == "flip":
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            out[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del out[pos:pos + draw(st.integers(1, 16))]
        elif op == "cut":
            del out[pos:]
        else:
            fmt = "<I" if op == "u32" else "<Q"
            value = draw(st.sampled_from([0, 1, 2, 3, 255, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1])
                         | st.integers(0, 2**16))
            raw = struct.pack(fmt, value % (2 ** (8 * struct.calcsize(fmt))))
            out[pos:pos + len(raw)] = raw
    return bytes(out)


@st.composite
def header_mutations(draw: st.DrawFn) -> bytes:
    """A valid header with JSON fields replaced, removed or added, the length field and data area varied."""
    header = json.loads(json.dumps(VALID_HEADER))
    names = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(names + ["__metadata__", "new"]))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "whole", "drop", "extra"]))
        if target == "new":
            header[draw(st.text(max_size=6))] = draw(json_values | st.fixed_dictionaries(
                {"dtype": json_scalars, "shape": shapes, "data_offsets": offsets}))
        elif target == "__metadata__":
            header["__metadata__"] = draw(json_values)
        elif field == "drop":
            header.pop(target, None)
        elif field == "whole":
            header[target] = draw(json_values)
        else:
            if not isinstance(header.get(target), dict):  # dropped or replaced by an earlier step
                header[target] = {}
            key = draw(st.text(max_size=6)) if field == "extra" else field
            header[target][key] = draw({"dtype": json_scalars, "shape": shapes, "data_offsets": offsets}.get(
                field, json_values))
    body = VALID_BODY
    tail = draw(st.sampled_from(["same", "cut", "grow"]))
    if tail == "cut":
        body = body[:draw(st.integers(0, len(body)))]
    elif tail == "grow":
        body += draw(st.binary(max_size=64))
    data = bytearray(_safetensors_bytes(header, body))
    if draw(st.sampled_from([False] * 9 + [True])):  # the length field lies
        n = struct.unpack("<Q", data[:8])[0]
        data[:8] = struct.pack("<Q", draw(st.sampled_from([0, n - 1, n + 1, n + 8, len(data), 2**62, 2**64 - 1])
                                          | st.integers(0, len(data) + 16)) % 2**64)
    return bytes(data)


# -- tests ----------------------------------------------------------------------------------------

@FUZZ
@given(data=st.binary(max_size=600))
def test_safetensors_random_bytes(work: Path, data: bytes) -> None:
    _load_safetensors(work, data)


@FUZZ
@given(length=st.integers(0, 2**64 - 1) | st.sampled_from(_BOUNDARY_INTS).filter(lambda n: 0 <= n < 2**64),
       header=st.dictionaries(st.text(max_size=8), json_values, max_size=4) | json_values,
       body=st.binary(max_size=64), honest=st.booleans())
def test_safetensors_random_header(work: Path, length: int, header: Any, body: bytes, honest: bool) -> None:
    blob = json.dumps(header).encode()
    _load_safetensors(work, struct.pack("<Q", len(blob) if honest else length) + blob + body)


@FUZZ
@given(data=byte_mutations(VALID_ST, hot=len(VALID_ST) - len(VALID_BODY)))
def test_safetensors_mutated_bytes(work: Path, data: bytes) -> None:
    _load_safetensors(work, data)


@FUZZ
@given(data=header_mutations())
def test_safetensors_mutated_header(work: Path, data: bytes) -> None:
    _load_safetensors(work, data)


@FUZZ
@given(index=json_values | st.fixed_dictionaries({"weight_map": st.dictionaries(
    st.text(max_size=6), st.sampled_from(["model.safetensors", "../model.safetensors", "/etc/passwd", "", ".",
                                          "missing.safetensors", "model.safetensors\0"]) | json_values)}))
def test_safetensors_random_index(work: Path, index: Any) -> None:
    folder = _fresh(work, "index")
    (folder / "model.safetensors").write_bytes(VALID_ST)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        ckpt = Checkpoint(folder)
    except ModelError as e:
        _check_error(e, str(folder))
        return
    assert all(info.file == folder / "model.safetensors" for info in ckpt.tensors.values())


@pytest.mark.parametrize("header", [
    b"[" * 100_000 + b"]" * 100_000,  # RecursionError inside json
    b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 24]}}',  # int() digit limit
    b'{"w": {"dtype": "F32", "shape": [1180591620717411303424], "data_offsets": [0, 24]}}',  # > int64
    # BF16 is read through a memory map and a reshape, not the Rust reader, which would catch these itself
    b'{"w": {"dtype": "BF16", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}}',  # 0 in int64
    b'{"w": {"dtype": "BF16", "shape": [0, 1180591620717411303424], "data_offsets": [0, 0]}}',
    b'{"w": {"dtype": "F32", "shape": [' + b"1, " * 99 + b'6], "data_offsets": [0, 24]}}',  # 100 dimensions
    b'{"w": {"dtype": ["F32"], "shape": [6], "data_offsets": [0, 24]}}',  # unhashable dtype
    b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 24]}}',
    b'{"__metadata__": {"format": 5}, "w": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}',
    b'{"\\ud800": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}',  # a lone surrogate as a name
])
def test_safetensors_header_regressions(work: Path, header: bytes) -> None:
    # cases that once leaked another exception or passed a lying header, kept as plain tests
    folder = _fresh(work, "regression")
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(24))
    with pytest.raises(ModelError) as info:
        Checkpoint(folder).get("w")
    _check_error(info.value, str(path))


# --------------------------------------------------------------------------------------------------
# GGUF

ARCH = "llama"
HIDDEN, HEADS, KV_HEADS, FFN = 32, 2, 1, 32
TOKENS = ["<s>", "</s>", "a", "b", "c", "Ġ", "ab", "Ġa", "abc", "<|im_end|>"]
MERGES = ["a b", "Ġ a", "ab c"]


def _metadata() -> dict[str, tuple[T, Any]]:
    a = ARCH
    return {
        f"{a}.block_count": (T.UINT32, 1), f"{a}.context_length": (T.UINT32, 64),
        f"{a}.embedding_length": (T.UINT32, HIDDEN), f"{a}.feed_forward_length": (T.UINT32, FFN),
        f"{a}.attention.head_count": (T.UINT32, HEADS), f"{a}.attention.head_count_kv": (T.UINT32, KV_HEADS),
        f"{a}.attention.layer_norm_rms_epsilon": (T.FLOAT32, 1e-5), f"{a}.rope.freq_base": (T.FLOAT32, 10000.0),
        "tokenizer.ggml.model": (T.STRING, "gpt2"), "tokenizer.ggml.pre": (T.STRING, "smollm"),
        "tokenizer.ggml.tokens": (T.ARRAY, TOKENS), "tokenizer.ggml.merges": (T.ARRAY, MERGES),
        "tokenizer.ggml.token_type": (T.ARRAY, [3, 3, 1, 1, 1, 1, 1, 1, 1, 3]),
        "tokenizer.ggml.bos_token_id": (T.UINT32, 0), "tokenizer.ggml.eos_token_id": (T.UINT32, 9),
        "tokenizer.ggml.add_bos_token": (T.BOOL, True),
        "tokenizer.chat_template": (T.STRING, "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}"),
    }


def _gguf_tensors() -> dict[str, tuple[np.ndarray, Q | None]]:
    """llama.cpp names, numpy (HF) shapes; a few quantized so dequantization is exercised too."""
    rng = np.random.default_rng(0)
    d = HIDDEN // HEADS

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "token_embd.weight": (w(len(TOKENS), HIDDEN), None), "output_norm.weight": (w(HIDDEN), None),
        "blk.0.attn_norm.weight": (w(HIDDEN), None), "blk.0.ffn_norm.weight": (w(HIDDEN), None),
        "blk.0.attn_q.weight": (w(HEADS * d, HIDDEN), Q.Q8_0), "blk.0.attn_k.weight": (w(KV_HEADS * d, HIDDEN), Q.F16),
        "blk.0.attn_v.weight": (w(KV_HEADS * d, HIDDEN), Q.Q4_0), "blk.0.attn_output.weight": (w(HIDDEN, HEADS * d), None),
        "blk.0.ffn_gate.weight": (w(FFN, HIDDEN), Q.Q5_0),
        "blk.0.ffn_up.weight": (w(FFN, HIDDEN), None), "blk.0.ffn_down.weight": (w(HIDDEN, FFN), Q.Q8_0),
    }


def _write_gguf(path: Path, metadata: dict[str, tuple[T, Any]], tensors: dict[str, tuple[np.ndarray, Q | None]],
                arch: str = ARCH) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    for key, (vtype, value) in metadata.items():
        w.add_key_value(key, value, vtype)
    for name, (array, qtype) in tensors.items():
        if qtype is None:
            w.add_tensor(name, array)
        elif qtype == Q.F16:
            w.add_tensor(name, array.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def valid_gguf(work: Path) -> tuple[bytes, int]:
    """The seed file's bytes and where its tensor data starts."""
    path = work / "seed.gguf"
    _write_gguf(path, _metadata(), _gguf_tensors())
    return path.read_bytes(), gguf.GGUFReader(path).data_offset


def _load_gguf(path: Path, convert: bool = False) -> None:
    """The entry points on one file; whatever is accepted must be usable."""
    try:
        model = read_gguf(path)
        shapes = model.tensor_shapes()
        for name, array in model.tensors():
            assert array.dtype == np.float32 and array.shape == shapes[name], name
        tok = model.tokenizer()
        tok.decode(tok.encode("abc a").ids)
        if convert:
            out = path.parent / "converted"
            shutil.rmtree(out, ignore_errors=True)
            model.save_hf(out, progress=False)
    except ModelError as e:
        _check_error(e, path.name)


def test_valid_gguf_loads(work: Path, valid_gguf: tuple[bytes, int]) -> None:
    path = work / "valid.gguf"
    path.write_bytes(valid_gguf[0])
    model = read_gguf(path)
    assert model.config["num_hidden_layers"] == 1 and model.config["vocab_size"] == len(TOKENS)
    got = dict(model.tensors())
    for name, (array, qtype) in _gguf_tensors().items():
        hf = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight"}.get(name)
        if hf:  # plain, and Q8_0 within its rounding
            np.testing.assert_allclose(got[hf], array, atol=0.05 if qtype else 0)
    assert model.tokenizer().encode("abc").tokens == ["<s>", "abc"]


@FUZZ
@given(data=st.binary(max_size=400), version=st.sampled_from([1, 2, 3, 4, 2**32 - 1, 0x03000000]))
def test_gguf_random_bytes(work: Path, data: bytes, version: int) -> None:
    path = work / "random.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", version) + data)
    _load_gguf(path)


@FUZZ
@given(st.data())
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN/inf block scales dequantize to NaN, as they should
def test_gguf_mutated_bytes(work: Path, valid_gguf: tuple[bytes, int], data: st.DataObject) -> None:
    seed, data_offset = valid_gguf
    path = work / "mutated.gguf"
    path.write_bytes(data.draw(byte_mutations(seed, hot=data_offset)))
    _load_gguf(path)


def _typed_values(original: tuple[T, Any] | None) -> st.SearchStrategy[tuple[T, Any]]:
    """Any GGUF value; half the time one of the original's type, near the original value."""
    anything = _any_typed_value()
    if original is None:
        return anything
    vtype, value = original
    if vtype == T.ARRAY:
        near = st.lists(st.sampled_from(value), min_size=1, max_size=len(value) + 2) | st.just(value[:-1] or value)
    elif vtype == T.STRING:
        near = st.sampled_from(["gpt2", "llama", "smollm", "qwen2", "default", "llama-bpe", "", value + "x"])
    elif vtype == T.BOOL:
        near = st.booleans()
    elif vtype in (T.FLOAT32, T.FLOAT64):
        near = st.sampled_from([0.0, -1.0, 1e-30, 1e30, float("inf"), float("nan"), value * 2])
    else:
        near = st.sampled_from([0, 1, 2, 3, 4, 5, 8, 9, 10, 16, 31, 32, 33, 64, 2**31 - 1])
    return st.tuples(st.just(vtype), near) | anything


def _any_typed_value() -> st.SearchStrategy[tuple[T, Any]]:
    ranges = {T.UINT8: (0, 2**8 - 1), T.INT8: (-2**7, 2**7 - 1), T.UINT16: (0, 2**16 - 1),
              T.INT16: (-2**15, 2**15 - 1), T.UINT32: (0, 2**32 - 1), T.INT32: (-2**31, 2**31 - 1),
              T.UINT64: (0, 2**64 - 1), T.INT64: (-2**63, 2**63 - 1)}
    ints = st.sampled_from(sorted(ranges)).flatmap(lambda t: st.tuples(st.just(t), st.one_of(
        st.integers(*ranges[t]), st.sampled_from([0, 1, 2, 3, 4, 8, 9, 10, 16, 32, 64]),
        st.sampled_from(list(ranges[t])))))
    return st.one_of(
        ints,
        st.tuples(st.sampled_from([T.FLOAT32, T.FLOAT64]), st.floats(width=32) | st.sampled_from([0.0, -1.0, 1e-5])),
        st.tuples(st.just(T.BOOL), st.booleans()),
        st.tuples(st.just(T.STRING), st.text(max_size=12) | st.sampled_from(
            ["llama", "qwen2", "mamba", "gpt2", "smollm", "linear", "yarn", "none", "a b", "{{"])),
        st.tuples(st.just(T.ARRAY), st.lists(st.text(max_size=6), min_size=1, max_size=12)),
        st.tuples(st.just(T.ARRAY), st.lists(st.integers(-4, 12), min_size=1, max_size=12)),
        st.tuples(st.just(T.ARRAY), st.lists(st.floats(width=32), min_size=1, max_size=4)),
    )


_EXTRA_KEYS = [f"{ARCH}.attention.key_length", f"{ARCH}.rope.scaling.type", f"{ARCH}.rope.scaling.factor",
               f"{ARCH}.rope.scale_linear", f"{ARCH}.vocab_size", "tokenizer.ggml.padding_token_id",
               "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.huggingface.json",
               "tokenizer.ggml.add_eos_token", "general.sampling.temp"]


@st.composite
def gguf_variants(draw: st.DrawFn) -> tuple[str, dict[str, tuple[T, Any]], dict[str, tuple[np.ndarray, Q | None]]]:
    """A well-formed GGUF container whose content is wrong: odd metadata values, tensors gone or reshaped."""
    metadata = _metadata()
    keys = sorted(metadata) + _EXTRA_KEYS
    for key in draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
        if key in metadata and draw(st.sampled_from([False] * 4 + [True])):
            del metadata[key]
        else:
            metadata[key] = draw(_typed_values(metadata.get(key)))
    tensors = _gguf_tensors()
    for name in draw(st.lists(st.sampled_from(sorted(tensors)), max_size=1 if metadata != _metadata() else 2,
                              unique=True)):
        change = draw(st.sampled_from(["drop", "shape", "type", "rename"]))
        array, qtype = tensors.pop(name)
        if change == "shape":
            dims = draw(st.lists(st.sampled_from([0, 1, 2, 3, 32, 64]), min_size=1, max_size=3))
            tensors[name] = (np.zeros(dims, np.float32), None)
        elif change == "type":
            tensors[name] = (array, draw(st.sampled_from([None, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_1])))
        elif change == "rename":
            tensors[draw(st.sampled_from(["rope_freqs.weight", "blk.7.attn_q.weight", "blk.0.attn_q.bias",
                                          "output.weight", "mystery.weight", "blk.0.ffn_up.weight"]))] = (array, qtype)
    arch = draw(st.sampled_from([ARCH] * 8 + ["qwen2", "mamba"]))
    return arch, metadata, tensors


@FUZZ
@given(variant=gguf_variants())
def test_gguf_random_metadata_and_tensors(work: Path, variant: Any) -> None:
    arch, metadata, tensors = variant
    path = work / "variant.gguf"
    try:
        _write_gguf(path, metadata, tensors, arch)
    except Exception:  # noqa: BLE001 - a combination gguf-py itself refuses to write
        assume(False)
    _load_gguf(path, convert=True)


@pytest.mark.parametrize("mutate", [
    lambda m: m.__setitem__(f"{ARCH}.block_count", (T.UINT64, 2**40)),  # must not enumerate 2**40 layers
    lambda m: m.__setitem__(f"{ARCH}.attention.head_count", (T.UINT32, 0)),
    lambda m: m.__setitem__("tokenizer.ggml.tokens", (T.ARRAY, [1, 2, 3])),
    lambda m: m.__setitem__("tokenizer.ggml.merges", (T.ARRAY, [5, 6])),
    lambda m: m.__setitem__("tokenizer.ggml.tokens", (T.STRING, "abc")),
    lambda m: m.__setitem__(f"{ARCH}.attention.layer_norm_rms_epsilon", (T.FLOAT32, float("nan"))),
    lambda m: m.__setitem__(f"{ARCH}.context_length", (T.INT32, -5)),
])
def test_gguf_metadata_regressions(work: Path, mutate: Callable[[dict], None]) -> None:
    # cases the fuzzer found (or would take long to find) kept as plain tests
    metadata = _metadata()
    mutate(metadata)
    path = work / "regression.gguf"
    _write_gguf(path, metadata, _gguf_tensors())
    with pytest.raises(ModelError) as info:
        model = read_gguf(path)
        model.tokenizer()
    _check_error(info.value, path.name)


def test_gguf_non_utf8_metadata_string(work: Path, valid_gguf: tuple[bytes, int]) -> None:
    seed, _ = valid_gguf
    data = bytearray(seed)
    at = data.index(b"smollm")  # the value of tokenizer.ggml.pre
    data[at:at + 2] = b"\xff\xfe"
    path = work / "latin1.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="tokenizer.ggml.pre.*not valid UTF-8"):
        read_gguf(path).tokenizer()
