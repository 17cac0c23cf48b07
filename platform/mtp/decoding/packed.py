"""Inference-only weights and forward for decoding, tuned for per-call overhead.

A decode step on a small model is bound by the number of kernel launches, not by
FLOPs, so this module repacks an ``MTPTransformer`` once:

* q/k/v and w1/w3 are fused into one matmul each;
* the ``n_future`` head blocks become one *stacked* layer (weights ``[n, ...]``,
  ``bmm``), so running every head costs about as many calls as running one;
* a trunk layer is the same stacked layer with one group, so there is a single
  implementation of the inference block;
* keys/values go to a preallocated ``StaticKVCache`` at explicit slots, and
  attention reads a slice (a view) of it: a step never copies the cache.

The stacked heads keep their keys/values as extra attention heads: head ``g``'s
``kv_heads`` live at channels ``g * kv_heads ...`` of its layer's cache, so one
4-D ``scaled_dot_product_attention`` call serves every head (GQA grouping maps
query head ``g * n_heads + h`` to kv head ``g * kv_heads + h // group``).

The weights are copied at packing time: rebuild the packed model (the ``Engine``)
after changing the ``MTPTransformer``'s parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from mtp.config import ModelConfig
from mtp.model import Block, MTPTransformer


@dataclass
class StepLayout:
    """Where the ``T`` tokens of each row of one forward go.

    ``rope_positions``/``slots`` are ``[B, T]``: the position used for the rotary
    embedding and the cache slot the token's key/value is written to (they differ
    only for tree verification, where siblings share a depth). ``mask`` is
    ``[B, 1, T, S]`` over cache slots ``0..S-1`` (True = attend). ``from_start``: the
    slots are ``0..T-1`` in every row (a prefill), so keys/values are written as one
    block instead of token by token.
    """

    rope_positions: torch.Tensor
    slots: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor  # [B, 1] row indices, to pair with ``slots`` in indexed writes
    from_start: bool = False

    @property
    def kv_len(self) -> int:
        return self.mask.shape[-1]


class StaticKVCache:
    """Keys and values of every packed layer, allocated once: ``[max_batch, 2, groups, kv_heads, slots, head_dim]``.

    Row ``b`` holds one sequence; slot ``s`` holds its token at position ``s``. A row's
    valid length lives with the decoder: rejected draft slots are simply overwritten
    by the next step and masked out until then, so rolling back is resetting that
    length. Keys and values share a tensor so one indexed write stores both.
    """

    def __init__(self, groups: Sequence[int], max_batch: int, kv_heads: int, head_dim: int, slots: int,
                 dtype: torch.dtype, device: torch.device):
        self.layers = [
            torch.zeros(max_batch, 2, g, kv_heads, slots, head_dim, dtype=dtype, device=device) for g in groups
        ]
        self.slots = slots

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src``'s first ``length`` slots to row ``dst`` (batch compaction, once per finished request)."""
        for store in self.layers:
            store[dst, ..., :length, :] = store[src, ..., :length, :]

    def move_slots(self, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Per-row slot moves ``[B, k]`` (tree verification: accepted path -> contiguous slots)."""
        r = rows[:, None]
        for store in self.layers:
            store[r, :, :, :, dst] = store[r, :, :, :, src]


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation without the gain (folded into the next matmul's weights)."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


def _rotate_(x: torch.Tensor, rope: torch.Tensor) -> None:
    """Rotary embedding in place (q and k of every group in one call), as complex products
    with ``rope`` (cos, sin pairs ``[..., head_dim/2, 2]``).

    Pairs of channels are rotated like ``mtp.model.apply_rope``; low-precision
    inputs rotate in fp32, as there. Under ``torch.compile`` the same product is
    written out in real arithmetic, which inductor fuses (it has no complex codegen).
    """
    if torch.compiler.is_compiling():
        (re, im), (cos, sin) = x.float().unflatten(-1, (-1, 2)).unbind(-1), rope.unbind(-1)
        x.copy_(torch.stack((re * cos - im * sin, re * sin + im * cos), -1).flatten(-2))
        return
    rope = torch.view_as_complex(rope)
    if x.dtype in (torch.float32, torch.float64):
        torch.view_as_complex(x.unflatten(-1, (-1, 2))).mul_(rope)
    else:
        x.copy_(torch.view_as_real(torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * rope).flatten(-2))


def _attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked GQA attention: ``q [B, H, T, hd]`` over ``keys``/``values [B, KV, S, hd]`` with ``mask [B, 1, T, S]``.

    Eagerly, ``scaled_dot_product_attention``. Under ``torch.compile`` (decode steps:
    a few query tokens per row) written out as two matmuls around a masked softmax,
    which inductor fuses: the CPU's fused attention kernel is built for long queries
    and cost ~0.5 ms per call at batch 8 here, most of a compiled step.
    """
    B, H, T, hd = q.shape
    KV, S = keys.shape[1], keys.shape[2]
    if not torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=H != KV)
    group = H // KV
    scores = (q.reshape(B, KV, group * T, hd) * hd**-0.5) @ keys.transpose(-1, -2)  # [B, KV, group*T, S]
    scores = scores.view(B, KV, group, T, S).masked_fill(~mask[:, :, None], float("-inf"))
    return (scores.softmax(-1).view(B, KV, group * T, S) @ values).view(B, H, T, hd)


