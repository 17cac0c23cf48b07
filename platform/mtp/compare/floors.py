"""Floors: the strongest non-learning answers of each task, scored on the same test set as the models.

A model is shown to have learned a task only when it beats these; a comparison of n is
meaningful only when its n=1 baseline does (``mtp.compare.stats.verdict``). Each floor
answers from the prompt alone (and, where it needs a constant, from training problems
only), and is scored with the metrics the models get (``exact_match``,
``token_accuracy``); floors that guess are scored by their expected value, so they do not
depend on a random draw.

- induction: ``guess_seen`` picks uniformly among the second bytes of the names seen so
  far; ``guess_seen_other`` the same without the names already in the query's own sentence
  (the two names of a sentence differ). Neither copies the queried name.
- polynomial: ``constant`` answers the most frequent training answer;
  ``two_rule_lookup`` answers ``c0000`` for ``o`` followed by a constant c (c(q(X)) = c),
  else the most frequent training answer among the problems that rule leaves.
- stargraph: ``copy_start_goal`` writes the start and the goal at their fixed places and
  nothing right in between; ``copy_and_guess`` the same with each node in between guessed
  among the graph's other nodes (a model that copies and has learned only which letters
  are nodes of this graph; 0.407 per node at degree 2, arms of 5); ``shortcut`` (the "Clever Hans" policy Bachmann & Nagarajan
  describe) takes a uniformly random first edge out of the start and follows the edges to
  the arm's end, right with probability 1/degree.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Protocol, Sequence


class Scored(Protocol):
    prompt: str
    answer: str


Floor = dict[str, float]  # metric name (exact_match, token_accuracy) -> score


def _expected(problems: Sequence[Scored], chance: Callable[[Scored], float]) -> Floor:
    """Single-byte answers scored by the probability a guess is right."""
    p = sum(chance(q) for q in problems) / len(problems)
    return {"exact_match": p, "token_accuracy": p}


def _answered(problems: Sequence[Scored], answer: Callable[[Scored], str]) -> Floor:
    """Deterministic answers scored exactly as ``mtp.tasks.scoring.score`` scores a model."""
    exact = correct = total = 0
    for q in problems:
        got = answer(q)
        exact += got == q.answer
        correct += sum(a == b for a, b in zip(q.answer, got))
        total += len(q.answer)
    return {"exact_match": exact / len(problems), "token_accuracy": correct / total}


# ------------------------------------------------------------------------ induction

_NAME = re.compile(r"(?<![A-Za-z])[A-Z][a-z](?![A-Za-z])")


def _seen_names(prompt: str) -> list[str]:
    return _NAME.findall(prompt[:-1])


def _guess(candidates: set[str], answer: str) -> float:
    return (answer in candidates) / len(candidates) if candidates else 0.0


def induction_floors(problems: Sequence[Scored]) -> dict[str, Floor]:
    def seen(q: Scored) -> float:
        return _guess({n[1] for n in _seen_names(q.prompt)}, q.answer)

    def seen_other(q: Scored) -> float:
        sentence = q.prompt[:-1].rsplit(".", 1)[-1]  # the query's own sentence, before the query
        mine = set(_NAME.findall(sentence))
        return _guess({n[1] for n in _seen_names(q.prompt) if n not in mine}, q.answer)

    return {"guess_seen": _expected(problems, seen), "guess_seen_other": _expected(problems, seen_other)}


# ----------------------------------------------------------------------- polynomial

def _lookup(prompt: str) -> str | None:
    if len(prompt) > 1 and prompt[0] == "o" and prompt[1].isdigit():
        return prompt[1] + "0" * 4
    return None


def polynomial_floors(problems: Sequence[Scored], fit: Sequence[Scored]) -> dict[str, Floor]:
    """``fit``: training problems, for the constants (never the test set itself)."""
    if not fit:
        raise ValueError("polynomial floors need training problems to fit their constant answer")
    constant = Counter(q.answer for q in fit).most_common(1)[0][0]
    rest = Counter(q.answer for q in fit if _lookup(q.prompt) is None)
    fallback = rest.most_common(1)[0][0] if rest else constant
    return {
        "constant": _answered(problems, lambda q: constant),
        "two_rule_lookup": _answered(problems, lambda q: _lookup(q.prompt) or fallback),
    }


# ------------------------------------------------------------------------ stargraph

def _graph(prompt: str) -> tuple[list[str], str, str]:
    edges, query = prompt.rstrip("=").split("|")
    return edges.split(","), query[0], query[1]


def stargraph_floors(problems: Sequence[Scored]) -> dict[str, Floor]:
    def copy(q: Scored) -> str:
        _, start, goal = _graph(q.prompt)
        return start + "\0" * (len(q.answer) - 2) + goal

    def shortcut(q: Scored) -> float:  # P(exact): the one right edge among the start's out-edges
        edges, start, _ = _graph(q.prompt)
        return 1 / sum(e[0] == start for e in edges)

    def shortcut_tokens(q: Scored) -> float:  # start always right; the rest only on the right arm
        return (1 + (len(q.answer) - 1) * shortcut(q)) / len(q.answer)

    def guess(q: Scored) -> float:  # P(one node in between is right): uniform over the other nodes
        edges, start, goal = _graph(q.prompt)
        return 1 / len({v for e in edges for v in e} - {start, goal})

    def per_token(tokens: Callable[[Scored], float]) -> float:  # pooled over answer tokens, as the scorer does
        return sum(tokens(q) * len(q.answer) for q in problems) / sum(len(q.answer) for q in problems)

    return {
        "copy_start_goal": _answered(problems, copy),
        "copy_and_guess": {"exact_match": sum(guess(q) ** (len(q.answer) - 2) for q in problems) / len(problems),
                           "token_accuracy": per_token(lambda q: (2 + (len(q.answer) - 2) * guess(q)) / len(q.answer))},
        "shortcut": {"exact_match": sum(map(shortcut, problems)) / len(problems), "token_accuracy": per_token(shortcut_tokens)},
    }


FLOORS: dict[str, Callable[..., dict[str, Floor]]] = {
    "induction": lambda test, fit: induction_floors(test),
    "polynomial": polynomial_floors,
    "stargraph": lambda test, fit: stargraph_floors(test),
}


NAMES: dict[str, tuple[str, ...]] = {  # what each task's floors are called (for checking a sweep file)
    "induction": ("guess_seen", "guess_seen_other"),
    "polynomial": ("constant", "two_rule_lookup"),
    "stargraph": ("copy_start_goal", "copy_and_guess", "shortcut"),
}


def task_floors(task: str, test: Sequence[Scored], fit: Sequence[Scored]) -> dict[str, Floor]:
    """Every floor of ``task`` on ``test`` (``fit``: training problems for fitted constants); {} for a
    task without floors."""
    make = FLOORS.get(task)
    return make(test, fit) if make and test else {}


def strongest(floors: dict[str, Floor], metric: str) -> tuple[str, float] | None:
    """(name, score) of the highest floor for ``metric``, or None."""
    scored = [(name, f[metric]) for name, f in floors.items() if metric in f]
    return max(scored, key=lambda s: s[1]) if scored else None
