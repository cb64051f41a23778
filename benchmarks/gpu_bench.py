"""Our runtime on a GPU (CuPy, float16 weights) vs HF transformers eager on the same GPU.

    python benchmarks/gpu_bench.py                          # on the GPU: about 2-3 minutes
    python benchmarks/gpu_bench.py --device cpu --tiny      # a dry run of the whole script: NumPy, CPU torch

Two model shapes with random float16 weights, made with transformers on the device
and saved as safetensors to a temporary folder (nothing is downloaded): SmolLM2-135M's
and Llama-3.2-1B's. For each, our decode tokens/s (128 tokens after a 32-token
prompt; for the 135M shape also at a depth of 2,048 tokens with the float16 and int8
caches) and prefill tokens/s (512 tokens), with runtime.bench.run_bench; next to
them HF transformers, torch float16, eager attention, on the same GPU: `generate`
(greedy, its default cache; decode = (n - 1) tokens over the time of an n-token
generate minus that of a 1-token one, as benchmarks/cpu_vs_hf.py) and one forward of
512 tokens for the prefill (logits of the last token only, as a prefill needs). Both
sides get untimed warm-up calls; clocks are read after synchronizing the device.

The floor is the decode bound: weight bytes read per token (all of them, float16)
over the bandwidth of a device-to-device copy of 1 GiB (read + write bytes, timed
with CUDA events; on the CPU a NumPy copy). It leaves out the KV cache a step reads.

Prints the device and versions, then one markdown table; writes the table to
$OUT/gpu_bench.md too when OUT is set (rewritten after every row, so a run cut
short keeps the rows it finished).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime  # noqa: E402,F401 - before NumPy: it picks OpenBLAS's kernels (runtime.blas)
import numpy as np  # noqa: E402
from runtime.bench import run_bench  # noqa: E402

# config.json shapes (transformers' LlamaConfig keys)
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True)
LLAMA_32_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
# the dry run: the same two kinds (tied, GQA; llama3 rope on the second), tiny
TINY_135M = dict(SMOLLM2_135M, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512)
TINY_1B = dict(LLAMA_32_1B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=512)


@dataclass(frozen=True)
class Plan:
    """Token counts of the tests; --tiny shrinks them with the shapes."""

    prompt: int = 512     # prefill test
    gen: int = 128        # decode test: tokens generated
    after: int = 32       # decode test: prompt before them
    depth: int = 2048     # the deep decode test (135M shape)
    context: int = 4096   # our cache: depth + warm-ups fit without wrapping
    repetitions: int = 2  # timed runs per test, each after the untimed warm-ups
    profile: int = 0      # decode steps to run under cProfile after our tests (0: none)


FULL, TINY = Plan(), Plan(prompt=64, gen=16, after=8, depth=256, context=512, repetitions=1)


@dataclass
class Row:
    model: str
    test: str
    ours: float | None  # None: that side failed (its traceback is in the log)
    hf: float | None
    floor: float | None  # decode rows only: prefill is bound by compute


# -- the device ------------------------------------------------------------------------------
def synchronizer(device: str) -> Callable[[], None]:
    """Waits for both libraries' queued GPU work (no-op on the CPU)."""
    if device != "cuda":
        return lambda: None
    import cupy
    import torch

    def sync() -> None:
        cupy.cuda.get_current_stream().synchronize()
        torch.cuda.synchronize()
    return sync


def describe(device: str) -> str:
    import torch
    import transformers

    versions = f"numpy {np.__version__}, torch {torch.__version__}, transformers {transformers.__version__}"
    if device != "cuda":
        return f"device: CPU ({os.cpu_count()} cores); {versions}"
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    memory = props["totalGlobalMem"] / 2**30
    cuda = cupy.cuda.runtime.runtimeGetVersion()
    return (f"device: {name}, {memory:.0f} GiB, compute capability {props['major']}.{props['minor']}; "
            f"cupy {cupy.__version__} (CUDA runtime {cuda // 1000}.{cuda % 1000 // 10}), {versions}")


