"""Stop strings: end generation at any of a few strings, which the client never sees.

A stop string may span several tokens, so text is held back while its end could
be the start of a stop string, and released once it cannot (as llama-server and
vLLM do). `push` returns the text that is safe to show.
"""

from __future__ import annotations

from typing import Sequence


class StopStrings:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.hit = False

    def push(self, text: str) -> str:
        """The part of held + text that can be shown; sets `hit` at a stop string."""
        if self.hit:
            return ""
        text = self.held + text
        found = [(text.find(s), s) for s in self.stops if s in text]
        if found:
            self.hit = True
            self.held = ""
            return text[:min(i for i, _ in found)]
        keep = max((partial_overlap(text, s) for s in self.stops), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """What is still held back when generation ends without a stop string."""
        held, self.held = ("" if self.hit else self.held), ""
        return held


def partial_overlap(text: str, stop: str) -> int:
    """The length of the longest end of text that is a proper start of stop (what must be
    held back while the rest of stop may still come; also the thinking tags')."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0
