"""Chat templates: find a model's Jinja chat template and render a conversation with it.

Rendering matches HF transformers' `apply_chat_template(..., tokenize=False)` byte for
byte: the same sandboxed Jinja environment (trim_blocks, lstrip_blocks, loop controls),
the same globals (`raise_exception`, `strftime_now`, a locked-down `dict` and
`namespace`), the same `tojson` filter and the same clean-up of the messages (keys whose
value is None dropped, reasoning fields aliased, everything rebuilt from plain JSON
types). Chat templates ship inside model folders, so they are untrusted code: every
failure while compiling or rendering one is reported as a one-line `ModelError`.

Tokenize the rendered text WITHOUT adding special tokens: templates write their own
BOS, and HF tokenizes with `add_special_tokens=False` so that it does not appear twice.
"""

from __future__ import annotations

import ctypes
import json
import threading
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.utils
import numpy as np
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from loaders.errors import ModelError

CHAT_TEMPLATE_FILE = "chat_template.jinja"

# Seconds a render may take. Real templates render a conversation in milliseconds
# (the largest here, Qwen2.5's with tools, in about 1 ms); a hostile one can loop for
# hours within jinja2's range limit (nested loops of 100,000 each).
RENDER_BUDGET_S = 2.0
EXTRA_TEMPLATES_DIR = "additional_chat_templates"

# Names a message's reasoning travels under; HF copies the first one found to
# `reasoning_content` (what most templates read) and `thinking` (what gpt-oss reads).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# End-of-turn strings of the common template families (none contains another).
_END_MARKERS = (
    "<｜end▁of▁sentence｜>",
    "<|end_of_turn|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
)


class _TemplateRaised(TemplateError):
    """The template itself called `raise_exception`: its message is meant for the user."""


