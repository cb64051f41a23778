"""Soak: the default model generating 20,000 tokens through a 256-token int8 cache.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/soak.py [--tokens 20000] [--ctx 256]
    python benchmarks/soak.py --tokens 4000 --ctx 4096 --kv-dtype float16 --block 500   # RSS 500 vs 4,000

Checks, per block of 1,000 tokens: every logit finite, RSS, tokens/s. Prints the last
block against the first: RSS within 2 MB, tokens/s within 10%.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime  # noqa: E402,F401 - before NumPy: it picks OpenBLAS's kernels (runtime.blas)
import numpy as np  # noqa: E402
from runtime.generate import prefill  # noqa: E402
from runtime.sampling import Sampler, SamplingParams  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--kv-dtype", default="int8")
    ap.add_argument("--block", type=int, default=1000)
    args = ap.parse_args()
    model = runtime.load(kv_dtype=args.kv_dtype, max_context=args.ctx, progress=False)
    cache = model.new_cache()
    sampler = Sampler(np, SamplingParams(temperature=0.8, top_p=0.95, seed=1))
    logits = prefill(model.net, cache, model.encode_prompt("Tell me an endless story about the sea."))
    finite = True
    blocks = []
    start = time.perf_counter()
    for n in range(1, args.tokens + 1):
        token = int(sampler(logits[-1]))
        logits = model.net.forward(np.array([token]), cache)
        finite &= bool(np.isfinite(logits).all())
        if n % args.block == 0:
            now = time.perf_counter()
            blocks.append((rss_mb(), args.block / (now - start)))
            start = now
            print(f"{n} tokens: RSS {blocks[-1][0]:.1f} MB, {blocks[-1][1]:.1f} tokens/s, all finite: {finite}",
                  flush=True)
    (rss0, tps0), (rss1, tps1) = blocks[0], blocks[-1]
    print(f"{args.tokens} tokens, kv {args.kv_dtype}, ctx {args.ctx}: all logits finite: {finite}; "
          f"RSS last - first block: {rss1 - rss0:+.2f} MB; tokens/s last / first: {tps1 / tps0:.3f}")


if __name__ == "__main__":
    main()
