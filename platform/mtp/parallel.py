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
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

BUCKET_ELEMENTS = 32 * 1024 * 1024
SHARDS = "shards"  # FSDP checkpoints: torch.distributed.checkpoint files of model + optimizer shards


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


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def shard_blocks(model: nn.Module) -> None:
    """FSDP2: ``fully_shard`` every transformer block (trunk and heads).

    The sequential schedule runs each block's backward exactly once per micro-batch
    (trunk blocks in the trunk backward, head ``i`` in its own), so with gradient
    sync enabled only on the last micro-batch each block reduce-scatters once per
    step. The embedding, shared norm and unembedding stay replicated: the
    unembedding's backward runs once per loss chunk per head, so it is synced with
    one all-reduce per step instead (``all_reduce_gradients``). Blocks hold nearly
    all parameters at the sizes that need sharding (7B: 98%).
    """
    from torch.distributed.fsdp import fully_shard

    for block in (*model.trunk_layers, *model.heads):
        fully_shard(block)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Let FSDP2 blocks reduce-scatter on their next backward (the step's last micro-batch)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(enabled, recurse=False)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to a global L2 norm over replicated and FSDP-sharded gradients; returns the norm.

    Sharded gradients contribute the squares of their local shards, summed over
    ranks with one all-reduce; replicated gradients are already identical everywhere.
    The squares and the scaling run as multi-tensor (foreach) kernels. The sum stays
    one tensor at a time, in order: ``torch.nn.utils.clip_grad_norm_`` takes the norm
    of per-tensor norms, which rounds differently and moved the stored loss trace
    (tests/loss_trace.json) by 1.7e-5 within 30 steps.
    """
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    local = [g.to_local() if is_sharded(g) else g for g in grads]
    sums = {True: torch.zeros((), device=device, dtype=torch.float32), False: torch.zeros((), device=device, dtype=torch.float32)}
    for g, square in zip(grads, torch._foreach_pow([t.float() for t in local], 2)):
        sums[is_sharded(g)] += square.sum()
    if any(is_sharded(g) for g in grads):
        all_reduce_sum(sums[True])
    total = (sums[True] + sums[False]).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in local:  # a DTensor's local shard is a view of it: scaling the shard scales the gradient
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype, group in by_dtype.items():
        torch._foreach_mul_(group, coef.to(dtype))
    return total


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a metrics tensor over ranks (in place); a no-op in a single process."""
    if dist_info().world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gather the unsharded weights on CPU (a collective; every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Each rank writes its own model and optimizer shards (``torch.distributed.checkpoint``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(directory))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Load what ``save_sharded`` wrote, resharding to the current world if it changed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not directory.is_dir():
        raise FileNotFoundError(f"{str(directory)!r} is missing: the checkpoint was not saved with strategy=fsdp")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
