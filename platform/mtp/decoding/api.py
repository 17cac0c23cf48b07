"""The decoding contract shared by the engine, evaluation and Serve.

``Engine`` (``mtp.decoding.engine``) turns prompts into ``Generation`` results under
``SamplingParams``; Serve and the evaluator depend on these types only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal


class RequestError(ValueError):
    """A request the engine cannot decode. ``field`` names the culprit (a ``SamplingParams``
    field or ``prompt``) and ``code`` the kind, so a server can answer without re-checking."""

    def __init__(self, message: str, field: str, code: str = "invalid_value"):
        super().__init__(message)
        self.field, self.code = field, code


def derive_seed(*parts: object) -> int:
    """A request seed from what identifies the draw (e.g. base seed, prompt, draw index): every
    prompt and draw gets its own random stream, and a rerun the same ones."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


@dataclass
class SamplingParams:
    """Per-request decoding settings (OpenAI-style names)."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    speculative: bool = True  # draft with the extra heads; False: head 0 only

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens={self.max_new_tokens} must be >= 1", "max_new_tokens")
        if self.temperature < 0:
            raise RequestError(f"temperature={self.temperature} must be >= 0", "temperature")
        if self.top_k is not None and self.top_k < 1:
            raise RequestError(f"top_k={self.top_k} must be >= 1", "top_k")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p={self.top_p} must be in (0, 1]", "top_p")


@dataclass
class GenerationStats:
    """How much the heads accelerated one sequence."""

    forwards: int = 0  # model forwards after the prefill (verification or vanilla steps)
    generated_tokens: int = 0
    accepted_histogram: list[int] = field(default_factory=list)  # [k] = steps that accepted k drafts
    elapsed_s: float = 0.0
    prefill_s: float = 0.0  # admission to first token (the prompt's forward)

    @property
    def tokens_per_forward(self) -> float:
        """Tokens each decode forward yielded (accepted drafts + 1), before any cut at a stop or max tokens."""
        steps = sum(self.accepted_histogram)
        return sum((k + 1) * n for k, n in enumerate(self.accepted_histogram)) / steps if steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class Generation:
    prompt_tokens: list[int]
    tokens: list[int]  # generated ids, stop sequence excluded
    text: str
    finish_reason: Literal["stop", "length"]
    stats: GenerationStats
