"""The engine's acceptance rule, all of it: which drafts one verification forward accepts,
and which token follows them.

A step feeds ``[pending, drafts...]``; head 0's output at fed position ``j`` judges
draft ``j``. Two rules, batched over rows:

* ``greedy`` (chain or ``DraftTree``): a draft is right when it is head 0's argmax at
  its parent; the deepest node whose whole path is right wins, and head 0's argmax
  there is the next (bonus) token. Output = greedy decoding's, token for token.
* ``sampled`` (chain; Leviathan et al. 2023, Chen et al. 2023): draft ``j``, drawn from
  ``q``, is accepted with probability ``min(1, p(x) / q(x))`` while all before it were;
  the token after the accepted drafts is drawn from the normalised residual
  ``max(p - q, 0)`` at the first rejection, or from ``p`` after the last draft. Output
  is distributed exactly as head 0's.

``mtp.decoding.reference`` states the same rules independently (one chain per path,
plain loops); the tests hold this module to it step for step.
"""

from __future__ import annotations

import torch

from mtp.decoding.sampling import sample
from mtp.decoding.tree import TreeTensors


def greedy(tree: TreeTensors, fed: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy verification of fed tokens ``[B, W]`` against head 0's argmax ``target [B, W]``.

    Children of a node carry distinct tokens, so the winning node is unique. Returns
    (accepted node ``[B]``, its depth = accepted drafts ``[B]``, the emitted tokens
    ``[B, depth + 1]`` padded to ``[B, D + 1]``): head 0's argmax along the path, i.e.
    the accepted drafts followed by the bonus token.
    """
    if tree.tree.is_chain:
        accepted = (fed[:, 1:] == target[:, :-1]).cumprod(1).sum(1)
        return accepted, accepted, target
    right = fed == target.gather(1, tree.parent.expand_as(fed))
    right[:, 0] = True
    on_path = ~((~right)[:, None, :] & tree.ancestors).any(-1)  # [B, W]
    best = torch.where(on_path, tree.depth + 1, 0).argmax(-1)
    return best, tree.depth[best], target.gather(1, tree.path[best])


def sampled(
    drafts: torch.Tensor, target: torch.Tensor, draft_probs: torch.Tensor, uniform: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling of a chain: ``drafts [B, D]`` drawn from ``draft_probs [B, D, V]``,
    ``target [B, D + 1, V]`` head 0's distribution at each fed position, ``uniform [B, D + 1]``
    (the accept tests, then the bonus token's draw).

    Returns (accepted drafts ``[B]``, the emitted tokens ``[B, D + 1]``: the accepted
    drafts, then the bonus token at index ``accepted``; entries after it are unused).
    """
    B, D = drafts.shape
    px = target[:, :D].gather(-1, drafts[..., None]).squeeze(-1)
    qx = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
    accepted = (uniform[:, :D] * qx < px).cumprod(-1).sum(-1)
    index = accepted[:, None, None].expand(B, 1, target.shape[-1])
    p = target.gather(1, index).squeeze(1)
    q = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], 1).gather(1, index).squeeze(1)
    residual = (p - q).clamp_(min=0.0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p)
    bonus = sample(residual[:, None], uniform[:, D : D + 1])
    return accepted, torch.cat([drafts, bonus], 1).scatter_(1, accepted[:, None], bonus)
