"""Peak memory and step time, measured the same way on CPU and on CUDA.

On CUDA the caching allocator keeps the books: ``torch.cuda.max_memory_allocated``
is the peak of bytes held by live tensors, and CUDA events time the device work.

The CPU allocator keeps no statistics (and ``tracemalloc`` does not see it; peak RSS
mixes in the allocator's cache and everything else in the process). So on CPU,
``LiveTensorBytes`` counts the same quantity the CUDA allocator reports: it is a
``TorchDispatchMode`` that sees every ATen op below autograd (the backward's ops too,
since the engine carries the mode to its thread), records each output's storage, and
re-adds the bytes of the still-live storages whenever a new one appears. A storage
is live until its last reference goes (a weak reference to the ``StorageImpl`` says
when), which is exactly when its memory returns to the allocator. It misses only
scratch space a kernel allocates internally (the CUDA count includes workspaces),
and it costs a Python call per op, so use it for a measured step, not every step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Tracks bytes of live tensor storages; ``peak_bytes`` is their maximum over time.

    Tensors that existed before the mode was entered are invisible unless passed to
    ``track`` (parameters, optimizer state, the batch): the mode only sees op outputs.
    Storages shared by views count once.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current_bytes = 0
        self.peak_bytes = 0

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count already-existing tensors (views of one storage count once)."""
        self._add(tensors)

    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now."""
        self._sweep()
        self.peak_bytes = self.current_bytes

    def _sweep(self) -> None:
        dead = [key for key, (ref, _) in self._live.items() if ref.expired()]
        for key in dead:
            self.current_bytes -= self._live.pop(key)[1]

    def _add(self, tensors: Iterable[Any]) -> None:
        storages = [
            t.untyped_storage() for t in tensors if isinstance(t, torch.Tensor) and t.device.type != "meta"
        ]
        if all(self._counted(s) for s in storages):
            return
        # Frees only lower the count, so sampling just before each allocation is
        # enough for an exact peak; dropping dead storages first also keeps a reused
        # address from being mistaken for a storage that is already counted.
        self._sweep()
        for s in storages:
            old = self._live.get(s._cdata)
            nbytes = s.nbytes()  # an existing storage may have been resized in place
            self.current_bytes += nbytes - (old[1] if old else 0)
            self._live[s._cdata] = (old[0] if old else StorageWeakRef(s), nbytes)
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def _counted(self, storage: torch.UntypedStorage) -> bool:
        entry = self._live.get(storage._cdata)
        return entry is not None and not entry[0].expired() and entry[1] == storage.nbytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._add(tree_leaves(out))
        return out


@dataclass
class MemoryReading:
    """Bytes live when the region started, and at most during it."""

    start_bytes: int = 0
    peak_bytes: int = 0

    @property
    def added_bytes(self) -> int:
        """Peak above the starting point: what the region itself needed."""
        return self.peak_bytes - self.start_bytes


class PeakMemory:
    """``with PeakMemory(device, resident) as m: ...`` then read ``m.reading``.

    On CUDA it reads the allocator's statistics (``resident`` is ignored: the
    allocator already counts everything). On CPU it runs the region under
    ``LiveTensorBytes``, counting ``resident`` tensors (parameters, optimizer state,
    inputs) as live from the start.
    """

    def __init__(self, device: torch.device | str, resident: Iterable[torch.Tensor] = ()) -> None:
        self.device = torch.device(device)
        self._resident = list(resident)
        self._mode: LiveTensorBytes | None = None
        self.reading = MemoryReading()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.reading.start_bytes = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu":
            self._mode = LiveTensorBytes()
            self._mode.track(self._resident)
            self._mode.reset_peak()
            self.reading.start_bytes = self._mode.current_bytes
            self._mode.__enter__()
        else:
            raise ValueError(f"peak memory is measured on 'cpu' or 'cuda', not {self.device.type!r}")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self.reading.peak_bytes = self._mode.peak_bytes
            self._mode = None
        else:
            torch.cuda.synchronize(self.device)
            self.reading.peak_bytes = torch.cuda.max_memory_allocated(self.device)


class DeviceTimer:
    """Seconds of a region's device work: CUDA events on GPU, ``cpu_clock`` on CPU.

    ``cpu_clock=time.process_time`` counts only this process's CPU time, which keeps
    comparisons steady on a shared machine (run with one intra-op thread, or it
    sums the threads' time).
    """

    def __init__(self, device: torch.device | str, cpu_clock: Callable[[], float] = time.perf_counter) -> None:
        self.device = torch.device(device)
        self.cpu_clock = cpu_clock
        self.seconds = 0.0

    def __enter__(self) -> "DeviceTimer":
        if self.device.type == "cuda":
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = self.cpu_clock()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1e3
        else:
            self.seconds = self.cpu_clock() - self._t0
