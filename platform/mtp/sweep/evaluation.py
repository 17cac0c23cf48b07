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
pipeline (an evaluation run linked to the trial's run, in the store the trial logs to,
the same metric names), with generation and sandboxes in the trial's process
(``backend: local``), on the resources the trial already holds, so evaluation never
waits on another trial. An ``EvalSpec`` is a ``mtp.sweep.scorers.Scorer``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtp.config import ConfigError
from mtp.evaluation.generation import GenerationConfig
from mtp.specs import build

_GENERATION_KEYS = {f.name for f in dataclasses.fields(GenerationConfig)} - {"backend"}


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
    progress_limit = 0  # pass@k is scored on the whole benchmark, after training only

    @classmethod
    def parse(cls, raw: Any, where: str = "evaluation") -> "EvalSpec":
        """An ``evaluation:`` section: its own keys and ``GenerationConfig``'s, side by side."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
        own = {k: v for k, v in raw.items() if k not in _GENERATION_KEYS}
        generation = build(GenerationConfig, {k: v for k, v in raw.items() if k in _GENERATION_KEYS}, where,
                           base=cls.generation)
        spec = dataclasses.replace(build(cls, own, where), generation=generation)
        if Path(spec.benchmark).suffix in (".jsonl", ".json", ".gz") and Path(spec.benchmark).is_file():
            # trials run in their own working directories
            spec = dataclasses.replace(spec, benchmark=str(Path(spec.benchmark).resolve()))
        if not spec.k or min(spec.k) < 1:
            raise ConfigError(f"{where}.k={spec.k!r} must be a list of positive integers")
        if max(spec.k) > spec.generation.n_samples:
            raise ConfigError(f"{where}.k={spec.k} needs n_samples >= {max(spec.k)}, got {spec.generation.n_samples}")
        try:
            spec.generation.validate()
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return spec

    def metric_names(self) -> list[str]:
        """Names of the metrics an evaluation reports (an unknown benchmark fails here; nothing is loaded)."""
        from mtp.evaluation.benchmarks import BenchmarkError, benchmark_name
        from mtp.evaluation.tracking import metric_prefix

        try:
            name = benchmark_name(self.benchmark)
        except BenchmarkError as exc:
            raise ConfigError(f"evaluation.benchmark={self.benchmark!r}: {exc}") from None
        return [f"{metric_prefix(name, self.generation.temperature)}/pass_at_{k}" for k in self.k]

    def training_config(self) -> dict[str, Any]:
        return {}

    def prepare(self) -> None:
        """Load the benchmark once before any trial (a missing file or hub dataset fails here)."""
        from mtp.evaluation import BenchmarkError, load_benchmark

        try:
            load_benchmark(self.benchmark)
        except (BenchmarkError, OSError) as exc:
            raise ConfigError(f"evaluation.benchmark={self.benchmark!r}: {exc}") from None

    def evaluate(self, checkpoint: str | Path, limit: int | None = None) -> dict[str, float]:
        """pass@k and verdict counts of ``checkpoint``, also logged as its own evaluation run in
        the store its training run logged to (``limit``: unused, pass@k takes the whole benchmark)."""
        from mtp.checkpoint import read_config
        from mtp.evaluation import DEFAULT_LIMITS, RunnerConfig
        from mtp.evaluation.pipeline import MLflowTarget, ScoringConfig, evaluate_checkpoint

        scoring = ScoringConfig(
            ks=self.k, limits=dataclasses.replace(DEFAULT_LIMITS, timeout_s=self.timeout_s),
            runner=RunnerConfig(backend="local", workers=self.sandbox_workers, insecure=self.insecure),
        )
        tracking_uri = read_config(checkpoint)["tracking"]["tracking_uri"]
        return evaluate_checkpoint(str(checkpoint), [self.benchmark], self.generation, scoring,
                                   mlflow=MLflowTarget(tracking_uri)).metrics
