"""Serving throughput: aggregate output tokens/s and time per output token at 1, 4, 8 and 16
concurrent streams, through `cli.py serve` over HTTP, next to llama.cpp's llama-batched-bench
on the same model and next to our single-stream decode.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/serve_bench.py \\
        [--llama-batched-bench PATH] [--llama-server PATH] [--gguf MODEL-F32.gguf] \\
        [--step-tokens N] [--no-single]

Each stream is a text completion of 64 random prompt token ids and 64 generated tokens
(ignore_eos), all streams sent at once, as llama-batched-bench's -npp 64 -ntg 64 -npl N.
Reported per concurrency:
- decode tokens/s: tokens generated while every stream was decoding (from the moment the
  last stream got its first token to the last token) over that time: llama's S_TG;
- whole tokens/s: every output token over the time from the requests to the last token;
- p50 / p99 time per output token (the gaps between one stream's tokens) and p50 time to
  first token.
The single-stream figure is Model.tokens alone (no server), 64 tokens after 64; "engine
alone" is runtime.engine.Engine stepped in this process (no HTTP) over the same streams, its
steady decode rate once every stream has its first token (the best of 3 runs). "Products
alone" is the ceiling a decode step's weight products leave: N rows through every matrix
a step multiplies (each layer's and the lm_head, the model's own weights, `linear`), the
best of 5, as if the rest of a step (attention, norms, rotary, sampling) took no time;
the lines under the table split the engine's step into those products and the rest. With
--llama-server, the same HTTP streams go to llama.cpp's llama-server (-np N slots of 1,024
tokens, continuous batching) on the F32 GGUF, with the clients on the same cores as ours, and
its time per output token next to ours. --step-tokens sets our engine's prompt chunk budget
(`serve --step-tokens`); --no-single runs only the HTTP streams.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import runtime  # noqa: E402 - before NumPy: it picks OpenBLAS's kernels (runtime.blas)

runtime.blas.choose_kernels(batched=True)  # a server's, as `cli.py serve` picks them
import numpy as np  # noqa: E402

PROMPT, GENERATED = 64, 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(max_batch: int, llama_server: str | None = None, gguf: str | None = None,
                 step_tokens: int | None = None) -> tuple[subprocess.Popen, str]:
    """Our `cli.py serve`, or llama.cpp's llama-server with as many slots (1,024 tokens each)."""
    import httpx

    port = _free_port()
    if llama_server:
        command = [llama_server, "-m", gguf, "--port", str(port), "-np", str(max_batch), "-c",
                   str(1024 * max_batch), "-t", str(os.cpu_count()), "--cont-batching"]
    else:
        command = [sys.executable, str(REPO / "cli.py"), "serve", "--port", str(port), "--max-batch",
                   str(max_batch), "--ctx", "1024"] + (["--step-tokens", str(step_tokens)] if step_tokens else [])
    # stderr to a file, not a pipe nobody reads: llama-server logs every request, and a full
    # pipe would stall it mid-benchmark
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    log.seek(0)
    raise SystemExit("the server did not come up: " + log.read().decode(errors="replace")[-2000:])


