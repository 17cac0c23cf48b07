"""Measurements behind ``jobs/bench_training.py`` (the job only parses arguments and prints).

``schedules``: what multi-token training costs against next-token training, per schedule;
``loop``: what the training loop costs around that work, in process and on Ray Train.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore the caller's setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
