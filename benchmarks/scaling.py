"""How decode cost grows with model size and with context depth.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/scaling.py [-r 2] [-n 32]

Decodes with the default model and with a Llama-3.2-1B-shaped
model with random weights (speed does not depend on the values; made once, about
5 GB of float32, under ~/.cache/nprt/bench), decoding at depths 0, 512, 2,048
and 4,096 with each KV-cache dtype. Prints one table, with each model's
bandwidth floor (weight bytes per token / the gemv bandwidth measured here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime  # noqa: E402,F401 - before NumPy: it picks OpenBLAS's kernels (runtime.blas)
import numpy as np  # noqa: E402
from runtime.generate import prefill  # noqa: E402
from benchmarks.cpu_vs_hf import bandwidth_probe  # noqa: E402

# Llama-3.2-1B's config.json shape (rope scaling left out: it does not change the cost)
LLAMA_1B = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                tie_word_embeddings=True, torch_dtype="float32")
DEPTHS = (0, 512, 2048, 4096)


def make_random_llama(folder: Path, config: dict, tokenizer_from: Path) -> Path:
    """A checkpoint of `config`'s shape with N(0, 0.02) weights, plus a borrowed tokenizer."""
    from safetensors.numpy import save_file

    from models.llama import Llama
    from loaders.config import ModelConfig

    if (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = Llama.expected_shapes(ModelConfig.from_dict(config))
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = np.ones(shape, dtype=np.float32)
        else:
            tensors[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tokenizer_from / name).is_file():
            (folder / name).write_bytes((tokenizer_from / name).read_bytes())
    return folder


def decode_speeds(model: "runtime.Model", depths: tuple[int, ...], n_gen: int, repetitions: int) -> list[float]:
    """Decode tokens/s at each depth, filling one cache upward (prefill to the next
    depth, then time n_gen steps, repetitions times): each prompt token is
    prefilled once, which a 1B model at 4,096 tokens needs on 2 cores."""
    net, xp = model.net, model.backend.xp
    rng = np.random.default_rng(0)
    cache = model.new_cache()
    speeds = []
    for depth in depths:
        if depth > cache.offset:
            prefill(net, cache, rng.integers(0, model.config.vocab_size, depth - cache.offset).tolist(),
                    model.options.prefill_chunk)
        token, runs = int(rng.integers(0, model.config.vocab_size)), []
        for _ in range(repetitions):
            start = time.perf_counter()
            for _ in range(n_gen):
                logits = net.forward(np.asarray([token], dtype=np.int64), cache)
                token = model.backend.to_int(xp.argmax(logits[-1]))
            runs.append(n_gen / (time.perf_counter() - start))
        speeds.append(statistics.fmean(runs))
    return speeds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-r", "--repetitions", type=int, default=2)
    ap.add_argument("-n", "--n-gen", type=int, default=32)
    ap.add_argument("--kv-dtypes", default="float32,float16,int8")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/nprt/bench"))
    args = ap.parse_args()

    default = runtime.load(progress=False)
    big = make_random_llama(Path(args.cache) / "llama-3.2-1b-shaped-random", LLAMA_1B, default.folder)
    del default
    ctx = max(DEPTHS) + len(DEPTHS) * args.repetitions * args.n_gen + 1
    print("| model | weights MB | floor tok/s | kv | " + " | ".join(f"decode @ {d}" for d in DEPTHS) + " |")
    print("|---|---|---|---|" + "---|" * len(DEPTHS))
    for name, source in (("SmolLM2-135M", None), ("Llama-3.2-1B-shaped", str(big))):
        for kv in args.kv_dtypes.split(","):
            model = runtime.load(source, kv_dtype=kv, max_context=ctx, progress=False)
            weight_bytes = sum(int(np.prod(s)) for s in model.net.expected_shapes(model.config).values()) * 4
            floor = bandwidth_probe(weight_bytes) * 1e9 / weight_bytes
            speeds = decode_speeds(model, DEPTHS, args.n_gen, args.repetitions)
            print(f"| {name} | {weight_bytes / 1e6:,.0f} | {floor:.1f} | {kv} | "
                  + " | ".join(f"{s:.1f}" for s in speeds) + " |", flush=True)
            del model


if __name__ == "__main__":
    main()
