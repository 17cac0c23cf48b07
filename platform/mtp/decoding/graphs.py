"""Compiled and captured decode steps: build each step shape once, then reuse it.

At small batch sizes a decode step is a few hundred tiny kernels, and launching
them from Python costs more than running them. ``CudaGraphs`` replays a captured
step in one launch; ``CompiledSteps`` runs it as ``torch.compile``'s fused code
(on a CPU too). A captured step needs its shapes to stay the same between calls,
which the engine ensures with ``static_shapes`` (attention over the whole masked
cache) and fixed per-kind buffers; a compiled step instead takes the attended cache
length as a dynamic size, so it attends over the filled part only. Either is keyed
by its kind and its batch size.
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
    """``torch.compile`` of a step function ``step(rows, batch_size, slots)``, one graph per kind and batch size.

    Graphs are specialised on the step kind (its rows object) and the batch size, so
    the compile-cache limit is raised for this function's calls only; the length of
    ``slots`` (the attended cache slots, ``2 .. max_slots``) is a dynamic size, so one
    graph serves every cache length. Once a kind and size is compiled, its calls
    evaluate only the guards that tell the compiled graphs apart (torch's
    ``skip_guard_eval_unsafe``): the full set re-checks every packed weight at each
    step, about 0.2 ms on a CPU, and nothing it checks changes between steps.
    ``compile_s`` adds up the first call of every kind and size: compiling, not decoding.
    """

    RECOMPILE_LIMIT = 64  # step kinds x batch buckets

    def __init__(self, step: Callable[..., Out], max_slots: int):
        self._step = torch.compile(step, dynamic=False)
        self._max_slots = max_slots
        self._seen: set[tuple[int, int]] = set()
        self.compile_s = 0.0

    def __call__(self, rows: object, batch_size: int, slots: torch.Tensor) -> Out:
        key = (id(rows), batch_size)
        warm = key in self._seen
        start = time.perf_counter()
        torch._dynamo.mark_dynamic(slots, 0, min=2, max=self._max_slots)
        with torch._dynamo.config.patch(recompile_limit=self.RECOMPILE_LIMIT), \
                torch.compiler.set_stance("default", skip_guard_eval_unsafe=warm):
            out = self._step(rows, batch_size, slots)
        if not warm:
            self._seen.add(key)
            self.compile_s += time.perf_counter() - start
        return out


def _restore(state: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
    for t, v in zip(state, saved):
        t.copy_(v)
