"""Hostile inputs that used to end in a hang, a traceback or a wrong answer: each now ends,
end to end through `python cli.py`, in at most two lines on stderr (the load line and the
error), exit status 2 and the word that names the problem; and through `runtime` in a
ModelError.

The cases: weights holding NaN or Inf, a chat template that loops for hours, a tokenizer
whose pre-tokenizer regex makes the `tokenizers` library panic, a prompt far longer than
the context, a bad flag value.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import runtime
from conftest import needs_default_model
from loaders import chat_template
from loaders.errors import ModelError
from test_cli import flag_error, run
from test_errors import CONFIG, ST, _weights, tiny, tiny_template  # noqa: F401 (fixtures)

Q_PROJ = "model.layers.1.self_attn.q_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"


def hostile_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, no traceback, exactly 2 lines on stderr: the load line, then the error with `words`."""
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "Traceback" not in err and "panicked at" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("loaded "), err
    assert lines[-1].startswith("error: "), err
    for word in words:
        assert word in lines[-1], err
    return lines[-1]


# -- weights with NaN / Inf -----------------------------------------------------------------

def _poison(folder: Path, name: str, value: float) -> None:
    weights = _weights(CONFIG)
    weights[name][3, 5] = value
    save_file(weights, str(folder / ST))


@pytest.mark.parametrize("name, value, kind", [(Q_PROJ, np.nan, "NaN"), (DOWN, np.inf, "Inf")])
def test_non_finite_weights_stop_generation(tiny: Path, name: str, value: float, kind: str) -> None:
    _poison(tiny, name, value)
    result = run("generate", "--model", str(tiny), "--raw", "--ignore-eos", "--max-tokens", "4", "--prompt", "hi")
    size = _weights(CONFIG)[name].size
    hostile_error(result, "not finite", f"weight {name} holds {kind} (1 of {size} values)")
    assert result.stdout.decode().strip() == ""  # not one token drawn from broken logits


def test_non_finite_weights_raise_model_error_in_runtime(tiny: Path) -> None:
    _poison(tiny, Q_PROJ, np.nan)
    model = runtime.load(tiny, progress=False)
    with pytest.raises(ModelError, match=f"not finite.*weight {Q_PROJ} holds NaN"):
        model.generate("hi", raw=True, max_tokens=4, ignore_eos=True)


def test_overflowing_activations_are_reported_as_such(tiny: Path) -> None:
    # every weight finite, yet the logits overflow: the message must not blame a weight
    weights = _weights(CONFIG)
    weights["model.norm.weight"] *= np.float32(1e20)
    weights["lm_head.weight"] *= np.float32(1e20)
    save_file(weights, str(tiny / ST))
    model = runtime.load(tiny, progress=False)
    with pytest.raises(ModelError, match="every weight is finite, so an activation overflowed"):
        model.generate("hi", raw=True, max_tokens=4, ignore_eos=True)


def test_finite_weights_generate_as_before(tiny: Path) -> None:
    # the check must not change a token: greedy ids equal an argmax over the full logits
    model = runtime.load(tiny, progress=False)
    ids = model.tokenizer.encode("hello there")
    tokens = list(model.tokens(ids, max_tokens=6, ignore_eos=True))
    expected = []
    for _ in range(6):
        expected.append(int(np.argmax(model.logits(ids + expected)[-1])))
    assert tokens == expected


def test_perplexity_with_nan_weights_is_an_error(tiny: Path, tmp_path: Path) -> None:
    _poison(tiny, Q_PROJ, np.nan)
    text = tmp_path / "text.txt"
    text.write_text("some text to score " * 10)
    hostile_error(run("perplexity", "--model", str(tiny), "--file", str(text), "--ctx", "32"),
                  "not finite", f"weight {Q_PROJ} holds NaN")


# -- a chat template that loops for hours ---------------------------------------------------

# Each loop within jinja2's range limit (100,000); together about 10**10 iterations, and
# the list is made once, so no sandboxed call happens inside the loops.
LOOPING_TEMPLATE = ("{% set r = range(99999) | list %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}"
                    "{{ messages[0].content }}")


def test_looping_chat_template_is_stopped(tiny: Path) -> None:
    (tiny / "chat_template.jinja").write_text(LOOPING_TEMPLATE)
    start = time.monotonic()
    result = run("generate", "--model", str(tiny), "--prompt", "hi", timeout=120)
    hostile_error(result, str(tiny / "chat_template.jinja"), "budget of 2 s")
    assert time.monotonic() - start < 60  # stopped, not run to the end (hours)


