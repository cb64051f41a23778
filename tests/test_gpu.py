"""The CuPy path on a real GPU: the same model files on device="cuda" against HF
transformers (CPU torch, float32) and against our own NumPy path.

- float32 weights: logits of tiny random models of several architectures within
  1e-3 of HF, by one prefill, a chunked prefill and token-by-token decode (and
  decode within 1e-3 of prefill); 32 greedy tokens equal to HF's and NumPy's, one
  host transfer per token; seeded sampling gives NumPy's tokens.
- float16 weights and cache (the GPU's default policy): top-1 agreement with
  float32 HF on a larger tiny model.
- the three KV-cache dtypes against the same dtype on NumPy: past two decode
  widening blocks (WIDEN_BLOCK slots), and around a wrapped ring with sinks.
- a forward pass (prefill chunks and decode steps) never synchronizes with the
  host (CuPy's own sync detector).
- `cli.py generate --device cuda` exits 0 and prints what the NumPy path prints.

Skipped, with one reason, where CuPy cannot run a kernel. NPRT_GPU_TEST_DEVICE=cpu
runs the same test bodies on the NumPy path (the known-good path) so that the
tests themselves can be checked without a GPU; the comparisons with NumPy are then
trivially equal, the ones with HF are not. Measured differences are printed and,
where $OUT is set (the device run), appended to $OUT/gpu_measured.tsv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from conftest import REPO, decode_logits, greedy, hf_greedy, hf_logits, load_net, prefill_logits, save_tiny

DEVICE = os.environ.get("NPRT_GPU_TEST_DEVICE", "cuda")
if DEVICE not in ("cuda", "cpu"):
    raise ValueError(f"NPRT_GPU_TEST_DEVICE must be cuda or cpu, got {DEVICE!r}")


def _cuda_unusable() -> str | None:
    """Why CuPy cannot compute here, or None: a device count is not enough (a
    driver without a device, or a device without a working toolkit, fails later),
    so one small kernel runs and its result is read back."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "0 CUDA devices"
        if float((cupy.arange(4, dtype=cupy.float32) * 2).sum()) != 12.0:
            return "a CuPy kernel computed a wrong sum"
    except Exception as exc:  # ImportError, CUDARuntimeError, NVRTC and driver errors
        return type(exc).__name__
    return None


_UNUSABLE = None if DEVICE == "cpu" else _cuda_unusable()
if _UNUSABLE is not None:  # one skip for the module, before torch and transformers are imported
    pytest.skip(f"no usable CUDA GPU for CuPy ({_UNUSABLE}); NPRT_GPU_TEST_DEVICE=cpu runs these tests on NumPy",
                allow_module_level=True)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF_TOL = 1e-3  # float32 weights and cache on the device vs HF float32 (the CPU suite holds 1e-4)
# float16 and int8 caches vs HF float32, as the CPU suite's KV_TOLERANCE
HF_KV_TOL = {"float32": HF_TOL, "float16": 2e-3, "int8": 2e-2}
# the device vs NumPy with the same cache dtype: float32 sums in another order,
# and (float16, int8) a stored value now and then rounded to its other neighbour
NUMPY_TOL = {"float32": 1e-4, "float16": 1e-3, "int8": 1e-2}
KV_DTYPES = ("float32", "float16", "int8")
SEQ = 96  # tokens of the parity input: longer than the windows below
VOCAB = 320


# -- reporting ---------------------------------------------------------------------------
def record(test: str, **figures: float) -> None:
    """Print measured figures; on the device run also keep them in $OUT/gpu_measured.tsv,
    so the tolerances can be stated from what the GPU gave."""
    line = "\t".join([DEVICE, test, *(f"{k}={v:.3g}" for k, v in figures.items())])
    print(line)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "gpu_measured.tsv", "a") as f:
            f.write(line + "\n")


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def ids_for(n: int, vocab: int = VOCAB, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def assert_on_device(net: Any) -> None:
    """The weights live where DEVICE says: a CuPy array on cuda, so no test passes on NumPy by accident."""
    expected = "cupy" if DEVICE == "cuda" else "numpy"
    assert type(net.lm_head).__module__.split(".")[0] == expected
    assert net.backend.device == DEVICE


# -- tiny random models, built with transformers' own classes ----------------------------------
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
            tie_word_embeddings=False)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
