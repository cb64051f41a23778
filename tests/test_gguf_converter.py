"""GGUF files as llama.cpp's converter writes them, for every architecture, read by us and by transformers.

The files come from `gguf_fixtures` (tiny random HF models run through the pinned
`convert_hf_to_gguf.py`, cached). Each is converted to an HF folder by `loaders.gguf` and run by our
runtime; the reference is transformers' own GGUF reader on the same file, building its model from
nothing of ours. F32 files are also held to the original HF model the converter started from.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

import gguf
import gguf_fixtures as fx
from conftest import greedy, hf_greedy, hf_logits, load_net, prefill_logits
from loaders.gguf import _CheckedReader, convert_gguf_to_hf, read_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
SEQ = 48


@pytest.fixture(scope="module", autouse=True)
def fixtures() -> None:
    fx.build_all()  # made once per machine and cached; a fresh one converts them all in one go


def transformers_gguf_model(path: Path, name: str, monkeypatch: pytest.MonkeyPatch, original_config: bool = False):
    """The model transformers' GGUF loader builds from `path`: its config, its tensors and renames.

    The loader maps GGUF tensor names onto the names of a model it is handed (`model_to_load`);
    the tiny original's skeleton serves for that, so the file is parsed once. The model returned is
    built from the config transformers read from the file, or with `original_config` from the
    original's config.json (for what transformers does not read from a GGUF: TRANSFORMERS_MISSES).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # from_pretrained(gguf_file=...) wants accelerate (absent here); this is the loader it calls.
    # Its name-map builder recomputes one pure table per tensor, so memoize it; and parse with the
    # reader subclass whose only change is reading through a plain ndarray view of the same memory
    # map instead of np.memmap slices (seconds on a 49k vocabulary).
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
    monkeypatch.setattr(gguf, "GGUFReader", _CheckedReader)
    with no_init_weights():  # every weight is overwritten below
        original = AutoConfig.from_pretrained(fx.tiny_hf(name)).to_dict()
        if original["model_type"] == "mistral":  # written as a llama file, so named as a Llama
            original = {k: v for k, v in original.items() if k not in ("model_type", "architectures")}
            names = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **original))
        else:
            names = getattr(transformers, fx.TINY[name].model_class)(AutoConfig.from_pretrained(fx.tiny_hf(name)))
        parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=names)
        config = dict(parsed["config"])
        if config["model_type"] == "gpt2" and "n_ctx" in config:
            # transformers maps gpt2.context_length to n_ctx only, while its GPT2 sizes the position
            # table by n_positions (default 1024): its own GGUF files would not load without this
            config["n_positions"] = config["n_ctx"]
        if original_config:
            model = getattr(transformers, fx.TINY[name].model_class)(AutoConfig.from_pretrained(fx.tiny_hf(name)))
        else:
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config),
                                                     dtype=torch.float32)
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if missing:
        model.tie_weights()
    return model.eval()


def _ids(vocab: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, SEQ).tolist()


def _ours(path: Path, tmp_path: Path):
    return load_net(convert_gguf_to_hf(path, tmp_path / "hf", progress=False))


# What transformers' GGUF loader leaves out of the config it reads (5.24): the RoPE scaling of Gemma 3
# (gemma3.rope.scaling.*, linear x8 on every Gemma 3 from 4B up) and Phi-3's LongRoPE factors
# (tensors rope_factors_long/short, the 128k models). Its model then runs plain RoPE and differs
# from the original by 0.10 and 0.0075 in logits here; the reference for these is its tensors in
# the original's config, and the test checks that its own reading still differs.
TRANSFORMERS_MISSES = {"gemma3-scaled", "phi3-longrope"}


