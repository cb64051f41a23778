"""Thinking models: the reasoning split from the answer as the text streams, the real Qwen3
template's history (earlier reasoning dropped, as the template does) still reusing the
cached prefix of the turn before, and /think toggling `enable_thinking`.

The model is a tiny random Qwen3 with the real Qwen3 template (tests/data/chat_templates)
and a byte-level tokenizer holding its special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import runtime
from conftest import save_tiny
from runtime.chat import ChatSession
from runtime.generate import prefill
from runtime.thinking import ThinkingSplitter, can_toggle, starts_inside, thinks

TEMPLATES = Path(__file__).resolve().parent / "data" / "chat_templates"
QWEN3 = (TEMPLATES / "qwen3.jinja").read_text()


def _split(pieces: list[str], inside: bool = False) -> list[tuple[str, str]]:
    splitter = ThinkingSplitter(inside)
    out = [part for piece in pieces for part in splitter.push(piece)] + splitter.flush()
    merged: list[tuple[str, str]] = []
    for kind, text in out:
        if merged and merged[-1][0] == kind:
            merged[-1] = (kind, merged[-1][1] + text)
        else:
            merged.append((kind, text))
    return merged


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(1, 40), max_size=10))
def test_splitter_is_independent_of_how_the_text_is_cut(cuts: list[int]) -> None:
    text = "<think>\nFirst, 2+2. Then </thi... no: </think>\n\nThe answer is 4 <think> stays."
    pieces, at = [], 0
    for cut in cuts:
        pieces.append(text[at:at + cut])
        at += cut
    pieces.append(text[at:])
    assert _split(pieces) == [("thinking", "\nFirst, 2+2. Then </thi... no: "),
                              ("answer", "\n\nThe answer is 4 <think> stays.")]


def test_splitter_starts_inside_when_the_prompt_opened_the_tag() -> None:
    assert _split(["plan", "</think>", "answer"], inside=True) == [("thinking", "plan"), ("answer", "answer")]
    assert _split(["no tags at all"]) == [("answer", "no tags at all")]
    assert starts_inside("<｜Assistant｜><think>\n") and not starts_inside("<|im_start|>assistant\n")
    assert thinks(QWEN3) and can_toggle(QWEN3)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Any:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=262, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=1024, tie_word_embeddings=True)
    folder = save_tiny(transformers.Qwen3ForCausalLM(config).eval(), tmp_path_factory.mktemp("q3") / "qwen3")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>", "<tool_call>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": QWEN3}))
    return runtime.load(folder, max_context=1024, progress=False)


def _forge_reply(session: ChatSession, reply: str) -> None:
    """As if the model had answered `reply` to the last user message: history and cache."""
    model = session.model
    ids = model.encode_chat(session.conversation(), **session.template_context)
    ids += model.tokenizer.encode(reply + "<|im_end|>", add_special_tokens=False)
    session.messages.append({"role": "assistant", "content": reply})
    session.cache.reset()
    prefill(model.net, session.cache, ids)
    session.cache_ids = ids


def test_qwen3_history_drops_old_reasoning_and_reuses_the_turn_before(qwen3: Any) -> None:
    session = ChatSession(qwen3, max_tokens=4, sampling={"ignore_eos": True})
    session.messages.append({"role": "user", "content": "What is 2+2?"})
    _forge_reply(session, "<think>\nTwo and two make four.\n</think>\n\nIt is 4.")
    before_reply = len(qwen3.encode_chat(session.conversation()[:-1]))  # up to "<|im_start|>assistant\n"
    "".join(session.send("And 3+3?"))
    # the template renders the first reply without its reasoning now: everything before that
    # reply comes from the cache; the reply itself (shorter now) is prefilled again
    assert session.last.reused_tokens == before_reply
    print(f"turn 2 after a thinking reply: {session.last.reused_tokens} tokens reused, "
          f"{session.last.prefilled_tokens} prefilled")
    rendered = qwen3.render(session.conversation()[:-1])
    assert "Two and two" not in rendered and "It is 4." in rendered
    # the turn after reuses everything but the end-of-turn marker (no reasoning to drop)
    held = len(session.cache_ids)
    "".join(session.send("And 4+4?"))
    assert session.last.reused_tokens >= held - 2
    print(f"turn 3: {session.last.reused_tokens} reused, {session.last.prefilled_tokens} prefilled")


def test_think_off_renders_qwen3s_empty_reasoning(qwen3: Any) -> None:
    on = ChatSession(qwen3, max_tokens=1)
    off = ChatSession(qwen3, max_tokens=1, template_context={"enable_thinking": False})
    prompt = [{"role": "user", "content": "hi"}]
    assert not qwen3.render(prompt, **on.template_context).endswith("<think>\n\n</think>\n\n")
    assert qwen3.render(prompt, **off.template_context).endswith("<think>\n\n</think>\n\n")
    "".join(off.send("hi"))
    assert qwen3.tokenizer.token_id("</think>") in off.cache_ids


@pytest.mark.parametrize("hide, dim, expected", [
    (False, True, "\x1b[2m\nplan\n\x1b[0m\n\nIt is 4."),
    (False, False, "<think>\nplan\n</think>\n\nIt is 4."),
    (True, True, "\n\nIt is 4."),
])
def test_chat_prints_reasoning_dimmed_tagged_or_not_at_all(capsys: Any, hide: bool, dim: bool, expected: str) -> None:
    import types

    import cli

    session = types.SimpleNamespace(model=types.SimpleNamespace(chat_template=QWEN3),
                                    reply_starts_thinking=lambda: False)
    show = cli._ReplyPrinter(session, hide_thinking=hide, dim=dim)
    for piece in ["<thi", "nk>\npl", "an\n</th", "ink>\n\nIt is", " 4."]:
        show(piece)
    show.end()
    assert capsys.readouterr().out == expected


def test_think_command_toggles_the_template_switch(qwen3: Any) -> None:
    import cli

    session = ChatSession(qwen3)
    assert cli._chat_command(session, "/think off") and session.template_context == {"enable_thinking": False}
    assert cli._chat_command(session, "/think on") and session.template_context == {"enable_thinking": True}