# name: (config class, model class, config keys over BASE)
ARCHS: dict[str, tuple[str, str, dict]] = {
    # GQA 8/2, llama3 rope
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM",
                  dict(num_attention_heads=8, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    # q/k/v biases, tied, layer 0 global and layers 1-2 a 24-token window: two rings
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=24, max_window_layers=1)),
    # soft-caps small enough to bite, alternating window/global layers, (1 + w) norms
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(num_hidden_layers=4, head_dim=16, sliding_window=24, query_pre_attn_scalar=24,
                    attn_logit_softcapping=0.5, final_logit_softcapping=0.5)),
    # fused qkv/gate_up, half the head rotating, LongRoPE short factors (no position reaches 128)
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(partial_rotary_factor=0.5, original_max_position_embeddings=128, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2,
                  rope_scaling=dict(type="longrope", short_factor=[1.0 + 0.05 * i for i in range(4)],
                                    long_factor=[1.0 + 1.5 * i * i for i in range(4)]))),
    # LayerNorm with bias, learned positions, Conv1D weights
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_embd=64, n_head=4, n_layer=3, n_positions=128, bos_token_id=1, eos_token_id=2)),
}


def _config(name: str) -> Any:
    config_name, _, extra = ARCHS[name]
    keys = dict(vocab_size=VOCAB, **extra) if name == "gpt2" else {**BASE, **extra}
    return getattr(transformers, config_name)(**keys)


def build_arch(name: str, folder: Path) -> tuple[Path, Any]:
    """A tiny random model saved as safetensors, and HF's float32 model on the same files."""
    model_class = getattr(transformers, ARCHS[name][1])
    torch.manual_seed(0)
    model = model_class(_config(name)).eval()
    if name == "gemma2":  # as tests/test_gemma.py: norms away from HF's 0 init, sharper attention
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "norm" in param_name:
                    param.normal_(0.0, 0.2)
                if "q_proj" in param_name or "k_proj" in param_name:
                    param.mul_(4.0)
    save_tiny(model, folder)
    # eager attention: the one HF path that applies Gemma 2's attention soft-cap in
    # every transformers version (5.17 on the GPU machine picked SDPA and skipped it)
    return folder, model_class.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def write_word_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer, "t0".."tN" split on spaces, so runtime.load and the CLI
    can run a random model and its output is printable text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({}))


@pytest.fixture(scope="module")
def arch(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Any]]:
    """Each architecture built once per module run."""
    built: dict[str, tuple[Path, Any]] = {}

    def get(name: str) -> tuple[Path, Any]:
        if name not in built:
            built[name] = build_arch(name, tmp_path_factory.mktemp(name))
        return built[name]
    return get


# -- float32 weights: parity with HF ------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_float32_logits_match_hf(arch, name: str) -> None:
    folder, reference = arch(name)
    ids = ids_for(SEQ)
    expected = hf_logits(reference, ids)
    net, spec = load_net(folder, device=DEVICE, dtype="float32")
    assert_on_device(net)
    prefilled = prefill_logits(net, spec, ids)
    chunked = prefill_logits(net, spec, ids, chunk=7)  # the cache read before each chunk, masks, two-part softmax
    stepped = decode_logits(net, spec, ids)
    assert prefilled.dtype == stepped.dtype == np.float32
    diffs = dict(prefill=max_diff(prefilled, expected), chunk7=max_diff(chunked, expected),
                 decode=max_diff(stepped, expected), decode_vs_prefill=max_diff(stepped, prefilled))
    record(f"float32 logits vs HF [{name}]", **diffs)
    assert max(diffs.values()) <= HF_TOL, diffs


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_greedy_matches_numpy_and_hf(arch, name: str) -> None:
    """32 greedy tokens (sampled on the device) equal NumPy's and HF's, and only the
    token ids cross to the host: one transfer per generated token."""
    folder, reference = arch(name)
    prompt = ids_for(16, seed=2)
    net, spec = load_net(folder, device=DEVICE, dtype="float32")
    before = net.backend.host_transfers
    ours = greedy(net, spec, prompt, 32)
    assert net.backend.host_transfers - before == 32
    on_numpy = greedy(*load_net(folder), prompt, 32)
    assert ours == on_numpy
    assert ours == hf_greedy(reference, prompt, 32)


