"""Llama parity with HF transformers on tiny random models, every head layout and dtype."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import decode_logits, greedy, hf_greedy, hf_logits, load_net, prefill_logits, save_tiny

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ = 64
BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
            max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0)
CASES = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "llama3-rope": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "linear-rope": dict(num_attention_heads=4, num_key_value_heads=2,
                        rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "bias": dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    "head-dim": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),
}
DTYPES = {"float32": None, "bfloat16": "bfloat16", "float16": "float16"}


def build(case: str, tmp_path, dtype: str = "float32", shard: str | None = None):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**BASE, "tie_word_embeddings": False, **CASES[case]})
    model = transformers.LlamaForCausalLM(config).eval()
    folder = save_tiny(model, tmp_path / case, getattr(torch, dtype) if DTYPES[dtype] else None, shard)
    # the reference runs in float32 on exactly the stored (possibly rounded) weights
    reference = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, reference


def prompt(seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, BASE["vocab_size"], SEQ).tolist()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(case, tmp_path):
    folder, ref = build(case, tmp_path)
    net, spec = load_net(folder)
    ids = prompt()
    expected = hf_logits(ref, ids)
    ours = prefill_logits(net, spec, ids)
    assert ours.dtype == np.float32
    assert np.abs(ours - expected).max() <= 1e-4
    stepped = decode_logits(net, spec, ids)
    assert stepped.dtype == np.float32
    assert np.abs(stepped - expected).max() <= 1e-4


@pytest.mark.parametrize("case", ["gqa", "tied", "llama3-rope"])
def test_greedy_continuation_matches_hf(case, tmp_path):
    folder, ref = build(case, tmp_path)
    net, spec = load_net(folder)
    ids = prompt(2)[:16]
    assert greedy(net, spec, ids, 32) == hf_greedy(ref, ids, 32)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints(dtype, tmp_path):
    folder, ref = build("gqa", tmp_path, dtype)
    net, spec = load_net(folder)
    assert net.layers[0].qkv_proj.dtype == np.float32  # computed in float32 on the CPU
    ids = prompt()
    assert np.abs(prefill_logits(net, spec, ids) - hf_logits(ref, ids)).max() <= 1e-4
    assert greedy(net, spec, ids[:16], 32) == hf_greedy(ref, ids[:16], 32)


def test_sharded_checkpoint(tmp_path):
    folder, ref = build("gqa", tmp_path, shard="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    net, spec = load_net(folder)
    ids = prompt()
    assert np.abs(prefill_logits(net, spec, ids) - hf_logits(ref, ids)).max() <= 1e-4


def test_chunked_prefill_equals_one_pass(tmp_path):
    folder, ref = build("gqa", tmp_path)
    net, spec = load_net(folder)
    ids = prompt()
    whole = prefill_logits(net, spec, ids)
    for chunk in (1, 7, 16, 63):
        assert np.abs(prefill_logits(net, spec, ids, chunk=chunk) - whole).max() <= 1e-5


def test_activations_stay_float32(tmp_path):
    """A float64 scalar anywhere would promote activations and slow every matmul."""
    folder, _ = build("gqa", tmp_path)
    net, spec = load_net(folder)
    seen = []
    original = net.block

    def spy(h, *args):
        seen.append(h.dtype)
        out = original(h, *args)
        seen.append(out.dtype)
        return out

    net.block = spy
    prefill_logits(net, spec, prompt()[:8])
    assert seen and all(d == np.float32 for d in seen)



@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_of_one_row_matches_the_formula(offset):
    """A decode step's one row (a BLAS dot on the CPU) and a chunk's rows (array passes)
    both give x / rms(x) * (weight + offset), in float32."""
    from models.layers import rms_norm

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 576)).astype(np.float32) * 4
    weight = rng.standard_normal(576).astype(np.float32)
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-5) * (weight + offset)
    one_by_one = np.concatenate([rms_norm(x[i:i + 1], weight, 1e-5, offset) for i in range(3)])
    for got in (one_by_one, rms_norm(x, weight, 1e-5, offset)):
        assert got.dtype == np.float32
        assert np.abs(got - expected).max() <= 1e-6 * np.abs(expected).max()
