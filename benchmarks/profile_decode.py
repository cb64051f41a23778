"""Where a decode step's time goes: cProfile over decode steps of the default model.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/profile_decode.py [--kv-dtype float16] [--depth 2048]

Prints the step time, the time of the weight matmuls alone (every weight once, back to
back: what the step would cost with nothing else), then the profile sorted by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--kv-dtype", default="float32")
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    model = runtime.load(args.model, kv_dtype=args.kv_dtype, max_context=args.depth + 2 * args.steps + 16,
                         progress=False)
    net, cache = model.net, model.new_cache()
    prefill(net, cache, np.random.default_rng(0).integers(0, model.config.vocab_size, args.depth).tolist())
    token = np.array([5])
    for _ in range(5):
        net.forward(token, cache)
    step = _timed(lambda: [net.forward(token, cache) for _ in range(args.steps)]) / args.steps
    print(f"decode step at depth {args.depth}, kv {args.kv_dtype}: {step * 1e3:.1f} ms ({1 / step:.1f} tok/s); "
          f"the weight matmuls alone: {matmuls_alone(net) * 1e3:.1f} ms")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.steps):
        net.forward(token, cache)
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
