"""The multi-token-prediction transformer (Gloeckle et al. 2024), readable in one sitting.

A shared trunk of pre-norm blocks (RMSNorm, rotary attention, SwiGLU) feeds
``n_future`` independent head blocks; every head goes through the same final norm
and the same unembedding. Head ``i`` predicts token ``t + i + 1`` from position
``t``, so head 0 is the ordinary next-token model.

The pieces are exposed separately (``trunk``, ``head``, ``logits``) because the
memory-efficient loss (``mtp.loss``) and the reference speculative decoder
(``mtp.decoding.reference``) schedule them differently from the plain ``forward``.
``heads_batched`` runs every head's block at once (their weights stacked: one
batched matmul per projection, attention over ``n * B`` sequences), the same math as
``head(i, h)`` for each ``i``, for the batched training schedule.
That decoder also passes explicit rotary ``positions``, an attention ``mask`` and a
per-layer ``LayerCache``; the fast engine (``mtp.decoding.Engine``) instead repacks
these weights into its own inference layers (``mtp.decoding.packed``).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtp.config import FREEZABLE, ModelConfig


class LayerCache(Protocol):
    """Per-layer key/value store used during decoding (``mtp.decoding.reference.KVCache``)."""

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v ``[B, kv_heads, T, head_dim]`` for the current positions; return all keys/values."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dimension, normalised in at least fp32."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return out.type_as(x) * weight


def rope_tables(
    head_dim: int, max_len: int, theta: float, scaling: dict[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[max_len, head_dim // 2]`` for rotary position embeddings.

    ``scaling`` stretches the frequencies as Hugging Face's ``linear`` and ``llama3``
    rope types do (``ModelConfig.rope_scaling``), for imported long-context models.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is not None:
        inv_freq = _scaled_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def _scaled_frequencies(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    kind, factor = scaling.get("rope_type", "default"), float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor
    if kind != "llama3":
        return inv_freq
    # Llama 3.1: long wavelengths divided by ``factor``, short ones kept, a smooth blend between.
    old_len = float(scaling["original_max_position_embeddings"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, blended, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels of ``x [B, H, T, D]``; cos/sin are ``[T, D/2]``."""
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return rotated.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
        causal = mask is None and cache is None
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.kv_heads != self.n_heads
        )
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class MTPTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.trunk_layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_trunk_layers))
        self.heads = nn.ModuleList(Block(cfg) for _ in range(cfg.n_future))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:  # one parameter; checkpoints store it once, as the embedding
            self.output.weight = self.tok_embeddings.weight
            self.register_state_dict_post_hook(_drop_tied_output)
            self.register_load_state_dict_pre_hook(_fill_tied_output)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, std) weights; residual projections scaled by depth (GPT-2)."""
        for name, p in self.named_parameters():
            init_parameter_(name, p, self.cfg)

    def rope(self, positions: torch.Tensor | None, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for ``positions [T]``, or for 0..T-1."""
        if positions is None:
            return self.rope_cos[:T], self.rope_sin[:T]
        return self.rope_cos[positions], self.rope_sin[positions]

    def trunk(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        caches: Sequence[LayerCache] | None = None,
    ) -> torch.Tensor:
        """Embed ``tokens [B, T]`` and run the shared trunk; returns ``[B, T, dim]``.

        Without ``caches`` attention is causal over ``tokens``; with them, each layer
        appends its keys/values to its cache and ``mask [T, S]`` says which of the
        ``S`` cached positions each token sees (True = attend).
        """
        cos, sin = self.rope(positions, tokens.shape[1])
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.trunk_layers):
            h = layer(h, cos, sin, mask, caches[i] if caches is not None else None)
        return h

    def head(
        self,
        i: int,
        h: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """Head ``i``'s block on trunk output ``h``; returns its hidden state (pre-norm)."""
        cos, sin = self.rope(positions, h.shape[1])
        return self.heads[i](h, cos, sin, mask, cache)

    def heads_batched(self, h: torch.Tensor) -> torch.Tensor:
        """Every head's block on trunk output ``h [B, T, D]`` at once; returns ``[n, B * T, D]``.

        The heads have identical shapes, so their weights are stacked (autograd splits
        the gradients back) and each projection is one ``bmm`` over ``n`` heads; the
        attention runs over ``n * B`` sequences. Head ``i``'s slice equals
        ``head(i, h)`` (the output is flattened over positions for the fused loss).
        """
        n, (B, T, D) = len(self.heads), h.shape
        cfg = self.cfg
        cos, sin = self.rope(None, T)

        def stacked(get) -> torch.Tensor:
            return torch.stack([get(block) for block in self.heads])

        def project(x: torch.Tensor, get) -> torch.Tensor:  # [n, B*T, in] -> [n, B*T, out]
            return torch.bmm(x, stacked(lambda b: get(b).weight).transpose(1, 2))

        def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:  # -> [n*B, heads, T, head_dim]
            return x.view(n * B, T, heads, cfg.head_dim).transpose(1, 2)

        x = h.reshape(1, B * T, D)
        a = rms_norm(x, stacked(lambda b: b.attention_norm.weight).unsqueeze(1), cfg.norm_eps)  # [n, B*T, D]
        q = apply_rope(split_heads(project(a, lambda b: b.attention.wq), cfg.n_heads), cos, sin)
        k = apply_rope(split_heads(project(a, lambda b: b.attention.wk), cfg.kv_heads), cos, sin)
        v = split_heads(project(a, lambda b: b.attention.wv), cfg.kv_heads)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=cfg.kv_heads != cfg.n_heads)
        x = x + project(att.transpose(1, 2).reshape(n, B * T, -1), lambda b: b.attention.wo)
        f = rms_norm(x, stacked(lambda b: b.ffn_norm.weight).unsqueeze(1), cfg.norm_eps)
        gated = F.silu(project(f, lambda b: b.feed_forward.w1)) * project(f, lambda b: b.feed_forward.w3)
        return x + project(gated, lambda b: b.feed_forward.w2)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Shared final norm and unembedding."""
        return self.output(self.norm(hidden))

    def forward(self, tokens: torch.Tensor, all_heads: bool = False) -> torch.Tensor:
        """Head-0 logits ``[B, T, V]``, or every head's ``[n_future, B, T, V]``."""
        h = self.trunk(tokens)
        if not all_heads:
            return self.logits(self.head(0, h))
        return torch.stack([self.logits(self.head(i, h)) for i in range(self.cfg.n_future)])


