"""Optional per-trial evaluation: each trial's final checkpoint is scored and pass@k becomes its metric.

A sweep file opts in with an ``evaluation`` section::

    evaluation:
      benchmark: humaneval        # or mbpp, or a JSONL path (see mtp.evaluation)
      k: [1]
      n_samples: 1
      temperature: 0.0
      max_new_tokens: 256
    metric: humaneval/T0/pass_at_1

Metric names are the evaluation job's (``<benchmark>/T<temperature>/pass_at_<k>``),
so a sweep's trials and ``jobs/evaluate.py`` runs compare directly. Generation and
the sandboxes run inside the trial's own process (``backend: local``), on the
resources the trial already holds, so evaluation can never wait on another trial.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from mtp.sweep.spec import SweepError


@dataclass(frozen=True)
class EvalSpec:
    """What to generate and how to score it, for every trial."""

    benchmark: str = "humaneval"
    k: list[int] = field(default_factory=lambda: [1])
    n_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    timeout_s: float = 3.0
    sandbox_workers: int = 1
    insecure: bool = False  # only where the sandbox cannot isolate (see mtp.sandbox)

    @classmethod
    def parse(cls, raw: dict) -> "EvalSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise SweepError(f"unknown evaluation key(s) {sorted(unknown)}; known: {sorted(known)}")
        spec = cls(**raw)
        if Path(spec.benchmark).suffix in (".jsonl", ".json", ".gz") and Path(spec.benchmark).is_file():
            # trials run in their own working directories
            spec = dataclasses.replace(spec, benchmark=str(Path(spec.benchmark).resolve()))
        if not spec.k or any(not isinstance(k, int) or k < 1 for k in spec.k):
            raise SweepError(f"evaluation.k={spec.k!r} must be a list of positive integers")
        if max(spec.k) > spec.n_samples:
            raise SweepError(f"evaluation.k={spec.k} needs n_samples >= {max(spec.k)}, got {spec.n_samples}")
        try:
            spec.generation().validate()
        except ValueError as exc:
            raise SweepError(f"evaluation: {exc}") from None
        return spec

    def generation(self):
        from mtp.evaluation.generation import GenerationConfig

        return GenerationConfig(n_samples=self.n_samples, temperature=self.temperature, top_p=self.top_p,
                                max_new_tokens=self.max_new_tokens, backend="local",
                                # trials are compared on the same inputs; generation warns with the counts
                                allow_truncation=True)

    def metric_names(self) -> list[str]:
        """Names of the metrics an evaluation reports (loads the benchmark: a bad one fails here)."""
        from mtp.evaluation import BenchmarkError, load_benchmark

        try:
            benchmark = load_benchmark(self.benchmark)
        except (BenchmarkError, OSError) as exc:
            raise SweepError(f"evaluation.benchmark={self.benchmark!r}: {exc}") from None
        return [f"{_prefix(benchmark.name, self.temperature)}/pass_at_{k}" for k in self.k]


def check_metric(spec: EvalSpec, metric: str) -> None:
    """With an evaluation, the sweep's metric must be one of its pass@k names."""
    names = spec.metric_names()
    if metric not in names:
        raise SweepError(f"metric {metric!r} is not reported by the evaluation; use one of {names}")


def evaluate_checkpoint(checkpoint: Path, spec: EvalSpec) -> dict[str, float]:
    """Generate from ``checkpoint`` and score in sandboxes; returns pass@k and verdict counts."""
    from dataclasses import replace

    from mtp.evaluation import DEFAULT_LIMITS, RunnerConfig, load_benchmark, score_samples
    from mtp.evaluation.generation import generate_samples
    from mtp.evaluation.tracking import ScoredRun, metrics

    benchmark = load_benchmark(spec.benchmark)
    rows = generate_samples(str(checkpoint), benchmark, spec.generation())
    result = score_samples(
        benchmark, [(r["task_id"], r["completion"]) for r in rows], spec.k,
        replace(DEFAULT_LIMITS, timeout_s=spec.timeout_s),
        RunnerConfig(backend="local", workers=spec.sandbox_workers, insecure=spec.insecure), progress=False,
    )
    return metrics([ScoredRun(result, spec.temperature)])


def _prefix(benchmark_name: str, temperature: float) -> str:
    """The evaluation job's metric prefix, computed by its own code (it reads only ``result.benchmark``)."""
    from types import SimpleNamespace

    from mtp.evaluation.tracking import ScoredRun

    return ScoredRun(SimpleNamespace(benchmark=benchmark_name), temperature).prefix


def log_evaluation(client, cfg, spec, checkpoint: Path | None) -> None:
    """Score the final checkpoint (pass@k and verdict counts for an ``EvalSpec``, or a task's
    metrics for an ``mtp.experiments.tasks.TaskSpec``); log them to the trial's run at the last step."""
    import time

    from mlflow.entities import Metric

    if checkpoint is None:
        raise RuntimeError("the sweep evaluates each trial, but training left no checkpoint")
    scores = evaluate_checkpoint(checkpoint, spec) if isinstance(spec, EvalSpec) else spec.evaluate(checkpoint)
    now = int(time.time() * 1000)
    client.log_batch(cfg.tracking.run_id, metrics=[Metric(k, float(v), now, cfg.train.max_steps) for k, v in scores.items()])
