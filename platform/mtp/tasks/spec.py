"""Tasks by name: a generator for training text and held-out evaluation sets, cached as a corpus file.

A sweep file's ``task:`` section builds a ``TaskSpec`` (a ``mtp.sweep.scorers.Scorer``)::

    task:
      name: polynomial                  # polynomial, stargraph, induction
      params: {max_ops: 5}              # the generator's settings (see TASKS)
      train_problems: 100000            # documents in the training corpus
      test_problems: 500                # per evaluation set
      progress_problems: 100            # of those, scored at each intermediate checkpoint (0: none)
      score_split: test                 # val while choosing sizes/budgets (the test split stays unseen)

``params: {stratified: true}`` (polynomial) scores one test set per operation count
(``ops_01`` ...; test_problems each, or all the split holds) and reports in/out of
domain pooled over their counts (all their problems together). Every corpus line also carries the problem's
``prompt``, so ``data.prompt_column: prompt`` (with ``data.pack: whole``) trains on the
answers only.

The corpus (one JSON line per training problem) is written once, under
``$MTP_CACHE_DIR/tasks``, named by a hash of everything that changes it, and
``data.source`` points to it; the evaluation sets are regenerated on demand (same
seed, same problems).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mtp.config import ConfigError
from mtp.config import cache_dir as mtp_cache_dir
from mtp.decoding.config import EngineConfig
from mtp.specs import build
from mtp.tasks import induction, polynomial, splits, stargraph
from mtp.tasks.problem import Problem


@dataclass(frozen=True)
class TaskDef:
    """How a task draws its training problems and each of its evaluation sets."""

    defaults: dict[str, Any]
    train: Callable[..., Callable]  # params -> sampler
    evals: dict[str, Callable[..., Callable]]  # eval set name -> (params -> sampler)
    # eval set name -> (the set it is made from, (params, problem) -> its counterpart): the same problems, changed
    derived: dict[str, tuple[str, Callable[..., Problem]]] = field(default_factory=dict)
    # with params["stratified"]: params -> {stratum: (the eval set it is part of, params -> sampler)}
    strata: Callable[[dict[str, Any]], dict[str, tuple[str, Callable]]] | None = None

    def params_type(self) -> type:
        """The params as a dataclass, typed by the defaults, for the strict parser."""
        return dataclasses.make_dataclass("params", [(k, type(v), dataclasses.field(default=v))
                                                     for k, v in self.defaults.items()])


TASKS: dict[str, TaskDef] = {
    "polynomial": TaskDef(
        defaults={"min_ops": 1, "max_ops": 5, "ood_min_ops": 6, "ood_max_ops": 10, "stratified": False},
        train=lambda p: polynomial.sampler(p["min_ops"], p["max_ops"]),
        evals={
            "in_domain": lambda p: polynomial.sampler(p["min_ops"], p["max_ops"]),
            "out_of_domain": lambda p: polynomial.sampler(p["ood_min_ops"], p["ood_max_ops"]),
        },
        # the paper reports per operation count: one test set per count (test_problems each, or all
        # there are), in/out of domain all their problems pooled
        strata=lambda p: {f"ops_{k:02d}": ("in_domain" if k <= p["max_ops"] else "out_of_domain",
                                           lambda _, k=k: polynomial.sampler(k, k))
                          for k in [*range(p["min_ops"], p["max_ops"] + 1), *range(p["ood_min_ops"], p["ood_max_ops"] + 1)]},
    ),
    "stargraph": TaskDef(
        defaults={"degree": 2, "arm_length": 5},
        train=lambda p: stargraph.sampler(p["degree"], p["arm_length"]),
        evals={"in_domain": lambda p: stargraph.sampler(p["degree"], p["arm_length"])},
    ),
    "induction": TaskDef(
        defaults={"n_names": 3, "n_sentences": 4, "templates": "story", "train_names": 0},
        train=lambda p: induction.sampler(p["n_names"], p["n_sentences"], p["templates"], p["train_names"]),
        evals={
            "in_domain": lambda p: induction.sampler(p["n_names"], p["n_sentences"], p["templates"], p["train_names"],
                                                     "test"),
        },
        derived={"counterfactual": ("in_domain", lambda p, q: induction.counterfactual(q, p["train_names"]))},
    ),
}


def pooled(by_stratum: dict[str, float], sizes: dict[str, int]) -> float:
    """A pooled set's score from its strata's: their mean weighted by problems (all its problems together)."""
    return sum(v * sizes[n] for n, v in by_stratum.items()) / sum(sizes[n] for n in by_stratum)


class TaskError(ConfigError):
    """A task section names an unknown task or a bad setting."""


def problem_key(problem: Problem) -> str:
    """What decides a problem's split: its full training text."""
    return problem.text