def test_seeded_sampling_matches_numpy(arch) -> None:
    """A seed gives the same tokens on the device as on NumPy (the draw is made on the
    host and sent over); temperature, top-k, top-p, min-p and the repeat penalty all on."""
    import runtime

    folder, _ = arch("llama-gqa")
    write_word_tokenizer(folder, VOCAB)
    params = dict(max_tokens=24, temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, repeat_penalty=1.2, seed=3,
                  ignore_eos=True)
    runs = {}
    for device in dict.fromkeys((DEVICE, "cpu")):
        model = runtime.load(folder, device=device, dtype="float32", kv_dtype="float32", progress=False)
        runs[device] = list(model.tokens(ids_for(12, seed=4), **params))
    assert len(runs[DEVICE]) == 24 and runs[DEVICE] == runs["cpu"]


# -- float16 weights and cache: the GPU's default policy -------------------------------------------
F16_CONFIG = dict(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False)
F16_SEQ = 512


@pytest.fixture(scope="module")
def f16_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**F16_CONFIG)).eval()
    folder = save_tiny(model, tmp_path_factory.mktemp("f16-llama"))
    write_word_tokenizer(folder, F16_CONFIG["vocab_size"])
    return folder, model


def test_float16_policy_top1_agrees_with_float32_hf(f16_model) -> None:
    import runtime

    folder, reference = f16_model
    # on cuda the default dtype is the policy under test; NumPy needs it asked for
    dtype = None if DEVICE == "cuda" else "float16"
    model = runtime.load(folder, device=DEVICE, dtype=dtype, kv_dtype="float16", progress=False)
    assert model.backend.dtype == "float16" and model.net.layers[0].qkv_proj.dtype == np.float16
    assert_on_device(model.net)
    ids = ids_for(F16_SEQ, F16_CONFIG["vocab_size"], seed=5)
    ours, expected = model.logits(ids), hf_logits(reference, ids)
    assert ours.dtype == np.float32
    diff = np.abs(ours - expected)
    top1 = float((ours.argmax(-1) == expected.argmax(-1)).mean())
    record("float16 weights+cache vs HF float32", top1=top1, max=float(diff.max()), mean=float(diff.mean()))
    assert top1 >= 0.99
    assert diff.mean() <= 2e-3  # on NumPy 1.4e-4 (max 8e-4, top-1 100%): 10x for sums in another order


# -- the KV cache dtypes: the device against NumPy ------------------------------------------------
KV_CONFIG = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def kv_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**KV_CONFIG)).eval()
    return save_tiny(model, tmp_path_factory.mktemp("kv-llama")), model


def run_long(folder: Path, device: str, kv_dtype: str, ids: list[int], n_prefill: int) -> np.ndarray:
    """Logits of every position: ids[:n_prefill] prefilled in 512-token chunks, the rest decoded."""
    from runtime.kv_cache import new_cache
    from runtime.generate import prefill

    net, spec = load_net(folder, kv_dtype=kv_dtype, device=device, dtype="float32")
    cache = new_cache(net.backend, spec)
    rows = [net.backend.to_host(prefill(net, cache, ids[:n_prefill], 512, all_logits=True))]
    rows += [net.backend.to_host(net.forward(np.array([t]), cache)) for t in ids[n_prefill:]]
    return np.concatenate(rows)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_long_context_cache_matches_numpy_and_hf(kv_model, kv_dtype: str) -> None:
    """1,100 tokens prefilled in three chunks, then decode steps whose reads of the
    cache span three WIDEN_BLOCKs (float16 and int8 are widened block by block)."""
    from runtime.kv_cache import WIDEN_BLOCK

    folder, reference = kv_model
    n_prefill, n_decode = 2 * WIDEN_BLOCK + 76, 16
    ids = ids_for(n_prefill + n_decode, KV_CONFIG["vocab_size"], seed=3)
    ours = run_long(folder, DEVICE, kv_dtype, ids, n_prefill)
    on_numpy = run_long(folder, "cpu", kv_dtype, ids, n_prefill)
    expected = hf_logits(reference, ids)
    diffs = dict(vs_numpy=max_diff(ours, on_numpy), vs_hf=max_diff(ours, expected),
                 numpy_vs_hf=max_diff(on_numpy, expected))
    record(f"kv {kv_dtype}, {len(ids)} tokens", **diffs)
    assert diffs["vs_numpy"] <= NUMPY_TOL[kv_dtype], diffs
    assert diffs["vs_hf"] <= HF_KV_TOL[kv_dtype], diffs


