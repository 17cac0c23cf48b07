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
"""

from __future__ import annotations

import random
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


def names(rng: random.Random, count: int) -> list[str]:
    firsts = rng.sample(FIRST_LETTERS, count)
    return [f + rng.choice(string.ascii_lowercase) for f in firsts]


def story(rng: random.Random, n_names: int, n_sentences: int, templates: str = "story") -> tuple[str, list[int]]:
    """(text, offsets of every name mention that repeats an earlier one)."""
    people = names(rng, n_names)
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


def sampler(n_names: int, n_sentences: int, templates: str = "story"):
    """``rng -> Problem``: the story up to the first byte of its last repeated name."""
    if templates not in TEMPLATE_SETS:
        raise ValueError(f"templates={templates!r} must be one of {', '.join(TEMPLATE_SETS)}")
    if n_sentences * 2 <= n_names:
        raise ValueError("stories need more name mentions than names, or nothing repeats")

    def sample(rng: random.Random) -> Problem:
        while True:
            text, repeats = story(rng, n_names, n_sentences, templates)
            if repeats:
                cut = repeats[-1]
                return Problem(text[: cut + 1], text[cut + 1], document=text)

    return sample
