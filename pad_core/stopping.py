"""Stop-string matching over a stream of text deltas.

Text that might be the beginning of a stop string is held back until it is
known not to be one, so a client never sees part of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence


def longest_partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:size]):
                best = size
                break
    return best


class StopStringMatcher:
    """Feed text deltas; get back the text that is safe to emit."""

    def __init__(self, stops: Sequence[str], include_stop: bool = False):
        self.stops = [s for s in stops if s]
        self.include_stop = include_stop
        self.pending = ""
        self.matched: str | None = None

    def feed(self, delta: str) -> str:
        """Returns the text to emit now. After a match, `matched` is set and the
        returned text ends right before the stop string (right after it, with
        `include_stop`: vLLM's include_stop_str_in_output)."""
        if not self.stops:
            return delta
        text = self.pending + delta
        hits = [(text.find(stop), stop) for stop in self.stops]
        # The first stop to complete wins (then the longest of those), so the
        # result does not depend on how the text was split into deltas.
        hits = [(pos + len(stop), pos, stop) for pos, stop in hits if pos >= 0]
        if hits:
            end, pos, self.matched = min(hits)
            self.pending = ""
            return text[:end] if self.include_stop else text[:pos]
        held = longest_partial_stop(text, self.stops)
        self.pending = text[len(text) - held :] if held else ""
        return text[: len(text) - held]

    def flush(self) -> str:
        """At the end of a request: whatever was held back is real text."""
        text, self.pending = self.pending, ""
        return text
