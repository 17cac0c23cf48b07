"""The tasks in the paper's settings: induction names only at test time, the counterfactual set."""

from __future__ import annotations

import re

from mtp.tasks import induction
from mtp.tasks.spec import TaskSpec

NAME = re.compile(r"(?<![A-Za-z])[A-Z][a-z](?![A-Za-z])")


def _spec(**params):
    return TaskSpec.parse({"name": "induction", "test_problems": 60,
                           "params": {"n_names": 3, "n_sentences": 8, "templates": "short", **params}})


def test_test_names_never_occur_in_training_with_a_closed_training_set():
    spec = _spec(train_names=4)
    closed = induction.closed_set(4)
    train_names = {n for p in spec.problems("train", 300) for n in NAME.findall(p.text)}
    assert train_names and all(n[1] in closed[n[0]] for n in train_names)
    assert len({n[0] for n in train_names}) > 15  # every first letter, only 4 second letters each
    for name, problems in spec.eval_sets().items():
        test_names = {n for p in problems for n in NAME.findall(p.prompt[:-1])}
        assert test_names and not test_names & train_names, name
        assert all(p.answer not in closed[p.prompt[-1]] for p in problems), name


def test_counterfactual_changes_the_earlier_mentions_and_the_answer_follows():
    problems = _spec(train_names=4).eval_sets()["counterfactual"]
    for p in problems:
        first = p.prompt[-1]
        earlier = [n for n in NAME.findall(p.prompt[:-1]) if n[0] == first]
        assert earlier and {n[1] for n in earlier} == {p.answer}  # the copy leads to the changed byte
    # the same stories as the plain test set, in order: only the queried name's second byte differs
    plain = _spec(train_names=4).eval_sets()["in_domain"]
    assert len(plain) == len(problems)
    for a, b in zip(plain, problems):
        assert b.answer != a.answer and len(a.prompt) == len(b.prompt)
        diff = {(x, y) for x, y in zip(a.prompt, b.prompt) if x != y}
        assert diff == {(a.answer, b.answer)}
    assert [q.prompt for q in _spec(train_names=4).eval_sets(limit=10)["counterfactual"]] == [q.prompt for q in problems[:10]]


def test_without_a_closed_set_the_task_is_as_before():
    spec = _spec()
    assert spec.params["train_names"] == 0
    assert all(p.answer == p.document[len(p.prompt)] for p in spec.problems("train", 50))
