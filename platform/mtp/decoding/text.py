"""Token ids -> text for one request: end-of-sequence, stop strings, safe streaming.

Stop strings are matched on decoded text (a stop can span tokens); what is
streamed holds back any tail that could still turn into a stop string, and a
trailing replacement character (half of a UTF-8 character split across tokens),
so a client never receives text that the final result does not contain.
"""

from __future__ import annotations

from mtp.tokenizer import Tokenizer


class TextState:
    """The growing output of one request and why it ended."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str], max_new_tokens: int):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.max_new_tokens = max_new_tokens
        self.tokens: list[int] = []
        self.text = ""
        self.streamed = 0
        self.finish_reason: str | None = None

    def extend(self, new_tokens: list[int]) -> bool:
        """Append accepted tokens; returns True when the request is finished."""
        room = self.max_new_tokens - len(self.tokens)
        new_tokens = new_tokens[:room]
        eos = self.tokenizer.eos_id
        if eos in new_tokens:
            new_tokens = new_tokens[: new_tokens.index(eos)]
            self.finish_reason = "stop"
        searched_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.tokens.extend(new_tokens)
        self.text = self.tokenizer.decode(self.tokens)
        cut = min((i for i in (self.text.find(s, searched_from) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self._truncate(cut)
            self.finish_reason = "stop"
        elif self.finish_reason is None and len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None

    def _truncate(self, cut: int) -> None:
        """Keep the text before a stop string and the tokens that decode within it."""
        self.text = self.text[:cut]
        keep = len(self.tokens)
        while keep and len(self.tokenizer.decode(self.tokens[:keep])) > cut:
            keep -= 1
        del self.tokens[keep:]

    def delta(self) -> str:
        """Text not yet streamed that can no longer change."""
        end = len(self.text)
        if self.finish_reason is None:
            end -= max((k for s in self.stop for k in range(len(s), 0, -1) if self.text.endswith(s[:k])), default=0)
            while end > self.streamed and self.text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.streamed:
            return ""
        out, self.streamed = self.text[self.streamed : end], end
        return out
