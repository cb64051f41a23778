"""RSS of a long generation on the default model: after 500 tokens vs after N.

    python benchmarks/rss_flat.py [--tokens 4000] [--kv-dtype float16] [--ctx 4096]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime  # noqa: E402
from runtime.generate import prefill  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--kv-dtype", default="float16")
    ap.add_argument("--ctx", type=int, default=4096)
    args = ap.parse_args()
    model = runtime.load(kv_dtype=args.kv_dtype, max_context=args.ctx, progress=False)
    cache = model.new_cache()
    logits = prefill(model.net, cache, model.encode_prompt("Tell me a very long story."))
    token = int(np.argmax(logits[-1]))
    marks = {}
    start = time.perf_counter()
    for step in range(1, args.tokens + 1):
        logits = model.net.forward(np.array([token]), cache)
        token = int(np.argmax(logits[-1]))
        if step in (500, 1000, 2000, 3000, args.tokens):
            marks[step] = rss_mb()
            print(f"after {step} tokens: RSS {marks[step]:.1f} MB, finite: {bool(np.isfinite(logits).all())}, "
                  f"{step / (time.perf_counter() - start):.1f} tokens/s", flush=True)
    print(f"RSS after {args.tokens} - after 500: {marks[args.tokens] - marks[500]:+.2f} MB "
          f"(kv {args.kv_dtype}, ctx {args.ctx})")


if __name__ == "__main__":
    main()
