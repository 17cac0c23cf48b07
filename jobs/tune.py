"""Run a sweep file with Ray Tune; every trial is a training run nested in one MLflow parent run.

    python jobs/tune.py --space tune_spaces/smoke.yaml
    python jobs/tune.py --space tune_spaces/smoke.yaml --resume runs/sweeps/smoke-20261128-101500-123456
    ray job submit --working-dir . -- python jobs/tune.py --space tune_spaces/paper_grid.yaml \\
        --storage-path /mnt/shared/sweeps --tracking-uri http://mlflow:5000

The sweep file, every config it can produce and the cluster's capacity are checked
before the first trial starts. At the end it prints one row per trial and where the
parent run is in MLflow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[1] / "platform"
sys.path.insert(0, str(SOURCE_ROOT))

from mtp.cluster.ray_env import connect  # noqa: E402
from mtp.data import DataError  # noqa: E402
from mtp.hints import command, mlflow_browse  # noqa: E402
from mtp.sweep import SweepError, SweepInterrupted, interrupted_count, load_spec, run_sweep  # noqa: E402
from mtp.sweep.summary import format_table  # noqa: E402
from mtp.tracking.store import TrackingError  # noqa: E402
from mtp.cluster.logs import set_verbose  # noqa: E402
from mtp.cluster.outputs import OutputError, check_durable  # noqa: E402
from mtp.tracking.registry import register_run_model  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", required=True, help="sweep file (tune_spaces/*.yaml)")
    p.add_argument("--storage-path", default=None,
                   help="where Tune keeps trial state and checkpoints (a filesystem every node mounts, on "
                        "multi-node clusters); "
                        "default runs/sweeps")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI; default the config's tracking.tracking_uri, else MLFLOW_TRACKING_URI")
    p.add_argument("--resume", metavar="SWEEP_DIR", default=None,
                   help="continue the sweep in this directory after a driver crash (Tuner.restore)")
    p.add_argument("--name", default=None, help="override the sweep's name")
    p.add_argument("--address", default=None, help="Ray address; default: the running cluster or a local one")
    p.add_argument("--skip-resource-check", action="store_true",
                   help="do not reject trials larger than the cluster is now (autoscaling clusters)")
    p.add_argument("--register", metavar="MODEL_NAME", default=None,
                   help="register the best trial's model as a new version of MODEL_NAME and make it @champion")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's and MLflow's INFO logs, Tune's trial tables and every trial's output too")
    return p.parse_args(argv)


def resume_command(args: argparse.Namespace, sweep_dir: str) -> str:
    """The command that continues this sweep, as the user ran it."""
    extra = ["--tracking-uri", args.tracking_uri] if args.tracking_uri else []
    extra += ["--address", args.address] if args.address else []
    return command(sys.argv[0], "--space", args.space, "--resume", sweep_dir, *extra)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_verbose(args.verbose)
    try:
        spec = load_spec(args.space, {"name": args.name} if args.name else None)
        check_durable(args.resume or args.storage_path, "--resume" if args.resume else "--storage-path")
    except (SweepError, OutputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"sweep {spec.name!r}: {spec.grid_size()} trials over {', '.join(spec.searched)}; "
          f"metric {spec.metric} ({spec.mode})")
    connect(args.address)
    try:
        result = run_sweep(
            spec, sweep_file=Path(args.space), storage_path=args.storage_path, tracking_uri=args.tracking_uri,
            resume=args.resume, check_resources=not args.skip_resource_check,
        )
    except (SweepError, DataError, TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SweepInterrupted as exc:
        print(f"\n{exc}\nresume with: {resume_command(args, exc.sweep_dir)}", file=sys.stderr)
        return 130
    if result.interrupted:
        print(f"\ninterrupted: {interrupted_count(result.trials_done, result.trials_total)} "
              f"(parent run {result.parent_run_id} marked KILLED)")
        print(f"resume with: {resume_command(args, result.sweep_dir)}")
        return 130
    print()
    print(format_table(result.rows, spec.metric, list(spec.searched)))
    print()
    failed = sum(r.status == "error" for r in result.rows)
    stopped = sum(r.status == "stopped" for r in result.rows)
    print(f"{len(result.rows)} trials, {failed} failed, {stopped} stopped early, "
          f"up to {result.max_concurrent_trials} at a time")
    if result.best is not None:
        print(f"best trial: {result.best.trial_id}  {spec.metric}={result.best.value(spec.metric):.4g}  "
              f"({', '.join(f'{k}={result.best.params[k]}' for k in spec.searched)})")
    print(f"MLflow: {result.tracking_uri}  experiment {spec.experiment!r} (id {result.experiment_id})  "
          f"parent run {result.parent_run_id}")
    print(f"  browse: {mlflow_browse(result.tracking_uri, result.experiment_id, result.parent_run_id)}")
    print(f"sweep dir (for --resume): {result.sweep_dir}")
    if args.register and result.best is not None and result.best.run_id:
        model = register_run_model(result.best.run_id, args.register, result.tracking_uri)
        print(f"best trial's model: {model} (now models:/{args.register}@champion)")
    return 1 if result.rows and failed == len(result.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
