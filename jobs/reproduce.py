"""Reproduce the paper's small-model findings: one command per experiment, or all five.

    python jobs/reproduce.py induction
    python jobs/reproduce.py all --tracking-uri sqlite:///$PWD/mlflow.db

Experiments (docs/REPRODUCTION.md): algorithmic, induction, planning, speed, finetune.
Each runs its sweep file(s) from tune_spaces/ with Ray Tune into one MLflow parent run
(experiment ``mtp-reproduction``) and prints its table: task metrics, mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

from mtp.cluster.ray_env import connect  # noqa: E402
from mtp.data import DataError  # noqa: E402
from mtp.experiments.catalog import EXPERIMENTS, run_experiment  # noqa: E402
from mtp.sweep import SweepError  # noqa: E402
from mtp.tracking.store import TrackingError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiments", nargs="+", choices=[*EXPERIMENTS, "all"], metavar="EXPERIMENT",
                   help=f"one or more of {', '.join(EXPERIMENTS)}, or all")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or local)")
    p.add_argument("--storage-path", default=None, help="where Tune keeps trials (default runs/sweeps)")
    p.add_argument("--address", default=None, help="Ray address; default: the running cluster or a local one")
    args = p.parse_args(argv)
    names = list(EXPERIMENTS) if "all" in args.experiments else list(dict.fromkeys(args.experiments))
    connect(args.address)
    done = []
    for name in names:
        print(f"== {name}: {', '.join(EXPERIMENTS[name])}", flush=True)
        try:
            result = run_experiment(name, REPO / "tune_spaces", tracking_uri=args.tracking_uri,
                                    storage_path=args.storage_path)
        except (SweepError, DataError, TrackingError) as exc:
            print(f"error: {name}: {exc}", file=sys.stderr)
            return 2
        done.append(result)
        print(result.table)
        print(f"{name}: {result.trials} trials ({result.failed} failed) in {result.seconds / 60:.1f} min; "
              f"MLflow {result.tracking_uri} parent run {result.parent_run_id}\n", flush=True)
    if len(done) > 1:
        print("experiment    trials  failed  minutes  parent run")
        for r in done:
            print(f"{r.name:<13} {r.trials:>6}  {r.failed:>6}  {r.seconds / 60:>7.1f}  {r.parent_run_id}")
    return 1 if any(r.failed == r.trials for r in done) else 0


if __name__ == "__main__":
    sys.exit(main())
