"""Our runtime vs HF transformers on the CPU, in one process, same model, prompt and threads.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/cpu_vs_hf.py [--model M] [-r 3]

Prints one table: prefill 512, decode of 128 tokens after a 32-token prompt, decode at
2,048 tokens of context (our float32, float16 and int8 caches), each ours vs HF
(`generate`, greedy, its default dynamic cache), the ratio, and the memory-bandwidth
floor: weight bytes read per token / bandwidth measured here by a gemv over as many
bytes as the weights.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime  # noqa: E402
from runtime.bench import run_bench  # noqa: E402


def bandwidth_probe(n_bytes: int, repeats: int = 5) -> float:
    """GB/s of a float32 gemv streaming n_bytes of matrix (what a decode step does)."""
    cols = 4096
    rows = n_bytes // 4 // cols
    w = np.ones((rows, cols), dtype=np.float32)
    x = np.ones(cols, dtype=np.float32)
    w @ x
    best = min(_timed(lambda: w @ x) for _ in range(repeats))
    return w.nbytes / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def hf_speeds(folder: Path, prompt: int, gen: int, depth: int, repeats: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    out: dict[str, list[float]] = {"prefill": [], "decode": [], "decode_depth": []}
    with torch.inference_mode():
        # untimed first calls, as runtime.bench makes for ours
        model(torch.tensor([rng.integers(0, vocab, 512).tolist()]), use_cache=True)
        model.generate(torch.tensor([rng.integers(0, vocab, 32).tolist()]), max_new_tokens=4, min_new_tokens=4,
                       do_sample=False, pad_token_id=0, eos_token_id=None)
        for _ in range(repeats):
            ids = torch.tensor([rng.integers(0, vocab, 512).tolist()])
            out["prefill"].append(512 / _timed(lambda: model(ids, use_cache=True)))
            for key, ctx in (("decode", prompt), ("decode_depth", depth)):
                ids = torch.tensor([rng.integers(0, vocab, ctx).tolist()])
                kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
                t_prefill = _timed(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs))
                t_all = _timed(lambda: model.generate(ids, max_new_tokens=gen, min_new_tokens=gen, **kwargs))
                out[key].append((gen - 1) / (t_all - t_prefill))
    return {k: statistics.fmean(v) for k, v in out.items()}


# The child reports its own peak RSS: VmHWM belongs to the process image after exec,
# while getrusage's ru_maxrss would include the parent's pages it was forked with.
_CHILD = """
import atexit, runpy, sys
def report():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("PEAK_RSS_KB " + line.split()[1] + "\\n")
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def startup_and_memory(model: "runtime.Model", tokens: int = 128) -> dict[str, float]:
    """`cli.py generate` as a user runs it, in a child process: seconds from its
    start to the first answer byte on stdout, and its peak RSS against weights +
    KV cache (default context and cache)."""
    import subprocess

    cli = Path(__file__).resolve().parents[1] / "cli.py"
    command = [sys.executable, "-c", _CHILD, str(cli), "generate", "--prompt",
               "Tell me a long story about a robot.", "--max-tokens", str(tokens), "--ignore-eos"]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.read(1)
    first = time.perf_counter() - start
    child.stdout.read()
    err = child.stderr.read().decode()
    child.wait()
    peak_kb = max(int(line.split()[1]) for line in err.splitlines() if line.startswith("PEAK_RSS_KB"))
    weights = sum(int(np.prod(s)) for s in model.net.expected_shapes(model.config).values()) * 4
    kv = runtime.load(kv_dtype="float16", progress=False).cache_spec.nbytes
    return {"first_token_s": first, "peak_rss_mb": peak_kb / 1024, "weights_mb": weights / 2**20,
            "kv_mb": kv / 2**20, "budget_mb": (weights + kv) / 2**20 + 300}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--depth", type=int, default=2048)
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()

    from threadpoolctl import threadpool_info
    import torch

    blas = [f"{i['internal_api']} {i.get('architecture')} x{i['num_threads']}" for i in threadpool_info()
            if i["user_api"] == "blas"]
    print(f"# {date.today()} {platform.machine()} {os.cpu_count()} cores; numpy BLAS: {', '.join(blas)}; "
          f"torch threads: {torch.get_num_threads()}")
    models = {kv: runtime.load(args.model, kv_dtype=kv, progress=False) for kv in ("float32", "float16", "int8")}
    m32 = models["float32"]
    weight_bytes = sum(int(np.prod(s)) for s in m32.net.expected_shapes(m32.config).values()) * 4
    gbps = bandwidth_probe(weight_bytes)
    floor = gbps * 1e9 / weight_bytes
    print(f"# weights {weight_bytes / 1e6:.0f} MB; gemv bandwidth {gbps:.1f} GB/s -> decode floor {floor:.1f} tokens/s")

    ours = {
        "prefill 512": statistics.fmean(run_bench(m32, 512, 0, args.repetitions).prefill_tps),
        "decode 128 after 32": statistics.fmean(run_bench(m32, 0, args.gen, args.repetitions, depth=32).decode_tps),
    }
    for kv, model in models.items():
        ours[f"decode @ {args.depth} (kv {kv})"] = statistics.fmean(
            run_bench(model, 0, args.gen, args.repetitions, depth=args.depth).decode_tps)
    hf = {} if args.no_hf else hf_speeds(m32.folder, 32, args.gen, args.depth, args.repetitions)
    hf_for = {"prefill 512": hf.get("prefill"), "decode 128 after 32": hf.get("decode")}
    for kv in models:
        hf_for[f"decode @ {args.depth} (kv {kv})"] = hf.get("decode_depth")

    startup = startup_and_memory(m32)
    print(f"# cli.py generate: first token after {startup['first_token_s']:.2f} s; peak RSS "
          f"{startup['peak_rss_mb']:.0f} MB vs weights {startup['weights_mb']:.0f} MB + KV "
          f"{startup['kv_mb']:.0f} MB + 300 MB = {startup['budget_mb']:.0f} MB")
    print("\n| test | ours tokens/s | HF tokens/s | ours / HF | floor tokens/s | ours / floor |")
    print("|---|---|---|---|---|---|")
    for name, value in ours.items():
        ref = hf_for.get(name)
        versus = f"{ref:.1f} | {value / ref:.2f}x" if ref else "- | -"
        # the bandwidth floor is a decode figure: prefill is bound by compute
        bound = f"{floor:.1f} | {100 * value / floor:.0f}%" if name.startswith("decode") else "- | -"
        print(f"| {name} | {value:.1f} | {versus} | {bound} |")


if __name__ == "__main__":
    main()
