"""pass@k evaluation: benchmarks, the estimator, sandboxed scoring fanned out on Ray."""

from mtp.evaluation.benchmarks import Benchmark, BenchmarkError, Problem, load_benchmark
from mtp.evaluation.passk import mean_pass_at_k, pass_at_k
from mtp.evaluation.sandbox_pool import Program, RunnerConfig, Scorer, open_scorer, score
from mtp.evaluation.scoring import DEFAULT_LIMITS, EvaluationResult, SampleResult, parse_samples, score_samples

__all__ = [
    "Benchmark", "BenchmarkError", "DEFAULT_LIMITS", "EvaluationResult", "Problem", "Program", "RunnerConfig", "Scorer",
    "SampleResult", "load_benchmark", "mean_pass_at_k", "open_scorer", "parse_samples", "pass_at_k", "score", "score_samples",
]
