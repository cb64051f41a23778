"""Bad input of every kind ends in one clear line and exit status 2: never a traceback, a hang,
a huge allocation, or code from the model folder run.

Each corruption is checked where it is detected (loaders.safetensors, loaders.config,
loaders.gguf) and end to end through `python cli.py`, on a tiny valid llama folder
built here (config.json, model.safetensors written with safetensors.numpy, a byte-level
tokenizer.json) and on tiny GGUFs written with gguf.GGUFWriter. The last tests run the
embedded default model: bad stdin, a context that cannot fit, and Ctrl-C while loading and
while generating.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from safetensors.numpy import save_file

import runtime
from conftest import REPO, needs_default_model
from loaders.config import ModelConfig, read_json
from loaders.errors import ModelError
from loaders.safetensors import Checkpoint, checkpoint_files, read_header
from models.llama import Llama
from test_cli import flag_error, one_line_error, run
from test_gguf import _write_gguf

CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16,
    "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 260, "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "bos_token_id": 256, "eos_token_id": 257,
}
ST = "model.safetensors"
NORM = "model.layers.1.input_layernorm.weight"        # (16,) float32: 64 bytes
NORM_2 = "model.layers.1.post_attention_layernorm.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"           # (16, 32)


def _tokenizer_json(path: Path) -> None:
    """A byte-level BPE with no merges: every UTF-8 byte is a token, plus two specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "<|im_end|>"])  # ids 256, 257
    tok.save(str(path))


def _weights(config: dict[str, Any]) -> dict[str, np.ndarray]:
    shapes = Llama.expected_shapes(ModelConfig.from_dict(config))
    rng = np.random.default_rng(0)
    return {name: (rng.standard_normal(shape) * 0.1).astype(np.float32) for name, shape in shapes.items()}


