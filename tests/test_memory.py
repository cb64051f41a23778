"""The decode loop allocates nothing that grows with the sequence: RSS stays flat."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from conftest import load_net, new_cache, save_tiny

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("kv_dtype", ["float16", "int8"])
def test_rss_flat_over_4000_decoded_tokens(tmp_path, kv_dtype):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    folder = save_tiny(transformers.LlamaForCausalLM(config).eval(), tmp_path / "m")
    net, spec = load_net(folder, kv_dtype=kv_dtype, max_context=4096)
    cache = new_cache(net, spec)
    token = 1
    for step in range(4000):
        logits = net.forward(np.array([token]), cache)
        token = int(np.argmax(logits[-1]))
        if step == 499:
            gc.collect()
            after_500 = rss_bytes()
    gc.collect()
    assert cache.offset == 4000
    assert abs(rss_bytes() - after_500) <= 2 * 2**20
