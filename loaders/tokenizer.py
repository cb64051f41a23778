"""The model's tokenizer: tokenizer.json through the `tokenizers` library.

Special tokens and the BOS policy come from tokenizer_config.json and
generation_config.json, as in HF transformers: a raw prompt gets the special
tokens tokenizer.json's post-processor adds; a chat-templated prompt gets none,
because the template writes them itself (no double BOS).
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from tokenizers import Tokenizer as HFTokenizer

from loaders.config import read_json
from loaders.errors import ModelError


T = TypeVar("T")


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict[str, Any] | None = None,
                 source: str = "tokenizer.json") -> None:
        self.tokenizer = tokenizer
        self.source = source  # named in errors
        self._special_texts: list[str] | None = None
        self.config = config or {}
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.bos_id = self.token_id(self.bos_token)
        self.eos_id = self.token_id(self.eos_token)

    @classmethod
    def from_folder(cls, folder: Path) -> "Tokenizer":
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelError(f"{folder}: no tokenizer.json (only fast tokenizers are supported)")
        tokenizer = guarded(str(path), "loading", lambda: HFTokenizer.from_file(str(path)))
        config_path = folder / "tokenizer_config.json"
        config = read_json(config_path) if config_path.is_file() else {}
        return cls(tokenizer, config, str(path))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True, literal: bool = False) -> list[int]:
        """Token ids of text; `literal`: special-token text in it (`<|im_end|>`) is
        tokenized as the plain text it is, not as the special token."""
        if not literal:
            return guarded(self.source, "encoding",
                           lambda: self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
        with _LITERAL_LOCK:  # the switch is the tokenizer's state
            self.tokenizer.encode_special_tokens = True
            try:
                return guarded(self.source, "encoding",
                               lambda: self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
            finally:
                self.tokenizer.encode_special_tokens = False

    @property
    def special_texts(self) -> list[str]:
        """The text of every special added token (what a user could type to forge one)."""
        if self._special_texts is None:
            decoder = self.tokenizer.get_added_tokens_decoder()
            self._special_texts = [t.content for t in decoder.values() if t.special and t.content]
        return self._special_texts

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        return guarded(self.source, "decoding",
                       lambda: self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns generated ids into text pieces as they arrive.

    A piece is only released when it does not end in a partial UTF-8 character
    (U+FFFD), and every piece is the difference between two decodes of the same
    window of ids, so spaces the tokenizer adds or drops at a token boundary come
    out exactly as in `decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: a few tokens of context for the decode
        self.read = 0    # ids before this have been released as text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        # ids before the new window are never decoded again: drop them, so a long
        # generation keeps a few ids here rather than all of them
        del self.ids[:self.read]
        self.prefix, self.read = 0, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """Whatever is still held back at the end (e.g. a truly broken character)."""
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]


def guarded(source: str, doing: str, call: Callable[[], T]) -> T:
    """call() into the `tokenizers` library, whose failures become one ModelError.

    Its Rust code panics on some inputs (a pre-tokenizer regex that backtracks past
    Oniguruma's retry limit, say): the panic arrives as pyo3's PanicException, a
    BaseException, after Rust's panic hook has written its own lines to file
    descriptor 2. So the call runs with fd 2 held aside; what it wrote is passed on
    unless the call failed, when the one-line error says it instead.
    """
    with _stderr_held() as held:
        try:
            return call()
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - PanicException derives from BaseException
            held.discard = True
            what = " ".join(str(exc).split()) or type(exc).__name__
            kind = "panicked" if type(exc).__name__ == "PanicException" else "failed"
            raise ModelError(f"{source}: the tokenizers library {kind} {doing} ({what})") from None


_HELD_LOCK = threading.Lock()
_LITERAL_LOCK = threading.Lock()
_held_file: Any = None


class _Held:
    discard = False


@contextmanager
def _stderr_held() -> Iterator[_Held]:
    """fd 2 pointed at a scratch file for the block; what was written there goes on to
    the real fd 2 at the end unless the block sets `discard`. Other threads' writes in
    that window are delayed, not lost (unless discarded with a panic's)."""
    global _held_file
    with _HELD_LOCK:
        if _held_file is None:
            _held_file = tempfile.TemporaryFile()
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(_held_file.fileno(), 2)
        held = _Held()
        try:
            yield held
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            fd = _held_file.fileno()
            size = os.fstat(fd).st_size
            if size:
                written = os.pread(fd, size, 0)
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)  # fd 2's writes went through this same offset
                if not held.discard:
                    os.write(2, written)


def _token_text(token: Any) -> str | None:
    # tokenizer_config.json stores a special token as a string or as an
    # AddedToken dict {"content": ...}.
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None