@pytest.fixture(scope="module")
def tiny_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    save_file(_weights(CONFIG), str(folder / ST))
    _tokenizer_json(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<|im_end|>"}))
    return folder


@pytest.fixture
def tiny(tiny_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the tiny valid llama folder, to break."""
    return Path(shutil.copytree(tiny_template, tmp_path / "model"))


def test_tiny_folder_is_valid(tiny: Path) -> None:
    # every corruption below starts from this folder, so it must load and run as it is
    model = runtime.load(tiny, progress=False)
    assert len(list(model.tokens("hello", max_tokens=3, ignore_eos=True))) == 3
    result = run("info", "--model", str(tiny))
    assert result.returncode == 0, result.stderr.decode()
    assert "llama (2 layers, hidden 16, 4 heads, 2 KV heads, head_dim 4)" in result.stdout.decode()


# --------------------------------------------------------------------------------------------------
# safetensors


def _split(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _rewrite(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit the JSON header in place; the data area stays byte for byte."""
    header, body = _split(path)
    edit(header)
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)


def _last_tensor(path: Path) -> str:
    header, _ = _split(path)
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


def _truncate_data(folder: Path) -> str:
    path = folder / ST
    last = _last_tensor(path)
    path.write_bytes(path.read_bytes()[:-10])  # into the last tensor only
    return last


def _truncate_header(folder: Path) -> None:
    path = folder / ST
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    path.write_bytes(path.read_bytes()[:8 + n // 2])


def _cut_to_5_bytes(folder: Path) -> None:
    (folder / ST).write_bytes((folder / ST).read_bytes()[:5])


def _header_length(value: int) -> Callable[[Path], None]:
    def corrupt(folder: Path) -> None:
        path = folder / ST
        path.write_bytes(struct.pack("<Q", value) + path.read_bytes()[8:])
    return corrupt


def _not_json(folder: Path) -> None:
    path = folder / ST
    data = bytearray(path.read_bytes())
    data[8:20] = b"{not json!!!"
    path.write_bytes(bytes(data))


def _set(name: str, key: str, value: Any) -> Callable[[Path], None]:
    def corrupt(folder: Path) -> None:
        _rewrite(folder / ST, lambda h: h[name].__setitem__(key, value))
    return corrupt


def _overlap(folder: Path) -> None:
    _rewrite(folder / ST, lambda h: h[NORM_2].__setitem__("data_offsets", h[NORM]["data_offsets"]))


def _resave(edit: Callable[[dict[str, np.ndarray]], None]) -> Callable[[Path], None]:
    def corrupt(folder: Path) -> None:
        weights = _weights(CONFIG)
        edit(weights)
        save_file(weights, str(folder / ST))
    return corrupt


# (corruption, fragments the one-line message must hold besides the file's path,
#  whether read_header alone detects it)
SAFETENSORS_CASES: dict[str, tuple[Callable[[Path], Any], list[str], bool]] = {
    "truncated data": (_truncate_data, ["out of range"], True),  # + the last tensor's name
    "truncated header": (_truncate_header, ["larger than the file"], True),
    "truncated to 5 bytes": (_cut_to_5_bytes, ["truncated", "no header"], True),
    "header length 2**62": (_header_length(2**62), ["header length 4611686018427387904", "larger than the file"],
                            True),
    "header not JSON": (_not_json, ["not valid JSON"], True),
    "unknown dtype": (_set(NORM, "dtype", "F8_E9M9"), [repr(NORM), "unknown dtype 'F8_E9M9'"], True),
    "offsets out of range": (_set(NORM, "data_offsets", [0, 10**9]), [repr(NORM), "out of range"], True),
    "negative offsets": (_set(NORM, "data_offsets", [-64, 0]), [repr(NORM), "out of range"], True),
    "overlapping offsets": (_overlap, [repr(NORM), repr(NORM_2), "overlap"], True),
    "shape x dtype != span": (_set(NORM, "shape", [15]),
                              [repr(NORM), "shape [15] x F32 is 60 bytes but its span is 64 bytes"], True),
    "dtype != span": (_set(NORM, "dtype", "F64"), [repr(NORM), "x F64 is 128 bytes but its span is 64"], True),
    # [2**32, 2**32] wraps to 0 elements in int64 arithmetic: it must not pass as an empty tensor
    "shape product overflows int64": (_set(NORM, "shape", [2**32, 2**32]),
                                      [repr(NORM), "is 73786976294838206464 bytes"], True),
    "shape [10**12]": (_set(NORM, "shape", [10**12]), [repr(NORM), "is 4000000000000 bytes"], True),
    "missing tensor": (_resave(lambda w: w.pop(DOWN)), [repr(DOWN), "missing"], False),
    "shape disagrees with config.json": (_resave(lambda w: w.__setitem__(DOWN, w[DOWN].T.copy())),
                                         [repr(DOWN), "shape [32, 16]", "config.json implies [16, 32]"], False),
}


def _break(tiny: Path, case: str) -> list[str]:
    corrupt, fragments, _ = SAFETENSORS_CASES[case]
    last = corrupt(tiny)
    return [str(tiny / ST), *fragments, *([repr(last)] if isinstance(last, str) else [])]


@pytest.mark.parametrize("case", SAFETENSORS_CASES)
def test_safetensors_loader_errors(tiny: Path, case: str) -> None:
    fragments = _break(tiny, case)
    if SAFETENSORS_CASES[case][2]:
        with pytest.raises(ModelError) as header_error:
            read_header(tiny / ST)
        _check_message(str(header_error.value), fragments)
    with pytest.raises(ModelError) as load_error:
        runtime.load(tiny, progress=False)
    _check_message(str(load_error.value), fragments)


@pytest.mark.parametrize("case", SAFETENSORS_CASES)
def test_safetensors_cli_errors(tiny: Path, case: str) -> None:
    fragments = _break(tiny, case)
    one_line_error(run("info", "--model", str(tiny)), *fragments)


def error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Like one_line_error, for errors after the model loaded: log lines may come first, the error last."""
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], err
    _check_message(lines[-1], list(fragments))
    return lines[-1]


def _check_message(message: str, fragments: list[str]) -> None:
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def _traced_peak(fn: Callable[[], Any]) -> tuple[BaseException | None, int]:
    tracemalloc.start()
    try:
        fn()
        error = None
    except BaseException as exc:  # noqa: BLE001 - returned for the caller to check
        error = exc
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return error, peak


@pytest.mark.parametrize("lie", ["header length 2**62", "header length 99 MiB", "shape [10**12]",
                                 "shape [2**62, 2**62]"])
def test_lying_header_allocates_nothing_like_what_it_claims(tmp_path: Path, lie: str) -> None:
    path = tmp_path / ST
    real = 4096  # a small honest file: one 1024-float tensor
    save_file({"w": np.zeros(1024, np.float32)}, str(path))
    if lie.startswith("header length"):
        n = 2**62 if "2**62" in lie else 99 * 2**20
        path.write_bytes(struct.pack("<Q", n) + path.read_bytes()[8:])
    else:
        shape = [10**12] if "10**12" in lie else [2**62, 2**62]
        _rewrite(path, lambda h: h["w"].__setitem__("shape", shape))
    for call in (lambda: read_header(path), lambda: Checkpoint(tmp_path).get("w")):
        error, peak = _traced_peak(call)
        assert isinstance(error, ModelError), error
        assert peak < real + 2**20, f"{lie}: peak {peak:,} bytes traced for a {path.stat().st_size:,}-byte file"


# --------------------------------------------------------------------------------------------------
# config.json

CONFIG_CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "missing hidden_size": ({"hidden_size": None}, ["missing required key(s): hidden_size"]),
    "missing two keys": ({"vocab_size": None, "num_hidden_layers": None},
                         ["missing required key(s)", "num_hidden_layers", "vocab_size"]),
    "zero layers": ({"num_hidden_layers": 0}, ["num_hidden_layers must be a positive integer, got 0"]),
    "negative intermediate_size": ({"intermediate_size": -32}, ["intermediate_size", "got -32"]),
    "negative hidden_size": ({"hidden_size": -16}, ["hidden_size", "got -16"]),
    "zero heads": ({"num_attention_heads": 0}, ["num_attention_heads", "got 0"]),
    "zero head_dim": ({"head_dim": 0}, ["head_dim", "got 0"]),
    "string size": ({"vocab_size": "260"}, ["vocab_size must be a positive integer, got '260'"]),
    "float size": ({"hidden_size": 16.0}, ["hidden_size", "got 16.0"]),
    "heads do not divide hidden_size": ({"num_attention_heads": 3, "num_key_value_heads": 1},
                                        ["hidden_size=16 is not divisible by num_attention_heads=3"]),
    "kv heads do not divide heads": ({"num_key_value_heads": 3},
                                     ["num_attention_heads=4 is not divisible by num_key_value_heads=3"]),
    "unknown rope_scaling type": ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
                                  ["unsupported rope_scaling type 'yarn'", "rope_scaling.rope_type"]),
    "legacy rope_scaling key": ({"rope_scaling": {"type": "dynamic", "factor": 2.0}},
                                ["unsupported rope_scaling type 'dynamic'", "rope_scaling.type"]),
    "rope_scaling without factor": ({"rope_scaling": {"rope_type": "linear"}}, ["rope_scaling", "'factor'"]),
    "rope_scaling not an object": ({"rope_scaling": "linear"}, ["rope_scaling must be an object"]),
    "rope_theta not a number": ({"rope_theta": "1e4"}, ["rope_theta must be a positive number"]),
    "negative rms_norm_eps": ({"rms_norm_eps": -1e-5}, ["rms_norm_eps"]),
    "eos_token_id not an id": ({"eos_token_id": 2.5}, ["eos_token_id"]),
    "a billion layers": ({"num_hidden_layers": 10**9}, ["num_hidden_layers", "implausibly large"]),
    "model_type not a string": ({"model_type": ["llama"]}, ["model_type"]),
}


def _bad_config(case: str) -> dict[str, Any]:
    changes, _ = CONFIG_CASES[case]
    return {k: v for k, v in {**CONFIG, **changes}.items() if v is not None}  # None: key removed


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_loader_errors(case: str) -> None:
    with pytest.raises(ModelError) as info:
        ModelConfig.from_dict(_bad_config(case), "/models/x/config.json")
    _check_message(str(info.value), ["/models/x/config.json", *CONFIG_CASES[case][1]])


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_cli_errors(tmp_path: Path, case: str) -> None:
    # config.json is checked before the weights are looked at: a folder with only it is enough
    (tmp_path / "config.json").write_text(json.dumps(_bad_config(case)))
    one_line_error(run("info", "--model", str(tmp_path)), str(tmp_path / "config.json"), *CONFIG_CASES[case][1])


@pytest.mark.parametrize("text, fragment", [
    (b"{not json", "not a readable JSON file"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),  # RecursionError inside json
    (b'{"hidden_size": ' + b"9" * 5000 + b"}", "not a readable JSON file"),  # int()'s digit limit
    (b'{"model_type": "\xff\xfe"}', "not UTF-8"),
    (b'["a list"]', "expected a JSON object"),
])
def test_unreadable_config_json(tmp_path: Path, text: bytes, fragment: str) -> None:
    (tmp_path / "config.json").write_bytes(text)
    with pytest.raises(ModelError, match=fragment) as info:
        read_json(tmp_path / "config.json")
    _check_message(str(info.value), [str(tmp_path / "config.json")])


def test_unreadable_config_json_cli(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    one_line_error(run("info", "--model", str(tmp_path)), "config.json", "not a readable JSON file")


# --------------------------------------------------------------------------------------------------
# GGUF files through the CLI (the loader-level checks are in test_gguf.py)


@pytest.fixture
def gguf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private conversion cache, so no bad file can leave anything in the user's."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("NPRT_CACHE", str(cache))
    return cache


def _patch_tensor_type(data: bytearray, name: bytes, type_id: int) -> None:
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, type_id)


def _gguf_case(path: Path, case: str) -> list[str]:
    if case == "bad magic":
        path.write_bytes(b"PK\x03\x04 a zip file, not a model" * 10)
        return ["not a GGUF file"]
    if case == "empty":
        path.write_bytes(b"")
        return ["not a GGUF file"]
    if case == "q8_1 tensor":
        _write_gguf(path, q8_1="blk.1.ffn_up.weight")
        return ["blk.1.ffn_up.weight", "unsupported tensor type Q8_1"]
    _write_gguf(path)
    data = bytearray(path.read_bytes())
    if case == "unsupported version":
        data[4:8] = struct.pack("<I", 99)
        fragments = ["unsupported GGUF version 99"]
    elif case == "truncated tensor data":
        data = data[:-1000]
        fragments = ["truncated GGUF", "token_embd.weight"]
    elif case == "truncated header":
        data = data[:300]
        fragments = ["truncated GGUF header"]
    else:  # a type id newer than gguf-py
        _patch_tensor_type(data, b"output_norm.weight", 250)
        fragments = ["unsupported tensor type id 250", "output_norm.weight"]
    path.write_bytes(bytes(data))
    return fragments


@pytest.mark.parametrize("case", ["bad magic", "empty", "unsupported version", "truncated tensor data",
                                  "truncated header", "q8_1 tensor", "unknown type id"])
def test_bad_gguf_cli(tmp_path: Path, gguf_cache: Path, case: str) -> None:
    path = tmp_path / "bad.gguf"
    fragments = _gguf_case(path, case)
    one_line_error(run("info", "--model", str(path)), str(path), *fragments)
    assert not gguf_cache.exists() or not any(gguf_cache.rglob("*.safetensors"))  # nothing half-converted


def test_valid_tiny_gguf_cli(tmp_path: Path, gguf_cache: Path) -> None:
    # the bad files above differ from this one by the corruption only
    path = tmp_path / "good.gguf"
    _write_gguf(path)
    result = run("info", "--model", str(path))
    assert result.returncode == 0, result.stderr.decode()


# --------------------------------------------------------------------------------------------------
# Pickles are never loaded


class _Payload:
    """Unpickling this calls open(marker, "w"): the marker file appears iff a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (str(self.marker), "w")


def _pickle_folder(folder: Path, marker: Path, index: bool = False) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    _tokenizer_json(folder / "tokenizer.json")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    if index:
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {NORM: "pytorch_model.bin"}}))


