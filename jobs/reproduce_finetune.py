"""n -> n' finetuning (paper §3.6): pretrain with n in {1, 4}, finetune on another task with n' in {1, 4}.

    python jobs/reproduce_finetune.py
    python jobs/reproduce_finetune.py --tracking-uri sqlite:///$PWD/mlflow.db

Two sweeps (``mtp.experiments.finetune``): the pretraining file's trials, then the
finetuning file with ``train.init_from`` over their final checkpoints. Prints the
task metrics by pretraining n and finetuning n' (mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

from mtp.cluster.ray_env import connect  # noqa: E402
from mtp.data import DataError  # noqa: E402
from mtp.experiments.finetune import run_finetune  # noqa: E402
from mtp.sweep import SweepError  # noqa: E402
from mtp.tracking import TrackingError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrain", default=str(REPO / "tune_spaces" / "paper_finetune_pretrain.yaml"))
    p.add_argument("--finetune", default=str(REPO / "tune_spaces" / "paper_finetune.yaml"))
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or local)")
    p.add_argument("--storage-path", default=None, help="where Tune keeps trials (default runs/sweeps)")
    args = p.parse_args(argv)
    connect()
    try:
        result = run_finetune(args.pretrain, args.finetune, tracking_uri=args.tracking_uri,
                              storage_path=args.storage_path)
    except (SweepError, DataError, TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.table)
    print(f"MLflow: {result.finetune.tracking_uri}  finetuning parent run {result.finetune.parent_run_id} "
          f"(pretraining parent {result.pretrain.parent_run_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
