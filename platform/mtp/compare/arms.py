"""Arms of an n_future comparison: what each trial is, beside the plain param-matched n.

- ``n=k`` (``param_matched``): the sweep's own n_future values.
- ``n=1 compute-matched to n=k``: the next-token model trained for more steps, so its
  training FLOPs (``mtp.model.training_flops_per_token``) equal the n=k arm's. A gain of
  n=k over this arm is not extra compute.
- ``n=k all heads t+1``: the n=k architecture and compute, every head trained on the
  next token (``train.head_targets: next``). A gain of n=k over this arm is the
  lookahead, not the extra head parameters.

A sweep file lists the controls in ``arms:``; the arm becomes one grid dimension
(``arm``, its label) in place of ``model.n_future``, and ``overrides`` turns a label into
the config fields the trial trains with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from mtp.config import JobConfig
from mtp.specs import build

KINDS = ("param_matched", "compute_matched", "next_token_heads")
ARM = "arm"  # the grid dimension's name, and the summary's column


@dataclass(frozen=True)
class Arm:
    n_future: int
    kind: str = "param_matched"
    controls: int | None = None  # the n of the arm a control stands beside

    @property
    def label(self) -> str:
        if self.kind == "compute_matched":
            return f"n=1 compute-matched to n={self.controls}"
        if self.kind == "next_token_heads":
            return f"n={self.n_future} all heads t+1"
        return f"n={self.n_future}"

    @property
    def is_baseline(self) -> bool:
        return self.kind == "param_matched" and self.n_future == 1


@dataclass(frozen=True)
class ArmsSpec:
    """A sweep file's ``arms:`` section: which controls to add for every n > 1 of the grid."""

    compute_matched: bool = False
    next_token_heads: bool = False

    @classmethod
    def parse(cls, raw: Any, where: str = "arms") -> "ArmsSpec":
        return build(cls, raw, where)

    def arms(self, n_futures: list[int]) -> list[Arm]:
        """The param-matched arms of ``n_futures`` (which must hold 1, the baseline), then the controls."""
        if 1 not in n_futures:
            raise ValueError(f"arms need the n=1 baseline among model.n_future {n_futures}")
        out = [Arm(n) for n in n_futures]
        for n in (n for n in n_futures if n > 1):
            if self.compute_matched:
                out.append(Arm(1, "compute_matched", n))
            if self.next_token_heads:
                out.append(Arm(n, "next_token_heads", n))
        return out


def compute_matched_steps(baseline: JobConfig, controlled: JobConfig) -> int:
    """Steps that give ``baseline`` the training FLOPs ``controlled`` spends in its ``max_steps``
    (rounded up, so the control never gets less compute)."""
    for cfg in (baseline, controlled):
        cfg.validate()
    return flops_matched_steps(baseline.model, controlled.model, baseline.train.seq_len, controlled.train.max_steps,
                               tokens_per_step(controlled) / tokens_per_step(baseline))


def training_flops(cfg: JobConfig) -> float:
    """FLOPs of a whole training run of ``cfg`` (``mtp.model.training_flops_per_token`` x its tokens)."""
    from mtp.model import training_flops_per_token  # torch: only where a control is built

    return training_flops_per_token(cfg.model, cfg.train.seq_len) * tokens_per_step(cfg) * cfg.train.max_steps


def tokens_per_step(cfg: JobConfig) -> int:
    """Token positions in one optimizer step of ``cfg`` (sequence x batch x accumulation)."""
    return cfg.train.seq_len * cfg.train.batch_size * cfg.train.grad_accum


def flops_matched_steps(baseline: Any, controlled: Any, seq_len: int, steps: int, token_ratio: float = 1.0) -> int:
    """Steps of ``baseline`` (a ModelConfig) with the FLOPs of ``steps`` of ``controlled``; ``token_ratio``:
    the controlled arm's tokens per step over the baseline's."""
    from mtp.model import training_flops_per_token  # torch: only where a control is built

    ratio = training_flops_per_token(controlled, seq_len) / training_flops_per_token(baseline, seq_len)
    return math.ceil(steps * ratio * token_ratio - 1e-9)


def overrides(arm: Arm, build: Callable[[dict[str, Any]], JobConfig]) -> dict[str, Any]:
    """Config fields of ``arm``; ``build(fields)`` makes the trial's config from fields (for the
    compute-matched arm's FLOPs, which depend on the rest of the trial's config)."""
    if arm.kind == "compute_matched":
        steps = compute_matched_steps(build({"model.n_future": 1}), build({"model.n_future": arm.controls}))
        return {"model.n_future": 1, "train.max_steps": steps}
    if arm.kind == "next_token_heads":
        return {"model.n_future": arm.n_future, "train.head_targets": "next"}
    return {"model.n_future": arm.n_future}


def by_label(arms: list[Arm]) -> dict[str, Arm]:
    return {a.label: a for a in arms}