@pytest.mark.parametrize("qtype", fx.ARCH_TYPES)
@pytest.mark.parametrize("name", sorted(fx.TINY))
def test_every_architecture_runs_as_transformers_reads_it(name: str, qtype: str, tmp_path: Path, monkeypatch) -> None:
    path = fx.gguf_of(name, qtype)
    net, spec = _ours(path, tmp_path)
    ref = transformers_gguf_model(path, name, monkeypatch, original_config=name in TRANSFORMERS_MISSES)
    ids = _ids(ref.config.vocab_size)
    ours = prefill_logits(net, spec, ids)
    if name in TRANSFORMERS_MISSES:
        as_read = hf_logits(transformers_gguf_model(path, name, monkeypatch), ids)
        assert np.abs(ours - as_read).max() > 1e-3, "transformers now reads this config: drop it from TRANSFORMERS_MISSES"
    assert ours.dtype == np.float32
    assert np.abs(ours - hf_logits(ref, ids)).max() <= TOLERANCE
    assert greedy(net, spec, ids[:8], 32) == hf_greedy(ref, ids[:8], 32)
    if qtype == "F32":  # nothing was rounded: the converter's input is a reference too
        original = getattr(transformers, fx.TINY[name].model_class).from_pretrained(
            fx.tiny_hf(name), dtype=torch.float32).eval()
        assert np.abs(ours - hf_logits(original, ids)).max() <= TOLERANCE


@pytest.mark.parametrize("qtype", fx.dequantizable_types())
def test_every_tensor_type_gguf_py_reads(qtype: str, tmp_path: Path, monkeypatch) -> None:
    # Gemma 3: every matrix's inner size is a multiple of 256, the K and IQ types' block
    path = fx.gguf_of("gemma3", qtype)
    model = read_gguf(path)
    reader = gguf.GGUFReader(path)
    raw = {t.name: t for t in reader.tensors}
    plans = {p.hf_name: p for p in model._plans}
    for name, weight in model.tensors():  # our HF tensors are the gguf-py dequantization, moved back
        t = raw[plans[name].tensor.name]
        if len(t.shape) == 2:  # every matrix in the type asked for; the converter keeps TQ's embedding F16
            assert t.tensor_type.name in (qtype, "F16" if qtype.startswith("TQ") else qtype), (name, t.tensor_type)
        expected = gguf.dequantize(t.data, t.tensor_type).astype(np.float32)
        if name.endswith("norm.weight"):
            expected = expected - 1.0  # Gemma's norms are written as 1 + w
        assert weight.dtype == np.float32 and np.array_equal(weight.reshape(expected.shape), expected), name
    net, spec = _ours(path, tmp_path)
    ref = transformers_gguf_model(path, "gemma3", monkeypatch)
    ids = _ids(ref.config.vocab_size)
    expected = hf_logits(ref, ids)
    assert np.isfinite(expected).all()
    assert np.abs(prefill_logits(net, spec, ids) - expected).max() <= TOLERANCE * max(1.0, np.abs(expected).max())


# --------------------------------------------------------------------------------------------------
# Tokenizers

