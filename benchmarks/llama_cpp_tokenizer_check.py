"""Our GGUF tokenizers against llama.cpp's own `llama-tokenize`, on the test suite's tricky strings.

The tests hold our rebuilt tokenizers to sentencepiece and to transformers' GGUF tokenizer; this
script is the third witness, the tokenizer the files were made for. It needs a `llama-tokenize`
binary (llama.cpp, e.g. built from the llama-cpp-python sdist the fixtures come from:
`cmake -B build && cmake --build build -j2 --target llama-tokenize` in its vendor/llama.cpp) and
the GGUF fixtures (`python tests/gguf_fixtures.py`).

    python benchmarks/llama_cpp_tokenizer_check.py --llama-tokenize PATH/llama-tokenize
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def llama_cpp_ids(binary: Path, gguf: Path, text: str) -> list[int]:
    out = subprocess.run([str(binary), "-m", str(gguf), "--stdin", "--ids", "--log-disable"], input=text.encode(),
                         capture_output=True, check=True, timeout=120)
    return ast.literal_eval(out.stdout.decode().strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-tokenize", type=Path, required=True)
    args = parser.parse_args()

    import gguf_fixtures as fx
    from conftest import default_gguf
    from loaders.gguf import read_gguf
    from test_gguf_converter import SPECIAL_TEXT, TRICKY

    files = {"default model (BPE, smollm)": default_gguf(), "gemma2 (SentencePiece, Gemma's)": fx.gguf_of("gemma2", "F32"),
             "qwen2 (SentencePiece, Llama 2's)": fx.gguf_of("qwen2", "F32"), "gemma3 (SentencePiece)": fx.gguf_of("gemma3", "F32"),
             "llama fixture (BPE)": fx.gguf_of("llama", "F32")}
    failures = 0
    for label, path in files.items():
        tok = read_gguf(path).tokenizer()
        same = 0
        texts = TRICKY + SPECIAL_TEXT + ["<|im_start|>user\nhi<|im_end|>\n"]
        for text in texts:
            ours, theirs = tok.encode(text).ids, llama_cpp_ids(args.llama_tokenize, path, text)
            if ours == theirs:
                same += 1
            else:
                failures += 1
                print(f"  {label}: {text!r}\n    ours      {ours}\n    llama.cpp {theirs}")
        print(f"{label}: {same}/{len(texts)} strings tokenized identically (BOS included)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
