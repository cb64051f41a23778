"""Our runtime vs HF transformers on the CPU, in one process, same model, prompt and threads.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/cpu_vs_hf.py [--model M] [-r 3]

Prints one table: prefill 512, decode of 128 tokens after a 32-token prompt, decode at
2,048 tokens of context (our float32, float16 and int8 caches), each ours vs HF
(`generate`, greedy, its default dynamic cache; prefill: one forward asking for the
last position's logits, as generate does), the ratio with its range over the rounds,
and the memory-bandwidth floor: weight bytes read per token / bandwidth measured here
by a gemv over as many bytes as the weights, sustained over a second, in every round
next to the decode tests (share of the floor: the mean of the rounds' shares, with their
range). The two sides alternate test by test. Both run with the malloc setting loading
our runtime makes (runtime.backend.keep_freed_memory, process-wide), from which torch's
prefill gains about as much as ours.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime  # noqa: E402,F401 - before NumPy: it picks OpenBLAS's kernels (runtime.blas)
import numpy as np  # noqa: E402
from runtime.bench import run_bench  # noqa: E402


class BandwidthProbe:
    """GB/s of a float32 gemv streaming n_bytes of matrix (what a decode step does).

    Measured again in every round, next to the decode tests: this VM's bandwidth
    drifts by 20% over minutes, and a floor measured once at the start compares
    decode speeds of later minutes with the bandwidth of another. Sustained: the
    mean over about a second of gemvs, as a decode's tokens/s is a mean over its
    steps; single 17 ms gemvs here range over 20-35 GB/s within seconds, and the
    best of a few catches a burst (reported as well)."""

    def __init__(self, n_bytes: int) -> None:
        cols = 4096
        self.w = np.ones((n_bytes // 4 // cols, cols), dtype=np.float32)
        self.x = np.ones(cols, dtype=np.float32)
        self.w @ self.x

    def gbps(self, seconds: float = 1.0) -> tuple[float, float]:
        """(sustained, best) GB/s over about `seconds` of back-to-back gemvs."""
        times: list[float] = []
        while sum(times) < seconds or len(times) < 5:
            times.append(_timed(lambda: self.w @ self.x))
        return self.w.nbytes * len(times) / sum(times) / 1e9, self.w.nbytes / min(times) / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class HFSide:
    """HF transformers on the same folder (torch float32, CPU), timed as ours is."""

    def __init__(self, folder: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.vocab = self.model.config.vocab_size
        self.rng = np.random.default_rng(0)
        # untimed first calls, as runtime.bench makes for ours
        self.prefill_tps(512)
        self.decode_tps(32, 4)

    def _ids(self, n: int):
        return self.torch.tensor([self.rng.integers(0, self.vocab, n).tolist()])

    def prefill_tps(self, n: int) -> float:
        # logits of the last position only, as HF's generate asks for a prompt
        # (and as ours computes): all 512 rows of the lm_head would add 29 GFLOP
        ids = self._ids(n)
        with self.torch.inference_mode():
            return n / _timed(lambda: self.model(ids, use_cache=True, logits_to_keep=1))

    def decode_tps(self, context: int, gen: int) -> float:
        """Tokens/s of `generate` (greedy, default cache) after a context-token prompt:
        the time of gen tokens less the time of the first, over gen - 1."""
        ids = self._ids(context)
        kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        with self.torch.inference_mode():
            t_first = _timed(lambda: self.model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs))
            t_all = _timed(lambda: self.model.generate(ids, max_new_tokens=gen, min_new_tokens=gen, **kwargs))
        return (gen - 1) / (t_all - t_first)


def ours_prefill_tps(model: "runtime.Model", n: int) -> float:
    return run_bench(model, n, 0, 1).prefill_tps[0]


def ours_decode_tps(model: "runtime.Model", depth: int, gen: int) -> float:
    return run_bench(model, 0, gen, 1, depth=depth).decode_tps[0]


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
    kv = runtime.load(progress=False).cache_spec.nbytes  # the cache cli.py generate makes
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
    probe = BandwidthProbe(weight_bytes)

    # Ours and HF's alternate, test by test within each round, so that the
    # machine's drift (+-20% here over minutes) falls on both sides alike.
    hf = None if args.no_hf else HFSide(m32.folder)
    hf_runs = {"prefill": lambda: hf.prefill_tps(512), "decode": lambda: hf.decode_tps(32, args.gen),
               "depth": lambda: hf.decode_tps(args.depth, args.gen)}
    tests = {"prefill 512": (lambda: ours_prefill_tps(m32, 512), "prefill"),
             "decode 128 after 32": (lambda: ours_decode_tps(m32, 32, args.gen), "decode")}
    for kv, model in models.items():  # one HF figure per round serves the three caches
        tests[f"decode @ {args.depth} (kv {kv})"] = (lambda m=model: ours_decode_tps(m, args.depth, args.gen),
                                                     "depth")
    ours: dict[str, list[float]] = {name: [] for name in tests}
    theirs: dict[str, list[float]] = {name: [] for name in tests}
    floors: list[float] = []  # tokens/s, one per round
    bursts: list[float] = []  # the fastest single gemv's GB/s, one per round
    for _ in range(args.repetitions):
        this_round: dict[str, float] = {}
        for name, (ours_fn, hf_key) in tests.items():
            if hf_key == "decode":
                sustained, best = probe.gbps()
                floors.append(sustained * 1e9 / weight_bytes)
                bursts.append(best)
            ours[name].append(ours_fn())
            if hf is not None:
                if hf_key not in this_round:
                    this_round[hf_key] = hf_runs[hf_key]()
                theirs[name].append(this_round[hf_key])

    del probe
    floor = statistics.fmean(floors)
    print(f"# weights {weight_bytes / 1e6:.0f} MB; gemv bandwidth {floor * weight_bytes / 1e9:.1f} GB/s "
          f"sustained (rounds {min(floors) * weight_bytes / 1e9:.1f}-{max(floors) * weight_bytes / 1e9:.1f}; "
          f"fastest single gemv {max(bursts):.1f}) -> decode floor {floor:.1f} tokens/s")
    startup = startup_and_memory(m32)
    print(f"# cli.py generate: first token after {startup['first_token_s']:.2f} s; peak RSS "
          f"{startup['peak_rss_mb']:.0f} MB vs weights {startup['weights_mb']:.0f} MB + KV "
          f"{startup['kv_mb']:.0f} MB + 300 MB = {startup['budget_mb']:.0f} MB")
    print("\n| test | ours tokens/s | HF tokens/s | ours / HF (range over rounds) | floor tokens/s | ours / floor (range) |")
    print("|---|---|---|---|---|---|")
    for name, values in ours.items():
        value = statistics.fmean(values)
        refs = theirs[name]
        if refs:
            ratios = [a / b for a, b in zip(values, refs)]
            versus = (f"{statistics.fmean(refs):.1f} | {value / statistics.fmean(refs):.2f}x "
                      f"({min(ratios):.2f}-{max(ratios):.2f})")
        else:
            versus = "- | -"
        # the bandwidth floor is a decode figure: prefill is bound by compute
        shares = [100 * a / f for a, f in zip(values, floors)]
        bound = (f"{floor:.1f} | {statistics.fmean(shares):.0f}% ({min(shares):.0f}-{max(shares):.0f})"
                 if name.startswith("decode") else "- | -")
        print(f"| {name} | {value:.1f} | {versus} | {bound} |")


if __name__ == "__main__":
    main()
