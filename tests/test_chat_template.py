"""Chat template rendering must match HF transformers' apply_chat_template exactly.

Every real template in tests/data/chat_templates (copied, with their license, from
the public collection named in LICENSE.chat_templates there) is rendered for a set of conversations by
our code and by transformers (with a tiny byte-level tokenizer carrying each model's
BOS/EOS, since there is no hub access); texts, token ids and error messages must agree.
The sandbox tests check that hostile templates fail as ModelError and run nothing.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from loaders.chat_template import (
    _compile,
    find_chat_template,
    generation_end_markers,
    render_chat_template,
)
from loaders.errors import ModelError

# The data travels with the project: a clone anywhere has it, so a missing file is a
# failure (test_templates_found), never a skip.
TEMPLATES_DIR = Path(__file__).resolve().parent / "data" / "chat_templates"
TEMPLATES = {p.stem: p.read_text(encoding="utf-8") for p in sorted(TEMPLATES_DIR.glob("*.jinja"))}

# The real (bos, eos) of each model family; the rest use Llama-style "<s>"/"</s>".
# Qwen2.5 has no BOS at all, so its template must render without a `bos_token` variable.
SPECIAL_TOKENS: dict[str, tuple[str | None, str]] = {
    "llama-3-instruct": ("<|begin_of_text|>", "<|eot_id|>"),
    "deepseek-r1-distill-qwen": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "gemma-it": ("<bos>", "<eos>"),
    "phi-3": ("<s>", "<|endoftext|>"),
    "phi-3-small": ("<|endoftext|>", "<|endoftext|>"),
    "phi-4-mini-instruct": ("<|endoftext|>", "<|endoftext|>"),
    "qwen2.5-instruct": (None, "<|im_end|>"),
    "qwen3": (None, "<|im_end|>"),
    "smollm2-instruct": ("<|im_start|>", "<|im_end|>"),
    "granite-3.0-instruct": ("<|end_of_text|>", "<|end_of_text|>"),
    "openchat-3.5": ("<s>", "<|end_of_turn|>"),
}

# Control tokens the templates write, so that they encode as single ids as in the real
# tokenizers (and a BPE split cannot hide a mismatch).
CONTROL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",
    "<|end_of_turn|>", "<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>",
    "<｜User｜>", "<｜Assistant｜>", "<|tool_call|>", "<|/tool_call|>", "<|endoftext|>",
]

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
USER = {"role": "user", "content": "Hello! Who are you?"}
ASSISTANT = {"role": "assistant", "content": "I am an assistant."}
USER2 = {"role": "user", "content": "What is 2 + 2?"}
ASSISTANT2 = {"role": "assistant", "content": "4."}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather <now> & later, in °C",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]

CONVERSATIONS: dict[str, tuple[list[dict], dict]] = {
    "user": ([USER], {}),
    "system_user": ([SYSTEM, USER], {}),
    "multi_turn": ([SYSTEM, USER, ASSISTANT, USER2], {}),
    "ends_with_assistant": ([USER, ASSISTANT, USER2, ASSISTANT2], {}),
    "unicode": (
        [
            {"role": "system", "content": "Tu es un assistant très serviable. Réponds en français."},
            {"role": "user", "content": "你好！今天天气怎么样？ 😀🎉"},
            {"role": "assistant", "content": "Ça va très bien, merci ! 🌞 Ünïcödé ñ"},
            {"role": "user", "content": "Ελληνικά, русский, العربية, हिन्दी 👩‍💻"},
        ],
        {},
    ),
    "whitespace": (
        [
            {"role": "user", "content": "  padded\n\nwith blank lines\r\nand CRLF  \n"},
            {"role": "assistant", "content": "\tanswer\t"},
            {"role": "user", "content": "{{ not jinja }} {% raw %}"},
        ],
        {},
    ),
    "bad_role_order": ([USER, USER2], {}),
    "assistant_first": ([ASSISTANT, USER], {}),
    "none_fields": (
        [USER, {"role": "assistant", "content": "Sure.", "tool_calls": None}, USER2],
        {},
    ),
    "reasoning": (
        [
            USER2,
            {
                "role": "assistant",
                "content": "<think>Add them.</think>The answer is 4.",
                "reasoning_content": "Add them.",
            },
            USER,
        ],
        {},
    ),
    "tools": (
        [
            SYSTEM,
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "content": '{"temp": 21}'},
        ],
        {"tools": TOOLS},
    ),
}


def _tokens_for(name: str) -> tuple[str | None, str]:
    return SPECIAL_TOKENS.get(name, ("<s>", "</s>"))


@lru_cache(maxsize=None)
def _tokenizer(bos: str | None, eos: str) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (encodes any text) whose post-processor adds BOS like Llama's."""
    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = [t for t in (bos, eos) if t is not None]
    backend.add_special_tokens(specials)
    backend.add_tokens([t for t in CONTROL_TOKENS if t not in specials])
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    kwargs = {"eos_token": eos} if bos is None else {"bos_token": bos, "eos_token": eos}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def _context(bos: str | None, eos: str) -> dict:
    return {"eos_token": eos} if bos is None else {"bos_token": bos, "eos_token": eos}


