"""Llama-family architectures against HF transformers: Qwen2, Qwen3, Mistral.

Each is a tiny random model built with transformers' own config class (GQA, and
a sliding window shorter than the input where the family has one), saved as
safetensors and held to `assert_matches_hf`.
"""

from __future__ import annotations

import pytest

from conftest import assert_matches_hf, save_tiny

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
            tie_word_embeddings=False)
CASES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    # layer 0 global, layers 1-2 a 24-token window: two rings of different sizes
    "qwen2-sliding": ("Qwen2Config", "Qwen2ForCausalLM",
                      dict(use_sliding_window=True, sliding_window=24, max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=24, head_dim=16)),
}


def build(case: str, tmp_path):
    config_name, model_name, extra = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**BASE, **extra})
    model_class = getattr(transformers, model_name)
    folder = save_tiny(model_class(config).eval(), tmp_path / case)
    return folder, model_class.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_hf(case, tmp_path):
    folder, reference = build(case, tmp_path)
    assert_matches_hf(folder, reference, BASE["vocab_size"])


def test_sliding_layers_get_their_own_ring(tmp_path):
    from conftest import load_net
    from runtime.kv_cache import HybridSpec

    folder, _ = build("qwen2-sliding", tmp_path)
    _, spec = load_net(folder)
    assert isinstance(spec, HybridSpec)
    assert [s.capacity for s in spec.specs] == [512, 24] and spec.layer_ring == (0, 1, 1)
    assert [s.n_sink for s in spec.specs] == [4, 0]
