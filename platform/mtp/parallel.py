"""Data parallelism that fits the sequential multi-token backward.

The memory-efficient schedule (``mtp.loss.sequential_backward``) calls backward once
per head, once per loss chunk and once for the trunk. ``DistributedDataParallel``
would all-reduce on each of those calls (or refuse to run them), so the model stays
a plain module and gradients are averaged here, once per optimizer step after all
micro-batches, in a few large flat buckets. The FSDP2 path lives in the same module
because it answers the same question: when may a gradient leave its rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

BUCKET_ELEMENTS = 32 * 1024 * 1024


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank and world size of the initialised process group (a single process otherwise)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    import os

    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def broadcast_parameters(model: nn.Module) -> None:
    """Start every rank from rank 0's weights (same seed should agree, this makes sure)."""
    if dist_info().world_size > 1:
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)


def _buckets(tensors: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Group same-dtype tensors into buckets of at most ``limit`` elements (one tensor may exceed it)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        if not buckets or size + t.numel() > limit or buckets[-1][0].dtype != t.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += t.numel()
    return buckets


def all_reduce_gradients(params: list[nn.Parameter], bucket_elements: int = BUCKET_ELEMENTS) -> None:
    """Average ``p.grad`` over ranks with one all-reduce per flat bucket.

    A rank whose parameter got no gradient contributes zeros, so every rank issues
    the same collectives.
    """
    world = dist_info().world_size
    if world == 1:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    for bucket in _buckets(grads, bucket_elements):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a metrics tensor over ranks (in place); a no-op in a single process."""
    if dist_info().world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