def test_payload_would_run_if_unpickled(tmp_path: Path) -> None:
    # the check below is only meaningful if unpickling really does leave the marker
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()


@pytest.mark.parametrize("index", [False, True])
def test_pickle_only_folder_never_unpickled(tmp_path: Path, index: bool) -> None:
    folder, marker = tmp_path / "model", tmp_path / "UNPICKLED"
    _pickle_folder(folder, marker, index)
    with pytest.raises(ModelError, match="pytorch_model.bin.*safetensors"):
        checkpoint_files(folder)
    for args in (["info"], ["generate", "--prompt", "hi", "--max-tokens", "2"]):
        one_line_error(run(*args, "--model", str(folder)), str(folder), "pytorch_model.bin", "pickle",
                       "safetensors")
    assert not marker.exists()


def test_python_files_in_the_model_folder_are_never_imported(tiny: Path, tmp_path: Path) -> None:
    # transformers' trust_remote_code layout: auto_map in config.json naming a module in the folder
    marker = tmp_path / "IMPORTED"
    code = f"open({str(marker)!r}, 'w').close()\n"
    for module in ("modeling_evil", "configuration_evil", "tokenization_evil", "numpy", "runtime", "loaders"):
        (tiny / f"{module}.py").write_text(code)
    config = {**CONFIG, "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                                     "AutoModelForCausalLM": "modeling_evil.EvilModel",
                                     "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}
    (tiny / "config.json").write_text(json.dumps(config))
    result = run("generate", "--model", str(tiny), "--prompt", "hi", "--raw", "--max-tokens", "2")
    assert result.returncode == 0, result.stderr.decode()
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# Chat templates are sandboxed

ESCAPES = {
    "mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "cycler globals": "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "template reference": "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('touch MARKER') }}",
    "lipsum globals": "{% for m in messages %}{{ lipsum.__globals__['os'].popen('touch MARKER') }}{% endfor %}",
}


@pytest.mark.parametrize("escape", ESCAPES)
def test_chat_template_cannot_reach_python(tiny: Path, tmp_path: Path, escape: str) -> None:
    marker = tmp_path / "ESCAPED"
    template = ESCAPES[escape].replace("MARKER", str(marker))
    (tiny / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": template}))
    # the template is rendered after the model has loaded, so the "loaded ..." log line precedes the error
    message = error_line(run("generate", "--model", str(tiny), "--prompt", "hi", "--max-tokens", "2"),
                         "chat template")
    assert "sandbox" in message or "unsafe" in message, message
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# Command-line values (test_cli.py covers generate's --max-tokens, --temperature, --top-p, --ctx,
# --kv-dtype and an unknown flag)


@pytest.mark.parametrize("args", [
    ["chat", "--max-tokens", "-3"],
    ["chat", "--temperature", "-1"],
    ["chat", "--top-p", "1.01"],
    ["chat", "--bogus"],
    ["info", "--ctx", "0"],
    ["info", "--ctx", "-5"],
    ["info", "--ctx", "1e6"],
    ["perplexity", "--file", "x.txt", "--ctx", "0"],
    ["generate", "--prompt", "x", "--max-tokens", "ten"],
    ["generate", "--prompt", "x", "--top-k", "-1"],
    ["generate", "--prompt", "x", "--min-p", "1"],
    ["generate", "--prompt", "x", "--repeat-penalty", "0"],
    ["generate", "--prompt", "x", "--temperature", "nan"],
    ["generate", "--prompt", "x", "--top-p", "nan"],
    ["generate", "--prompt", "x", "--temperature", "inf"],  # logits / inf: NaN probabilities
    ["generate", "--prompt", "x", "--seed", "-1"],  # numpy's default_rng refuses negative seeds
    ["generate", "--prompt", "x", "--device", "tpu"],
    ["generate"],  # --prompt is required
    ["frobnicate"],
    [],
])
def test_more_bad_flags_exit_2_with_one_line_and_help(args: list[str]) -> None:
    if args[:1] in (["chat"], ["generate"], ["info"], ["perplexity"]):
        args = [*args, "--model", "/no/such/model"]  # if a bad value got through, fail fast, not after a load
    flag_error(run(*args))


# --------------------------------------------------------------------------------------------------
# Running: the default model with bad stdin, a context that cannot fit, and Ctrl-C (a prompt
# longer than the context: test_hostile_inputs.py)


@needs_default_model
def test_chat_survives_non_utf8_stdin() -> None:
    result = run("chat", "--max-tokens", "8", stdin=b"\xff\xfe hello \x80\xc3 there\n")
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert "Traceback" not in err
    assert result.stdout.decode().strip()  # some answer was printed


@needs_default_model
def test_huge_context_refused_before_allocation() -> None:
    line = one_line_error(run("info", "--ctx", "100000000"), "not enough memory", "100,000,000 tokens")
    need, available = re.search(r"need ([\d,]+) MiB, ([\d,]+) MiB available", line).groups()
    assert int(need.replace(",", "")) > int(available.replace(",", "")) > 0
    assert "KV cache 4,394,531 MiB" in line  # 30 layers x 3 KV heads x 64 x 2 (K, V) x 4 bytes (float32) x 1e8 tokens


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "cli.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def _interrupt(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.decode()


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the process ended or stalled first: {proc.communicate()[1].decode()[-2000:]}")
        time.sleep(0.02)


@needs_default_model
def test_ctrl_c_while_generating() -> None:
    proc = _start("generate", "--prompt", "Tell me a long story.", "--max-tokens", "2000", "--ignore-eos")
    fd = proc.stdout.fileno()
    _wait_for(lambda: bool(select.select([fd], [], [], 0.1)[0]), proc)  # the first generated bytes
    assert os.read(fd, 1)
    code, err = _interrupt(proc)
    assert code == 130, err
    assert "Traceback" not in err and "interrupted" in err


@needs_default_model
@pytest.mark.parametrize("stage, mapped", [
    ("importing", "_multiarray_umath"),  # NumPy is imported by the load itself (cli.py imports it lazily)
    ("reading weights", "model.safetensors"),  # the checkpoint is mapped while its tensors are copied out
])
def test_ctrl_c_while_loading(stage: str, mapped: str) -> None:
    proc = _start("generate", "--prompt", "hi", "--max-tokens", "2000", "--ignore-eos")

    def reached() -> bool:
        try:
            return mapped in Path(f"/proc/{proc.pid}/maps").read_text()
        except OSError:
            return False

    _wait_for(reached, proc)
    code, err = _interrupt(proc)
    assert code == 130, err
    assert "Traceback" not in err and "loaded" not in err  # it was still loading
