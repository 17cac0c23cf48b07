"""Run engine calls one at a time off the event loop, and notice when one hangs.

The engine owns preallocated caches and is not re-entrant, and on a CPU two
concurrent forwards only fight over the same cores, so calls are serialised. They
run in worker threads so the replica's event loop keeps accepting, batching and
streaming while the engine computes; ``busy_for`` feeds Serve's health check.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")


class EngineRunner:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started: float | None = None

    def call(self, fn: Callable[..., T], *args) -> T:
        """Run ``fn(*args)`` while holding the engine (blocking; use from a thread)."""
        with self._lock:
            self._started = time.monotonic()
            try:
                return fn(*args)
            finally:
                self._started = None

    async def run(self, fn: Callable[..., T], *args) -> T:
        """``call`` in a worker thread, awaited from the event loop."""
        return await asyncio.to_thread(self.call, fn, *args)

    def busy_for(self) -> float:
        """Seconds the current engine call has been running (0 when idle)."""
        started = self._started
        return time.monotonic() - started if started is not None else 0.0
