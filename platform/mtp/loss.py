"""Multi-token losses and the memory-efficient sequential backward.

The loss is ``sum_i w_i * CE_i``, where ``CE_i`` is head ``i``'s mean cross-entropy
over its valid (non-ignored) targets. Two schedules compute the same gradients:

* ``naive_loss``: every head's logits at once, one backward. Peak memory grows with
  ``n_future`` (``n`` full ``[B, T, V]`` logits tensors).
* ``sequential_backward``: the paper's schedule. The trunk runs forward once; each
  head then runs forward and backward on the detached trunk output, accumulating
  that output's gradient; one trunk backward ends the step. Each head's loss is
  computed in chunks of positions, backpropagated chunk by chunk, so not even one
  head's full logits tensor exists.
* ``batched_loss``: the schedule for the GPU's FLOP floor. The heads run as one
  batched computation (``MTPTransformer.heads_batched``) and the shared
  unembedding + cross-entropy is fused (``linear_cross_entropy``): chunk by chunk of
  positions it computes the logits, the loss and their gradients at once, so no
  ``[B, T, V]`` logits tensor exists and no separate pass reads one. One backward
  for the whole step. It holds every head block's activations at once, as ``naive``
  does; with ``param_matched`` heads that is what the next-token model's replaced
  trunk blocks hold, and without the logits the peak stays below ``n=1``'s. Its
  chunk function is the unit ``torch.compile`` fuses (``compile_chunks=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import functools

import torch
import torch.nn.functional as F

from mtp.model import MTPTransformer
from mtp.packing import LOSS_MASK_FLAG

IGNORE_INDEX = -100
MIN_CHUNK_ROWS = 512  # the fused loss's default chunk, at least (see linear_cross_entropy)


def mtp_targets(tokens: torch.Tensor, n_future: int, pad_id: int | None = None, *, next_token_only: bool = False,
                masked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a block ``[B, T+1]`` into inputs ``[B, T]`` and per-head targets ``[n, B, T]``.

    Head ``i`` at position ``t`` targets ``tokens[t + 1 + i]`` (``tokens[t + 1]`` for
    every head with ``next_token_only``: the control that keeps the extra heads and
    compute but not the lookahead); positions past the block's end, and targets equal to
    ``pad_id``, are ``IGNORE_INDEX``. With ``masked``, tokens carrying ``LOSS_MASK_FLAG``
    (a task's prompt, ``mtp.packing``) are inputs only, never targets.
    """
    if masked:
        keep = tokens < LOSS_MASK_FLAG
        tokens = tokens.where(keep, tokens - LOSS_MASK_FLAG)
    inputs = tokens[:, :-1]
    B, T = inputs.shape
    targets = torch.full((n_future, B, T), IGNORE_INDEX, dtype=torch.long, device=tokens.device)
    for i in range(min(n_future, T)):
        shift = 0 if next_token_only else i
        targets[i, :, : T - shift] = tokens[:, 1 + shift :]
        if masked:
            targets[i, :, : T - shift].masked_fill_(~keep[:, 1 + shift :], IGNORE_INDEX)
    if pad_id is not None:
        targets.masked_fill_(targets == pad_id, IGNORE_INDEX)  # not boolean indexing: that waits for the device
    return inputs, targets


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in at least fp32 (bf16 logits lose too much in the softmax)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _weights(n_future: int, head_weights: Sequence[float] | None) -> list[float]:
    """Per-head loss weights; the paper's plain sum when none are given."""
    return [1.0] * n_future if head_weights is None else [float(w) for w in head_weights]


@dataclass
class StepLosses:
    """Detached per-head mean cross-entropies of one forward/backward."""

    head_losses: torch.Tensor  # [n_future]
    loss: torch.Tensor  # weighted sum, the optimised objective


