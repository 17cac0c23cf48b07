"""The verdict for one program: the only thing that leaves the sandbox."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal

Status = Literal["passed", "failed", "timed_out", "crashed"]
STATUSES: tuple[str, ...] = ("passed", "failed", "timed_out", "crashed")


@dataclass
class Verdict:
    """``passed`` only when the program's code ran to its end and the harness said so.

    ``detail`` names why it did not pass: the exception, the signal, or the limit hit.
    """

    status: Status
    detail: str = ""
    stdout: str = ""
    stderr: str = ""
    output_truncated: bool = False
    exit_code: int | None = None
    signal: str | None = None
    duration_s: float = 0.0
    isolation: Literal["full", "insecure"] = "full"
    # trusted: decided by a process that never ran the completion; inprocess: by the program's own
    # process (forgeable, see the README); fallback: trusted was asked for, the tests needed in-process
    oracle: Literal["trusted", "inprocess", "fallback"] = "inprocess"

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> "Verdict":
        if data.get("status") not in STATUSES:
            raise ValueError(f"not a verdict status: {data.get('status')!r}")
        return cls(**data)