def copy_bandwidth(device: str, n_bytes: int = 1 << 30, repeats: int = 10) -> float:
    """GB/s of a device-to-device copy: read + write bytes over the time CUDA events measure."""
    if device != "cuda":
        src = np.ones(n_bytes // 4 // 4, dtype=np.float32)  # a quarter of the size: the CPU's RAM is slower
        dst = np.empty_like(src)
        np.copyto(dst, src)
        best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
        return 2 * src.nbytes / best / 1e9
    import cupy

    src = cupy.ones(n_bytes // 4, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    cupy.copyto(dst, src)  # warm-up
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(repeats):
        cupy.copyto(dst, src)
    end.record()
    end.synchronize()
    seconds = cupy.cuda.get_elapsed_time(start, end) / 1e3
    del src, dst
    cupy.get_default_memory_pool().free_all_blocks()
    return 2 * n_bytes * repeats / seconds / 1e9


def _timed(fn: Callable[[], Any], sync: Callable[[], None] = lambda: None) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


# -- the models ---------------------------------------------------------------------------------
def make_hf_model(shape: dict, device: str) -> Any:
    """A random Llama of `shape` in torch float16 with eager attention, made on the device
    directly (a 1B model initialised in float32 on the CPU would take most of the run)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(**shape)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    assert next(model.parameters()).dtype == torch.float16
    return model


def save_folder(model: Any, folder: Path) -> Path:
    """The model as safetensors, with a small word-level tokenizer so runtime.load accepts
    the folder (the benchmark feeds token ids; the tokenizer is never used)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    model.save_pretrained(folder, safe_serialization=True)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({}))
    return folder


# -- the two sides ------------------------------------------------------------------------------------
DEEP_KV = ("float16", "int8")


def test_names(plan: Plan, deep: bool) -> list[str]:
    """Our tests, in table order; HF runs the same ones (its deep decode once: its cache is float16)."""
    names = [f"decode {plan.gen} after {plan.after}", f"prefill {plan.prompt}"]
    return names + ([f"decode {plan.gen} @ {plan.depth} (kv {kv})" for kv in DEEP_KV] if deep else [])


def ours(folder: Path, device: str, plan: Plan, deep: bool, results: dict[str, float]) -> None:
    """Our tokens/s per test (float16 weights), filled in as tests finish; a failed test
    is reported and the next one still runs."""
    decode, prefill, *deep_names = test_names(plan, deep)
    # per cache dtype: (test, prompt tokens, generated tokens, depth) as run_bench takes them
    runs = {"float16": [(decode, 0, plan.gen, plan.after), (prefill, plan.prompt, 0, 0)]}
    if deep:
        for kv, name in zip(DEEP_KV, deep_names):
            runs.setdefault(kv, []).append((name, 0, plan.gen, plan.depth))
    for kv, tests in runs.items():
        model = runtime.load(folder, device=device, dtype="float16", kv_dtype=kv, max_context=plan.context,
                             progress=False)
        for name, prompt, gen, depth in tests:
            def measure() -> None:
                result = run_bench(model, prompt, gen, plan.repetitions, depth=depth)
                results[name] = statistics.fmean(result.prefill_tps if prompt else result.decode_tps)
                log(f"#   ours, {name}: {results[name]:.1f} tok/s")  # progress, kept if the run is cut short
            attempt(f"ours, {name}", measure)
        if plan.profile and kv == "float16":
            attempt("ours, profile", lambda: profile_decode(model, plan.profile))
        del model
        free_memory(device)


def profile_decode(model: Any, steps: int) -> None:
    """Where a decode step's host time goes: cProfile's own-time table over `steps`
    steps. On the GPU the step is bound by Python and kernel launches, not by the
    device, so this is its profile."""
    import cProfile
    import io
    import pstats

    net, backend, xp = model.net, model.backend, model.backend.xp
    cache = model.new_cache()
    token = np.asarray([1], dtype=np.int64)
    for _ in range(4):
        net.forward(token, cache)
    backend.synchronize()
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    for _ in range(steps):
        backend.to_int(xp.argmax(net.forward(token, cache)[-1]))
    profile.disable()
    per_step = (time.perf_counter() - start) / steps
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
    log(f"# profile: {steps} decode steps, {per_step * 1e3:.1f} ms per step under cProfile\n{text.getvalue()}")


def hf(model: Any, device: str, plan: Plan, deep: bool, results: dict[str, float]) -> None:
    """HF's tokens/s for the same tests (names without our cache dtype), filled in as they finish."""
    import torch

    sync = synchronizer(device)
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)

    def ids(n: int) -> Any:
        return torch.tensor([rng.integers(0, vocab, n).tolist()], device=device)

    def generate(prompt: Any, n: int) -> None:
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                       eos_token_id=None)

    def decode_tps(context: int) -> float:
        prompt = ids(context)
        first = _timed(lambda: generate(prompt, 1), sync)  # the prefill and one token
        return (plan.gen - 1) / (_timed(lambda: generate(prompt, plan.gen), sync) - first)

    def prefill_tps() -> float:
        prompt = ids(plan.prompt)
        return plan.prompt / _timed(lambda: model(prompt, logits_to_keep=1), sync)

    decode, prefill, *_ = test_names(plan, deep)
    tests = {decode: lambda: decode_tps(plan.after), prefill: prefill_tps}
    if deep:
        tests[f"decode {plan.gen} @ {plan.depth}"] = lambda: decode_tps(plan.depth)
    with torch.inference_mode():
        model(ids(plan.prompt), logits_to_keep=1)  # untimed warm-ups, as run_bench makes for ours
        generate(ids(plan.after), 4)
        sync()
        for name, test in tests.items():
            results[name] = statistics.fmean(test() for _ in range(plan.repetitions))
            log(f"#   HF, {name}: {results[name]:.1f} tok/s")


