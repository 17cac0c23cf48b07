"""Which device a process computes on (the one place ``"auto"`` becomes cuda or cpu), and
what it can do at most: the datasheet peak that every MFU in the platform is against."""

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


# Dense bf16 tensor-core peaks (FLOP/s, without sparsity) from the vendors' datasheets,
# keyed by a piece of the name CUDA reports. The first piece found in the name wins, so
# the PCIe and NVL H100s come before the SXM one ("NVIDIA H100 80GB HBM3"), L40S before L4.
DATASHEET_BF16_FLOPS: dict[str, float] = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989.4e12,  # SXM
    "H200": 989.4e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
}


def datasheet_peak_flops(device: torch.device | str) -> float | None:
    """The device's dense bf16 datasheet peak, or None (a CPU, an unlisted GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(name: str) -> float | None:
    return next((flops for key, flops in DATASHEET_BF16_FLOPS.items() if key in name), None)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation, the one definition every stage uses: the model's training
    FLOPs per token (``mtp.model.training_flops_per_token``: 6N plus causal attention)
    times tokens per second of whole optimizer steps, over the devices' datasheet peak.
    None without a peak: a measured matmul peak is reported beside it, never under it."""
    if not peak_flops:
        return None
    return tokens_per_s * flops_per_token / (peak_flops * devices)
