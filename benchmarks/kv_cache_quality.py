"""What the KV-cache storage and the ring buffer cost in quality, on the default model.

    python benchmarks/kv_cache_quality.py [--text FILE] [--ctx 512] [--quick]

Prints, on a real English text (default: the GPL-3 text in /usr/share/common-licenses):
1. windowed perplexity (llama-perplexity style) with float32, float16 and int8 caches,
   and int8 with one scale per (token, head) instead of per 32 channels;
2. greedy 64-token answers with the int8 cache vs the float32 cache on 10 prompts;
3. rolling perplexity of a text 8x the cache capacity, ring buffer vs a full cache,
   with sinks scored at shifted positions and at absolute positions;
4. finiteness of a generation 8x the cache capacity with float16 and int8 caches.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime  # noqa: E402,F401 - before NumPy: it picks OpenBLAS's kernels (runtime.blas)
import numpy as np  # noqa: E402
from runtime import kv_cache, perplexity  # noqa: E402
from runtime.generate import prefill  # noqa: E402

PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "List three primary colors.",
    "Explain what a CPU does in two sentences.", "What is 12 times 12?", "Name a famous painting by Leonardo da Vinci.",
    "Give me a tip for learning a new language.", "What is photosynthesis?", "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--ring", type=int, default=256, help="cache capacity for the rolling runs")
    ap.add_argument("--long-texts", nargs="+", default=[
        f"/usr/share/common-licenses/{name}" for name in ("GPL-3", "GFDL-1.3", "LGPL-2.1", "GPL-2", "Apache-2.0",
                                                          "MPL-2.0", "GPL-1")],
                    help="texts joined into one sequence longer than the model's trained context")
    ap.add_argument("--quick", action="store_true", help="fewer tokens, for a smoke run")
    args = ap.parse_args()
    text = Path(args.text).read_text(encoding="utf-8")
    print(f"text: {args.text} ({len(text.encode())} bytes)")

    models = {dt: runtime.load(kv_dtype=dt, max_context=args.ctx, progress=False)
              for dt in ("float32", "float16", "int8")}
    ids = models["float32"].tokenizer.encode(text)
    if args.quick:
        ids = ids[:4 * args.ctx]
    print(f"tokens: {len(ids)}\n\n## 1. windowed perplexity, ctx {args.ctx}")
    base = None
    for dt, model in models.items():
        ppl = timed(lambda: perplexity.windowed(model, ids, args.ctx).perplexity)
        base = base or ppl
        print(f"{dt:>24}: {ppl:.4f} ({100 * (ppl / base - 1):+.3f}%)  [{timed.last:.0f} s]")
    group = kv_cache.INT8_GROUP
    variants = {}
    for name, size in (("int8, scale per 32", 32), ("int8, scale per head", 1 << 30)):
        kv_cache.INT8_GROUP = size  # head_dim % size != 0 -> one scale per (token, head)
        variants[name] = runtime.load(kv_dtype="int8", max_context=args.ctx, progress=False)
        ppl = timed(lambda: perplexity.windowed(variants[name], ids, args.ctx).perplexity)
        print(f"{name:>24}: {ppl:.4f} ({100 * (ppl / base - 1):+.3f}%)  [{timed.last:.0f} s]")
    kv_cache.INT8_GROUP = group

    print("\n## 2. greedy 64 tokens vs the float32 cache, identical answers out of 10 prompts")
    reference = [models["float32"].generate(p, max_tokens=64) for p in PROMPTS]
    for name, model in [("float16", models["float16"]), ("int8", models["int8"]), *variants.items()]:
        same = sum(model.generate(p, max_tokens=64) == r for p, r in zip(PROMPTS, reference))
        print(f"{name:>24}: {same}/{len(PROMPTS)}")

    n = 8 * args.ring
    print(f"\n## 3. rolling perplexity over {n} tokens (8x a {args.ring}-token cache), first {args.ring} not scored")
    full = runtime.load(kv_dtype="float32", max_context=n + 8, progress=False)
    print(f"{'full cache':>24}: {timed(lambda: perplexity.rolling(full, ids[:n], skip=args.ring).perplexity):.4f}")
    for shift in (True, False):
        for dt in ("float32", "int8"):
            ring = runtime.load(kv_dtype=dt, max_context=args.ring, progress=False)
            ring.net.shift_sink_positions = shift
            ppl = timed(lambda: perplexity.rolling(ring, ids[:n], skip=args.ring).perplexity)
            name = f"ring {dt}, {'shifted' if shift else 'absolute'} sinks"
            print(f"{name:>24}: {ppl:.4f}  [{timed.last:.0f} s]")

    long_text = "\n\n".join(Path(f).read_text(encoding="utf-8") for f in args.long_texts)
    long_ids = models["float32"].tokenizer.encode(long_text)
    trained = models["float32"].config.max_position_embeddings
    n = min(len(long_ids), trained + 4096)
    print(f"\n## 3b. rolling perplexity past the trained context ({trained}): {n} tokens through a "
          f"{args.ring}-token cache, only tokens after position {trained} scored")
    for shift in (True, False):
        ring = runtime.load(kv_dtype="float32", max_context=args.ring, progress=False)
        ring.net.shift_sink_positions = shift
        ppl = timed(lambda: perplexity.rolling(ring, long_ids[:n], skip=trained).perplexity)
        print(f"{'shifted' if shift else 'absolute'} sinks: {ppl:.4f}  [{timed.last:.0f} s]")

    print(f"\n## 4. generating {8 * args.ring} tokens through a {args.ring}-token cache")
    for dt in ("float16", "int8"):
        model = runtime.load(kv_dtype=dt, max_context=args.ring, progress=False)
        cache = model.new_cache()
        finite = True
        steps = 8 * args.ring
        tokens = model.encode_prompt("Tell me a very long story about a dragon.")
        logits = prefill(model.net, cache, tokens)
        token = int(np.argmax(logits[-1]))
        start = time.perf_counter()
        for _ in range(steps):
            logits = model.net.forward(np.array([token]), cache)
            finite &= bool(np.isfinite(logits).all())
            token = int(np.argmax(logits[-1]))
        print(f"  {dt}: {steps} tokens, all logits finite: {finite}, {steps / (time.perf_counter() - start):.1f} tokens/s")


def timed(fn):
    start = time.perf_counter()
    value = fn()
    timed.last = time.perf_counter() - start
    return value


if __name__ == "__main__":
    main()