def attempt(what: str, fn: Callable[[], None]) -> None:
    """Run one part; a failure is printed and the run goes on: one device call should
    bring back everything that works."""
    try:
        fn()
    except Exception:
        log(f"# {what} FAILED:\n{traceback.format_exc()}")


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import cupy
        import torch

        cupy.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()


# -- the table ---------------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    lines = ["| model | test | ours tok/s | HF tok/s | ours/HF | floor tok/s | ours/floor |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mine = f"{r.ours:.1f}" if r.ours else "failed"
        hf_tps = f"{r.hf:.1f}" if r.hf else "failed"
        versus = f"{r.ours / r.hf:.2f}x" if r.ours and r.hf else "-"
        bound = f"{r.floor:.1f} | " + (f"{100 * r.ours / r.floor:.0f}%" if r.ours else "-") if r.floor else "- | -"
        lines.append(f"| {r.model} | {r.test} | {mine} | {hf_tps} | {versus} | {bound} |")
    return "\n".join(lines)


def hf_figure(hf_results: dict[str, float], test: str) -> float | None:
    """HF's figure for one of our tests: the deep decode rows share HF's one (float16 cache)."""
    return hf_results.get(test.split(" (kv ")[0])


def bench_model(name: str, shape: dict, device: str, plan: Plan, deep: bool, bandwidth: float) -> list[Row]:
    started = time.perf_counter()
    reference = make_hf_model(shape, device)
    # every weight once (a tied matrix once), float16: what a decode step reads
    n_bytes = 2 * sum(p.numel() for p in reference.parameters())
    ours_results: dict[str, float] = {}
    hf_results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="nprt-gpu-bench-") as tmp:
        folder = save_folder(reference, Path(tmp))
        made = time.perf_counter() - started
        attempt(f"{name}: ours", lambda: ours(folder, device, plan, deep, ours_results))
    attempt(f"{name}: HF", lambda: hf(reference, device, plan, deep, hf_results))
    del reference
    free_memory(device)
    floor = bandwidth * 1e9 / n_bytes
    log(f"# {name}: weights {n_bytes / 1e6:,.0f} MB (float16) -> floor {floor:.1f} tok/s; made and saved in "
        f"{made:.1f} s; whole model {time.perf_counter() - started:.1f} s")
    return [Row(name, test, ours_results.get(test), hf_figure(hf_results, test),
                floor if test.startswith("decode") else None) for test in test_names(plan, deep)]


def log(message: str) -> None:
    print(message, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and token counts (a dry run)")
    ap.add_argument("-r", "--repetitions", type=int, help="timed runs per test (default 2, --tiny 1)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="also run STEPS decode steps of ours under cProfile and print where the time goes")
    args = ap.parse_args()
    plan = TINY if args.tiny else FULL
    if args.repetitions:
        plan = dataclasses.replace(plan, repetitions=args.repetitions)
    plan = dataclasses.replace(plan, profile=args.profile)
    shapes = {"SmolLM2-135M-shaped": (TINY_135M if args.tiny else SMOLLM2_135M, True),
              "Llama-3.2-1B-shaped": (TINY_1B if args.tiny else LLAMA_32_1B, False)}
    out = Path(os.environ["OUT"]) / "gpu_bench.md" if os.environ.get("OUT") else None

    started = time.perf_counter()
    header = [f"# {describe(args.device)}"]
    bandwidth = copy_bandwidth(args.device)
    header.append(f"# copy bandwidth (read + write) {bandwidth:.1f} GB/s (the floor's); {plan}")
    header.append("# ours: float16 weights, float16 KV cache unless the test says; "
                  "HF: torch float16, eager attention, its default cache")
    log("\n".join(header))
    rows: list[Row] = []
    for name, (shape, deep) in shapes.items():
        attempt(name, lambda: rows.extend(bench_model(name, shape, args.device, plan, deep, bandwidth)))
        if out:
            out.write_text("\n".join(header) + "\n\n" + table(rows) + "\n")
    log(f"# total {time.perf_counter() - started:.0f} s\n")
    log(table(rows))


if __name__ == "__main__":
    main()
