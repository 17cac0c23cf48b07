"""What a sweep trial is scored with, besides its training metrics: one ``Scorer`` protocol.

A sweep file's scorer sections (``evaluation:`` for pass@k, ``task:`` for a paper task or
the speed measurement) each parse into a ``Scorer``. The sweep only talks to the protocol:

* ``metric_names()``: what ``evaluate`` reports (the sweep's ``metric`` may be one);
* ``training_config()``: dotted config fields the trials train with (a task's corpus as
  ``data.source``), known without writing or downloading anything;
* ``prepare()``: what must exist before the first trial (write that corpus, load the
  benchmark); the driver calls it once, parsing a sweep file never does;
* ``progress_limit``: problems scored at each intermediate checkpoint (0: the final one only);
* ``evaluate(checkpoint, limit)``: the scores of one checkpoint (the first ``limit``
  problems when given).

A new scorer is a class with these members and one entry in ``TASK_SCORERS`` (a ``task:``
section with that ``name``) or ``SECTIONS`` (a section of its own).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Protocol

from mtp.sweep.evaluation import EvalSpec
from mtp.tasks.spec import TaskSpec
from mtp.tasks.speed import SpeedSpec


class Scorer(Protocol):
    progress_limit: int

    def metric_names(self) -> list[str]: ...

    def training_config(self) -> dict[str, Any]: ...

    def prepare(self) -> None: ...

    def evaluate(self, checkpoint: str | Path, limit: int | None = None) -> dict[str, float]: ...


# ``task: {name: ...}`` -> its scorer's parser, ``(raw, where) -> Scorer``; any other name is a
# generated task (mtp.tasks.spec.TASKS).
TASK_SCORERS: dict[str, Callable[[Any, str], Scorer]] = {"speed": SpeedSpec.parse}


def parse_task(raw: Any, where: str = "task") -> Scorer:
    """A ``task:`` section: a named measurement (``TASK_SCORERS``) or a generated task."""
    if isinstance(raw, dict) and raw.get("name") in TASK_SCORERS:
        return TASK_SCORERS[raw["name"]](raw, where)
    return TaskSpec.parse(raw, where)


# A sweep file's scorer sections (fields of SweepSpec), in the order trials are scored.
SECTIONS: dict[str, Callable[[Any, str], Scorer]] = {"evaluation": EvalSpec.parse, "task": parse_task}


class ScoreProgress:
    """A scorer's metrics over training: each intermediate checkpoint of a trial scored on
    the first ``progress_limit`` problems, logged to the trial's run at its step under the
    final metric's name (the last step's point, from ``log_scores``, is on everything)."""

    def __init__(self, client, run_id: str, scorer: Scorer, final_step: int):
        self.client, self.run_id, self.scorer, self.final_step = client, run_id, scorer, final_step

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, step: int, directory: Path) -> None:
        if step < self.final_step:
            log_scores(self.client, self.run_id, self.scorer.evaluate(directory, limit=self.scorer.progress_limit), step)


def log_scores(client, run_id: str, scores: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in scores.items()])
