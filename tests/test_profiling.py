"""``mtp.bench.profiling``: the CPU peak-memory count is exact for what it can see."""

from __future__ import annotations

import pytest
import torch

from mtp.bench.profiling import DeviceTimer, LiveTensorBytes, PeakMemory


def test_counts_live_storages_frees_and_views():
    with LiveTensorBytes() as mode:
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(1000)
        assert mode.current_bytes == 8000
        del b
        c = torch.empty(1000)  # often lands on b's freed address: must still count as new
        assert (mode.current_bytes, mode.peak_bytes) == (8000, 8000)
        view = a.view(10, 100)  # same storage: no new bytes
        e = torch.ones(2000)
        assert (mode.current_bytes, mode.peak_bytes) == (16000, 16000)
        del a, view, c, e
        torch.empty(10)
        assert (mode.current_bytes, mode.peak_bytes) == (40, 16000)


def test_resize_in_place_is_counted():
    with LiveTensorBytes() as mode:
        x = torch.empty(0)
        x.resize_(500)
        assert mode.current_bytes == 2000


def test_peak_memory_counts_resident_tensors_and_backward():
    w = torch.randn(256, 256, requires_grad=True)
    x = torch.randn(64, 256)
    with PeakMemory("cpu", [w, x, w[0]]) as peak:  # a view of w counts once
        (x @ w).square().sum().backward()
    assert peak.reading.start_bytes == w.nbytes + x.nbytes
    # The backward ran on autograd's side and still counted: w.grad alone is w.nbytes.
    assert peak.reading.added_bytes >= w.grad.nbytes


def test_peak_memory_rejects_unsupported_device():
    with pytest.raises(ValueError, match="'meta'"):
        PeakMemory("meta").__enter__()


def test_device_timer_uses_given_clock():
    ticks = iter([1.0, 3.5])
    with DeviceTimer("cpu", cpu_clock=lambda: next(ticks)) as timer:
        pass
    assert timer.seconds == 2.5
