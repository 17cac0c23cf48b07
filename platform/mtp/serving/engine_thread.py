"""Step the engine on one dedicated thread, off the event loop, and notice when a step hangs.

On a CPU two concurrent forwards only fight over the same cores, and a GPU gains
nothing from them either, so all engine work runs on one worker thread: steps of
the engine's running batch, back to back while it has work. Requests are
submitted to the engine from the replica's event loop meanwhile (thread-safe) and
join the batch at the next step, without a thread hop per step. ``busy_for``
feeds Serve's health check: one step running for minutes means the engine is stuck.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable


class EngineRunner:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._started: float | None = None

    async def run_until_idle(self, step: Callable[[], bool]) -> None:
        """Call ``step`` on the engine thread until it returns False (nothing left to do);
        an exception ends the run and propagates."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._steps, step)

    def _steps(self, step: Callable[[], bool]) -> None:
        try:
            while True:
                self._started = time.monotonic()
                if not step():
                    return
        finally:
            self._started = None

    def busy_for(self) -> float:
        """Seconds the current engine step has been running (0 when idle)."""
        started = self._started
        return time.monotonic() - started if started is not None else 0.0
