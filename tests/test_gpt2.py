"""GPT-2 against HF transformers, its position limit, its checkpoint variants and its CLI.

Tiny random GPT2LMHeadModels built with transformers' own config class are saved as
safetensors and held to `assert_matches_hf`. GPT-2's learned positions stop at
n_positions, so going past it must end in one line naming both numbers, also from
`cli.py generate`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, ARCH_SEQ, assert_matches_hf, hf_logits, load_net, new_cache, prefill_logits, save_tiny
from loaders.errors import ModelError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# n_positions 128: the 96-token parity input fits; bos/eos inside the vocabulary (the
# CLI tests' byte-level tokenizer has <s> = 256 and <|im_end|> = 257)
BASE = dict(vocab_size=320, n_embd=64, n_head=4, n_layer=3, n_positions=128, bos_token_id=256,
            eos_token_id=257)
CASES = {
    "gpt2": {},
    "untied-inner-pytorch-tanh": dict(tie_word_embeddings=False, n_inner=96,
                                      activation_function="gelu_pytorch_tanh"),
    # a score scale of 1/sqrt(d)/(layer+1); the upcast changes nothing in float32
    "scaled-by-layer": dict(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
    "unscaled": dict(scale_attn_weights=False),
}


def build(case: str, tmp_path: Path) -> tuple[Path, object]:
    torch.manual_seed(0)
    config = transformers.GPT2Config(**{**BASE, **CASES[case]})
    folder = save_tiny(transformers.GPT2LMHeadModel(config).eval(), tmp_path / case)
    return folder, transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """The default tiny GPT-2, with a byte-level tokenizer so that the CLI can run it."""
    from test_errors import _tokenizer_json

    folder, reference = build("gpt2", tmp_path_factory.mktemp("gpt2"))
    _tokenizer_json(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<|im_end|>"}))
    return folder, reference


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_hf(case: str, tmp_path: Path) -> None:
    folder, reference = build(case, tmp_path)
    assert_matches_hf(folder, reference, BASE["vocab_size"])


def test_config_names_the_runtime_reads(tiny) -> None:
    net, spec = load_net(tiny[0])
    c = net.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        (64, 3, 4, 4, 16)
    assert c.intermediate_size == 256  # n_inner null: 4 * n_embd
    assert c.max_position_embeddings == 128 and c.sliding_window is None and c.layer_windows() == [None] * 3
    assert c.eos_ids == [257] and c.torch_dtype == "float32"  # transformers 5 writes "dtype"
    assert spec.capacity == 128


GOOD = dict(model_type="gpt2", vocab_size=320, n_embd=64, n_head=4, n_layer=3, n_positions=128)


@pytest.mark.parametrize("edit, fragments", [
    (dict(activation_function="relu"), ["activation_function 'relu'", "gelu_new", "gelu_pytorch_tanh"]),
    (dict(n_head=5), ["n_embd=64 is not divisible by n_head=5"]),
    (dict(n_embd=0), ["n_embd must be a positive integer, got 0"]),
    (dict(n_inner=-1), ["n_inner must be a positive integer"]),
    (dict(n_positions="1024"), ["n_positions must be a positive integer"]),
    (dict(n_layer=10**6), ["n_layer", "implausibly large"]),
    (dict(layer_norm_epsilon=-1.0), ["layer_norm_epsilon must be a non-negative number"]),
    (dict(scale_attn_by_inverse_layer_idx="yes"), ["scale_attn_by_inverse_layer_idx must be true or false"]),
    (dict(eos_token_id="</s>"), ["eos_token_id must be a token id"]),
    (dict(n_embd=None), ["missing required key(s): n_embd"]),
])
def test_config_errors(edit: dict, fragments: list[str]) -> None:
    from models.gpt2 import GPT2Config

    with pytest.raises(ModelError) as info:
        GPT2Config.from_dict({**GOOD, **edit}, "cfg.json")
    message = str(info.value)
    assert "\n" not in message and message.startswith("cfg.json: ")
    for fragment in fragments:
        assert fragment in message


def test_position_limit(tiny) -> None:
    net, spec = load_net(tiny[0])
    cache = new_cache(net, spec)
    net.forward(np.arange(120), cache)
    with pytest.raises(ModelError, match=r"^gpt2: 129 tokens do not fit: .*n_positions=128") as info:
        net.forward(np.arange(9), cache)
    assert "\n" not in str(info.value)
    assert cache.offset == 120  # refused before anything was stored
    net.forward(np.arange(8), cache)  # positions 120..127: the last row of wpe
    assert cache.offset == 128 and not cache.wrapped
    with pytest.raises(ModelError, match="129 tokens"):
        net.forward(np.array([1]), cache)


def test_context_is_capped_and_the_ring_never_wraps(tiny) -> None:
    net, spec = load_net(tiny[0], max_context=1000)
    assert spec.capacity == 128  # no slot for a position the model lacks
    net, spec = load_net(tiny[0], max_context=64)
    cache = new_cache(net, spec)
    net.forward(np.arange(60), cache)  # a call takes at most capacity - sinks tokens
    net.forward(np.arange(4), cache)
    with pytest.raises(ModelError, match=r"65 tokens do not fit in the context of 64 tokens.*n_positions=128"):
        net.forward(np.array([1]), cache)
    assert not cache.wrapped


def test_checkpoint_without_prefix_and_with_mask_buffers(tiny, tmp_path: Path) -> None:
    # the hub's gpt2 is a bare GPT2Model: no "transformer.", plus attn.bias / attn.masked_bias
    from safetensors.numpy import save_file

    folder, reference = tiny
    state = {k.removeprefix("transformer."): v.numpy() for k, v in reference.state_dict().items()
             if k != "lm_head.weight"}
    n = BASE["n_positions"]
    for layer in range(BASE["n_layer"]):
        state[f"h.{layer}.attn.bias"] = np.tril(np.ones((n, n), dtype=np.uint8))[None, None]
        state[f"h.{layer}.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(state, str(bare / "model.safetensors"))
    (bare / "config.json").write_text((folder / "config.json").read_text())
    ids = list(range(0, 300, 7))
    net, spec = load_net(bare)
    assert np.abs(prefill_logits(net, spec, ids) - hf_logits(reference, ids)).max() <= 1e-4


def test_missing_tensor_is_named(tiny, tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    folder, reference = tiny
    state = {k: v.numpy() for k, v in reference.state_dict().items()
             if k not in ("lm_head.weight", "transformer.h.1.mlp.c_fc.weight")}
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file(state, str(broken / "model.safetensors"))
    (broken / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ModelError, match="'transformer.h.1.mlp.c_fc.weight' is missing"):
        load_net(broken)


# -- through the command line -------------------------------------------------------
def error_after_load(result) -> str:
    """Exit status 2 and a last stderr line that is the one error: no traceback."""
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1, err
    return lines[-1]


def test_cli_prompt_longer_than_n_positions(tiny) -> None:
    from test_cli import run

    result = run("generate", "--model", str(tiny[0]), "--raw", "--prompt", "a" * 200)
    line = error_after_load(result)
    assert "the prompt is 200 tokens, longer than the context of 128" in line
    assert result.stdout.decode() == ""


def test_cli_generation_stops_at_n_positions(tiny) -> None:
    from test_cli import run

    # 100 prompt tokens + 40 generated: the 29th generated token would need position 128
    result = run("generate", "--model", str(tiny[0]), "--raw", "--ignore-eos", "--max-tokens", "40",
                 "--ctx", "4096", "--prompt", "a" * 100)
    line = error_after_load(result)
    assert "129 tokens do not fit" in line and "n_positions=128" in line
    assert "context 128" in result.stderr.decode()  # --ctx capped at n_positions
    assert result.stdout.decode()  # what was generated before the limit was printed


def test_cli_generate_within_the_limit(tiny) -> None:
    from test_cli import run

    result = run("generate", "--model", str(tiny[0]), "--raw", "--ignore-eos", "--max-tokens", "29",
                 "--prompt", "a" * 100)
    assert result.returncode == 0, result.stderr.decode()
    assert "prefill: 100 tokens" in result.stderr.decode() and "decode: 29 tokens" in result.stderr.decode()


def test_cli_info(tiny) -> None:
    from test_cli import run

    folder, reference = tiny
    result = run("info", "--model", str(folder), "--kv-dtype", "float32")
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert "architecture:   gpt2 (3 layers, hidden 64, 4 heads, 4 KV heads, head_dim 16)" in out
    assert f"parameters:     {reference.num_parameters():,}" in out  # lm_head tied: counted once
    assert "context:        128 tokens" in out
    assert f"{3 * 2 * 64 * 4:,} bytes per token" in out


# -- one code for CPU and GPU (the checks tests/test_backend.py makes for Llama) ---------
def test_decode_on_a_stand_in_device_reads_only_token_ids(tiny) -> None:
    from loaders.safetensors import Checkpoint
    from models.gpt2 import GPT2, GPT2Config
    from runtime.backend import Backend, get_backend
    from runtime.engine import decode_tokens
    from runtime.generate import GenerationStats
    from runtime.kv_cache import CacheSpec, KVCache
    from runtime.sampling import Sampler, SamplingParams
    from test_backend import FakeDevice

    config = GPT2Config.from_dict(json.loads((tiny[0] / "config.json").read_text()))

    def tokens(backend: Backend) -> list[int]:
        net = GPT2.load(config, Checkpoint(tiny[0]), backend)
        cache = KVCache(backend, CacheSpec(3, 4, 16, 64, "float16", 4))
        return list(decode_tokens(net, cache, list(range(30)), Sampler(backend.xp, SamplingParams()),
                                  max_tokens=10, stop_ids=set(), stats=GenerationStats(), prefill_chunk=8))

    xp = FakeDevice()
    device = Backend("cuda", xp, "float16")
    assert tokens(device) == tokens(get_backend("cpu", "float16"))
    assert not xp.refused and not xp.mask_syncs
    assert xp.host_reads == device.host_transfers == 10  # one token id per step