def one_stream(url: str, prompt: list[int], start: threading.Barrier, times: list[float]) -> None:
    import httpx

    body = {"prompt": prompt, "max_tokens": GENERATED, "temperature": 0, "stream": True, "ignore_eos": True}
    # every client is made before the start: making 16 of them (SSL contexts) after it spread
    # the requests over 0.33 s instead of sending them at once
    with httpx.Client(timeout=600) as client:
        start.wait()
        with client.stream("POST", url + "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choice = json.loads(line[6:])["choices"][0]
                    if choice["finish_reason"] is None:
                        times.append(time.perf_counter())


def run_level(url: str, n: int, rng: np.random.Generator) -> dict[str, float]:
    prompts = [rng.integers(100, 20000, PROMPT).tolist() for _ in range(n)]
    times: list[list[float]] = [[] for _ in range(n)]
    start = threading.Barrier(n + 1)
    threads = [threading.Thread(target=one_stream, args=(url, p, start, t)) for p, t in zip(prompts, times)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    counts = [len(t) for t in times]
    all_decoding = max(t[0] for t in times)
    end = max(t[-1] for t in times)
    in_window = sum(sum(1 for x in t if x > all_decoding) for t in times)
    gaps = np.concatenate([np.diff(t) for t in times if len(t) > 1])
    return {"streams": n, "tokens": sum(counts), "decode_tps": in_window / (end - all_decoding),
            "whole_tps": sum(counts) / (end - t0), "tpot_p50_ms": float(np.percentile(gaps, 50) * 1e3),
            "tpot_p99_ms": float(np.percentile(gaps, 99) * 1e3),
            "ttft_p50_s": float(np.median([t[0] - t0 for t in times]))}


def single_stream() -> float:
    import runtime

    model = runtime.load(max_context=1024, progress=False)
    ids = np.random.default_rng(1).integers(100, 20000, PROMPT).tolist()
    rates = []
    for _ in range(3):
        list(model.tokens(ids, max_tokens=GENERATED, ignore_eos=True))
        rates.append(model.stats.decode_tps)
    return float(np.median(rates))


def products_ms(net, n: int) -> float:
    """Milliseconds the weight products of one decode step of n rows take (the best of 5)."""
    from models.layers import linear

    matrices = [w for layer in net.layers for w in vars(layer).values()
                if getattr(w, "ndim", 0) == 2] + [net.lm_head]
    inputs = {width: np.random.default_rng(3).standard_normal((n, width), dtype=np.float32)
              for width in {w.shape[1] for w in matrices}}
    times = []
    for _ in range(6):
        start = time.perf_counter()
        for w in matrices:
            linear(inputs[w.shape[1]], w)
        times.append(time.perf_counter() - start)
    return min(times[1:]) * 1e3


def engine_alone(levels: list[int], step_tokens: int | None = None) -> tuple[dict[int, float], dict[int, float]]:
    """The engine's steady decode rate per level, and the weight products' ms a step."""
    import runtime
    from runtime.engine import Engine, Request

    model = runtime.load(max_context=1024, progress=False)
    products = {n: products_ms(model.net, n) for n in levels}
    options = {"step_tokens": step_tokens} if step_tokens else {}
    engine = Engine.for_model(model, max_batch=max(levels), context=1024, **options)
    rng = np.random.default_rng(2)
    rates = {}
    for n in levels:
        best = 0.0
        for _ in range(3):
            for _ in range(n):
                engine.submit(Request(rng.integers(100, 20000, PROMPT).tolist(), GENERATED), lambda event: None)
            while engine.waiting or any(len(s.pending) > 1 for s in engine.running):
                engine.step()  # the prompts, and each stream's first token
            start, steps = time.perf_counter(), 0
            while engine.step():
                steps += 1
            best = max(best, steps * n / (time.perf_counter() - start))
        rates[n] = best
    return rates, products


def llama_batched(binary: str, gguf: str, levels: list[int]) -> dict[int, float]:
    out = subprocess.run([binary, "-m", gguf, "-c", "4096", "-b", "2048", "-ub", "512", "-npp", str(PROMPT),
                          "-ntg", str(GENERATED), "-npl", ",".join(map(str, levels)), "-t", str(os.cpu_count())],
                         capture_output=True, text=True, check=True).stdout
    rates = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and re.fullmatch(r"\d+", cells[2] or ""):
            rates[int(cells[2])] = float(cells[7])  # S_TG t/s
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,4,8,16")
    parser.add_argument("--llama-batched-bench", help="path of llama.cpp's llama-batched-bench")
    parser.add_argument("--llama-server", help="path of llama.cpp's llama-server: the same HTTP streams against it")
    parser.add_argument("--gguf", help="the default model as an F32 GGUF, for llama.cpp's tools")
    parser.add_argument("--step-tokens", type=int, help="our engine's prompt chunk budget per step "
                        "(`serve --step-tokens`; default the engine's)")
    parser.add_argument("--no-single", action="store_true", help="skip the single-stream and engine-alone runs")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    try:
        from threadpoolctl import threadpool_info
        print("BLAS:", [(i["internal_api"], i.get("architecture"), i["num_threads"]) for i in threadpool_info()])
    except ImportError:
        pass
    alone = float("nan") if args.no_single else single_stream()
    nothing = {n: float("nan") for n in levels}
    engine, products = (nothing, nothing) if args.no_single else engine_alone(levels, args.step_tokens)
    proc, url = start_server(max(levels), step_tokens=args.step_tokens)
    try:
        run_level(url, 2, np.random.default_rng(0))  # warm-up
        rows = [run_level(url, n, np.random.default_rng(n)) for n in levels]
    finally:
        proc.terminate()
        proc.wait()
    llama = llama_batched(args.llama_batched_bench, args.gguf, levels) if args.llama_batched_bench else {}
    theirs_http = {}
    if args.llama_server:
        proc, url = start_server(max(levels), args.llama_server, args.gguf)
        try:
            run_level(url, 2, np.random.default_rng(0))
            theirs_http = {n: run_level(url, n, np.random.default_rng(n)) for n in levels}
        finally:
            proc.terminate()
            proc.wait()
    print(f"single stream (Model.tokens, {GENERATED} after {PROMPT}): {alone:.1f} tokens/s\n")
    print("| streams | decode tokens/s | x single | engine alone | x single | products alone | llama.cpp F32 S_TG "
          "| llama-server F32 (HTTP) | whole tokens/s | TPOT p50 / p99 ms | TTFT p50 s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        n = r["streams"]
        own = engine[n]
        batched = f"{llama[n]:.1f}" if n in llama else "-"
        served = f"{theirs_http[n]['decode_tps']:.1f}" if n in theirs_http else "-"
        print(f"| {n} | {r['decode_tps']:.1f} | {r['decode_tps'] / alone:.2f}x | {own:.1f} | {own / alone:.2f}x | "
              f"{n * 1e3 / products[n]:.1f} | {batched} | {served} | {r['whole_tps']:.1f} | "
              f"{r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f} | {r['ttft_p50_s']:.2f} |")
    if not args.no_single:
        print("\nms a decode step, the engine's: weight products + the rest" +
              (", and llama-batched-bench's whole step" if llama else "") + ":\n")
        for n in levels:
            step = n * 1e3 / engine[n]
            print(f"- {n} streams: {step:.1f} = {products[n]:.1f} + {step - products[n]:.1f}" +
                  (f"; llama.cpp {n * 1e3 / llama[n]:.1f}" if n in llama else ""))
    if theirs_http:
        print("\nllama-server's latency on the same streams (TPOT's p99 counts the stalls of a step "
              "that prefills other streams' prompts, ours and theirs alike):\n")
        print("| streams | whole tokens/s | TPOT p50 / p99 ms | TTFT p50 s |\n|---|---|---|---|")
        for n, r in theirs_http.items():
            print(f"| {n} | {r['whole_tps']:.1f} | {r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f} | "
                  f"{r['ttft_p50_s']:.2f} |")


if __name__ == "__main__":
    main()
