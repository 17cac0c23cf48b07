"""Does an arm beat its n=1 baseline? Mean, std, a seeded bootstrap interval, and a computed verdict.

The verdict is a function of the numbers, never a sentence written after looking at
them, in this order:

1. ``inconclusive``: the n=1 baseline does not clear the task's floor (its strongest
   non-learning answer, ``mtp.compare.floors``) by the margin the sweep file fixed
   before the run, or an arm has fewer than two seeds. A baseline that has not learned
   the task leaves nothing for multi-token prediction to improve on.
2. ``better`` / ``worse``: the 95% bootstrap interval of (arm mean - baseline mean)
   excludes 0; "better" follows the metric's direction (``mode``).
3. ``no difference detected (smallest detectable effect X)``: otherwise. X is
   2.8 bootstrap standard errors of the difference: the effect such a comparison finds
   4 times in 5 at the 5% level (z 1.96 + z 0.84), so a reader sees what "no
   difference" could have missed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 10_000
DETECTABLE_SE = 1.96 + 0.84  # two-sided 5% level, 80% power


@dataclass(frozen=True)
class ArmStats:
    """One arm's metric over its seeds."""

    mean: float
    std: float  # sample std (ddof 1); 0 for a single value
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "ArmStats":
        if not values:
            raise ValueError("an arm needs at least one value")
        a = np.asarray(values, dtype=float)
        return cls(float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0, len(a))

    def cell(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f} ({self.n})"


@dataclass(frozen=True)
class Interval:
    """Bootstrap percentile interval of a difference of means, and its standard error."""

    diff: float
    low: float
    high: float
    se: float

    def cell(self) -> str:
        return f"{self.diff:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def bootstrap_difference(arm: Sequence[float], baseline: Sequence[float], seed: int = 0,
                         resamples: int = RESAMPLES, level: float = LEVEL) -> Interval:
    """Interval of mean(arm) - mean(baseline), each arm resampled with replacement on its own
    (seeds are independent trials, not pairs). Seeded: the same numbers give the same interval."""
    a, b = np.asarray(arm, dtype=float), np.asarray(baseline, dtype=float)
    if len(a) < 1 or len(b) < 1:
        raise ValueError("both arms need at least one value")
    rng = np.random.default_rng(seed)
    diffs = (rng.choice(a, (resamples, len(a))).mean(1) - rng.choice(b, (resamples, len(b))).mean(1))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return Interval(float(a.mean() - b.mean()), float(low), float(high), float(diffs.std(ddof=1)))


@dataclass(frozen=True)
class Verdict:
    """The comparison of one arm with its n=1 baseline, and what it allows to say."""

    arm: ArmStats
    baseline: ArmStats
    interval: Interval | None  # None when a side has fewer than two seeds
    floor: float | None
    margin: float
    word: str  # better, worse, no difference detected, inconclusive
    reason: str  # the numbers behind the word

    def text(self) -> str:
        return f"{self.word} ({self.reason})" if self.reason else self.word


def verdict(arm: Sequence[float], baseline: Sequence[float], *, floor: float | None, margin: float,
            mode: str = "max", seed: int = 0) -> Verdict:
    """Compare ``arm`` with the n=1 ``baseline`` (one metric value per seed each).

    ``floor`` is the strongest non-learning score on the same test set (None: the metric
    has none, e.g. a loss), ``margin`` how far above it (below, for ``mode='min'``) the
    baseline's mean must be for any comparison to count.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode={mode!r} must be 'max' or 'min'")
    if margin < 0 or not math.isfinite(margin):
        raise ValueError(f"margin={margin!r} must be a finite number >= 0")
    a, b = ArmStats.of(arm), ArmStats.of(baseline)
    sign = 1.0 if mode == "max" else -1.0
    # the interval is shown whatever the verdict, so a reader sees what an inconclusive comparison measured
    interval = bootstrap_difference(arm, baseline, seed=seed) if a.n >= 2 and b.n >= 2 else None
    if floor is not None and sign * (b.mean - floor) < margin:
        return Verdict(a, b, interval, floor, margin, "inconclusive",
                       f"n=1 {b.mean:.3f} does not clear the floor {floor:.3f} by {margin:g}")
    if interval is None:
        return Verdict(a, b, None, floor, margin, "inconclusive", f"{min(a.n, b.n)} seed(s): no interval")
    if interval.low > 0 or interval.high < 0:
        word = "better" if sign * interval.diff > 0 else "worse"
        return Verdict(a, b, interval, floor, margin, word, f"interval {interval.cell()} excludes 0")
    return Verdict(a, b, interval, floor, margin, "no difference detected",
                   f"smallest detectable effect {DETECTABLE_SE * interval.se:.3f}")
