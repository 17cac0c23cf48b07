"""Induction (paper §4.1): stories in which two-token names recur.

A name is two bytes, an upper-case letter and a lower-case one (``Qk``), drawn at
random for each story, so its second byte can only be known by copying it from an
earlier mention: that is what an induction head does. The names of one story start
with different letters, so the first byte of a repeated name determines the second.

Each story is a few template sentences, from one of two template sets: ``story``
(sentences of about 30 bytes) or ``short`` (``Qk met Bd.``, about 14 bytes), where
name mentions, and so the repeats the metric scores, are twice as dense in the
training text. The evaluation prompt is a story cut just
after the first byte of the last mention of a name seen before; the answer is that
name's second byte (chance: 1/26, or 1/k guessing among the k names of the story).

Names only at test time (the paper's setting): with ``train_names=k``, training stories
draw each name's second byte from a closed set of k letters per first letter (fixed,
the same for every seed), and test stories from the other 26 - k letters, so every test
name is one no training story holds: the second byte can only be copied. The
``counterfactual`` evaluation set takes a test story and changes the second byte of the
queried name's earlier mentions: the answer is the changed byte, so a model is right
only if it follows the change (a memorised name cannot be).
"""

from __future__ import annotations

import functools
import random
import re
import string

from mtp.tasks.problem import Problem

TEMPLATES = (
    "{a} went to the market with {b}.",
    "{a} gave {b} a red apple.",
    "{a} and {b} walked home.",
    "Then {a} saw {b} near the river.",
    "{a} told {b} a long story.",
    "Later {a} met {b} at the park.",
    "{a} asked {b} for help.",
    "{a} waved at {b}.",
)

SHORT_TEMPLATES = (
    "{a} saw {b}.",
    "{a} met {b}.",
    "{a} hit {b}.",
    "{a} paid {b}.",
    "{a} and {b} ran.",
    "{a} fed {b}.",
    "{a} told {b}.",
    "{a} waved at {b}.",
)

TEMPLATE_SETS = {"story": TEMPLATES, "short": SHORT_TEMPLATES}


# Capitals that start a template word ("Then", "Later") cannot start a name.
FIRST_LETTERS = "".join(c for c in string.ascii_uppercase if c not in "TL")


@functools.cache
def closed_set(k: int) -> dict[str, str]:
    """The ``k`` second letters each first letter may take in training (seed-independent)."""
    rng = random.Random("induction-train-names")
    return {f: "".join(sorted(rng.sample(string.ascii_lowercase, k))) for f in FIRST_LETTERS}


@functools.cache
def second_letters(first: str, train_names: int, split: str) -> str:
    """Letters a name starting with ``first`` may end with: any, the closed training set, or the rest."""
    if not train_names:
        return string.ascii_lowercase
    closed = closed_set(train_names)[first]
    return closed if split == "train" else "".join(c for c in string.ascii_lowercase if c not in closed)


def names(rng: random.Random, count: int, train_names: int = 0, split: str = "train") -> list[str]:
    firsts = rng.sample(FIRST_LETTERS, count)
    return [f + rng.choice(second_letters(f, train_names, split)) for f in firsts]


def story(rng: random.Random, n_names: int, n_sentences: int, templates: str = "story", train_names: int = 0,
          split: str = "train") -> tuple[str, list[int]]:
    """(text, offsets of every name mention that repeats an earlier one)."""
    people = names(rng, n_names, train_names, split)
    text, repeats, seen = "", [], set()
    for _ in range(n_sentences):
        template = rng.choice(TEMPLATE_SETS[templates])
        a, b = rng.sample(people, 2)
        sentence = template.format(a=a, b=b)
        for name in sorted((a, b), key=sentence.index):
            offset = len(text) + (1 if text else 0) + sentence.index(name)
            if name in seen:
                repeats.append(offset)
            seen.add(name)
        text = f"{text} {sentence}" if text else sentence
    return text, repeats


def sampler(n_names: int, n_sentences: int, templates: str = "story", train_names: int = 0, split: str = "train"):
    """``rng -> Problem``: the story up to the first byte of its last repeated name; names of
    ``split`` (``train`` or ``test``, when ``train_names`` closes the training set)."""
    if templates not in TEMPLATE_SETS:
        raise ValueError(f"templates={templates!r} must be one of {', '.join(TEMPLATE_SETS)}")
    if n_sentences * 2 <= n_names:
        raise ValueError("stories need more name mentions than names, or nothing repeats")
    if not 0 <= train_names <= 20:
        raise ValueError(f"train_names={train_names!r} must be in [0, 20]: test names need the other letters")

    def sample(rng: random.Random) -> Problem:
        while True:
            text, repeats = story(rng, n_names, n_sentences, templates, train_names, split)
            if repeats:
                cut = repeats[-1]
                return Problem(text[: cut + 1], text[cut + 1], document=text)

    return sample


def counterfactual(problem: Problem, train_names: int) -> Problem:
    """The same story with the queried name's second byte changed everywhere before the query (to a
    letter no training name has there, drawn by a hash of the story); the answer follows the change."""
    rng = random.Random(problem.prompt)
    first, old = problem.prompt[-1], problem.answer
    new = rng.choice([c for c in second_letters(first, train_names, "test") if c != old])
    prompt = re.sub(rf"(?<![A-Za-z]){first}{old}(?![A-Za-z])", first + new, problem.prompt[:-1]) + first
    return Problem(prompt, new)
