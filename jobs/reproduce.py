"""Reproduce the paper's small-model findings: one command per experiment, or all five.

    python jobs/reproduce.py induction
    python jobs/reproduce.py all --tracking-uri sqlite:///$PWD/mlflow.db
    python jobs/reproduce.py induction --resume runs/sweeps/paper_induction-...   # after Ctrl-C, as printed

Experiments (docs/REPRODUCTION.md): algorithmic, induction, planning, speed, finetune.
Each runs its sweep file(s) from tune_spaces/ with Ray Tune into one MLflow parent run
(experiment ``mtp-reproduction``) and prints its table: task metrics, mean ± std over seeds.
Ctrl-C stops the running experiment (its parent run ends KILLED) and prints the command that
continues it: ``--resume`` continues the first experiment named from its sweep directory
(finetune: the pretraining sweep's, then the finetuning sweep's), then runs the others.
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
from mtp.cluster.logs import set_verbose  # noqa: E402
from mtp.hints import command  # noqa: E402
from mtp.sweep import SweepError, SweepInterrupted, interrupted_count  # noqa: E402
from mtp.tracking.store import TrackingError  # noqa: E402


def resume_command(names: list[str], args: argparse.Namespace, resume: tuple[str, ...]) -> str:
    """The command that continues from the interrupted experiment (the first of ``names``)."""
    extra = [flag for name, value in (("--tracking-uri", args.tracking_uri), ("--storage-path", args.storage_path),
                                      ("--address", args.address)) if value for flag in (name, value)]
    return command(sys.argv[0], *names, *(flag for d in resume for flag in ("--resume", d)), *extra)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiments", nargs="+", choices=[*EXPERIMENTS, "all"], metavar="EXPERIMENT",
                   help=f"one or more of {', '.join(EXPERIMENTS)}, or all")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or local)")
    p.add_argument("--storage-path", default=None, help="where Tune keeps trials (default runs/sweeps)")
    p.add_argument("--address", default=None, help="Ray address; default: the running cluster or a local one")
    p.add_argument("--resume", action="append", default=[], metavar="SWEEP_DIR",
                   help="continue the first experiment named from the sweep directory an interrupted run printed "
                        "(finetune: twice, pretraining then finetuning)")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's and MLflow's INFO logs, Tune's trial tables and every trial's output too")
    args = p.parse_args(argv)
    set_verbose(args.verbose)
    names = list(EXPERIMENTS) if "all" in args.experiments else list(dict.fromkeys(args.experiments))
    connect(args.address)
    done = []
    for i, name in enumerate(names):
        print(f"== {name}: {', '.join(EXPERIMENTS[name])}", flush=True)
        try:
            result = run_experiment(name, REPO / "tune_spaces", resume=args.resume if i == 0 else (),
                                    tracking_uri=args.tracking_uri, storage_path=args.storage_path)
        except (SweepError, DataError, TrackingError) as exc:
            print(f"error: {name}: {exc}", file=sys.stderr)
            return 2
        except SweepInterrupted as exc:
            print(f"\n{name}: {exc}\nresume with: {resume_command(names[i:], args, (exc.sweep_dir,))}",
                  file=sys.stderr)
            return 130
        if result.interrupted is not None:
            sweep = result.interrupted
            print(f"\n{name}: interrupted: {interrupted_count(sweep.trials_done, sweep.trials_total)} "
                  f"(parent run {sweep.parent_run_id} marked KILLED)")
            print(f"resume with: {resume_command(names[i:], args, result.resume)}", flush=True)
            return 130
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
