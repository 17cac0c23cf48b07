"""Per-program resource limits: the one knob set shared by the CLI, the evaluator and tests."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Limits:
    """What one program (and every process it starts) may use.

    Memory and processes are limits on the whole process tree (cgroups), not per
    process: eight children of 160 MiB each must not get past a 512 MiB limit.
    """

    timeout_s: float = 10.0  # wall clock, the whole tree
    cpu_s: float | None = None  # CPU seconds per process; None: timeout_s + 1
    memory_mb: int = 512  # whole tree (cgroup), including its tmpfs scratch files
    max_processes: int = 32  # whole tree, the program itself included
    output_bytes: int = 64 * 1024  # kept per stream (stdout, stderr); the rest is discarded
    file_size_mb: int = 16  # largest file it may write
    open_files: int = 64

    def validate(self) -> "Limits":
        for name in ("timeout_s", "memory_mb", "max_processes", "output_bytes", "file_size_mb", "open_files"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"Limits.{name}={value!r} must be a positive number")
        if self.cpu_s is not None and self.cpu_s <= 0:
            raise ValueError(f"Limits.cpu_s={self.cpu_s!r} must be positive or None")
        if self.memory_mb < 16:
            raise ValueError(f"Limits.memory_mb={self.memory_mb} is too small to start Python (>= 16)")
        return self

    @property
    def cpu_seconds(self) -> int:
        return math.ceil(self.cpu_s if self.cpu_s is not None else self.timeout_s + 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Limits":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown Limits fields: {sorted(unknown)}")
        return cls(**data).validate()
