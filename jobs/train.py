"""Train a multi-token-prediction model on Ray Train, tracked in MLflow.

    python jobs/train.py                                  # configs/tiny.yaml: n_future=4 on the stdlib corpus
    python jobs/train.py --max-steps 500 --set train.lr=1e-3
    python jobs/train.py --preset 0.3B --num-workers 8 --use-gpu --set train.batch_size=16
    python jobs/train.py --resume runs/<run-name>         # continue a finished or interrupted run, as it was
    python jobs/train.py --resume runs/<run-name> --max-steps 800   # ... with a longer schedule (printed, recorded)
    python jobs/train.py --init-from models:/mtp-model/3 --n-future 1   # n -> n' finetuning (paper §3.6)
    ray job submit --working-dir . -- python jobs/train.py --num-workers 16 --use-gpu ...

Precedence: built-in defaults < preset < --config file < flags < --set overrides.
With --resume: the checkpoint's own configuration < --config file < flags < --set overrides
(only what is given explicitly changes the run; each change is printed and recorded in MLflow).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))  # runs without an install, and under `ray job submit`

from mtp.cluster.failures import JobStopped  # noqa: E402
from mtp.cluster.job import JobError, run_job  # noqa: E402
from mtp.cluster.lifecycle import stop_on_sigterm  # noqa: E402
from mtp.cluster.logs import set_verbose  # noqa: E402
from mtp.cluster.outputs import OutputError, check_durable  # noqa: E402
from mtp.cluster.resume import ResumeError, plan_resume  # noqa: E402
from mtp.cluster.trainer import PlacementError  # noqa: E402
from mtp.config import ConfigError, build_config, flatten_mapping, read_yaml_mapping  # noqa: E402
from mtp.data import DataError  # noqa: E402
from mtp.hints import mlflow_browse  # noqa: E402
from mtp.tracking.store import TrackingError  # noqa: E402

# What `python jobs/train.py` trains with no arguments: a few minutes on 2 CPU cores.
DEFAULT_CONFIG = REPO / "configs" / "tiny.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="YAML file with model/data/train/scaling/tracking sections (default: configs/tiny.yaml; "
                             "with --resume, the checkpoint's own configuration)")
    parser.add_argument("--preset", help="model preset (debug, tiny, small, 0.3B ... 13B)")
    parser.add_argument("--n-future", type=int, help="number of future-token heads")
    parser.add_argument("--max-steps", type=int, help="optimizer steps")
    parser.add_argument("--num-workers", type=int, help="Ray Train workers")
    parser.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker, NCCL")
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), help="data parallel (ddp) or sharded (fsdp)")
    parser.add_argument("--max-failures", type=int, help="restarts from the last checkpoint after a worker failure")
    parser.add_argument("--resume", help="checkpoint dir, Ray run dir or models:/ URI to continue from, "
                                         "with its own configuration (flags and --set change it)")
    parser.add_argument("--wait-for-resources", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to this long for the workers' CPUs/GPUs to be free (default: fail at once, "
                             "naming who holds them)")
    parser.add_argument("--init-from", metavar="CHECKPOINT_OR_MODEL_URI",
                        help="start from another run's weights (trunk and shared heads kept, extra heads dropped, "
                             "new heads initialised; fresh optimizer), e.g. to finetune an n=4 model with n_future=1")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config field, e.g. --set train.lr=1e-3 (repeatable)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's and MLflow's INFO logs, worker tracebacks and progress bars too")
    return parser.parse_args(argv)


def overrides_from(args: argparse.Namespace) -> dict[str, object]:
    flags = {
        "train.preset": args.preset,
        "model.n_future": args.n_future,
        "train.max_steps": args.max_steps,
        "scaling.num_workers": args.num_workers,
        "scaling.use_gpu": args.use_gpu,
        "scaling.strategy": args.strategy,
        "scaling.max_failures": args.max_failures,
        "train.init_from": args.init_from,
    }
    overrides = {k: v for k, v in flags.items() if v is not None}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} must look like section.key=value")
        overrides[key.strip()] = value.strip()
    return overrides


def configure(args: argparse.Namespace) -> tuple:
    """The job's config and (with --resume) the checkpoint it continues; prints a resume's changes."""
    overrides = overrides_from(args)
    if args.resume is None:
        return build_config(args.config or DEFAULT_CONFIG, overrides), None
    explicit = flatten_mapping(read_yaml_mapping(args.config), where=f"{args.config}: ") if args.config else {}
    plan = plan_resume(args.resume, {**explicit, **overrides})
    print(f"resuming {plan.config.tracking.run_name} from {plan.checkpoint}", flush=True)
    for line in plan.describe_changes():
        print(line, flush=True)
    if plan.step is not None and plan.step >= plan.config.train.max_steps:
        print(f"resume: the checkpoint is at step {plan.step} of train.max_steps={plan.config.train.max_steps}: "
              "nothing to train (--max-steps N continues it)", flush=True)
    return plan.config, plan


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_verbose(args.verbose)
    stop_on_sigterm()
    try:
        cfg, plan = configure(args)
        check_durable(cfg.train.output_dir, "--set train.output_dir")
        result = run_job(cfg, config_file=args.config, resume=plan.checkpoint if plan else None,
                         track=not args.no_tracking, wait_for_resources_s=args.wait_for_resources,
                         changes=plan.changes if plan else None)
    except (ConfigError, DataError, TrackingError, PlacementError, OutputError, ResumeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except JobError as exc:
        print(f"\n{exc}", file=sys.stderr)
        return 1
    except JobStopped as exc:
        print(f"\n{exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # stopped before training started: nothing to resume
        print("\nstopped", file=sys.stderr)
        return 130
    print(f"\nfinal checkpoint: {result.checkpoint}")
    if result.tracking is not None:
        run = result.tracking
        print(run.describe(mlflow_browse(run.tracking_uri, run.experiment_id, run.run_id)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
