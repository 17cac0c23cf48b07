"""How much the extra heads can and do accelerate decoding.

* ``acceptance``: what decoding measured, the accepted-draft histogram summed over
  generations and the tokens each forward yielded;
* ``teacher_forced``: what the heads promise on real text, without decoding: how
  often head ``i`` agrees with head 0's greedy choice ``i`` tokens later, turned
  into expected tokens per forward;
* ``distinct_ngrams``: a weak model that emits a run of spaces accepts every draft,
  which is not acceleration; this tells such output apart.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mtp.decoding.api import Generation
from mtp.model import MTPTransformer

NONREPETITIVE = 0.5  # fraction of distinct 8-grams above which a generation counts as real output


def distinct_ngrams(tokens: Sequence[int], n: int = 8) -> float:
    """Fraction of distinct n-grams in a generation (1.0 when it is shorter than n)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def acceptance(generations: Sequence[Generation]) -> tuple[float | None, list[int]]:
    """Tokens per forward (accepted drafts + 1, averaged over steps; None without steps) and the summed histogram."""
    width = max((len(g.stats.accepted_histogram) for g in generations), default=0)
    hist = [0] * width
    for g in generations:
        for k, count in enumerate(g.stats.accepted_histogram):
            hist[k] += count
    steps = sum(hist)
    return (sum((k + 1) * c for k, c in enumerate(hist)) / steps if steps else None), hist


@torch.inference_mode()
def teacher_forced(model: MTPTransformer, texts: Sequence[Sequence[int]]) -> dict[str, object]:
    """Expected tokens per forward if chain drafts were verified against head 0 on real text.

    At position t, draft i (head i) is accepted when it equals head 0's greedy choice
    at t+i and every earlier draft was accepted; the expectation averages that
    accepted count + 1 over positions with all n-1 checks inside the text.
    """
    n = model.cfg.n_future
    device = next(model.parameters()).device
    agree_sum = torch.zeros(n)
    accepted_sum, positions = 0.0, 0
    for ids in texts:
        T = len(ids) - n + 1
        if T <= 0:
            continue
        choices = model(torch.tensor([list(ids)], device=device), all_heads=True)[:, 0].argmax(-1).cpu()  # [n, len]
        agree = torch.stack([choices[i, :T] == choices[0, i : i + T] for i in range(n)])  # [n, T]; row 0 all True
        agree_sum += agree.float().sum(1)
        accepted_sum += float(agree[1:].cumprod(0).sum())
        positions += T
    return {
        "teacher_forced_tokens_per_forward": 1 + accepted_sum / max(positions, 1),
        "teacher_forced_head_agreement": (agree_sum / max(positions, 1)).tolist(),
        "teacher_forced_positions": positions,
    }
