"""Incremental detokenization with stop strings, for streaming and for final text."""

from __future__ import annotations

from collections.abc import Callable


class TextAssembler:
    """Turns a growing list of token ids into text pieces, cut at the first stop string.

    A piece is held back while it could still be the start of a stop string, or while it
    ends in an incomplete UTF-8 sequence (shown by the tokenizer as U+FFFD).
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]) -> None:
        self.decode = decode
        self.stop = stop
        self.ids: list[int] = []
        self.emitted = 0  # characters of text already handed out
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append a token; return the text that is now safe to show (maybe '')."""
        self.ids.append(token_id)
        self.text = self.decode(self.ids)
        for s in self.stop:
            at = self.text.find(s)
            if at != -1:
                self.text, self.stopped = self.text[:at], True
        if self.stopped:
            return self._take(len(self.text))
        hold = max((len(s) - 1 for s in self.stop), default=0)
        safe = len(self.text) - hold
        # byte-fallback tokenizers show one U+FFFD per byte of an unfinished character
        safe = min(safe, len(self.text.rstrip("\ufffd")))
        return self._take(safe)

    def flush(self) -> str:
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted:upto], upto
        return piece
