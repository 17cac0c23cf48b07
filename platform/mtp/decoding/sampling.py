"""Per-row sampling distributions and the speculative accept/reject rule.

Everything is batched over rows with per-row settings, and greedy rows are the
one-hot special case of the same rule: with ``p`` and ``q`` one-hot, "accept with
probability ``p(x) / q(x)``" is "accept iff the draft is head 0's argmax", and the
residual ``max(p - q, 0)`` is head 0's argmax. So one code path keeps sampled rows
exactly distributed as head 0 and greedy rows exactly equal to greedy decoding.
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

    Temperature, then top-k, then top-p (nucleus, keeping at least the top token);
    greedy rows get the one-hot of their argmax.
    """
    greedy = rows.temperature == 0
    temperature = torch.where(greedy, 1.0, rows.temperature)[:, None, None]
    ordered, order = (logits / temperature).sort(dim=-1, descending=True)
    probs = ordered.softmax(-1)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    drop = (probs.cumsum(-1) - probs > rows.top_p[:, None, None]) | (rank >= rows.top_k[:, None, None])
    probs = probs.masked_fill(drop, 0.0)
    probs = torch.zeros_like(probs).scatter_(-1, order, probs / probs.sum(-1, keepdim=True))
    one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None, None], one_hot, probs)


def sample(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: ``probs [B, K, V]``, ``uniform [B, K]`` in [0, 1) -> ids ``[B, K]``.

    Driven by caller-supplied uniforms so per-request seeds work inside a batch; a
    one-hot row always yields its hot index.
    """
    cdf = probs.cumsum(-1)
    u = (uniform * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def speculative_accept(
    drafts: torch.Tensor,
    target: torch.Tensor,
    draft_probs: torch.Tensor,
    uniform: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling's rule (Leviathan et al. 2023; Chen et al. 2023), batched.

    ``drafts [B, K]`` were drawn from ``draft_probs [B, K, V]``; ``target [B, K+1, V]``
    is head 0's distribution at each fed position (position ``j`` scores draft ``j``).
    Draft ``j`` is accepted with probability ``min(1, p(x) / q(x))`` while all before
    it were. Returns (accepted count ``[B]``, the distribution to draw the next token
    from ``[B, V]``: the normalised residual ``max(p - q, 0)`` at the first rejection,
    or ``p`` after the last draft).
    """
    B, K = drafts.shape
    px = target[:, :K].gather(-1, drafts[..., None]).squeeze(-1)
    qx = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
    accepted = (uniform * qx < px).cumprod(-1).sum(-1)
    index = accepted[:, None, None].expand(B, 1, target.shape[-1])
    p = target.gather(1, index).squeeze(1)
    q = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], 1).gather(1, index).squeeze(1)
    residual = (p - q).clamp_(min=0.0)
    mass = residual.sum(-1, keepdim=True)
    return accepted, torch.where(mass > 0, residual / mass.clamp(min=1e-30), p)
