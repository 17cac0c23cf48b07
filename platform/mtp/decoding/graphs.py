"""Compiled and captured decode steps: build each step shape once, then reuse it.

At small batch sizes a decode step is a few hundred tiny kernels, and launching
them from Python costs more than running them. ``CudaGraphs`` replays a captured
step in one launch; ``CompiledSteps`` runs it as ``torch.compile``'s fused code
(on a CPU too). Either needs a step's shapes to stay the same between calls, which
the engine ensures with ``static_shapes`` (attention over the whole masked cache)
and fixed per-kind buffers; a step is keyed by its kind and its batch size.
"""

from __future__ import annotations

import time
from typing import Callable, Hashable, Sequence, TypeVar

import torch

Out = TypeVar("Out")


class CudaGraphs:
    """Captured steps, sharing one memory pool (replays never overlap)."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, object]] = {}
        self._pool = None

    def run(self, key: Hashable, step: Callable[[], Out], state: Sequence[torch.Tensor]) -> Out:
        """Replay ``step``'s graph for ``key``, capturing it first if needed.

        ``step`` updates ``state`` in place (the rows' tokens and lengths); warm-up
        runs happen for real, so ``state`` is restored after them. Their cache writes
        land in slots past each row's length, which a real step overwrites before
        they are ever attended to.
        """
        if key not in self._graphs:
            saved = [t.clone() for t in state]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):  # cuBLAS/allocator set-up must happen outside capture
                    step()
                    _restore(state, saved)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = step()
            _restore(state, saved)
            self._pool = graph.pool()
            self._graphs[key] = (graph, out)
        graph, out = self._graphs[key]
        graph.replay()
        return out  # type: ignore[return-value]


class CompiledSteps:
    """``torch.compile`` of a step function ``step(rows, batch_size)``, one graph per kind and batch size.

    Graphs are specialised on the step kind (its rows object) and the batch size, so
    the compile-cache limit is raised for this function's calls only. ``compile_s``
    adds up the first call of every kind and size: compiling, not decoding.
    """

    RECOMPILE_LIMIT = 64  # step kinds x batch buckets

    def __init__(self, step: Callable[..., Out]):
        self._step = torch.compile(step, dynamic=False)
        self._seen: set[tuple[int, int]] = set()
        self.compile_s = 0.0

    def __call__(self, rows: object, batch_size: int) -> Out:
        key = (id(rows), batch_size)
        start = time.perf_counter()
        with torch._dynamo.config.patch(recompile_limit=self.RECOMPILE_LIMIT):
            out = self._step(rows, batch_size)
        if key not in self._seen:
            self._seen.add(key)
            self.compile_s += time.perf_counter() - start
        return out


def _restore(state: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
    for t, v in zip(state, saved):
        t.copy_(v)
