"""Self-speculative decoding, batch 1, written as plainly as possible: the executable spec.

Head ``i`` of an MTP model guesses token ``t + i + 1`` from position ``t``. One
decoding step feeds the pending token followed by the heads' drafts; a single
forward of trunk and heads then gives, at every fed position, head 0's verdict on
the next draft and every head's drafts for the following step (Stern et al. 2018;
Gloeckle et al. 2024). Drafts that are rejected are rolled back by cutting the
KV cache.

* ``greedy``: drafts are accepted while they equal head 0's argmax. With a draft
  tree (``widths``, Medusa-style) every path through the heads' top tokens is
  tried and the longest accepted one wins. Output = greedy decoding's.
* ``sample``: draft ``j`` is accepted with probability ``min(1, p(x) / q(x))``,
  and the first rejection draws from ``max(p - q, 0)`` (Leviathan et al. 2023),
  so outputs are distributed as head 0's.

``mtp.decoding.Engine`` is the fast path; its tests check it against this module
token for token and step for step (``sample`` draws its uniforms in the engine's
order: ``1 + D`` at the prompt, ``2D + 1`` per step).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

import torch

from mtp.model import MTPTransformer


class KVCache:
    """One attention layer's keys/values ``[1, kv_heads, length, head_dim]``: a ``mtp.model.LayerCache``."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is not None:
            k, v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
        self.k, self.v = k, v
        return k, v

    def crop(self, length: int) -> None:
        self.k, self.v = self.k[:, :, :length], self.v[:, :, :length]


class Decoder:
    """One sequence: the model plus a cache per trunk layer and per head."""

    def __init__(self, model: MTPTransformer):
        self.model, self.length = model, 0
        self.caches = [KVCache() for _ in range(len(model.trunk_layers) + len(model.heads))]

    def feed(self, tokens: Sequence[int]) -> torch.Tensor:
        """Append ``tokens`` to the sequence; every head's logits at each of them ``[n_future, T, V]``."""
        start, T = self.length, len(tokens)
        self.length += T
        positions = torch.arange(start, self.length, device=self.model.rope_cos.device)
        mask = torch.ones(T, self.length, dtype=torch.bool, device=positions.device).tril(start)  # causal
        n_trunk = len(self.model.trunk_layers)
        h = self.model.trunk(positions.new_tensor([list(tokens)]), positions, mask, self.caches[:n_trunk])
        heads = [self.model.head(i, h, positions, mask, c) for i, c in enumerate(self.caches[n_trunk:])]
        return self.model.logits(torch.cat(heads)).float()

    def rewind(self, length: int) -> None:
        """Forget everything after the first ``length`` tokens (rejected drafts)."""
        for cache in self.caches:
            cache.crop(length)
        self.length = length


@dataclass
class Decoded:
    tokens: list[int]
    accepted_histogram: list[int] = field(default_factory=list)  # [k] = steps that accepted k drafts

    def step(self, accepted: int, tokens: list[int]) -> None:
        self.accepted_histogram.extend([0] * (accepted + 1 - len(self.accepted_histogram)))
        self.accepted_histogram[accepted] += 1
        self.tokens += tokens

    def finished(self, max_new_tokens: int, eos_id: int | None) -> bool:
        return len(self.tokens) >= max_new_tokens or eos_id in self.tokens

    def cut(self, max_new_tokens: int, eos_id: int | None) -> "Decoded":
        """At most ``max_new_tokens``, and nothing from an end-of-sequence token on."""
        tokens = self.tokens[:max_new_tokens]
        self.tokens = tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens
        return self


@torch.inference_mode()
def greedy(model: MTPTransformer, prompt: list[int], max_new_tokens: int, widths: Sequence[int] = (),
           eos_id: int | None = None) -> Decoded:
    """Greedy decoding, drafting ``widths[d]`` top tokens of head ``d + 1`` per level.

    ``(1,) * (n_future - 1)`` is the chain of all heads, ``()`` head 0 alone.
    """
    decoder = Decoder(model)
    logits = decoder.feed(prompt)[:, -1]  # every head at the end of the prompt
    out = Decoded([int(logits[0].argmax())])
    while not out.finished(max_new_tokens, eos_id):
        pending, start = out.tokens[-1], decoder.length
        tops = [logits[d + 1].topk(w).indices.tolist() for d, w in enumerate(widths)]
        best = (-1, ())
        for path in itertools.product(*tops):  # every root-to-leaf path of the tree, a chain each
            verdicts = decoder.feed([pending, *path])[0].argmax(-1).tolist()
            decoder.rewind(start)
            accepted = next((j for j, x in enumerate(path) if x != verdicts[j]), len(path))
            if accepted > best[0]:
                best = (accepted, path)
        accepted, path = best
        logits = decoder.feed([pending, *path])[:, accepted]  # the winner again, for its keys/values
        decoder.rewind(start + 1 + accepted)
        out.step(accepted, [*path[:accepted], int(logits[0].argmax())])
    return out.cut(max_new_tokens, eos_id)


def draw(probs: torch.Tensor, uniform: torch.Tensor) -> int:
    """Inverse-CDF sampling from (unnormalised) ``probs [V]`` with a uniform in [0, 1)."""
    cdf = probs.cumsum(0)
    return int(torch.searchsorted(cdf, uniform * cdf[-1], right=True).clamp(max=len(probs) - 1))


@torch.inference_mode()
def sample(model: MTPTransformer, prompt: list[int], max_new_tokens: int, temperature: float, seed: int,
           speculative: bool = True, eos_id: int | None = None) -> Decoded:
    """Speculative sampling at ``temperature`` with the chain of all heads (head 0 alone if not ``speculative``)."""
    D = model.cfg.n_future - 1 if speculative else 0
    generator = torch.Generator().manual_seed(seed)
    decoder = Decoder(model)
    probs = (decoder.feed(prompt)[: D + 1, -1] / temperature).softmax(-1)  # [1 + D, V]
    first, *drafts = [draw(p, u) for p, u in zip(probs, torch.rand(1 + D, generator=generator))]
    q = probs[1:]  # the distributions the drafts were drawn from
    out = Decoded([first])
    while not out.finished(max_new_tokens, eos_id):
        start = decoder.length
        p = (decoder.feed([out.tokens[-1], *drafts])[: D + 1] / temperature).softmax(-1)  # [1 + D, 1 + D, V]
        u = torch.rand(2 * D + 1, generator=generator)
        accepted = 0
        while accepted < D and u[accepted] * q[accepted, drafts[accepted]] < p[0, accepted, drafts[accepted]]:
            accepted += 1
        target = p[0, accepted]
        residual = (target - q[accepted]).clamp(min=0) if accepted < D else target
        token = draw(residual if residual.sum() > 0 else target, u[D])
        decoder.rewind(start + 1 + accepted)
        out.step(accepted, [*drafts[:accepted], token])
        q = p[1:, accepted]  # the heads at the last accepted position draft the next step
        drafts = [draw(qd, ud) for qd, ud in zip(q, u[D + 1 :])]
    return out.cut(max_new_tokens, eos_id)