def test_render_budget_in_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_template, "RENDER_BUDGET_S", 0.2)
    start = time.monotonic()
    with pytest.raises(ModelError, match="budget of 0.2 s"):
        chat_template.render_chat_template(LOOPING_TEMPLATE, [{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < 5
    # the thread goes on as usual afterwards: no stop left pending from the timer
    assert chat_template.render_chat_template("{{ messages[0].content }}", [{"role": "user", "content": "x"}]) == "x"
    time.sleep(0.3)
    assert sum(range(10**6)) == 499999500000


# -- a tokenizer whose regex makes the library panic ----------------------------------------

def _catastrophic_pre_tokenizer(folder: Path) -> None:
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    # backtracks exponentially on "aaa...c": Oniguruma gives up at its retry limit and
    # the tokenizers library panics (pyo3's PanicException, a BaseException)
    data["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated",
                             "invert": False}
    path.write_text(json.dumps(data))


def test_tokenizer_panic_is_one_line(tiny: Path) -> None:
    _catastrophic_pre_tokenizer(tiny)
    result = run("generate", "--model", str(tiny), "--raw", "--prompt", "a" * 60 + "c")
    hostile_error(result, str(tiny / "tokenizer.json"), "panicked", "retry-limit")


def test_tokenizer_panic_is_model_error_in_runtime(tiny: Path) -> None:
    _catastrophic_pre_tokenizer(tiny)
    model = runtime.load(tiny, progress=False)
    with pytest.raises(ModelError, match="tokenizers library panicked encoding"):
        model.tokenizer.encode("a" * 60 + "c")
    assert len(model.tokenizer.encode("ab")) == 2  # the same tokenizer still works


# -- a prompt far longer than the context ---------------------------------------------------

@needs_default_model
def test_prompt_far_longer_than_the_context_is_refused_at_once() -> None:
    result = run("generate", "--ctx", "2048", "--prompt", "All work and no play makes Jack a dull boy. " * 2300)
    line = hostile_error(result, "longer than the context of 2,048", "--truncate-prompt")
    assert "prefill" not in result.stderr.decode()
    prompt_tokens = int(line.split("the prompt is ")[1].split(" tokens")[0].replace(",", ""))
    assert prompt_tokens > 20_000


def test_prompt_longer_than_the_context_is_refused(tiny: Path) -> None:
    # byte-level tokens: "a " is two, so 300 tokens against a context of 64
    result = run("generate", "--model", str(tiny), "--ctx", "64", "--raw", "--prompt", "a " * 150)
    hostile_error(result, "the prompt is 300 tokens, longer than the context of 64")


def test_truncate_prompt_keeps_the_sinks_and_the_last_tokens(tiny: Path) -> None:
    result = run("generate", "--model", str(tiny), "--ctx", "64", "--raw", "--ignore-eos", "--max-tokens", "5",
                 "--prompt", "a " * 150, "--truncate-prompt")
    err = result.stderr.decode()
    assert result.returncode == 0, err
    # room for the 5 new tokens: 59 kept, the 4 sink tokens and the last 55
    assert "keeping its first 4 and last 55 tokens" in err and "prefill: 59 tokens" in err, err


def test_fit_prompt_keeps_what_the_ring_would(tiny: Path) -> None:
    model = runtime.load(tiny, max_context=64, progress=False)
    ids = list(range(300))
    fitted = model.fit_prompt(ids, max_tokens=100, truncate=True)
    assert fitted == ids[:4] + ids[-44:]  # a quarter of the context (16) left for new tokens
    assert model.fit_prompt(ids[:64], max_tokens=10) == ids[:64]
    with pytest.raises(ModelError, match="300 tokens, longer than the context of 64"):
        model.fit_prompt(ids, max_tokens=10)


# -- a bad flag value -----------------------------------------------------------------------

@pytest.mark.parametrize("args, word", [
    (["generate", "--prompt", "x", "--top-p", "2"], "top-p"),
    (["chat", "--temperature", "hot"], "temperature"),
    (["info", "--kv-dtype", "int4"], "int4"),
])
def test_bad_flag_value_is_one_line_and_a_pointer_to_help(args: list[str], word: str) -> None:
    line = flag_error(run(*args, "--model", "/no/such/model"))
    assert word in line


def test_chat_message_longer_than_the_context_is_refused_and_the_chat_goes_on(tiny: Path) -> None:
    from runtime.chat import ChatSession

    (tiny / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}a:{% endif %}")
    model = runtime.load(tiny, max_context=64, progress=False)
    session = ChatSession(model, max_tokens=4, sampling={"ignore_eos": True})
    "".join(session.send("hi"))
    before = list(session.messages)
    with pytest.raises(ModelError, match=r"the prompt is \d+ tokens, longer than the context of 64"):
        "".join(session.send("a " * 100))
    assert session.messages == before
    "".join(session.send("ok"))
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    assert session.last.reused_tokens >= len(model.tokenizer.encode("user: hi"))  # the first turn still cached