class PackedLayer:
    """``G`` transformer blocks run as one batched layer (``G = 1`` for a trunk layer).

    The norms' gains are folded into the matmul that follows them
    (``(x * r * g) @ W == (x * r) @ (g[:, None] * W)``), and the first projection
    of all ``G`` blocks is one matmul, since they read the same input.
    """

    def __init__(self, blocks: Sequence[Block], cfg: ModelConfig):
        def stack(get) -> torch.Tensor:
            return torch.stack([get(b).detach() for b in blocks]).contiguous()

        def folded(norm: torch.Tensor, *linears: torch.nn.Linear) -> torch.Tensor:
            return (norm[:, None] * torch.cat([lin.weight for lin in linears]).T).detach()

        self.groups = len(blocks)
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.eps = cfg.norm_eps
        # [D, q of every group | k of every group | v of every group]: the k|v of all groups are one
        # block per token, written to the cache in one go. Fewer groups get their own copy (see qkv).
        # Imported models' q/k/v biases (mtp.importing) follow the same column order.
        projections = [getattr(b.attention, name) for name in ("wq", "wk", "wv") for b in blocks]
        bias = torch.cat([lin.bias for lin in projections]).detach() if cfg.attn_bias else None
        self._wqkv = {
            self.groups: (torch.cat([folded(b.attention_norm.weight, lin) for b, lin in zip(list(blocks) * 3, projections)], 1)
                          .contiguous(), bias)
        }
        self.wo = stack(lambda b: b.attention.wo.weight.T)
        self.w13 = stack(lambda b: folded(b.ffn_norm.weight, b.feed_forward.w1, b.feed_forward.w3))
        self.w2 = stack(lambda b: b.feed_forward.w2.weight.T)

    def qkv(self, groups: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused projection (weight, bias or None) of the first ``groups`` blocks (built once per
        count, e.g. head 0 alone)."""
        if groups not in self._wqkv:
            q, k, v = (self.n_heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim)
            (weight, bias), G = self._wqkv[self.groups], self.groups
            spans = [(s, s + groups * w) for s, w in zip((0, G * q, G * (q + k)), (q, k, v))]
            self._wqkv[groups] = (
                torch.cat([weight[:, a:b] for a, b in spans], 1).contiguous(),
                torch.cat([bias[a:b] for a, b in spans]) if bias is not None else None,
            )
        return self._wqkv[groups]

    def __call__(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        layout: StepLayout,
        cache: torch.Tensor,
        groups: int,
        outputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x [1, B*T, D]`` (shared input) -> ``[groups, B*Q, D]`` for the first ``groups`` blocks.

        Every token's key/value is written to ``cache`` (this layer's
        ``[B, 2, G, kv_heads, slots, head_dim]`` rows for the batch, a view), but only
        the positions ``outputs [B, Q]`` (all ``T`` when None) are carried through
        attention and the feed-forward: a prefill needs the last block's output at
        the last prompt position only. ``rope`` is ``[B, T, 1, head_dim/2, 2]`` (cos, sin).
        """
        B, T = layout.slots.shape
        H, KV, hd = groups * self.n_heads, groups * self.kv_heads, self.head_dim
        weight, bias = self.qkv(groups)
        qkv = _rms(x[0], self.eps) @ weight
        qkv = (qkv if bias is None else qkv + bias).view(B, T, H + 2 * KV, hd)
        _rotate_(qkv[:, :, : H + KV], rope)
        kv = qkv[:, :, H:].unflatten(2, (2, groups, self.kv_heads))  # [B, T, 2, groups, kv_heads, hd]
        if layout.from_start:
            cache[:, :, :groups, :, :T] = kv.permute(0, 2, 3, 4, 1, 5)
        elif groups == self.groups:
            cache[layout.rows, :, :, :, layout.slots] = kv
        else:  # index the groups too: a write through a ``:groups`` view made inductor copy the whole cache twice
            g = torch.arange(groups, device=kv.device)
            cache[layout.rows[..., None], :, g, :, layout.slots[..., None]] = kv.transpose(2, 3)
        S = layout.kv_len
        keys = cache[:, 0, :groups, :, :S].flatten(1, 2)  # [B, groups * kv_heads, S, hd], a view
        values = cache[:, 1, :groups, :, :S].flatten(1, 2)
        q, mask = qkv[:, :, :H], layout.mask
        if outputs is not None:
            q, mask = q[layout.rows, outputs], mask[layout.rows, 0, outputs][:, None]
            x = x.view(B, T, -1)[layout.rows, outputs].view(1, -1, x.shape[-1])
            T = outputs.shape[1]
        out = _attention(q.transpose(1, 2), keys, values, mask)
        out = out.view(B, groups, self.n_heads, T, hd).permute(1, 0, 3, 2, 4).reshape(groups, B * T, self.n_heads * hd)
        x = x + torch.bmm(out, self.wo[:groups])
        gate, up = torch.bmm(_rms(x, self.eps), self.w13[:groups]).chunk(2, dim=-1)
        return x + torch.bmm(F.silu(gate).mul_(up), self.w2[:groups])


class PackedModel:
    """The whole network repacked for decoding: trunk layers, one stacked head layer, shared unembedding."""

    def __init__(self, model: MTPTransformer):
        cfg = model.cfg
        self.cfg = cfg
        self.n_future = cfg.n_future
        self.embedding = model.tok_embeddings.weight.detach()
        self.trunk = [PackedLayer([blk], cfg) for blk in model.trunk_layers]
        self.heads = PackedLayer(list(model.heads), cfg)
        self.norm = model.norm.weight.detach()
        self.output = model.output.weight.detach()
        self.eps = cfg.norm_eps
        self.freqs = torch.stack((model.rope_cos.float(), model.rope_sin.float()), -1).detach()  # [L, head_dim/2, 2]

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding.device

    @property
    def layers(self) -> list[PackedLayer]:
        return [*self.trunk, self.heads]

    def new_cache(self, max_batch: int, slots: int) -> StaticKVCache:
        cfg = self.cfg
        return StaticKVCache(
            [layer.groups for layer in self.layers], max_batch, cfg.kv_heads, cfg.head_dim, slots, self.dtype, self.device
        )

    def forward(
        self,
        tokens: torch.Tensor,
        layout: StepLayout,
        cache: StaticKVCache,
        rows: slice,
        heads: int,
        outputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states ``[heads, B, Q, D]`` of the first ``heads`` heads for ``tokens [B, T]``.

        ``rows`` selects the batch's rows of the cache; every layer writes its
        keys/values at ``layout.slots`` and attends through ``layout.mask``. The heads
        produce outputs at the positions ``outputs [B, Q]`` only (all when None).
        """
        B, T = tokens.shape
        rope = self.freqs[layout.rope_positions][:, :, None]
        x = F.embedding(tokens, self.embedding).view(1, B * T, -1)
        for layer, store in zip(self.trunk, cache.layers):
            x = layer(x, rope, layout, store[rows], 1)
        x = self.heads(x, rope, layout, cache.layers[-1][rows], heads, outputs)
        return x.view(heads, B, -1, x.shape[-1])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Shared final norm and unembedding, in fp32 for sampling."""
        return F.linear(F.rms_norm(hidden, (hidden.shape[-1],), self.norm, self.eps), self.output).float()