def _hf(tok: PreTrainedTokenizerFast, template: str, messages: list[dict], **kwargs):
    """(text, None) from transformers, or (None, its error message)."""
    try:
        text = tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any HF failure must be mirrored as ModelError
        return None, " ".join(str(exc).split())
    return text, None


def _assert_same(
    template: str, messages: list[dict], bos: str | None, eos: str, **kwargs
) -> str | None:
    """Our text equals HF's (returned), or both fail and ours carries HF's message."""
    tok = _tokenizer(bos, eos)
    expected, hf_error = _hf(tok, template, messages, **kwargs)
    if hf_error is not None:
        with pytest.raises(ModelError) as caught:
            render_chat_template(template, messages, **_context(bos, eos), **kwargs)
        assert hf_error in str(caught.value)
        assert "\n" not in str(caught.value)
        return None
    ours = render_chat_template(template, messages, **_context(bos, eos), **kwargs)
    assert ours == expected
    return ours


@pytest.mark.parametrize("add_generation_prompt", [False, True], ids=["no_gen", "gen"])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_matches_transformers(name: str, conversation: str, add_generation_prompt: bool) -> None:
    template = TEMPLATES[name]
    bos, eos = _tokens_for(name)
    messages, extra = CONVERSATIONS[conversation]
    ours = _assert_same(
        template, messages, bos, eos, add_generation_prompt=add_generation_prompt, **extra
    )
    if ours is None:
        return
    tok = _tokenizer(bos, eos)
    expected_ids = tok.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=True,
        return_dict=False,
        add_generation_prompt=add_generation_prompt,
        **extra,
    )
    ids = tok.encode(ours, add_special_tokens=False)
    assert ids == expected_ids
    if bos is not None:
        bos_id = tok.convert_tokens_to_ids(bos)
        # HF encodes with add_special_tokens=False: every BOS comes from the template.
        assert ids.count(bos_id) == ours.count(bos)
        assert ids[:2] != [bos_id, bos_id], "double BOS at the start"


def test_templates_found() -> None:
    assert len(TEMPLATES) >= 22, f"expected the real templates in {TEMPLATES_DIR}"
    assert (TEMPLATES_DIR / "LICENSE.chat_templates").is_file()
    assert set(SPECIAL_TOKENS) | set(EXPECTED_MARKERS) <= set(TEMPLATES)


@pytest.mark.parametrize("name", ["llama-2-chat", "mistral-instruct", "chatml", "gemma-it"])
def test_bad_role_order_raises_template_message(name: str) -> None:
    bos, eos = _tokens_for(name)
    with pytest.raises(ModelError, match="^chat template error: Conversation roles must alternate"):
        render_chat_template(TEMPLATES[name], [USER, USER2], **_context(bos, eos))


def test_phi4_mini_needs_tools_like_transformers() -> None:
    # HF always passes tools=None, and this template tests `tools is defined`, which is
    # true for None, then iterates it: without tools it fails in HF, so it fails here too.
    template = TEMPLATES["phi-4-mini-instruct"]
    for messages in ([USER], [SYSTEM, USER]):
        with pytest.raises(ModelError, match="'NoneType' object is not iterable"):
            render_chat_template(template, messages, eos_token="<|endoftext|>")
    text = render_chat_template(template, [SYSTEM, USER], eos_token="<|endoftext|>", tools=[])
    assert text.startswith("<|system|>You are a helpful assistant.You are a helpful assistant with")


