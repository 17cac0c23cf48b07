"""CUDA graphs for decode steps: capture each step shape once, then replay it.

At small batch sizes a decode step is a few hundred tiny kernels, and launching
them from Python costs more than running them. A captured graph replays them in
one launch. A step's shapes must not change between replays, which the engine
ensures with ``static_shapes`` (attention over the whole masked cache) and fixed
per-kind buffers; a graph is keyed by the step kind and the batch size.
"""

from __future__ import annotations

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


def _restore(state: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
    for t, v in zip(state, saved):
        t.copy_(v)
