"""Per-row sampling distributions and inverse-CDF draws, for sampled (temperature > 0) rows.

Batched over rows with per-row temperature, top-k and top-p. Greedy requests never
come here: they step in their own batch (a step kind of their own) and take head 0's
argmax (``mtp.decoding.acceptance.greedy``). The accept/reject rule that uses these
distributions is ``mtp.decoding.acceptance.sampled``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtp.decoding.api import SamplingParams


@dataclass
class RowSampling:
    """Sampling settings of a batch's rows as device tensors ``[B]``."""

    temperature: torch.Tensor  # 0 = greedy
    top_k: torch.Tensor  # vocab size = off
    top_p: torch.Tensor

    @classmethod
    def build(cls, params: list[SamplingParams], vocab_size: int, device: torch.device) -> "RowSampling":
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor([min(p.top_k or vocab_size, vocab_size) for p in params], device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
        )

    def rows(self, index: slice | torch.Tensor) -> "RowSampling":
        return RowSampling(self.temperature[index], self.top_k[index], self.top_p[index])


def target_probs(logits: torch.Tensor, rows: RowSampling) -> torch.Tensor:
    """The distribution each row samples from: ``logits [B, K, V]`` -> probabilities ``[B, K, V]``.

    Temperature, then top-k, then top-p (nucleus, keeping at least the top token;
    ``top_p >= 1`` cuts nothing, where a float32 cumulative sum could drop tail mass).
    A row with temperature 0 (an unused padding row of a compiled step) gets
    temperature 1, so that it stays finite.
    """
    temperature = torch.where(rows.temperature == 0, 1.0, rows.temperature)[:, None, None]
    ordered, order = (logits / temperature).sort(dim=-1, descending=True)
    probs = ordered.softmax(-1)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    top_p = rows.top_p[:, None, None]
    drop = ((probs.cumsum(-1) - probs > top_p) & (top_p < 1)) | (rank >= rows.top_k[:, None, None])
    probs = probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, probs / probs.sum(-1, keepdim=True))


def sample(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: ``probs [B, K, V]``, ``uniform [B, K]`` in [0, 1) -> ids ``[B, K]``.

    Driven by caller-supplied uniforms so per-request seeds work inside a batch; a
    one-hot row always yields its hot index.
    """
    cdf = probs.cumsum(-1)
    u = (uniform * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
