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
    ``[B, 1, T, S]`` over cache slots ``0..S-1`` (True = attend).
    """

    rope_positions: torch.Tensor
    slots: torch.Tensor
    mask: torch.Tensor

    @property
    def kv_len(self) -> int:
        return self.mask.shape[-1]


class StaticKVCache:
    """Keys/values of every packed layer, allocated once: ``[max_batch, groups * kv_heads, slots, head_dim]``.

    Row ``b`` holds one sequence; slot ``s`` holds its token at position ``s``. A row's
    valid length lives with the decoder: rejected draft slots are simply overwritten
    by the next step, so rolling back is resetting that length.
    """

    def __init__(self, groups: Sequence[int], max_batch: int, kv_heads: int, head_dim: int, slots: int,
                 dtype: torch.dtype, device: torch.device):
        shape = lambda g: (max_batch, g * kv_heads, slots, head_dim)  # noqa: E731
        self.keys = [torch.zeros(shape(g), dtype=dtype, device=device) for g in groups]
        self.values = [torch.zeros(shape(g), dtype=dtype, device=device) for g in groups]
        self.slots = slots

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src``'s first ``length`` slots to row ``dst`` (batch compaction, once per finished request)."""
        for store in (*self.keys, *self.values):
            store[dst, :, :length] = store[src, :, :length]

    def move_slots(self, rows: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Per-row slot moves ``[B, k]`` (tree verification: accepted path -> contiguous slots)."""
        r = rows[:, None]
        for store in (*self.keys, *self.values):
            store[r, :, dst] = store[r, :, src]


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


class PackedLayer:
    """``G`` transformer blocks run as one batched layer (``G = 1`` for a trunk layer)."""

    def __init__(self, blocks: Sequence[Block], cfg: ModelConfig):
        def stack(get) -> torch.Tensor:
            return torch.stack([get(b).detach() for b in blocks]).contiguous()

        self.groups = len(blocks)
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.eps = cfg.norm_eps
        self.attn_norm = stack(lambda b: b.attention_norm.weight[None])  # [G, 1, D]
        self.wqkv = stack(lambda b: torch.cat([b.attention.wq.weight, b.attention.wk.weight, b.attention.wv.weight]).T)
        self.wo = stack(lambda b: b.attention.wo.weight.T)
        self.ffn_norm = stack(lambda b: b.ffn_norm.weight[None])
        self.w13 = stack(lambda b: torch.cat([b.feed_forward.w1.weight, b.feed_forward.w3.weight]).T)
        self.w2 = stack(lambda b: b.feed_forward.w2.weight.T)

    def __call__(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        layout: StepLayout,
        keys: torch.Tensor,
        values: torch.Tensor,
        groups: int,
    ) -> torch.Tensor:
        """``x [1 or G, B*T, D]`` -> ``[G, B*T, D]`` for the first ``groups`` blocks.

        ``rope`` is ``[B, T, 1, head_dim/2]`` complex; ``keys``/``values`` are this
        layer's cache rows for the batch (views of the static cache).
        """
        B, T = layout.slots.shape
        H, KV, hd = self.n_heads, self.kv_heads, self.head_dim
        h = _rms(x, self.eps) * self.attn_norm[:groups]
        qkv = torch.bmm(h, self.wqkv[:groups]).view(groups, B, T, H + 2 * KV, hd)
        qk = torch.view_as_complex(qkv[..., : H + KV, :].float().unflatten(-1, (-1, 2)))
        qk = torch.view_as_real(qk * rope).flatten(-2).type_as(x)
        q, k, v = qk[..., :H, :], qk[..., H:, :], qkv[..., H + KV :, :]
        rows = torch.arange(B, device=x.device)[:, None]
        kv_channels = groups * KV
        keys[rows, :kv_channels, layout.slots] = k.permute(1, 2, 0, 3, 4).reshape(B, T, kv_channels, hd)
        values[rows, :kv_channels, layout.slots] = v.permute(1, 2, 0, 3, 4).reshape(B, T, kv_channels, hd)
        q = q.permute(1, 0, 3, 2, 4).reshape(B, groups * H, T, hd)
        S = layout.kv_len
        out = F.scaled_dot_product_attention(
            q, keys[:, :kv_channels, :S], values[:, :kv_channels, :S], attn_mask=layout.mask, enable_gqa=H != KV
        )
        out = out.view(B, groups, H, T, hd).permute(1, 0, 3, 2, 4).reshape(groups, B * T, H * hd)
        x = x + torch.bmm(out, self.wo[:groups])
        gate, up = torch.bmm(_rms(x, self.eps) * self.ffn_norm[:groups], self.w13[:groups]).chunk(2, dim=-1)
        return x + torch.bmm(F.silu(gate) * up, self.w2[:groups])


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
        self.freqs = torch.complex(model.rope_cos, model.rope_sin).detach()

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
        self, tokens: torch.Tensor, layout: StepLayout, cache: StaticKVCache, rows: slice, heads: int
    ) -> torch.Tensor:
        """Hidden states ``[heads, B, T, D]`` of the first ``heads`` heads for ``tokens [B, T]``.

        ``rows`` selects the batch's rows of the cache; every layer writes its
        keys/values at ``layout.slots`` and attends through ``layout.mask``.
        """
        B, T = tokens.shape
        rope = self.freqs[layout.rope_positions][:, :, None]
        x = F.embedding(tokens, self.embedding).view(1, B * T, -1)
        for i, layer in enumerate(self.trunk):
            x = layer(x, rope, layout, cache.keys[i][rows], cache.values[i][rows], 1)
        x = self.heads(x, rope, layout, cache.keys[-1][rows], cache.values[-1][rows], heads)
        return x.view(heads, B, T, -1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Shared final norm and unembedding, in fp32 for sampling."""
        return F.linear(F.rms_norm(hidden, (hidden.shape[-1],), self.norm, self.eps), self.output).float()
