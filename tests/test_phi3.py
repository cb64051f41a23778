"""Phi-3 against HF transformers: fused qkv/gate_up, partial rotary, LongRoPE, sliding window.

Tiny random models built with transformers' Phi3Config, saved as safetensors and
held to `assert_matches_hf`. LongRoPE models whose positions cross
original_max_position_embeddings are held to what HF gives for the same calls
(see test_longrope_switch_matches_hf).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import (ARCH_SEQ, KV_TOLERANCE, assert_matches_hf, decode_logits, greedy, hf_greedy, hf_logits,
                      load_net, new_cache, prefill_logits, save_tiny)
from loaders.errors import ModelError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
            tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def longrope(n: int, original: int) -> dict:
    """n factors per set; long ones grow towards the low frequencies, as in Phi-3's."""
    return dict(original_max_position_embeddings=original,
                rope_scaling=dict(type="longrope", short_factor=[1.0 + 0.05 * i for i in range(n)],
                                  long_factor=[1.0 + 1.5 * i * i for i in range(n)]))


SWITCH = 32  # original_max_position_embeddings of the cases that cross it: inside the input and the greedy run
CASES = {
    "plain": {},
    "partial-rotary": dict(partial_rotary_factor=0.5),
    # every layer a 24-token window: the whole cache is one 24-slot ring
    "sliding": dict(sliding_window=24),
    # the short factors and the attention factor (sqrt(1 + ln 4 / ln 128)) only: no position reaches 128
    "longrope-short": longrope(8, 128),
}
SWITCH_CASES = {
    "longrope": longrope(8, SWITCH),
    # Phi-4-mini's layout: a quarter of each head does not rotate, tied embeddings
    "phi4-mini": dict(partial_rotary_factor=0.75, tie_word_embeddings=True, **longrope(6, SWITCH)),
    # the replay at the switch goes through a ring smaller than the sequence
    "longrope-sliding": dict(sliding_window=24, **longrope(8, SWITCH)),
}


def build(case: str, tmp_path):
    extra = {**CASES, **SWITCH_CASES}[case]
    torch.manual_seed(0)
    config = transformers.Phi3Config(**{**BASE, **extra})
    folder = save_tiny(transformers.Phi3ForCausalLM(config).eval(), tmp_path / case)
    return folder, transformers.Phi3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def prompt(seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, BASE["vocab_size"], ARCH_SEQ).tolist()


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_hf(case, tmp_path):
    folder, reference = build(case, tmp_path)
    assert_matches_hf(folder, reference, BASE["vocab_size"])


def test_sliding_window_is_one_ring(tmp_path):
    folder, _ = build("sliding", tmp_path)
    _, spec = load_net(folder)
    assert (spec.capacity, spec.n_sink, spec.num_layers) == (24, 0, 3)


def hf_calls(reference, ids: list[int], chunk: int) -> np.ndarray:
    """What HF gives each call's tokens when every call sees one forward of the whole sequence so far."""
    return np.concatenate([hf_logits(reference, ids[:start + chunk])[start:] for start in range(0, len(ids), chunk)])


@pytest.mark.parametrize("case", sorted(SWITCH_CASES))
def test_longrope_switch_matches_hf(case, tmp_path):
    # HF's rotary picks one set of factors per forward call: the long one once the
    # call's largest position reaches original_max_position_embeddings. So HF's
    # one-shot logits of a 96-token input are all long-factor logits, while a
    # causal run (decode, or a chunked prefill) has produced the first 32 positions'
    # logits before any position reached the switch. HF's generate recomputes the
    # whole sequence with the long factors when it first passes the switch (Phi3's
    # prepare_inputs_for_generation), and so do we; each call's logits are then
    # those of one HF forward of the sequence so far, which is the reference here.
    folder, reference = build(case, tmp_path)
    ids = prompt()
    full = hf_logits(reference, ids)
    before_switch = hf_logits(reference, ids[:SWITCH])
    # the two regimes differ, so every comparison below exercises the switch
    assert np.abs(full[:SWITCH] - before_switch).max() > 1e-3  # ten times the tolerance
    net, spec = load_net(folder)
    for chunk in (512, 7, 40):  # 512: one call (HF's prefill, `full`) unless a sliding ring caps the chunk
        ours = prefill_logits(net, spec, ids, chunk=chunk)
        assert ours.dtype == np.float32
        expected = hf_calls(reference, ids, min(chunk, new_cache(net, spec).max_chunk))
        assert np.abs(ours - expected).max() <= 1e-4, f"chunk {chunk}"
    causal = np.concatenate([before_switch, full[SWITCH:]])  # one token per call
    assert np.abs(decode_logits(net, spec, ids) - causal).max() <= 1e-4, "decode"
    for kv_dtype, tolerance in KV_TOLERANCE.items():
        net_kv, spec_kv = load_net(folder, kv_dtype=kv_dtype)
        stepped = decode_logits(net_kv, spec_kv, ids)
        assert np.isfinite(stepped).all(), kv_dtype
        assert np.abs(stepped - causal).max() <= tolerance, kv_dtype
    # 16 prompt tokens + 32 generated cross position 32: HF's generate recomputes there
    assert greedy(net, spec, ids[:16], 32) == hf_greedy(reference, ids[:16], 32)


