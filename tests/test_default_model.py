"""The embedded default model (SmolLM2-135M-Instruct) against HF transformers, and the API."""

from __future__ import annotations

import numpy as np
import pytest

import runtime
from conftest import hf_greedy, hf_logits, needs_default_model

pytestmark = needs_default_model

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
]


@pytest.fixture(scope="module")
def model():
    return runtime.load(kv_dtype="float32", progress=False)


@pytest.fixture(scope="module")
def reference(model):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(model.folder, dtype=torch.float32).eval()


def test_default_model_is_smollm2(model):
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == ("llama", 30, 9, 3)
    assert model.chat_template and "<|im_start|>" in model.chat_template
    assert model.tokenizer.token_id("<|im_end|>") in model.stop_ids


@pytest.mark.parametrize("text", PROMPTS)
def test_logits_match_hf(model, reference, text):
    ids = model.encode_prompt(text)
    ours = model.logits(ids)
    assert ours.dtype == np.float32 and ours.shape == (len(ids), model.config.vocab_size)
    assert np.abs(ours - hf_logits(reference, ids)).max() <= 1e-3


def test_64_greedy_tokens_match_hf(model, reference):
    ids = model.encode_prompt(PROMPTS[0])
    ours = list(model.tokens(ids, max_tokens=64, ignore_eos=True))
    assert ours == hf_greedy(reference, ids, 64)


def test_chat_template_applied_and_no_double_bos(model):
    ids = model.encode_prompt("hi")
    text = model.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    raw = model.encode_prompt("hi", raw=True)
    assert raw == model.tokenizer.encode("hi")
    assert model.encode_prompt([1, 2, 3]) == [1, 2, 3]


def test_generate_answers_and_is_deterministic(model):
    answer = model.generate(PROMPTS[0], max_tokens=24)
    assert "Paris" in answer
    assert model.generate(PROMPTS[0], max_tokens=24) == answer


def test_stream_pieces_join_to_generate(model):
    pieces = list(model.stream(PROMPTS[1], max_tokens=40))
    assert len(pieces) > 5
    assert "".join(pieces) == model.generate(PROMPTS[1], max_tokens=40)


def test_seeded_sampling_is_reproducible(model):
    kwargs = dict(max_tokens=24, temperature=0.9, top_k=40, top_p=0.95, seed=7)
    first = model.generate(PROMPTS[1], **kwargs)
    assert model.generate(PROMPTS[1], **kwargs) == first
    others = {model.generate(PROMPTS[1], **{**kwargs, "seed": s}) for s in range(3)}
    assert len(others) > 1  # the seed matters


def test_ignore_eos_runs_to_max_tokens(model):
    list(model.tokens(PROMPTS[2], max_tokens=200))
    assert model.stats.stop_reason == "stop"  # a short answer ends on <|im_end|>
    n = model.stats.generated_tokens
    list(model.tokens(PROMPTS[2], max_tokens=n + 20, ignore_eos=True))
    assert model.stats.generated_tokens == n + 20 and model.stats.stop_reason == "length"