def _raise_exception(message: str) -> NoReturn:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes `<`, `>` and `&`, which would corrupt tool schemas
    # inside prompts; HF replaces it with plain json.dumps and so must we.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` for templates, without exposing the `dict` type itself to attribute tricks."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names, which could shadow its internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # Same positional-only trick as Jinja's Namespace, so `namespace(self=...)` works.
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attribute {name!r} starts with an underscore")


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """HF's sandbox, except that touching an unsafe attribute fails at once.

    Jinja returns an Undefined for `''.__class__` and only fails once it is used, so
    `{{ ''.__class__ }}` would render as an empty string. Real templates never reach for
    such attributes, so failing early changes no legitimate output and leaves no window.
    """

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = _StrictSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except TemplateSyntaxError as exc:
        raise ModelError(
            f"chat template syntax error on line {exc.lineno}: {_one_line(exc.message or '')}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - the template is untrusted input
        raise ModelError(
            f"chat template does not compile: {type(exc).__name__}: {_one_line(str(exc))}"
        ) from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _plain(value: Any) -> Any:
    # The template only ever sees plain JSON data: arbitrary objects (arrays, enums,
    # str subclasses) carry methods the sandbox does not know to be dangerous.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: list[dict]) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise ModelError(f"chat messages must be a list of dicts, got a {type(messages).__name__}")
    if not messages:
        raise ModelError("cannot apply a chat template to an empty conversation")
    prepared = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ModelError(f"chat message {index} is a {type(message).__name__}, not a dict")
        # APIs send `content: null` or `tool_calls: null`; templates handle a missing
        # key but would print "None", so HF drops such keys and so do we.
        message = {_plain(key): _plain(item) for key, item in message.items() if item is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


def render_chat_template(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = False,
    **context: Any,
) -> str:
    """Render `messages` with a chat template exactly as HF `apply_chat_template` would.

    `context` carries the other template variables: `bos_token`, `eos_token` (and any
    other special tokens), `tools`, `documents`, or model switches such as
    `enable_thinking`. `tools` and `documents` default to None as in HF, which some
    templates test with `is defined`.
    """
    compiled = _compile(template)
    variables = {"tools": None, "documents": None, **_plain(context)}
    variables["messages"] = _prepare_messages(messages)
    variables["add_generation_prompt"] = add_generation_prompt
    try:
        return _within_budget(lambda: compiled.render(**variables), RENDER_BUDGET_S)
    except _OverBudget:
        raise ModelError(
            f"chat template ran past its budget of {RENDER_BUDGET_S:g} s and was stopped "
            "(a loop that never ends in time?)"
        ) from None
    except _TemplateRaised as exc:
        raise ModelError(f"chat template error: {_one_line(exc.message or '')}") from None
    except SecurityError as exc:
        raise ModelError(f"chat template blocked by the sandbox: {_one_line(str(exc))}") from None
    except TemplateError as exc:
        raise ModelError(f"chat template failed: {_one_line(str(exc))}") from None
    except Exception as exc:  # noqa: BLE001 - the template is untrusted code from the model folder
        # A template that fails on these messages (e.g. iterating a None `tools`) is a
        # problem with the model's files or the conversation, not with the runtime.
        raise ModelError(
            f"chat template failed: {type(exc).__name__}: {_one_line(str(exc))}"
        ) from None


class _OverBudget(BaseException):
    """Raised inside a render that ran too long; a BaseException so that nothing the
    template calls can swallow it as an ordinary error."""


def _within_budget(render: Any, seconds: float) -> str:
    """render() in this thread, stopped with _OverBudget once it runs past `seconds`.

    A timer thread raises the exception asynchronously in this one
    (PyThreadState_SetAsyncExc): the compiled template is Python bytecode, so it
    stops at its next instruction, wherever the loop is. The lock makes "done" and
    "stop it" exclusive, and a stop that raced the end of the render is cleared.
    """
    thread = ctypes.c_ulong(threading.get_ident())
    lock = threading.Lock()
    done = False

    def stop() -> None:
        with lock:
            if not done:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(thread, ctypes.py_object(_OverBudget))

    timer = threading.Timer(seconds, stop)
    timer.daemon = True
    timer.start()
    try:
        return render()
    finally:
        with lock:
            done = True
            timer.cancel()
            ctypes.pythonapi.PyThreadState_SetAsyncExc(thread, None)  # one set too late is dropped


def find_chat_template(
    model_dir: Path, tokenizer_config: dict, *, name: str = "default"
) -> str | None:
    """The model's chat template, or None when it has none.

    Like HF, a `chat_template.jinja` file in the folder wins over the `chat_template`
    entry of tokenizer_config.json, which is either one template or a list of
    `{"name", "template"}` entries. `name` picks a named template (e.g. "tool_use").
    """
    model_dir = Path(model_dir)
    if name == "default":
        path = model_dir / CHAT_TEMPLATE_FILE
    else:
        path = model_dir / EXTRA_TEMPLATES_DIR / f"{name}.jinja"
    if path.is_file():
        return _read_template_file(path)
    entry = tokenizer_config.get("chat_template")
    if entry is None:
        return None
    if isinstance(entry, str):
        return entry if name == "default" else None
    if isinstance(entry, Mapping):
        named = dict(entry)
    elif isinstance(entry, list) and all(isinstance(e, Mapping) for e in entry):
        named = {e.get("name"): e.get("template") for e in entry}
    else:
        raise ModelError(
            f"tokenizer_config.json: chat_template is a {type(entry).__name__}, "
            "expected a string or a list of {name, template} entries"
        )
    if name not in named:
        if name == "default":
            raise ModelError(
                "tokenizer_config.json has several chat templates and none named 'default': "
                f"{sorted(str(k) for k in named)}"
            )
        return None
    template = named[name]
    if not isinstance(template, str):
        raise ModelError(f"tokenizer_config.json: chat template {name!r} is not a string")
    return template


def _read_template_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ModelError(f"{path}: chat template is not valid UTF-8") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read chat template: {exc.strerror}") from None


def generation_end_markers(template: str) -> list[str]:
    """End-of-turn strings written literally by `template`, to stop generation on.

    The tokenizer's EOS token is not included: templates name it as `eos_token`, and
    the caller knows it anyway.
    """
    found = [marker for marker in _END_MARKERS if marker in template]
    return sorted(found, key=template.index)
