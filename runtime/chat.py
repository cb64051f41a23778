"""A conversation that keeps its tokens in one KV cache across turns.

Each turn renders the whole conversation with the model's chat template,
compares its token ids with the ids the cache holds, keeps the common prefix and
prefills only from the first difference: turn N costs the tokens new since turn
N-1. When the conversation no longer fits the context, the oldest whole turns
(never the system message) are dropped and the rest is prefilled again; a single
turn longer than the context rides the ring buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from loaders.errors import ModelError
from runtime import chat_file, thinking
from runtime.model import Model
from runtime.stop_strings import StopStrings


# llama.cpp's conversation defaults (llama-cli), for a model whose generation_config.json
# says nothing about sampling; a 135M model loops under greedy decoding
CONVERSATION_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
# DRY in the chat's defaults: it measured fewer looping replies (benchmarks/chat_loops.py); with
# llama.cpp's repeat penalty 1.1 (its default until 2024) beside it, none of 60 first replies loop,
# against 3 of 40 with DRY alone: DRY cannot see a loop of one-token lines ("A\n\nA\n\n..."), as
# every newline breaks its sequences, and a repeat penalty can
CHAT_DRY_MULTIPLIER = 0.8
CHAT_REPEAT_PENALTY = 1.1


def conversation_sampling(generation_config: dict[str, Any]) -> dict[str, Any]:
    """The chat's sampling when the user sets none: what generation_config.json asks for,
    read as transformers reads it (do_sample false is greedy; unset fields take
    transformers' defaults: temperature 1, top-k 50, top-p 1), else llama.cpp's."""
    keys = ("do_sample", "temperature", "top_k", "top_p", "min_p")
    given = {k: generation_config[k] for k in keys if generation_config.get(k) is not None}
    if not given:
        return {**CONVERSATION_DEFAULTS, "dry_multiplier": CHAT_DRY_MULTIPLIER, "repeat_penalty": CHAT_REPEAT_PENALTY,
                "source": "llama.cpp's conversation defaults"}
    # transformers' repetition_penalty is the same divide-or-multiply rule
    penalty = float(generation_config.get("repetition_penalty") or 1.0)
    if given.get("do_sample") is False:
        return {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "dry_multiplier": 0.0,
                "repeat_penalty": penalty, "source": "generation_config.json: do_sample false"}
    return {"temperature": float(given.get("temperature", 1.0)), "top_k": int(given.get("top_k", 50)),
            "top_p": float(given.get("top_p", 1.0)), "min_p": float(given.get("min_p", 0.0)),
            "dry_multiplier": 0.0, "repeat_penalty": penalty, "source": "generation_config.json"}


@dataclass
class TurnStats:
    reused_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    dropped_turns: int = 0
    context_used: int = 0
    stop_reason: str = ""


@dataclass
class ChatSession:
    model: Model
    system: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    max_tokens: int = 512
    stop: list[str] = field(default_factory=list)  # strings that end a reply (not kept in it)
    notice: Callable[[str], None] | None = None     # told once when old turns start being dropped
    allow_special: bool = False  # special-token text typed in a message becomes the token (else literal)
    template_context: dict[str, Any] = field(default_factory=dict)  # e.g. enable_thinking (Qwen3's /think)

    def __post_init__(self) -> None:
        self.messages: list[dict[str, str]] = []
        self.cache = self.model.new_cache()
        self.cache_ids: list[int] = []  # the tokens whose keys/values the cache holds
        self._told_dropping = False
        self.last = TurnStats()

    # -- conversation state ----------------------------------------------------
    def reset(self) -> None:
        self.messages = []
        self.cache.reset()
        self.cache_ids = []
        self.last = TurnStats()
        self._told_dropping = False

    def reply_starts_thinking(self) -> bool:
        """The next reply starts inside <think> (the template opened it: DeepSeek-R1's)."""
        text = self.model.render(self.conversation() + [{"role": "user", "content": "x"}],
                                 **self.template_context) if self.model.chat_template else ""
        return thinking.starts_inside(text)

    def conversation(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def save(self, path: Path) -> None:
        """The conversation and its KV cache, to resume without prefilling (runtime.chat_file)."""
        chat_file.save(self, path)

    def load(self, path: Path) -> None:
        """A chat saved by `save` (or JSON messages, prefilled at the next turn); ModelError
        for a file of another model, template or cache dtype, or a damaged one, with the
        session left as it was."""
        chat_file.load(self, path)

    # -- one turn --------------------------------------------------------------
    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the reply; the reply joins the history even if
        the caller stops early (Ctrl-C)."""
        before = list(self.messages)
        self.messages.append({"role": "user", "content": text})
        try:
            ids, dropped = self._fitting_prompt()
            # a message that alone is longer than the context is refused, before the cache is touched
            self.model.fit_prompt(ids, self.max_tokens)
        except ModelError:
            self.messages = before  # the conversation stays as it was, its cache too
            raise
        if dropped and self.notice is not None and not self._told_dropping:
            self._told_dropping = True
            self.notice(f"the conversation no longer fits the context of {self.cache.capacity:,} tokens with "
                        f"room for a reply: its oldest turns are dropped from now on (the system message stays)")
        common = self._reuse_prefix(ids)
        tokens = self.model.tokens(ids[common:], max_tokens=self.max_tokens, cache=self.cache, **self.sampling)
        stats = TurnStats(dropped_turns=dropped)
        stats.reused_tokens, stats.prefilled_tokens = common, len(ids) - common
        reply = {"role": "assistant", "content": ""}
        self.messages.append(reply)
        decoder = self.model.tokenizer.stream_decoder()
        stops = StopStrings(self.stop)
        generated: list[int] = []
        try:
            for token in tokens:
                generated.append(token)
                piece = stops.push(decoder.push(token))
                reply["content"] += piece
                if piece:
                    yield piece
                if stops.hit:
                    tokens.close()
                    self.model.stats.stop_reason = "stop"
                    break
            tail = stops.push(decoder.flush()) + stops.flush()
            reply["content"] += tail
            if tail:
                yield tail
        finally:
            # only tokens whose forward pass finished are in the cache
            self.cache_ids = (ids + generated)[:self.cache.offset] if not self.cache.wrapped else []
            s = self.model.stats
            stats.generated_tokens = len(generated)
            stats.prefill_tps, stats.decode_tps = s.prefill_tps, s.decode_tps
            stats.stop_reason = s.stop_reason or "interrupted"
            stats.context_used = min(self.cache.offset, self.cache.capacity)
            self.last = stats

    def _fitting_prompt(self) -> tuple[list[int], int]:
        """Token ids of the conversation, dropping the oldest turns until it fits."""
        capacity = self.cache.capacity
        dropped = 0
        while True:
            ids = self.model.encode_chat(self.conversation(), allow_special=self.allow_special,
                                         **self.template_context)
            room = capacity - len(ids)
            if room >= min(self.max_tokens, capacity // 4) or len(self.messages) <= 1:
                return ids, dropped
            # drop the oldest exchange (a user turn and the replies up to the next user turn)
            cut = next((i for i, m in enumerate(self.messages[1:], 1) if m["role"] == "user"), len(self.messages) - 1)
            del self.messages[:cut]
            dropped += 1

    def _reuse_prefix(self, ids: list[int]) -> int:
        """Keep the cached tokens that the new prompt starts with; returns how many."""
        if self.cache.wrapped:
            self.cache.reset()
            self.cache_ids = []
        common = 0
        for a, b in zip(self.cache_ids, ids):
            if a != b:
                break
            common += 1
        # at least one token must go through the model to give the next logits
        common = min(common, len(ids) - 1)
        self.cache.truncate(common)
        self.cache_ids = self.cache_ids[:common]
        return common
