"""The command line as a user runs it: output streams, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, greedy_log_softmax, needs_default_model


def run(*args: str, stdin: str | bytes | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], input=data, capture_output=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def test_missing_path(tmp_path):
    one_line_error(run("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"), "no such file or folder")


def test_folder_without_config(tmp_path):
    one_line_error(run("generate", "--model", str(tmp_path), "--prompt", "hi"), "no config.json")


def test_unknown_model_type_names_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    one_line_error(run("info", "--model", str(tmp_path)), "unsupported model_type 'mamba'", "llama")


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 16, "vocab_size": 10}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled, ever")
    one_line_error(run("info", "--model", str(tmp_path)), "pickle", "safetensors")


def test_hub_id_without_network_or_cache(tmp_path):
    env_cache = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(REPO / "cli.py"), "generate", "--model", "nobody/no-such-model",
                             "--prompt", "hi"], capture_output=True, timeout=120, cwd=REPO,
                            env={**os.environ, **env_cache})
    one_line_error(result, "nobody/no-such-model", "cache")


@pytest.mark.parametrize("args", [
    ["generate", "--prompt", "x", "--max-tokens", "-1"],
    ["generate", "--prompt", "x", "--temperature", "-0.5"],
    ["generate", "--prompt", "x", "--top-p", "0"],
    ["generate", "--prompt", "x", "--top-p", "1.5"],
    ["generate", "--prompt", "x", "--ctx", "0"],
    ["generate", "--prompt", "x", "--no-such-flag"],
    ["generate", "--prompt", "x", "--kv-dtype", "int4"],
])
def test_bad_flags_exit_2_with_one_line_and_help(args):
    flag_error(run(*args))


def flag_error(result: subprocess.CompletedProcess) -> str:
    """A bad flag: the one error line, then a pointer to --help; exit status 2."""
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "Traceback" not in err and "usage:" not in err, err
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert ": error: " in lines[0] and "--help" in lines[1], err
    return lines[0]


@needs_default_model
def test_generate_default_model_stdout_is_only_the_answer():
    result = run("generate", "--prompt", "What is the capital of France?", "--max-tokens", "20")
    assert result.returncode == 0, result.stderr.decode()
    out, err = result.stdout.decode(), result.stderr.decode()
    assert "Paris" in out
    assert "tokens/s" in err and "tokens/s" not in out
    assert "loaded" in err


@needs_default_model
def test_generate_raw_and_ignore_eos():
    result = run("generate", "--raw", "--prompt", "The capital of France is", "--max-tokens", "8", "--ignore-eos")
    assert result.returncode == 0, result.stderr.decode()
    assert "decode: 8 tokens" in result.stderr.decode()


@needs_default_model
@pytest.mark.parametrize("kv_dtype", ["float32", "float16", "int8"])
def test_info_reports_what_the_cache_allocates(kv_dtype):
    import re

    import runtime

    result = run("info", "--ctx", "1000", "--kv-dtype", kv_dtype)
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    per_token, total = map(lambda s: int(s.replace(",", "")),
                           re.search(r"([\d,]+) bytes per token, ([\d,]+) bytes in total", out).groups())
    model = runtime.load(kv_dtype=kv_dtype, max_context=1000, progress=False)
    cache = model.new_cache()
    arrays = [cache.k, cache.v] + ([cache.k_scale, cache.v_scale] if kv_dtype == "int8" else [])
    assert total == sum(a.nbytes for a in arrays) == per_token * 1000
    assert "parameters:     134,515,008" in out
    assert "architecture:   llama (30 layers, hidden 576, 9 heads, 3 KV heads, head_dim 64)" in out


@needs_default_model
@pytest.mark.parametrize("dtype", [None, "float16"])
def test_the_cache_defaults_to_the_weight_dtype(dtype):
    """float32 weights (the CPU's default) get a float32 cache, float16 weights a float16 one."""
    import runtime

    result = run("info", "--ctx", "64", *(["--dtype", dtype] if dtype else []))
    assert result.returncode == 0, result.stderr.decode()
    expected = dtype or "float32"
    assert f"KV cache:       {expected}, " in result.stdout.decode()
    model = runtime.load(dtype=dtype, max_context=64, progress=False)
    cache = model.new_cache()
    assert model.cache_spec.kv_dtype == expected and cache.k.dtype == cache.v.dtype == np.dtype(expected)


@needs_default_model
def test_bench_json_reports_each_repetition():
    """The bench command's contract (not its speed): one figure per repetition for each
    test, at the depth, cache and context asked for."""
    result = run("bench", "-p", "24", "-n", "4", "-r", "2", "--depth", "40", "--ctx", "128",
                 "--kv-dtype", "int8", "--json")
    assert result.returncode == 0, result.stderr.decode()
    row = json.loads(result.stdout.decode())
    assert (row["prompt_tokens"], row["gen_tokens"], row["depth"]) == (24, 4, 40)
    assert (row["kv_dtype"], row["context"]) == ("int8", 128)
    assert len(row["prefill_tps"]) == len(row["decode_tps"]) == len(row["first_token_s"]) == 2
    assert all(v > 0 for v in row["prefill_tps"] + row["decode_tps"] + row["first_token_s"])
    assert row["prefill_tps_mean"] == pytest.approx(sum(row["prefill_tps"]) / 2)
    assert row["load_s"] > 0 and row["peak_rss_mb"] > 100


@needs_default_model
def test_gguf_file_as_model_and_perplexity_command(tmp_path):
    from loaders.resolve import default_gguf

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    result = run("perplexity", "--model", str(default_gguf()), "--file", str(text), "--ctx", "64")
    assert result.returncode == 0, result.stderr.decode()
    last = result.stdout.decode().strip().splitlines()[-1]
    assert last.startswith("perplexity: ") and 1.0 < float(last.split()[1]) < 5.0  # a repeated sentence is easy


@needs_default_model
def test_generate_stop_string_ends_the_answer_and_is_not_printed():
    question = "What is the capital of France?"
    full = run("generate", "--prompt", question, "--max-tokens", "24").stdout.decode().rstrip("\n")
    # a stop string across a token boundary ("capital of" is two tokens or more)
    stop = full[full.index("capital") + 3:full.index("capital") + 10]
    result = run("generate", "--prompt", question, "--max-tokens", "24", "--stop", "never-seen", "--stop", stop)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == full[:full.index(stop)] + "\n"
    assert "stop: stop" in result.stderr.decode()


@needs_default_model
def test_generate_logprobs_are_log_softmax_of_the_logits():
    import runtime

    question = "What is the capital of France?"
    result = run("generate", "--prompt", question, "--max-tokens", "5", "--logprobs", "2")
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stderr.decode().splitlines()
    table = lines[lines.index("logprobs (token, log-probability, likeliest alternatives):") + 1:-1]
    model = runtime.load(progress=False)
    tokens, rows = greedy_log_softmax(model, model.encode_prompt(question), 5)
    assert len(table) == len(tokens)
    for line, token, log_softmax in zip(table, tokens, rows):
        text, logprob, alternatives = line.split("\t")
        assert text == repr(model.tokenizer.decode([token], skip_special_tokens=False))
        assert abs(float(logprob) - log_softmax[token]) < 1e-3
        best = np.argsort(-log_softmax)[:2]
        assert [float(a.rsplit(" ", 1)[1]) for a in alternatives.split(", ")] == \
            pytest.approx(log_softmax[best].tolist(), abs=1e-3)


@pytest.mark.parametrize("lines, expected", [
    (["hello"], "hello"),
    (["first \\", "second \\", "third"], "first \nsecond \nthird"),
    (['"""', "a poem", "", "  indented", '"""'], "a poem\n\n  indented"),
    (['"""begins here', 'and ends here"""'], "begins here\nand ends here"),
    (['"""one line"""'], "one line"),
])
def test_chat_reads_multi_line_messages(lines, expected):
    import cli

    feed = iter(lines)
    continued = []

    def read(more: bool) -> str:
        continued.append(more)
        return next(feed)

    assert cli.read_message(read) == expected
    assert continued == [False] + [True] * (len(lines) - 1)
    assert next(feed, None) is None  # every line was read, and no more


@needs_default_model
def test_chat_block_arrives_as_one_message():
    stdin = '"""\nSay the word: apple.\nThen say the word: pear.\n"""\n/stats\n'
    result = run("chat", "--max-tokens", "16", "--temperature", "0", stdin=stdin)
    assert result.returncode == 0, result.stderr.decode()
    import re

    import runtime

    # one turn whose prompt is the whole block: what /stats says was prefilled is exactly
    # the two-line message in the chat template
    prefilled = int(re.search(r"tokens reused from the cache, (\d+) prefilled", result.stdout.decode()).group(1))
    model = runtime.load(progress=False)
    assert prefilled == len(model.encode_prompt("Say the word: apple.\nThen say the word: pear."))