def test_longrope_truncating_below_the_switch_replays_short(tmp_path):
    # a chat reusing a prefix of a cache that went past the switch: the prefix was
    # made with the long factors, a sequence that ends before the switch wants the short ones
    folder, reference = build("longrope", tmp_path)
    ids = prompt()
    net, spec = load_net(folder)
    cache = new_cache(net, spec)
    net.forward(np.asarray(ids[:40]), cache, all_logits=True)
    cache.truncate(10)
    ours = net.forward(np.asarray(ids[10:20]), cache, all_logits=True)
    assert np.abs(ours - hf_logits(reference, ids[:20])[10:]).max() <= 1e-4
    ours = net.forward(np.asarray(ids[20:50]), cache, all_logits=True)  # and past the switch again
    assert np.abs(ours - hf_logits(reference, ids[:50])[20:]).max() <= 1e-4


def test_config_as_hf_reads_it(tmp_path):
    from models.phi3 import Phi3Config

    folder, reference = build("phi4-mini", tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    # transformers 5 writes partial_rotary_factor and original_max_position_embeddings
    # inside rope_parameters (and at the top level)
    assert raw["rope_parameters"]["partial_rotary_factor"] == 0.75
    config = Phi3Config.from_dict(raw)
    assert config.rotary_dim == 12
    assert config.rope_scaling["original_max_position_embeddings"] == SWITCH
    assert config.rope_scaling["attention_factor"] == pytest.approx(reference.model.rotary_emb.attention_scaling)
    # HF's Phi3Config takes the top-level original_max_position_embeddings (4096 by
    # default) over the one among the rope parameters
    del raw["original_max_position_embeddings"]
    expected = transformers.Phi3Config(**raw).rope_parameters["original_max_position_embeddings"]
    assert expected == 4096 == Phi3Config.from_dict(raw).rope_scaling["original_max_position_embeddings"]


def test_pre_transformers_5_config(tmp_path):
    # Phi-3/Phi-4-mini's own config.json: rope_theta, partial_rotary_factor and
    # original_max_position_embeddings at the top level, LongRoPE as rope_scaling of type "su"
    folder, reference = build("phi4-mini", tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw.update(rope_theta=rope["rope_theta"], partial_rotary_factor=0.75,
               rope_scaling={"type": "su", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]})
    (folder / "config.json").write_text(json.dumps(raw))
    net, spec = load_net(folder)
    assert net.rotary.dim == 12 and net.longrope
    ids = prompt()
    assert np.abs(prefill_logits(net, spec, ids) - hf_logits(reference, ids)).max() <= 1e-4


def good_longrope() -> dict:
    return {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
            "original_max_position_embeddings": 64}


TOP_LEVEL = ("partial_rotary_factor", "original_max_position_embeddings")  # Phi-3 writes these outside rope_scaling
BROKEN = {
    "no long_factor": ({"long_factor": None}, ["rope_scaling of type 'longrope' needs 'long_factor'"]),
    "short list": ({"short_factor": [1.0] * 7}, ["rope_scaling.short_factor must be a list of 8 positive numbers"]),
    "not numbers": ({"long_factor": ["2"] * 8}, ["rope_scaling.long_factor", "'2'"]),
    "zero factor": ({"long_factor": [0.0] * 8}, ["rope_scaling.long_factor"]),
    "not a list": ({"short_factor": 1.0}, ["rope_scaling.short_factor", "got 1.0"]),
    "original too small": ({"original_max_position_embeddings": 1},
                           ["original_max_position_embeddings must be an integer >= 2"]),
    "negative attention_factor": ({"attention_factor": -1.0}, ["rope_scaling.attention_factor", "-1.0"]),
    "partial over 1": ({"partial_rotary_factor": 1.5}, ["partial_rotary_factor must be at most 1"]),
    "odd rotary dims": ({"partial_rotary_factor": 0.35}, ["rotates 5 dimensions"]),
    "list for the rotary part": ({"partial_rotary_factor": 0.5}, ["must be a list of 4 positive numbers"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_longrope_config(case):
    from models.phi3 import Phi3Config

    changes, fragments = BROKEN[case]
    top_level = {k: v for k, v in changes.items() if k in TOP_LEVEL}
    scaling = {k: v for k, v in {**good_longrope(), **changes}.items() if k not in TOP_LEVEL and v is not None}
    raw = {"model_type": "phi3", **BASE, "rope_scaling": scaling, **top_level}
    with pytest.raises(ModelError) as info:
        Phi3Config.from_dict(raw, "/m/config.json")
    message = str(info.value)
    assert "\n" not in message and message.startswith("/m/config.json: ")
    for fragment in fragments:
        assert fragment in message, message