def init_parameter_(name: str, p: torch.Tensor, cfg: ModelConfig) -> None:
    """One parameter's initialisation (``reset_parameters``; imported models' fresh heads)."""
    if name.endswith(".bias"):
        nn.init.zeros_(p)
    elif p.dim() < 2:
        nn.init.ones_(p)
    elif name.endswith(("wo.weight", "w2.weight")):
        nn.init.normal_(p, std=cfg.init_std / (2 * (cfg.n_trunk_layers + 1)) ** 0.5)
    else:
        nn.init.normal_(p, std=cfg.init_std)


def _drop_tied_output(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
    state.pop(prefix + "output.weight", None)


def _fill_tied_output(module: nn.Module, state: dict, prefix: str, *args: Any) -> None:
    if prefix + "tok_embeddings.weight" in state:
        state.setdefault(prefix + "output.weight", state[prefix + "tok_embeddings.weight"])


def part_parameters(model: MTPTransformer, part: str) -> Iterator[nn.Parameter]:
    """The parameters of one ``train.freeze`` part (``mtp.config.FREEZABLE``)."""
    if part not in FREEZABLE:
        raise ValueError(f"unknown model part {part!r}; choose from {', '.join(FREEZABLE)}")
    modules: Iterable[nn.Module] = (
        (model.tok_embeddings, *model.trunk_layers) if part == "trunk" else (model.heads[0], model.norm, model.output)
    )
    for module in modules:
        yield from module.parameters()


def freeze_(model: MTPTransformer, parts: Sequence[str]) -> int:
    """Stop gradients to ``parts`` (``requires_grad=False``); returns how many parameters stay trainable.

    A tied unembedding is the embedding matrix, so it freezes with either part.
    """
    for part in parts:
        for p in part_parameters(model, part):
            p.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by part, computed from the config alone."""
    d, hid, hd = cfg.dim, cfg.hidden_dim, cfg.head_dim
    bias = (cfg.n_heads + 2 * cfg.kv_heads) * hd if cfg.attn_bias else 0
    block = d * hd * (2 * cfg.n_heads + 2 * cfg.kv_heads) + 3 * d * hid + 2 * d + bias
    unembedding = (0 if cfg.tie_embeddings else cfg.vocab_size * d) + d
    return {
        "embedding": cfg.vocab_size * d,
        "trunk": cfg.n_trunk_layers * block,
        "heads": cfg.n_future * block,
        "unembedding": unembedding,
        "total": cfg.vocab_size * d + unembedding + (cfg.n_trunk_layers + cfg.n_future) * block,
    }


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward+backward FLOPs per input token: 6N (matmul parameters) plus causal attention.

    Every head pays its block and the shared unembedding, so this is the floor of
    how much slower n_future > 1 trains than the next-token model. Attention: per
    layer QK^T and AV, 2 FLOPs per multiply-add each, over on average ``seq_len / 2``
    keys (causal; PaLM's appendix counts all ``seq_len``), times 3 for the backward.
    """
    counts = count_parameters(cfg)
    layers = cfg.n_trunk_layers + cfg.n_future
    dense = counts["trunk"] + counts["heads"] + cfg.n_future * cfg.vocab_size * cfg.dim
    attention = layers * 2 * 2 * cfg.n_heads * cfg.head_dim * seq_len / 2  # per token, forward
    return 6 * dense + 3 * attention