def test_adding_special_tokens_would_double_bos() -> None:
    # Why callers must encode the rendered text with add_special_tokens=False.
    tok = _tokenizer("<s>", "</s>")
    template = "{{ bos_token }}[INST] {{ messages[0].content }} [/INST]"
    text = render_chat_template(template, [USER], bos_token="<s>", eos_token="</s>")
    bos_id = tok.convert_tokens_to_ids("<s>")
    assert tok.encode(text, add_special_tokens=True)[:2] == [bos_id, bos_id]
    assert tok.encode(text, add_special_tokens=False)[:2] != [bos_id, bos_id]


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(TEMPLATES)),
    texts=st.lists(st.text(st.characters(blacklist_categories=("Cs",))), min_size=1, max_size=4),
    add_generation_prompt=st.booleans(),
)
def test_random_text_matches_transformers(
    name: str, texts: list[str], add_generation_prompt: bool
) -> None:
    roles = ["user", "assistant"]
    messages = [{"role": roles[i % 2], "content": text} for i, text in enumerate(texts)]
    bos, eos = _tokens_for(name)
    _assert_same(TEMPLATES[name], messages, bos, eos, add_generation_prompt=add_generation_prompt)


# Templates of our own for the features the real ones do not use.
FEATURE_TEMPLATES = {
    "tojson_default": "{{ data | tojson }}",
    "tojson_options": "{{ data | tojson(indent=2, sort_keys=True) }}|"
    "{{ data | tojson(separators=(',', ':')) }}",
    "tojson_ascii": "{{ data | tojson(ensure_ascii=True) }}",
    "strftime_now": "{{ strftime_now('%Y') }}",
    "loop_controls": "{% for m in messages %}{% if loop.index0 == 1 %}{% continue %}{% endif %}"
    "{{ m.role }};{% if loop.index0 == 2 %}{% break %}{% endif %}{% endfor %}",
    "namespace_dict": "{% set ns = namespace(n=0) %}{% for m in messages %}"
    "{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}{{ dict(a=1) | tojson }}{{ dict.fromkeys(['x']) | tojson }}",
    "tools_documents_none": "{{ tools is none }}{{ documents is none }}{{ tools is defined }}",
    "undefined_bos": "{{ bos_token + messages[0].content }}",
    "none_dropped": "{{ messages[1].tool_calls is defined }}{{ messages[1] | tojson }}",
    "reasoning_alias": "{{ messages[1].thinking }}|{{ messages[1].reasoning_content }}",
    "custom_raise": "{{ raise_exception('You said: ' + messages[0].content) }}",
    "undefined_call": "{{ nothing_here() }}",
    "type_error": "{{ messages[0].content + 1 }}",
}
FEATURE_DATA = {"b": [1, 2.5, None, True], "a": "<tag> & \"quotes\" 你好 é 😀"}


@pytest.mark.parametrize("name", list(FEATURE_TEMPLATES))
def test_feature_templates_match_transformers(name: str) -> None:
    messages = [
        USER,
        {"role": "assistant", "content": "x", "tool_calls": None, "reasoning": "why"},
        USER2,
    ]
    _assert_same(FEATURE_TEMPLATES[name], messages, None, "</s>", data=FEATURE_DATA)


