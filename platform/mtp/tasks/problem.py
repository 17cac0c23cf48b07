"""One generated problem: what the model is prompted with, the answer, and its training text."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    document: str | None = None  # training text when it is more than prompt + answer (a whole story)

    @property
    def text(self) -> str:
        return self.document if self.document is not None else self.prompt + self.answer
