"""Disjoint train/validation/test splits by construction: a problem's split is a hash of its text.

A generator draws problems from a seeded stream and keeps those whose canonical key
hashes into the split it is asked for. The same problem therefore always lands in
the same split, whoever generated it and with whatever seed, so no test problem
can appear in a training corpus.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable, Iterator, TypeVar

SPLITS = ("train", "val", "test")
# Per 100 hash buckets: 90 train, 5 validation, 5 test.
_BUCKETS = {"train": range(0, 90), "val": range(90, 95), "test": range(95, 100)}
_STREAMS = {"train": 0, "val": 1, "test": 2}

T = TypeVar("T")
EXHAUSTED_AFTER = 20_000  # draws in a row that find nothing new: a stratum's split holds no more


def split_of(key: str) -> str:
    """The split a problem with this canonical key belongs to."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100
    return next(name for name, buckets in _BUCKETS.items() if bucket in buckets)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {', '.join(SPLITS)}")


def draw(sample: Callable[[random.Random], T], key: Callable[[T], str], split: str, seed: int,
         count: int, stream: str = "", at_most: bool = False) -> Iterator[T]:
    """``count`` problems of ``split``: ``sample(rng)`` draws, ``key`` decides membership.

    ``stream`` separates draws that share a seed (e.g. in- and out-of-domain test
    sets). Duplicates within a split are kept only once, so a small problem space
    raises instead of looping forever, or with ``at_most`` ends with every problem it found
    (a stratum smaller than asked for: all of it).
    """
    check_split(split)
    rng = random.Random(f"{seed}:{split}:{stream}:{_STREAMS[split]}")
    seen: set[str] = set()
    misses = in_a_row = 0
    while len(seen) < count:
        problem = sample(rng)
        k = key(problem)
        if k in seen or split_of(k) != split:
            misses += 1
            in_a_row += 1
            if at_most and in_a_row > EXHAUSTED_AFTER:
                return
            if misses > 1000 * (count + 100):
                raise ValueError(f"only {len(seen)} distinct {split} problems found, {count} asked for: "
                                 "the problem space is too small")
            continue
        in_a_row = 0
        seen.add(k)
        yield problem
