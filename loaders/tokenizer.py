"""The model's tokenizer: tokenizer.json through the `tokenizers` library.

Special tokens and the BOS policy come from tokenizer_config.json and
generation_config.json, as in HF transformers: a raw prompt gets the special
tokens tokenizer.json's post-processor adds; a chat-templated prompt gets none,
because the template writes them itself (no double BOS).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from tokenizers import Tokenizer as HFTokenizer

from loaders.config import read_json
from loaders.errors import ModelError


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
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
        try:
            tokenizer = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises a bare Exception
            raise ModelError(f"{path}: cannot load tokenizer ({exc})") from None
        config_path = folder / "tokenizer_config.json"
        config = read_json(config_path) if config_path.is_file() else {}
        return cls(tokenizer, config)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

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


def _token_text(token: Any) -> str | None:
    # tokenizer_config.json stores a special token as a string or as an
    # AddedToken dict {"content": ...}.
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None