def naive_loss(
    model: MTPTransformer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    head_weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, StepLosses]:
    """Reference schedule: every head's logits alive at once; returns the loss (with graph).

    The heads' logits are not stacked into one tensor (that copy would add another
    ``n`` logits tensors), so this is the plain schedule at its best; for
    ``n_future=1`` it is the ordinary next-token step.
    """
    h = model.trunk(inputs)
    per_head = torch.stack(
        [
            F.cross_entropy(_upcast(model.logits(model.head(i, h)).flatten(0, 1)), tg.flatten(), ignore_index=IGNORE_INDEX)
            for i, tg in enumerate(targets)
        ]
    )
    weights = torch.tensor(_weights(len(per_head), head_weights), device=per_head.device, dtype=per_head.dtype)
    loss = (weights * per_head).sum()
    return loss, StepLosses(per_head.detach(), loss.detach())


def _ce_and_grad_(logits: torch.Tensor, targets: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Summed CE of ``logits [N, V]``; overwrites them with ``scale * dCE/dlogits``.

    The gradient is ``softmax - onehot`` (zero on ignored rows), written in place: what
    autograd's log_softmax + nll_loss backward computes, without their ``[N, V]``
    intermediates (the saved log-probabilities, a zero-filled gradient, its result),
    which are most of a head's memory and much of its non-matmul time.
    """
    valid = targets != IGNORE_INDEX
    safe_targets = targets.where(valid, 0).unsqueeze(-1)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    ce = ((lse - logits.gather(-1, safe_targets)).squeeze(-1) * valid).sum()
    row_valid = valid.unsqueeze(-1).to(logits.dtype)
    probs = logits.sub_(lse).exp_()
    probs.scatter_add_(-1, safe_targets, -row_valid)
    probs.mul_(row_valid * scale)
    return ce


def _chunked_ce_backward(
    model: MTPTransformer,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    scale: float | torch.Tensor,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backpropagate ``scale * sum CE`` of ``logits(hidden)`` chunk by chunk.

    ``hidden`` is a detached ``[B, T, D]`` activation. Returns (the gradient with
    respect to it, the summed CE). The shared norm/unembedding accumulate their
    parameter gradients; only one chunk's logits are alive at a time, and they hold
    their own gradient (see ``_ce_and_grad_``).
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    grad = torch.empty_like(flat)
    total = torch.zeros((), device=hidden.device, dtype=torch.promote_types(hidden.dtype, torch.float32))
    step = chunk_size or flat.shape[0]
    for start in range(0, flat.shape[0], step):
        piece = flat[start : start + step].detach().requires_grad_()
        logits = model.logits(piece)
        logits_grad = _upcast(logits.detach())  # the logits themselves when already fp32
        total += _ce_and_grad_(logits_grad, flat_targets[start : start + step], scale)
        logits.backward(logits_grad.to(logits.dtype))
        grad[start : start + step] = piece.grad
    return grad.view_as(hidden), total


def _head_backward(
    model: MTPTransformer,
    i: int,
    h_leaf: torch.Tensor,
    targets: torch.Tensor,
    scale: float | torch.Tensor,
    chunk_size: int | None,
) -> torch.Tensor:
    """Head ``i``'s forward and backward on the detached trunk output; returns its summed CE.

    The head's gradient accumulates into ``h_leaf.grad``. A function of its own so
    that the head's output and its gradient are freed on return, before the next
    head starts.
    """
    z = model.head(i, h_leaf)
    if not z.requires_grad and not model.output.weight.requires_grad:  # frozen head on a frozen trunk: no backward
        with torch.no_grad():
            return _summed_ce(model, z, targets, chunk_size)
    z_grad, ce_sum = _chunked_ce_backward(model, z.detach().requires_grad_(), targets, scale, chunk_size)
    if z.requires_grad:
        z.backward(z_grad)
    return ce_sum


def sequential_backward(
    model: MTPTransformer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    head_weights: Sequence[float] | None = None,
    chunk_size: int | None = None,
    loss_scale: float = 1.0,
) -> StepLosses:
    """The paper's memory-efficient schedule; accumulates ``loss_scale * loss`` gradients.

    ``loss_scale`` lets gradient accumulation divide by the number of micro-batches.
    Returns the detached losses (unscaled). Nothing waits for the device: each head's
    gradient scale ``w_i * loss_scale / n_valid_i`` stays a device tensor, computed in
    float64 as the same expression in Python floats would be.
    """
    weights = _weights(targets.shape[0], head_weights)
    h = model.trunk(inputs)  # a frozen trunk (train.freeze) builds no graph: nothing to run backward through
    h_leaf = h.detach().requires_grad_(h.requires_grad)
    valid_counts = (targets != IGNORE_INDEX).flatten(1).sum(1).clamp(min=1)
    # From host memory with non_blocking: a plain torch.tensor(..., device=cuda) waits for the stream.
    weights_t = torch.tensor(weights, dtype=torch.float64).to(targets.device, non_blocking=True)
    scales = weights_t * loss_scale / valid_counts
    head_losses = [
        _head_backward(model, i, h_leaf, targets[i], scales[i], chunk_size) / valid_counts[i]
        for i in range(len(weights))
    ]
    if h.requires_grad:
        h.backward(h_leaf.grad)
    per_head = torch.stack(head_losses)
    return StepLosses(per_head, (weights_t.to(per_head.dtype) * per_head).sum())


def _linear_ce_chunk(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows ``x [N, D]`` and the unembedding ``weight [V, D]``: per-row CE ``[N]`` and the
    gradients of ``sum(scale * CE)`` with respect to ``x`` and ``weight``.

    The logits live only inside this function; compiled, their softmax, loss and
    gradient are one or two fused passes (the ``_ce_and_grad_`` math).
    """
    logits = x @ weight.t()
    valid = targets != IGNORE_INDEX
    safe_targets = targets.where(valid, 0).unsqueeze(-1)
    wide = _upcast(logits)
    lse = torch.logsumexp(wide, dim=-1, keepdim=True)
    ce = (lse - wide.gather(-1, safe_targets)).squeeze(-1) * valid
    grad = (wide - lse).exp_()  # softmax - onehot, scaled; in place: one [N, V] buffer in eager mode
    grad.scatter_add_(-1, safe_targets, -torch.ones_like(lse))
    grad.mul_((valid * scale).to(grad.dtype).unsqueeze(-1))
    grad = grad.to(logits.dtype)
    return ce, grad @ weight, grad.t() @ x


@functools.cache
def _compiled_chunk():
    return torch.compile(_linear_ce_chunk, dynamic=False)


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum(row_scale * CE(x @ weight.T, targets))`` with its gradients computed in the forward.

    As Liger Kernel's fused linear cross-entropy: chunk by chunk of rows, the logits
    are made, reduced to the loss and turned into the two gradients, which the
    backward only scales by the incoming gradient. Also returns the per-row CE
    (not differentiable) so callers can report per-head losses.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, row_scale, chunk_size, compiled):
        chunk = _compiled_chunk() if compiled else _linear_ce_chunk
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device)
        ce = torch.empty(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        for s in range(0, x.shape[0], chunk_size):
            e = s + chunk_size
            ce[s:e], grad_x[s:e], gw = chunk(x[s:e], weight, targets[s:e], row_scale[s:e])
            grad_w += gw
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(ce)
        return (ce * row_scale.to(ce.dtype)).sum(), ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss.to(grad_x.dtype), (grad_w * grad_loss).to(ctx.weight_dtype), None, None, None, None


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_scale: torch.Tensor,
    chunk_size: int | None = None,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused unembedding + cross-entropy over rows ``x [N, D]``: ``(sum(row_scale * CE), CE [N])``.

    ``chunk_size`` rows at a time (default: about as many logits as ``x`` has
    elements, Liger's choice, but at least ``MIN_CHUNK_ROWS``: every chunk also reads and
    writes a ``[V, D]`` weight gradient, which small chunks make the bulk of the work);
    the first output is differentiable in ``x`` and ``weight``.
    """
    n_rows, dim = x.shape
    step = chunk_size or max(MIN_CHUNK_ROWS, n_rows * dim // weight.shape[0])
    return _LinearCrossEntropy.apply(x, weight, targets, row_scale, step, compiled)


def batched_loss(
    model: MTPTransformer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    head_weights: Sequence[float] | None = None,
    chunk_size: int | None = None,
    compiled: bool = False,
) -> tuple[torch.Tensor, StepLosses]:
    """The batched-heads, fused-loss schedule; returns the loss (with graph) like ``naive_loss``.

    The same objective and gradients as ``naive_loss`` (pinned in fp64); ``compiled``
    compiles the heads' batched block and the loss chunk (one graph each, none per head).
    """
    n = targets.shape[0]
    h = model.trunk(inputs)
    heads = _compiled_heads() if compiled else MTPTransformer.heads_batched
    x = model.norm(heads(model, h)).flatten(0, 1)  # [n * B * T, D]
    valid_counts = (targets != IGNORE_INDEX).flatten(1).sum(1).clamp(min=1)
    weights_t = torch.tensor(_weights(n, head_weights), dtype=torch.float64).to(targets.device, non_blocking=True)
    row_scale = (weights_t / valid_counts).repeat_interleave(targets[0].numel())
    loss, ce = linear_cross_entropy(x, model.output.weight, targets.reshape(-1), row_scale, chunk_size, compiled)
    per_head = ce.view(n, -1).sum(1) / valid_counts
    return loss, StepLosses(per_head, (weights_t.to(per_head.dtype) * per_head).sum())


@functools.cache
def _compiled_heads():
    return torch.compile(MTPTransformer.heads_batched)


def step_backward(
    schedule: str,
    model: MTPTransformer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    head_weights: Sequence[float] | None = None,
    chunk_size: int | None = None,
    loss_scale: float = 1.0,
    compiled: bool = False,
) -> StepLosses:
    """One micro-batch's forward and backward on ``schedule`` (``TrainConfig.schedule``).

    Accumulates ``loss_scale`` times the loss's gradients; returns the detached losses.
    The training loop and every measurement of the schedules call this one function.
    """
    if schedule == "sequential":
        return sequential_backward(model, inputs, targets, head_weights, chunk_size, loss_scale)
    if schedule == "batched":
        loss, losses = batched_loss(model, inputs, targets, head_weights, chunk_size, compiled)
    elif schedule == "naive":
        loss, losses = naive_loss(model, inputs, targets, head_weights)
    else:
        raise ValueError(f"unknown schedule {schedule!r}: 'sequential', 'batched' or 'naive'")
    (loss * loss_scale if loss_scale != 1.0 else loss).backward()
    return losses


@torch.no_grad()
def evaluate_head_losses(
    model: MTPTransformer, inputs: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Per-head summed CE and valid-target counts ``[n, 2]``, without storing full logits."""
    h = model.trunk(inputs)
    out = []
    for i in range(targets.shape[0]):
        ce = _summed_ce(model, model.head(i, h), targets[i], chunk_size)
        out.append(torch.stack([ce, (targets[i] != IGNORE_INDEX).sum().to(ce.dtype)]))
    return torch.stack(out)


def _summed_ce(model: MTPTransformer, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """Summed CE of ``logits(hidden [B, T, D])`` against ``targets [B, T]``, chunk by chunk of positions."""
    z, tg = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    step = chunk_size or z.shape[0]
    return sum(
        F.cross_entropy(_upcast(model.logits(z[s : s + step])), tg[s : s + step], ignore_index=IGNORE_INDEX, reduction="sum")
        for s in range(0, z.shape[0], step)
    )
