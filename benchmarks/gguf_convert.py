"""How long a downloaded GGUF takes to become our float32 folder: first use, then the second.

No hub is reachable here, so the file is made locally in the shape of Qwen2.5-0.5B-Instruct's
Q4_K_M (24 layers, hidden 896, vocabulary 151,936, tied embeddings) with the tensor types
llama-quantize gives that model: 896 is not a multiple of 256, so the matrices it feeds fall back
from Q4_K to Q5_0 and from Q6_K to Q8_0, and only ffn_down (4864 inputs) keeps K types, Q6_K on
every other layer as Q4_K_M's "more bits" rule does. The block bytes are random (below 0x28, so
every float16 scale is small and finite): dequantization costs the same whatever the values.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/gguf_convert.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime  # noqa: E402,F401 - before NumPy: it picks OpenBLAS's kernels (runtime.blas)
import numpy as np  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB = 896, 24, 14, 2, 4864, 151936


def _types(layer: int) -> dict[str, str]:
    more_bits = layer % 2 == 0  # llama.cpp's use_more_bits for Q4_K_M, approximately
    return {"attn_q": "Q5_0", "attn_k": "Q5_0", "attn_v": "Q8_0" if more_bits else "Q5_0", "attn_output": "Q5_0",
            "ffn_gate": "Q5_0", "ffn_up": "Q5_0", "ffn_down": "Q6_K" if more_bits else "Q4_K"}


def make_file(path: Path) -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType

    from loaders.gguf import _CheckedReader
    from loaders.resolve import default_gguf

    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), "qwen2")
    w.add_block_count(LAYERS)
    w.add_context_length(32768)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(LlamaFileType.MOSTLY_Q4_K_M)
    tok = _CheckedReader(default_gguf())  # a real BPE vocabulary, so the tokenizer rebuild is timed too
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tok.fields["tokenizer.ggml.tokens"].contents())
    w.add_token_types(tok.fields["tokenizer.ggml.token_type"].contents())
    w.add_token_merges(tok.fields["tokenizer.ggml.merges"].contents())
    w.add_eos_token_id(2)

    def quantized(name: str, rows: int, cols: int, qtype: str) -> None:
        t = GGMLQuantizationType[qtype]
        block, size = GGML_QUANT_SIZES[t]
        raw = rng.integers(0, 0x28, size=(rows, cols // block * size), dtype=np.uint8)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=t)

    def plain(name: str, n: int) -> None:
        w.add_tensor(name, (1.0 + 0.01 * rng.standard_normal(n)).astype(np.float32))

    quantized("token_embd.weight", VOCAB, HIDDEN, "Q8_0")
    plain("output_norm.weight", HIDDEN)
    q, kv = HIDDEN, KV_HEADS * (HIDDEN // HEADS)
    for i in range(LAYERS):
        types, b = _types(i), f"blk.{i}."
        plain(b + "attn_norm.weight", HIDDEN)
        plain(b + "ffn_norm.weight", HIDDEN)
        for name, rows in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
            quantized(f"{b}{name}.weight", rows, HIDDEN, types[name])
            plain(f"{b}{name}.bias", rows)
        quantized(b + "attn_output.weight", HIDDEN, q, types["attn_output"])
        quantized(b + "ffn_gate.weight", FFN, HIDDEN, types["ffn_gate"])
        quantized(b + "ffn_up.weight", FFN, HIDDEN, types["ffn_up"])
        quantized(b + "ffn_down.weight", HIDDEN, FFN, types["ffn_down"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=Path(tempfile.gettempdir()) / "nprt-bench-qwen2-0.5b-q4_k_m.gguf")
    args = parser.parse_args()
    from threadpoolctl import threadpool_info

    from loaders.resolve import converted

    print(f"cores: {os.cpu_count()}, BLAS: {[(i['internal_api'], i.get('architecture')) for i in threadpool_info()]}")
    if not args.file.is_file():
        t0 = time.perf_counter()
        make_file(args.file)
        print(f"made {args.file} in {time.perf_counter() - t0:.1f} s")
    print(f"file: {args.file.stat().st_size / 1e6:.0f} MB")
    cache = Path(tempfile.mkdtemp(prefix="nprt-bench-cache-"))
    os.environ["NPRT_CACHE"] = str(cache)
    try:
        t0 = time.perf_counter()
        folder = converted(args.file, progress=True)
        first = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in folder.iterdir())
        t0 = time.perf_counter()
        again = converted(args.file, progress=True)
        second = time.perf_counter() - t0
        assert again == folder
        print(f"first use (convert): {first:.1f} s -> {size / 1e6:.0f} MB float32 folder")
        print(f"second use (reuse):  {second * 1e3:.1f} ms")
    finally:
        shutil.rmtree(cache)


if __name__ == "__main__":
    main()
