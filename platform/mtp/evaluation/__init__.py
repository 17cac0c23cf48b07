"""pass@k evaluation: benchmarks, the estimator, sandboxed scoring fanned out on Ray.

``evaluate_checkpoint`` is the whole pipeline (generate, score, log to MLflow); the
names below it are its parts.
"""

from mtp.evaluation.benchmarks import Benchmark, BenchmarkError, Problem, load_benchmark
from mtp.evaluation.passk import mean_pass_at_k, pass_at_k
from mtp.evaluation.sandbox_pool import Program, RunnerConfig, Scorer, open_scorer, score
from mtp.evaluation.scoring import DEFAULT_LIMITS, EvaluationResult, SampleResult, parse_samples, score_samples
from mtp.evaluation.pipeline import (  # noqa: I001 - after its parts
    Evaluation, MLflowTarget, ScoringConfig, evaluate_checkpoint, evaluate_samples,
)

__all__ = [
    "Benchmark", "BenchmarkError", "DEFAULT_LIMITS", "Evaluation", "EvaluationResult", "MLflowTarget", "Problem",
    "Program", "RunnerConfig", "SampleResult", "Scorer", "ScoringConfig", "evaluate_checkpoint", "evaluate_samples",
    "load_benchmark", "mean_pass_at_k", "open_scorer", "parse_samples", "pass_at_k", "score", "score_samples",
]
