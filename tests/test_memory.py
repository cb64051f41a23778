"""The decode loop allocates nothing that grows with the sequence: RSS stays flat; a prefill
reuses freed memory rather than faulting in new pages."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, load_net, needs_default_model, new_cache, save_tiny

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


_PREFILL_FAULTS = """
import resource
import numpy as np
import runtime

model = runtime.load(progress=False)  # its default context, as a user gets it
ids = np.random.default_rng(0).integers(0, model.config.vocab_size, 512)
model.net.forward(ids, model.new_cache())
cache = model.new_cache()  # touched when made: its pages are not the prefill's
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
model.net.forward(ids, cache)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@needs_default_model
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (runtime.backend.keep_freed_memory)")
def test_a_second_prefill_reuses_the_memory_of_the_first():
    """A prefill's activations are freed and made again layer by layer; kept by malloc
    (runtime.backend.keep_freed_memory) they are reused instead of faulted in afresh.
    In a fresh process, glibc hands most of them back: about 60,000 page faults for
    each 512-token prefill of the default model at its default context (at 1,024
    tokens of context, by chance of the heap's layout, only the first prefill's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    child = subprocess.run([sys.executable, "-c", _PREFILL_FAULTS], cwd=REPO, env=env, capture_output=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr.decode()
    faults = int(child.stdout.decode().split()[-1])
    assert faults < 2_000, faults
