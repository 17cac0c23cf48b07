"""Which device a process computes on: the one place ``"auto"`` becomes cuda or cpu."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def resolve_device(name: str | None = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` (or None): this rank's GPU when one is visible, else the CPU.

    A bare ``"cuda"`` also picks this rank's GPU (``local_rank`` modulo the visible
    GPUs), so ranks sharing a node do not share a device; ``"cuda:N"`` and ``"cpu"``
    are taken as given. Asking for CUDA where none is visible is an error, not a
    silent fall back to a CPU run hundreds of times slower.
    """
    name = name or "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but no CUDA device is visible")
    if name == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore the caller's setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
