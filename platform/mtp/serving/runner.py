"""Run engine steps one at a time off the event loop, and notice when one hangs.

On a CPU two concurrent forwards only fight over the same cores, and a GPU
gains nothing from them either, so every engine call (one scheduling step of the
running batch) goes to one dedicated worker thread, in order. The replica's event
loop keeps accepting requests and relaying streamed text meanwhile; new requests
join the batch at the next step. ``busy_for`` feeds Serve's health check: one
step running for minutes means the engine is stuck.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


class EngineRunner:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._started: float | None = None

    async def run(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` on the engine thread, after the calls queued before it."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._timed, fn, *args)

    def _timed(self, fn: Callable[..., T], *args) -> T:
        self._started = time.monotonic()
        try:
            return fn(*args)
        finally:
            self._started = None

    def busy_for(self) -> float:
        """Seconds the current engine call has been running (0 when idle)."""
        started = self._started
        return time.monotonic() - started if started is not None else 0.0
