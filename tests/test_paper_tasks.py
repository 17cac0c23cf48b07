"""The tasks in the paper's settings: induction names only at test time, the counterfactual set."""

from __future__ import annotations

import re

import pytest

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


def test_polynomial_test_sets_stratified_per_operation_count():
    from mtp.tasks import polynomial

    spec = TaskSpec.parse({"name": "polynomial", "test_problems": 30,
                           "params": {"max_ops": 3, "ood_min_ops": 4, "ood_max_ops": 5, "stratified": True}})
    sets = spec.eval_sets()
    assert list(sets) == ["ops_01", "ops_02", "ops_03", "ops_04", "ops_05"]
    assert spec.groups() == {"in_domain": ["ops_01", "ops_02", "ops_03"], "out_of_domain": ["ops_04", "ops_05"]}
    for name, problems in sets.items():
        ops = int(name[-2:])
        counted = {sum(c in polynomial.UNARY + polynomial.BINARY for c in p.prompt) for p in problems}
        assert counted == {ops}, name  # every problem of a stratum has exactly its operation count
        assert len({p.prompt for p in problems}) == len(problems)
    assert len(sets["ops_01"]) < 30 and all(len(sets[n]) == 30 for n in ("ops_03", "ops_04", "ops_05"))
    # a stratum smaller than asked holds all the test split has of it: asking for more finds no more
    more = TaskSpec.parse({"name": "polynomial", "test_problems": 60, "params": {**spec.params}}).eval_sets()["ops_01"]
    assert [p.prompt for p in more] == [p.prompt for p in sets["ops_01"]]
    names = spec.metric_names()
    assert "task/ops_02/exact_match" in names and "task/in_domain/exact_match" in names
    floors = spec.floors()
    sizes = {n: len(sets[n]) for n in spec.groups()["in_domain"]}
    pooled = sum(floors[f"task/{n}/exact_match"]["two_rule_lookup"] * k for n, k in sizes.items()) / sum(sizes.values())
    assert floors["task/in_domain/exact_match"]["two_rule_lookup"] == pytest.approx(pooled)


def test_val_split_scoring_for_choosing_settings():
    val = TaskSpec.parse({"name": "stargraph", "test_problems": 20, "score_split": "val"}).eval_sets()["in_domain"]
    test = TaskSpec.parse({"name": "stargraph", "test_problems": 20}).eval_sets()["in_domain"]
    assert not {p.prompt for p in val} & {p.prompt for p in test}
    with pytest.raises(ValueError, match="score_split"):
        TaskSpec.parse({"name": "stargraph", "score_split": "train"})