HOSTILE_TEMPLATES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.system('touch ' ~ marker) }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'].system('touch ' ~ marker) }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__ }}",
    "{{ dict.__class__ }}",
    "{{ cycler.__class__ }}",
    "{{ lipsum.__code__.co_consts }}",
    "{{ self._TemplateReference__context }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ messages | attr('__class__') }}",
    "{{ messages['__class__'] }}",
    "{{ '{0.__class__}'.format(messages) }}",
    "{{ messages.append(1) }}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{{ messages[0].clear() }}",
    "{% set ns = namespace(_hidden=1) %}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
]


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_sandbox_blocks_python_internals(template: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(ModelError, match="^chat template ") as caught:
        render_chat_template(template, [USER], marker=str(marker))
    assert "\n" not in str(caught.value)
    assert not marker.exists()


def test_messages_are_not_mutated_and_objects_are_inert() -> None:
    class Secret:
        def run(self) -> str:
            return "ran"

    messages = [{"role": "user", "content": "hi", "tool_calls": None, "obj": Secret()}]
    out = render_chat_template("{{ messages[0] | tojson }}{{ messages[0].obj.run }}", messages)
    assert out == '{"role": "user", "content": "hi", "obj": "<Secret>"}'
    assert "tool_calls" in messages[0]


def test_syntax_error_names_line() -> None:
    with pytest.raises(ModelError, match=r"^chat template syntax error on line 3: "):
        render_chat_template("{% for m in messages %}\n{{ m.role }}\n{% endfo %}", [USER])


@pytest.mark.parametrize("messages", [[], [["user", "hi"]], "hello"])
def test_bad_messages(messages: object) -> None:
    with pytest.raises(ModelError):
        render_chat_template("{{ messages }}", messages)  # type: ignore[arg-type]


def test_compiled_template_is_cached() -> None:
    assert _compile("{{ 1 }}") is _compile("{{ 1 }}")


# find_chat_template ------------------------------------------------------------------


def test_find_prefers_jinja_file(tmp_path: Path) -> None:
    (tmp_path / "chat_template.jinja").write_text("from file", encoding="utf-8")
    assert find_chat_template(tmp_path, {"chat_template": "from config"}) == "from file"


def test_find_string_and_named_list(tmp_path: Path) -> None:
    assert find_chat_template(tmp_path, {"chat_template": "plain"}) == "plain"
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "chat"}]
    assert find_chat_template(tmp_path, {"chat_template": named}) == "chat"
    assert find_chat_template(tmp_path, {"chat_template": named}, name="tool_use") == "tools"
    assert find_chat_template(tmp_path, {"chat_template": named}, name="rag") is None


def test_find_extra_template_file(tmp_path: Path) -> None:
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("t", encoding="utf-8")
    assert find_chat_template(tmp_path, {}, name="tool_use") == "t"


def test_find_none(tmp_path: Path) -> None:
    assert find_chat_template(tmp_path, {}) is None
    assert find_chat_template(tmp_path, {"chat_template": None}) is None


@pytest.mark.parametrize(
    "entry", [[{"name": "tool_use", "template": "t"}], 42, [{"name": "default", "template": 3}]]
)
def test_find_bad_config(tmp_path: Path, entry: object) -> None:
    with pytest.raises(ModelError, match="chat"):
        find_chat_template(tmp_path, {"chat_template": entry})


def test_find_bad_file(tmp_path: Path) -> None:
    (tmp_path / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(ModelError, match="not valid UTF-8"):
        find_chat_template(tmp_path, {})


def test_find_reads_real_template(tmp_path: Path) -> None:
    (tmp_path / "chat_template.jinja").write_text(TEMPLATES["chatml"], encoding="utf-8")
    config = json.loads(json.dumps({"chat_template": "ignored"}))
    assert find_chat_template(tmp_path, config) == TEMPLATES["chatml"]


# generation_end_markers ----------------------------------------------------------------

EXPECTED_MARKERS = {
    "chatml": ["<|im_end|>"],
    "qwen2.5-instruct": ["<|im_end|>"],
    "qwen3": ["<|im_end|>"],
    "smollm2-instruct": ["<|im_end|>"],
    "llama-3-instruct": ["<|eot_id|>"],
    "gemma-it": ["<end_of_turn>"],
    "phi-3": ["<|end|>"],
    "phi-4-mini-instruct": ["<|end|>"],
    "openchat-3.5": ["<|end_of_turn|>"],
    "granite-3.0-instruct": ["<|end_of_text|>"],
    "deepseek-r1-distill-qwen": ["<｜end▁of▁sentence｜>"],
    "llama-2-chat": [],  # ends turns with eos_token, which the caller adds itself
    "alpaca": [],
}


@pytest.mark.parametrize("name", list(EXPECTED_MARKERS))
def test_generation_end_markers(name: str) -> None:
    assert generation_end_markers(TEMPLATES[name]) == EXPECTED_MARKERS[name]