TRICKY = [
    "Hello, world!",
    "12345 and 3.14159, 2024-12-03",
    "def add(a, b):\n    return a + b  # sum\n\nprint(add(1, 2))",
    "  two leading spaces, three trailing   ",
    "line1\n\nline2\r\n\ttabbed\t\tend\n",
    "你好，世界！今天天气很好。日本語のテキスト",
    "emoji 😀👍🏽 and ❤️ and 🇫🇷",
    "Café naïve résumé Ångström Straße ŽŸ",
    "I'm sure they'll say we've DON'T",
    "",
    " ",
    "\n",
]
SPECIAL_TEXT = ["<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "a<end_of_turn>b", "<bos>x<eos>"]


@pytest.mark.parametrize("name", sorted(n for n, t in fx.TINY.items() if t.tokenizer.startswith("spm")))
def test_sentencepiece_vocabulary_tokenizes_as_sentencepiece(name: str) -> None:
    """The SentencePiece model the converter read is the reference llama.cpp's tokenizer follows."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(fx.tiny_hf(name) / "tokenizer.model"))
    ours = read_gguf(fx.gguf_of(name, "F32")).tokenizer()
    # Gemma's turn markers are matched whole by both; after one, llama.cpp (and so we) starts the
    # next piece of text as text's start, which differs from sentencepiece only with a leading space
    texts = TRICKY + (SPECIAL_TEXT[:2] if fx.TINY[name].tokenizer == "spm" else [])
    for text in texts:
        assert ours.encode(text, add_special_tokens=False).ids == sp.encode(text), text
        assert ours.decode(sp.encode(text), skip_special_tokens=False) == text, text
    assert ours.encode("hi").ids[0] == sp.bos_id()  # add_bos_token from the file


# transformers' differences, each shown against sentencepiece: for a Llama-2-style vocabulary (the
# leading space added) it builds the Metaspace pre-tokenizer, which folds a text's own leading
# spaces into the added one ("  two" -> "▁▁two"), while sentencepiece and llama.cpp (which adds a
# space, then maps every space to ▁) keep them all ("▁▁▁two"); llama.cpp's own llama-tokenize agrees
# with us on every string here (benchmarks/llama_cpp_tokenizer_check.py).
TRANSFORMERS_DIFFERS = {"qwen2": {"  two leading spaces, three trailing   ", " "}}


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "qwen2", "llama", "phi3"])
def test_tokenizer_matches_transformers_gguf_tokenizer(name: str) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    path = fx.gguf_of(name, "F32")
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = read_gguf(path).tokenizer()
    differs = TRANSFORMERS_DIFFERS.get(name, set())
    for text in TRICKY + SPECIAL_TEXT:
        mine, theirs = ours.encode(text, add_special_tokens=False).ids, ref(text, add_special_tokens=False)["input_ids"]
        if text not in differs:
            assert mine == theirs, text
            continue
        sp = spm.SentencePieceProcessor(model_file=str(fx.tiny_hf(name) / "tokenizer.model"))
        assert mine != theirs, f"transformers now agrees on {text!r}: drop it from TRANSFORMERS_DIFFERS"
        assert mine == sp.encode(text), text
    if "tokenizer.ggml.bos_token_id" in gguf.GGUFReader(path).fields:
        assert ours.encode("hi").ids == ref("hi")["input_ids"]
    else:  # the file names no BOS: transformers adds none, llama.cpp its SentencePiece default, id 1
        assert ours.encode("hi").ids[0] == 1 and ref("hi")["input_ids"][0] != 1


def test_chat_template_comes_from_the_file(tmp_path: Path) -> None:
    import json

    path = fx.gguf_of("gemma2", "F32")
    folder = convert_gguf_to_hf(path, tmp_path / "hf", progress=False)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["chat_template"] == fx._GEMMA_TEMPLATE
    assert config["bos_token"] == "<bos>" and config["eos_token"] == "<eos>"


# --------------------------------------------------------------------------------------------------
# The command line on a GGUF


def _cli(*args: str, cache: Path, stdin: str = "") -> "subprocess.CompletedProcess[str]":
    import os
    import subprocess
    import sys

    from conftest import REPO

    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], input=stdin, capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, "NPRT_CACHE": str(cache)})


def test_info_names_the_quantization_beside_the_float32_bytes(tmp_path: Path) -> None:
    path = fx.gguf_of("gemma2", "Q8_0")
    result = _cli("info", "--model", str(path), cache=tmp_path)
    assert result.returncode == 0, result.stderr
    reader = gguf.GGUFReader(path)
    counts = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    line = next(line for line in result.stdout.splitlines() if line.startswith("converted from:"))
    assert f"{path.name}, Q8_0, {path.stat().st_size:,} bytes" in line
    assert f"{counts['Q8_0']} Q8_0" in line and f"{counts['F32']} F32" in line
    assert "weights:" in result.stdout and "(float32)" in result.stdout


def test_a_model_without_a_template_generates_raw_and_says_so_in_chat(tmp_path: Path) -> None:
    path = fx.gguf_of("qwen2", "Q8_0")  # its tokenizer_config had no template, so the file has none
    assert "tokenizer.chat_template" not in gguf.GGUFReader(path).fields
    chat = _cli("chat", "--model", str(path), cache=tmp_path, stdin="hi\n")
    assert chat.returncode == 2 and "Traceback" not in chat.stderr
    assert [line for line in chat.stderr.splitlines() if line.startswith("error:")] == [chat.stderr.strip().splitlines()[-1]]
    assert "no chat template" in chat.stderr and "generate --raw" in chat.stderr
    raw = _cli("generate", "--raw", "--model", str(path), "--max-tokens", "4", "--prompt", "Hello", cache=tmp_path)
    assert raw.returncode == 0, raw.stderr
