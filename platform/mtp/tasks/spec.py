"""Tasks by name: a generator for training text and held-out evaluation sets, cached as a corpus file.

A sweep file's ``task:`` section builds a ``TaskSpec`` (a ``mtp.sweep.scorers.Scorer``)::

    task:
      name: polynomial                  # polynomial, stargraph, induction
      params: {max_ops: 5}              # the generator's settings (see TASKS)
      train_problems: 100000            # documents in the training corpus
      test_problems: 500                # per evaluation set
      progress_problems: 100            # of those, scored at each intermediate checkpoint (0: none)

The corpus (one JSON line per training problem) is written once, under
``$MTP_CACHE_DIR/tasks``, named by a hash of everything that changes it, and
``data.source`` points to it; the evaluation sets are regenerated on demand (same
seed, same problems).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mtp.config import ConfigError
from mtp.config import cache_dir as mtp_cache_dir
from mtp.decoding.config import EngineConfig
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


TASKS: dict[str, TaskDef] = {
    "polynomial": TaskDef(
        defaults={"min_ops": 1, "max_ops": 5, "ood_min_ops": 6, "ood_max_ops": 10},
        train=lambda p: polynomial.sampler(p["min_ops"], p["max_ops"]),
        evals={
            "in_domain": lambda p: polynomial.sampler(p["min_ops"], p["max_ops"]),
            "out_of_domain": lambda p: polynomial.sampler(p["ood_min_ops"], p["ood_max_ops"]),
        },
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
    seed: int = 0
    engine: EngineConfig = EngineConfig(max_batch_size=64)  # what decodes the answers (``engine:``, any field)

    @classmethod
    def parse(cls, raw: Any) -> "TaskSpec":
        if not isinstance(raw, dict):
            raise TaskError(f"task must be a mapping, got {raw!r}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(raw) - known
        if unknown:
            raise TaskError(f"unknown task key(s) {sorted(unknown)}; known: {sorted(known)}")
        if raw.get("name") not in TASKS:
            raise TaskError(f"task.name={raw.get('name')!r} must be one of {', '.join(TASKS)}")
        definition = TASKS[raw["name"]]
        params = raw.get("params") or {}
        bad = set(params) - set(definition.defaults)
        if bad:
            raise TaskError(f"task.params {sorted(bad)} unknown for {raw['name']}; known: {sorted(definition.defaults)}")
        engine = EngineConfig.from_dict(raw.get("engine"), "task.engine", cls.engine)
        spec = cls(**{**raw, "params": {**definition.defaults, **params}, "engine": engine})
        for name in ("train_problems", "test_problems"):
            value = getattr(spec, name)
            if not isinstance(value, int) or value < 1:
                raise TaskError(f"task.{name}={value!r} must be a positive integer")
        if not isinstance(spec.progress_problems, int) or spec.progress_problems < 0:
            raise TaskError(f"task.progress_problems={spec.progress_problems!r} must be a non-negative integer")
        try:
            definition.train(spec.params)  # samplers check their settings when built
        except ValueError as exc:
            raise TaskError(f"task.params: {exc}") from None
        return spec

    @property
    def definition(self) -> TaskDef:
        return TASKS[self.name]

    def problems(self, split: str, count: int, eval_set: str | None = None) -> list[Problem]:
        """``count`` distinct problems of ``split``; ``eval_set`` picks an evaluation distribution."""
        make = self.definition.evals[eval_set] if eval_set else self.definition.train
        return list(splits.draw(make(self.params), problem_key, split, self.seed, count, stream=eval_set or ""))

    def eval_sets(self, limit: int | None = None) -> dict[str, list[Problem]]:
        """Held-out test problems per evaluation set (never in any training corpus); the
        first ``limit`` of each if given (a seeded stream: the same problems every time,
        and drawing fewer draws a prefix of the full set)."""
        count = self.test_problems if limit is None else min(limit, self.test_problems)
        sets = {name: self.problems("test", count, name) for name in self.definition.evals}
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
        for name, problems in self.eval_sets().items():
            for floor, scores in task_floors(self.name, problems, fit).items():
                for metric, value in scores.items():
                    out.setdefault(f"task/{name}/{metric}", {})[floor] = value
        return out

    def metric_names(self) -> list[str]:
        """What ``evaluate`` reports, for a sweep's ``metric``."""
        from mtp.tasks.scoring import METRICS

        return [f"task/{name}/{metric}" for name in [*self.definition.evals, *self.definition.derived]
                for metric in METRICS]

    def evaluate(self, checkpoint: str | Path, limit: int | None = None) -> dict[str, float]:
        """Greedy answers of ``checkpoint`` on every held-out evaluation set (its first
        ``limit`` problems if given), scored."""
        from mtp.tasks.scoring import evaluate_task

        return evaluate_task(checkpoint, self.eval_sets(limit), self.engine)

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
        makes = {"name": self.name, "params": self.params, "train_problems": self.train_problems, "seed": self.seed}
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
                fh.write(json.dumps({"text": problem.text}) + "\n")
        os.replace(tmp, path)
        return path

