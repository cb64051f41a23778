"""How long the default model's weight products take for a batch of M rows, M = 1..32:
the 30 layers' q/k/v, o, gate/up and down matrices and the lm_head, weights laid out as the
runtime loads them (Backend.matrix_order), random float32 values of the model's shapes.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/batch_rows.py [M ...]

Two columns: `x @ w.T` as NumPy runs it, and `linear` (models/layers.py), which pads a few
rows up to a multiple of 8. OpenBLAS's small-M paths make the first column anything but
monotonic; the engine's decode step is one such product per matrix for its whole batch.
OpenBLAS's kernels are those a server picks (runtime.blas); name others with
OPENBLAS_CORETYPE=SkylakeX (or Haswell, ...) to compare.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime  # noqa: E402 - before NumPy: it picks OpenBLAS's kernels (runtime.blas)

runtime.blas.choose_kernels(batched=True)  # a server's, as `cli.py serve` picks them
import numpy as np  # noqa: E402
from models.layers import linear  # noqa: E402
from runtime.backend import get_backend  # noqa: E402

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
LAYERS, VOCAB = 30, 49152


def median_ms(f, reps: int = 5) -> float:
    f()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main() -> None:
    rows = [int(m) for m in sys.argv[1:]] or [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 16, 20, 24, 32]
    try:
        from threadpoolctl import threadpool_info
        print("BLAS:", [(i["internal_api"], i.get("architecture"), i["num_threads"]) for i in threadpool_info()])
    except ImportError:
        pass
    backend = get_backend("cpu", None)
    rng = np.random.default_rng(0)

    def matrix(shape: tuple[int, int]) -> np.ndarray:
        return np.asarray(rng.standard_normal(shape, dtype=np.float32),
                          order=backend.matrix_order(shape, np.float32))

    weights = [(name, [matrix(shape) for _ in range(LAYERS)]) for name, shape in SHAPES.items()]
    lm_head = matrix((VOCAB, 576))
    print("| rows | x @ w.T ms | linear ms | linear ms per row |\n|---|---|---|---|")
    for m in rows:
        xs = {name: rng.standard_normal((m, SHAPES[name][1]), dtype=np.float32) for name in SHAPES}

        def step(product) -> None:
            for n in range(LAYERS):
                for name, mats in weights:
                    product(xs[name], mats[n])
            product(xs["qkv"], lm_head)

        plain = median_ms(lambda: step(lambda x, w: x @ w.T))
        ours = median_ms(lambda: step(linear))
        print(f"| {m} | {plain:.1f} | {ours:.1f} | {ours / m:.2f} |", flush=True)


if __name__ == "__main__":
    main()