@dataclass(frozen=True)
class TaskSpec:
    """One synthetic task: generator settings, corpus size, evaluation sets."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    train_problems: int = 100_000
    test_problems: int = 500
    progress_problems: int = 100  # the first ones of each test set, scored at intermediate checkpoints
    score_split: str = "test"  # "val" while choosing sizes and budgets: the test split is for the final runs only
    seed: int = 0
    engine: EngineConfig = EngineConfig(max_batch_size=64)  # what decodes the answers (``engine:``, any field)

    @classmethod
    def parse(cls, raw: Any, where: str = "task") -> "TaskSpec":
        """A ``task:`` section; unknown keys and wrong types, the params' too, fail naming the key."""
        name = raw.get("name") if isinstance(raw, dict) else None
        if name not in TASKS:
            raise TaskError(f"{where}.name: expected one of {', '.join(TASKS)}, got {name!r}")
        definition = TASKS[name]
        params = dataclasses.asdict(build(definition.params_type(), raw.get("params") or {}, f"{where}.params"))
        spec = build(cls, {**raw, "params": params}, where)
        for key in ("train_problems", "test_problems"):
            if getattr(spec, key) < 1:
                raise TaskError(f"{where}.{key}={getattr(spec, key)!r} must be a positive integer")
        if spec.score_split not in ("test", "val"):
            raise TaskError(f"{where}.score_split={spec.score_split!r} must be 'test' or 'val'")
        if spec.progress_problems < 0:
            raise TaskError(f"{where}.progress_problems={spec.progress_problems!r} must be a non-negative integer")
        spec.engine.validate()
        try:
            definition.train(spec.params)  # samplers check their settings when built
        except ValueError as exc:
            raise TaskError(f"{where}.params: {exc}") from None
        return spec

    @property
    def definition(self) -> TaskDef:
        return TASKS[self.name]

    @property
    def stratified(self) -> bool:
        return bool(self.params.get("stratified")) and self.definition.strata is not None

    def _evals(self) -> dict[str, Callable]:
        """Evaluation set name -> sampler factory: the strata of a stratified task, else the task's sets."""
        if self.stratified:
            return {name: make for name, (_, make) in self.definition.strata(self.params).items()}
        return self.definition.evals

    def groups(self) -> dict[str, list[str]]:
        """Of a stratified task: each pooled set (in_domain, ...) and its strata, reported as their mean."""
        out: dict[str, list[str]] = {}
        for name, (group, _) in (self.definition.strata(self.params).items() if self.stratified else ()):
            out.setdefault(group, []).append(name)
        return out

    def problems(self, split: str, count: int, eval_set: str | None = None) -> list[Problem]:
        """``count`` distinct problems of ``split`` (of a stratum: at most, all there are); ``eval_set``
        picks an evaluation distribution."""
        make = self._evals()[eval_set] if eval_set else self.definition.train
        return list(splits.draw(make(self.params), problem_key, split, self.seed, count, stream=eval_set or "",
                                at_most=self.stratified and eval_set is not None))

    def eval_sets(self, limit: int | None = None) -> dict[str, list[Problem]]:
        """Held-out test problems per evaluation set (never in any training corpus); the
        first ``limit`` of each if given (a seeded stream: the same problems every time,
        and drawing fewer draws a prefix of the full set)."""
        count = self.test_problems if limit is None else min(limit, self.test_problems)
        sets = {name: self.problems(self.score_split, count, name) for name in self._evals()}
        for name, (source, change) in self.definition.derived.items():
            sets[name] = [change(self.params, q) for q in sets[source]]
        return sets

    def floors(self, fit_problems: int = 5000) -> dict[str, dict[str, float]]:
        """``task/<set>/<metric>`` -> {floor: score}: the task's non-learning answers on the very test
        sets the trials are scored on (``mtp.compare.floors``); constants fitted on training problems."""
        from mtp.compare.floors import FLOORS, task_floors

        if self.name not in FLOORS:
            return {}
        fit = self.problems("train", min(fit_problems, self.train_problems)) if self.name == "polynomial" else []
        out: dict[str, dict[str, float]] = {}
        sets = self.eval_sets()
        for name, problems in sets.items():
            for floor, scores in task_floors(self.name, problems, fit).items():
                for metric, value in scores.items():
                    out.setdefault(f"task/{name}/{metric}", {})[floor] = value
        sizes = {name: len(problems) for name, problems in sets.items()}
        for group, names in self.groups().items():
            for metric in {m.rsplit("/", 1)[1] for m in out}:
                for floor in out[f"task/{names[0]}/{metric}"]:
                    out.setdefault(f"task/{group}/{metric}", {})[floor] = pooled(
                        {n: out[f"task/{n}/{metric}"][floor] for n in names}, sizes)
        return out

    def metric_names(self) -> list[str]:
        """What ``evaluate`` reports, for a sweep's ``metric``."""
        from mtp.tasks.scoring import METRICS

        return [f"task/{name}/{metric}" for name in [*self._evals(), *self.groups(), *self.definition.derived]
                for metric in METRICS]

    def evaluate(self, checkpoint: str | Path, limit: int | None = None) -> dict[str, float]:
        """Greedy answers of ``checkpoint`` on every held-out evaluation set (its first
        ``limit`` problems if given), scored."""
        from mtp.tasks.scoring import METRICS, evaluate_task

        sets = self.eval_sets(limit)
        scores = evaluate_task(checkpoint, sets, self.engine)
        sizes = {name: len(problems) for name, problems in sets.items()}
        for group, names in self.groups().items():
            for metric in METRICS:
                scores[f"task/{group}/{metric}"] = pooled({n: scores[f"task/{n}/{metric}"] for n in names}, sizes)
        return scores

    @property
    def progress_limit(self) -> int:
        return self.progress_problems

    def training_config(self) -> dict[str, Any]:
        """The trials train on the task's corpus (its path only: ``prepare`` writes it)."""
        return {"data.source": str(self.corpus_path())}

    def prepare(self) -> None:
        self.write_corpus()

    def corpus_path(self, cache_dir: str | Path | None = None) -> Path:
        root = Path(cache_dir) / "tasks" if cache_dir else mtp_cache_dir("tasks")
        # named by what decides its lines only: how many test problems are scored, and when, does not
        makes = {"name": self.name, "params": self.params, "train_problems": self.train_problems, "seed": self.seed,
                 "lines": "text+prompt"}
        digest = hashlib.sha256(json.dumps(makes, sort_keys=True).encode()).hexdigest()[:12]
        return root / f"{self.name}-{digest}.jsonl"

    def write_corpus(self, cache_dir: str | Path | None = None) -> Path:
        """The training corpus (train split only), written once and reused; returns its path."""
        path = self.corpus_path(cache_dir)
        if path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        with tmp.open("w") as fh:
            for problem in self.problems("train", self.train_problems):
                fh.write(json.dumps({"text": problem.text, "prompt": problem.prompt}) + "\n")
        os.replace(tmp, path)
        return path

