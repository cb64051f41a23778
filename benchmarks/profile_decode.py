"""Where a decode step's time goes, on the default model (or --model, a Llama-family one).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/profile_decode.py [--kv-dtype float16] [--depth 2048] [--cprofile]

Prints the step time; the time of the weight matmuls alone (every weight once, back to
back: what the step would cost with nothing else); then, per step, the time spent in each
part: every weight's matmul (by name), the norms, the rotary, attention over the cache,
the MLP's activation, and the rest (embedding, residual adds, Python). The parts are
timed by wrapping the functions the model calls, which adds about a microsecond per call.
--cprofile adds cProfile's table sorted by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime  # noqa: E402,F401 - before NumPy: it picks OpenBLAS's kernels (runtime.blas)
import numpy as np  # noqa: E402
import models.llama as llama  # noqa: E402
from runtime.generate import prefill  # noqa: E402


def matmuls_alone(net) -> float:
    """Seconds for one pass of x @ W.T over every weight matrix, as a decode step does them."""
    c = net.config
    x, wide = np.ones((1, c.hidden_size), np.float32), np.ones((1, c.intermediate_size), np.float32)

    def once() -> None:
        for layer in net.layers:
            x @ layer.qkv_proj.T, x @ layer.o_proj.T, x @ layer.gate_up_proj.T, wide @ layer.down_proj.T
        x @ net.lm_head.T

    once()
    return min(_timed(once) for _ in range(5))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def parts_per_step(net, cache, token: np.ndarray, steps: int) -> dict[str, float]:
    """Seconds per decode step in each part, by wrapping the functions models/llama.py calls."""
    spent: dict[str, float] = collections.defaultdict(float)
    names = {id(net.lm_head): "lm_head"}
    for layer in net.layers:
        names.update({id(w): name for name, w in vars(layer).items() if w is not None and w.ndim == 2})

    def timed(fn, part=None):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[part or "matmul " + names.get(id(args[1]), "?")] += time.perf_counter() - start
            return out
        return wrapper

    originals = {name: getattr(llama, name) for name in ("linear", "rms_norm", "attend")}
    rope_apply, activation = llama.Rope.apply, type(net).activation
    llama.linear = timed(originals["linear"])
    llama.rms_norm = timed(originals["rms_norm"], "rms_norm")
    llama.attend = timed(originals["attend"], "attention (store, scores, softmax, values)")
    llama.Rope.apply = timed(rope_apply, "rotary")
    type(net).activation = staticmethod(timed(activation, "activation"))
    try:
        start = time.perf_counter()
        for _ in range(steps):
            net.forward(token, cache)
        total = time.perf_counter() - start
    finally:
        for name, fn in originals.items():
            setattr(llama, name, fn)
        llama.Rope.apply, type(net).activation = rope_apply, staticmethod(activation)
    parts = {part: t / steps for part, t in spent.items()}
    parts["rest (embedding, residuals, Python)"] = total / steps - sum(parts.values())
    return parts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--kv-dtype", default="float32")
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--cprofile", action="store_true")
    args = ap.parse_args()
    model = runtime.load(args.model, kv_dtype=args.kv_dtype, max_context=args.depth + 3 * args.steps + 16,
                         progress=False)
    net, cache = model.net, model.new_cache()
    prefill(net, cache, np.random.default_rng(0).integers(0, model.config.vocab_size, args.depth).tolist())
    token = np.array([5])
    for _ in range(5):
        net.forward(token, cache)
    step = _timed(lambda: [net.forward(token, cache) for _ in range(args.steps)]) / args.steps
    print(f"decode step at depth {args.depth}, kv {args.kv_dtype}: {step * 1e3:.1f} ms ({1 / step:.1f} tok/s); "
          f"the weight matmuls alone: {matmuls_alone(net) * 1e3:.1f} ms")
    parts = parts_per_step(net, cache, token, args.steps)
    total = sum(parts.values())
    print(f"\nper step, timed in parts ({total * 1e3:.1f} ms with the timers):")
    for part, t in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {part:45s} {t * 1e3:6.2f} ms  {t / total:5.1%}")
    if args.cprofile:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.steps):
            net.forward(token, cache)
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