RING, SINKS, RING_SEQ = 64, 4, 200


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_wrapped_ring_matches_numpy(kv_model, kv_dtype: str) -> None:
    """200 tokens through a 64-slot ring with 4 sinks (tests/test_kv_cache.py checks NumPy
    against a masked full forward): decoded token by token, and prefilled in chunks
    that wrap inside a chunk (scattered slots) and mask old slots."""
    folder, _ = kv_model
    ids = ids_for(RING_SEQ, KV_CONFIG["vocab_size"], seed=3)
    runs: dict[str, dict[str, np.ndarray]] = {}
    for device in dict.fromkeys((DEVICE, "cpu")):
        net, spec = load_net(folder, kv_dtype=kv_dtype, max_context=RING, n_sink=SINKS, device=device,
                             dtype="float32")
        runs[device] = {"decode": decode_logits(net, spec, ids),
                        **{f"chunk{c}": prefill_logits(net, spec, ids, chunk=c) for c in (17, 60)}}
    diffs = {how: max_diff(runs[DEVICE][how], runs["cpu"][how]) for how in runs["cpu"]}
    # the three ways of feeding the ring agree with each other on the device too (as on
    # NumPy: a chunk scores its own keys before they are stored, so in float16 or int8
    # it differs from a decode by the storage's rounding)
    decode = runs[DEVICE]["decode"]
    among = max(max_diff(decode, runs[DEVICE][c]) for c in ("chunk17", "chunk60"))
    record(f"kv {kv_dtype}, ring {RING}/{SINKS} sinks, {RING_SEQ} tokens vs NumPy", **diffs,
           decode_vs_chunks=among)
    assert max(diffs.values()) <= NUMPY_TOL[kv_dtype], diffs
    assert among <= HF_KV_TOL[kv_dtype]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_forward_never_synchronizes(kv_model, kv_dtype: str) -> None:
    """Prefill chunks (one wrapping the ring) and decode steps under CuPy's sync
    detector: any device-to-host copy inside a forward pass (a hidden .item(),
    boolean-mask indexing, a NumPy call on a device array) raises."""
    if DEVICE != "cuda":
        pytest.skip("CuPy's sync detector needs the cuda device")
    import cupyx

    from runtime.generate import prefill
    from runtime.kv_cache import new_cache

    folder, _ = kv_model
    net, spec = load_net(folder, kv_dtype=kv_dtype, max_context=32, n_sink=SINKS, device="cuda", dtype="float32")
    cache = new_cache(net.backend, spec)
    ids = ids_for(48, KV_CONFIG["vocab_size"], seed=6)
    with cupyx.allow_synchronize(False):
        logits = prefill(net, cache, ids, chunk=10)
        for token in ids[:8]:
            logits = net.forward(np.array([token]), cache)
    assert cache.wrapped
    assert np.isfinite(net.backend.to_host(logits)).all()


# -- the command line -----------------------------------------------------------------------------
def _generate(folder: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "cli.py"), "generate", "--model", str(folder), "--raw", "--prompt",
               "t5 t17 t42 t7", "--max-tokens", "16", "--ignore-eos", *args]
    return subprocess.run(command, capture_output=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def test_cli_generate_on_the_device(arch) -> None:
    """`generate --device cuda` with the device's defaults exits 0 and prints words; with
    float32 weights and cache its greedy text is the NumPy path's."""
    folder, _ = arch("llama-gqa")
    write_word_tokenizer(folder, VOCAB)
    default = _generate(folder, "--device", DEVICE)
    assert default.returncode == 0, default.stderr.decode()
    words = default.stdout.decode().split()
    assert len(words) == 16 and all(w.startswith("t") for w in words), default.stdout
    assert "decode: 16 tokens" in default.stderr.decode()
    exact = ["--dtype", "float32", "--kv-dtype", "float32"]
    ours, on_numpy = _generate(folder, "--device", DEVICE, *exact), _generate(folder, "--device", "cpu", *exact)
    assert ours.returncode == on_numpy.returncode == 0, ours.stderr.decode() + on_numpy.stderr.decode()
    assert ours.stdout == on_numpy.stdout
