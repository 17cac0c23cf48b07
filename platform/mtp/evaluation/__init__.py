"""pass@k evaluation: benchmarks, the estimator, sandboxed scoring fanned out on Ray.

``evaluate_checkpoint`` is the whole pipeline (generate, score, log to MLflow); the
names below it are its parts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mtp.lazy import exports

# public name -> its module, imported on first use: scoring a sample file needs no torch (mtp.lazy)
_EXPORTS = {
    **dict.fromkeys(["Benchmark", "BenchmarkError", "Problem", "load_benchmark"], "mtp.evaluation.benchmarks"),
    **dict.fromkeys(["mean_pass_at_k", "pass_at_k"], "mtp.evaluation.passk"),
    **dict.fromkeys(["Program", "ProgramScorer", "RunnerConfig", "open_scorer", "score"], "mtp.evaluation.sandbox_pool"),
    **dict.fromkeys(["DEFAULT_LIMITS", "EvaluationResult", "SampleResult", "parse_samples", "score_samples"],
                    "mtp.evaluation.scoring"),
    **dict.fromkeys(["Evaluation", "MLflowTarget", "ScoringConfig", "evaluate_checkpoint", "evaluate_samples"],
                    "mtp.evaluation.pipeline"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = exports(globals(), _EXPORTS)

if TYPE_CHECKING:  # static checkers and IDEs see the real names
    from mtp.evaluation.benchmarks import Benchmark, BenchmarkError, Problem, load_benchmark
    from mtp.evaluation.passk import mean_pass_at_k, pass_at_k
    from mtp.evaluation.pipeline import Evaluation, MLflowTarget, ScoringConfig, evaluate_checkpoint, evaluate_samples
    from mtp.evaluation.sandbox_pool import Program, ProgramScorer, RunnerConfig, open_scorer, score
    from mtp.evaluation.scoring import DEFAULT_LIMITS, EvaluationResult, SampleResult, parse_samples, score_samples
