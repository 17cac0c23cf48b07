"""pass@k against exact combinatorics (fractions of binomials), including where floats overflow."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest

from mtp.evaluation.passk import counts_by_problem, mean_pass_at_k, pass_at_k


def exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


@pytest.mark.parametrize("n", [1, 2, 5, 10, 37])
def test_matches_exact_binomials_on_a_grid(n):
    for c, k in itertools.product(range(n + 1), range(1, n + 1)):
        assert pass_at_k(n, c, k) == pytest.approx(float(exact(n, c, k)), rel=1e-12, abs=1e-15), (n, c, k)


@pytest.mark.parametrize("n,c,k", [(200, 1, 1), (200, 3, 100), (1000, 7, 10), (1000, 500, 100), (2000, 1, 1000), (3000, 40, 1500)])
def test_stable_where_binomials_overflow_floats(n, c, k):
    assert math.comb(n, k) > 1e15 or k == 1
    assert pass_at_k(n, c, k) == pytest.approx(float(exact(n, c, k)), rel=1e-10)


def test_enumerating_subsets_agrees():
    """The definition itself: the share of k-subsets that contain a correct sample."""
    flags = [True, False, False, True, False, False]
    for k in range(1, len(flags) + 1):
        subsets = list(itertools.combinations(flags, k))
        share = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(len(flags), sum(flags), k) == pytest.approx(share)


def test_pass_at_1_is_the_fraction_correct():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


@pytest.mark.parametrize("n,c,k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="need"):
        pass_at_k(n, c, k)


def test_mean_skips_k_beyond_the_smallest_n():
    counts = counts_by_problem({"a": [True, False, False], "b": [False] * 5})
    assert counts == {"a": (3, 1), "b": (5, 0)}
    table = mean_pass_at_k(counts.values(), [1, 3, 5])
    assert set(table) == {"pass@1", "pass@3"}
    assert table["pass@1"] == pytest.approx((1 / 3 + 0) / 2)
    assert table["pass@3"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no problems"):
        mean_pass_at_k([], [1])
