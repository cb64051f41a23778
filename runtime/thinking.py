"""A thinking model's reply split into its reasoning and its answer, as the text streams.

Qwen3 and DeepSeek-R1 write their reasoning between `<think>` and `</think>` before the
answer; DeepSeek-R1's template opens the tag itself, in the generation prompt, so the
reply starts inside it. The tags may arrive split over several pieces, so text that could
be the start of a tag is held back until it cannot (as stop strings are).
"""

from __future__ import annotations

from runtime.stop_strings import partial_overlap

OPEN, CLOSE = "<think>", "</think>"


def thinks(template: str | None) -> bool:
    """Whether a chat template is a thinking model's (it writes or strips <think>)."""
    return bool(template) and CLOSE in template


def can_toggle(template: str | None) -> bool:
    """Whether the template reads `enable_thinking` (Qwen3's switch)."""
    return bool(template) and "enable_thinking" in template


def starts_inside(prompt_text: str) -> bool:
    """The generation prompt already opened the reasoning (DeepSeek-R1's template)."""
    tail = prompt_text.rstrip()
    return tail.endswith(OPEN)


class ThinkingSplitter:
    """push(text) -> [(kind, text)] with kind "thinking" or "answer"; the tags themselves
    are not part of either."""

    def __init__(self, inside: bool = False) -> None:
        self.inside = inside
        self.held = ""
        self.seen_open = inside

    def push(self, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        text = self.held + text
        self.held = ""
        while text:
            tag = CLOSE if self.inside else OPEN
            at = text.find(tag)
            if at >= 0 and (self.inside or not self.seen_open):
                if at:
                    out.append((self._kind(), text[:at]))
                text = text[at + len(tag):]
                self.inside = not self.inside
                self.seen_open = True
                continue
            if not self.inside and self.seen_open:  # the answer: no tag to look for anymore
                out.append(("answer", text))
                break
            keep = partial_overlap(text, tag)
            if len(text) > keep:
                out.append((self._kind(), text[:len(text) - keep]))
            self.held = text[len(text) - keep:]
            break
        return [(k, t) for k, t in out if t]

    def flush(self) -> list[tuple[str, str]]:
        held, self.held = self.held, ""
        return [(self._kind(), held)] if held else []

    def _kind(self) -> str:
        return "thinking" if self.inside else "answer"
