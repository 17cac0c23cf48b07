"""Optional per-trial evaluation: each trial's final checkpoint is scored and pass@k becomes its metric.

A sweep file opts in with an ``evaluation`` section (any ``GenerationConfig`` field too)::

    evaluation:
      benchmark: humaneval        # or mbpp, or a JSONL path (see mtp.evaluation)
      k: [1]
      n_samples: 1
      temperature: 0.0
      max_new_tokens: 256
    metric: humaneval/T0/pass_at_1

It runs ``mtp.evaluation.pipeline.evaluate_checkpoint``, the evaluation job's own
pipeline (an evaluation run linked to the trial's run, the same metric names), with
generation and sandboxes in the trial's process (``backend: local``), on the
resources the trial already holds, so evaluation never waits on another trial.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from mtp.evaluation.generation import GenerationConfig
from mtp.sweep.spec import SweepError

_GENERATION_KEYS = {f.name for f in dataclasses.fields(GenerationConfig)} - {"backend", "engine"}


@dataclass(frozen=True)
class EvalSpec:
    """The benchmark, the ks, how to generate, and the sandboxes, for every trial."""

    benchmark: str = "humaneval"
    k: list[int] = field(default_factory=lambda: [1])
    timeout_s: float = 3.0
    sandbox_workers: int = 1
    insecure: bool = False  # only where the sandbox cannot isolate (see mtp.sandbox)
    # trials are compared on the same inputs: too long a prompt is cut (generation warns with the counts)
    generation: GenerationConfig = GenerationConfig(max_new_tokens=256, backend="local", allow_truncation=True)

    @classmethod
    def parse(cls, raw: dict) -> "EvalSpec":
        own = {f.name for f in dataclasses.fields(cls)} - {"generation"}
        unknown = set(raw) - own - _GENERATION_KEYS
        if unknown:
            raise SweepError(f"unknown evaluation key(s) {sorted(unknown)}; known: {sorted(own | _GENERATION_KEYS)}")
        generation = {k: tuple(v) if k == "stop" and v is not None else v for k, v in raw.items() if k in _GENERATION_KEYS}
        spec = cls(**{k: v for k, v in raw.items() if k in own},
                   generation=dataclasses.replace(cls.generation, **generation))
        if Path(spec.benchmark).suffix in (".jsonl", ".json", ".gz") and Path(spec.benchmark).is_file():
            # trials run in their own working directories
            spec = dataclasses.replace(spec, benchmark=str(Path(spec.benchmark).resolve()))
        if not spec.k or any(not isinstance(k, int) or k < 1 for k in spec.k):
            raise SweepError(f"evaluation.k={spec.k!r} must be a list of positive integers")
        if max(spec.k) > spec.generation.n_samples:
            raise SweepError(f"evaluation.k={spec.k} needs n_samples >= {max(spec.k)}, got {spec.generation.n_samples}")
        try:
            spec.generation.validate()
        except ValueError as exc:
            raise SweepError(f"evaluation: {exc}") from None
        return spec

    def metric_names(self) -> list[str]:
        """Names of the metrics an evaluation reports (loads the benchmark: a bad one fails here)."""
        from mtp.evaluation import BenchmarkError, load_benchmark
        from mtp.evaluation.tracking import metric_prefix

        try:
            benchmark = load_benchmark(self.benchmark)
        except (BenchmarkError, OSError) as exc:
            raise SweepError(f"evaluation.benchmark={self.benchmark!r}: {exc}") from None
        return [f"{metric_prefix(benchmark.name, self.generation.temperature)}/pass_at_{k}" for k in self.k]

    def evaluate(self, checkpoint: Path, tracking_uri: str) -> dict[str, float]:
        """pass@k and verdict counts of ``checkpoint``, also logged as its own evaluation run."""
        from mtp.evaluation import DEFAULT_LIMITS, RunnerConfig
        from mtp.evaluation.pipeline import MLflowTarget, ScoringConfig, evaluate_checkpoint

        scoring = ScoringConfig(
            ks=self.k, limits=dataclasses.replace(DEFAULT_LIMITS, timeout_s=self.timeout_s),
            runner=RunnerConfig(backend="local", workers=self.sandbox_workers, insecure=self.insecure),
        )
        return evaluate_checkpoint(str(checkpoint), [self.benchmark], self.generation, scoring,
                                   mlflow=MLflowTarget(tracking_uri)).metrics


def check_metric(spec: EvalSpec, metric: str) -> None:
    """With an evaluation, the sweep's metric must be one of its pass@k names."""
    names = spec.metric_names()
    if metric not in names:
        raise SweepError(f"metric {metric!r} is not reported by the evaluation; use one of {names}")


class TaskProgress:
    """The task metric over training: each intermediate checkpoint of a trial scored on
    the first ``progress_problems`` test problems of every evaluation set, logged to the
    trial's run at its step under the final metric's name (the last step's point, from
    ``log_evaluation``, is on the full test sets)."""

    def __init__(self, client, run_id: str, task, final_step: int):
        self.client, self.run_id, self.task, self.final_step = client, run_id, task, final_step

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, step: int, directory: Path) -> None:
        if step >= self.final_step or not self.task.progress_problems:
            return
        _log_scores(self.client, self.run_id, self.task.evaluate(directory, limit=self.task.progress_problems), step)


def _log_scores(client, run_id: str, scores: dict[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in scores.items()])


def log_evaluation(client, cfg, spec, checkpoint: Path | None) -> None:
    """Score the final checkpoint (an ``EvalSpec``'s pass@k and verdict counts, or an
    ``mtp.experiments.tasks.TaskSpec``'s metrics); log them to the trial's run at the last step."""
    if checkpoint is None:
        raise RuntimeError("the sweep evaluates each trial, but training left no checkpoint")
    scores = spec.evaluate(checkpoint, cfg.tracking.tracking_uri) if isinstance(spec, EvalSpec) else spec.evaluate(checkpoint)
    _log_scores(client, cfg.tracking.run_id, scores, cfg.train.max_steps)
