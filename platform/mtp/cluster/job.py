"""The training job end to end: check everything, then the run's lifecycle on Ray Train workers.

Every check that can fail on bad input (config, data source, tracking server,
cluster size) runs before a worker starts, so mistakes cost seconds, not a queue
slot. A failed fit still closes its MLflow run as FAILED and names the last
checkpoint, which ``--resume`` continues from.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mtp.checkpoint import CONFIG, inherit_source_model, read_config
from mtp.cluster.lifecycle import run_tracked
from mtp.cluster.ray_env import connect
from mtp.cluster.trainer import check_placement, fit_on_workers
from mtp.config import JobConfig
from mtp.data import prepare_data
from mtp.tracking.registry import resolve_checkpoint
from mtp.tracking.runs import FinishedRun
from mtp.tracking.store import check_tracking, tracking_uri
from mtp.train import default_run_name


class JobError(RuntimeError):
    """Training failed; the message names the last checkpoint to resume from."""


@dataclass
class JobResult:
    checkpoint: str | None  # the final checkpoint in Ray's storage (a local path on one machine)
    run_id: str | None
    tracking: FinishedRun | None
    storage_dir: str  # Ray Train's run directory (a path, or a URI such as s3://...)


def find_checkpoint(path_or_uri: str | Path) -> Path:
    """A checkpoint directory, an MLflow URI, or a Ray run directory (its newest checkpoint)."""
    path = Path(str(path_or_uri)).expanduser()
    if path.is_dir() and not (path / CONFIG).is_file():
        newest = newest_checkpoint(path)
        if newest is not None:
            return newest
    return resolve_checkpoint(path_or_uri)


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete ``checkpoint_*`` in a Ray Train run directory."""
    found = sorted(p for p in run_dir.glob("checkpoint_*") if (p / CONFIG).is_file())
    return found[-1] if found else None


def run_job(
    cfg: JobConfig,
    *,
    config_file: str | Path | None = None,
    resume: str | Path | None = None,
    track: bool = True,
) -> JobResult:
    """Train ``cfg`` on the Ray cluster (local if none), tracked in MLflow unless ``track=False``."""
    cfg = copy.deepcopy(cfg).validate()
    if cfg.train.init_from:  # as train() does, here too, so that the run's params show the real shape
        inherit_source_model(cfg, resolve_checkpoint(cfg.train.init_from))
    cfg.tracking.run_name = cfg.tracking.run_name or default_run_name(cfg)
    resume_dir = find_checkpoint(resume) if resume is not None else None
    if resume_dir is not None and not cfg.tracking.run_id:
        cfg.tracking.run_id = read_config(resume_dir).get("tracking", {}).get("run_id")

    if track:
        cfg.tracking.tracking_uri = tracking_uri(cfg.tracking)
        check_tracking(cfg.tracking.tracking_uri)
    prepare_data(cfg.data, cfg.train.seq_len)  # a missing dataset fails here; workers then hit the cache
    connect()
    check_placement(cfg.scaling)

    storage = cfg.train.output_dir  # Ray Train storage: shared by all nodes on a multi-node cluster
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    storage_dir = f"{storage.rstrip('/')}/{cfg.tracking.run_name}"
    final: list[str] = []  # the final checkpoint's path in Ray's storage

    @contextlib.contextmanager
    def fit(cfg: JobConfig) -> Iterator[Path | None]:
        with fit_on_workers(cfg, storage, resume_dir) as (directory, result):
            final.extend([result.checkpoint.path] if result.checkpoint else [])
            yield directory

    try:
        finished = run_tracked(cfg, fit, track=track, config_file=config_file)
    except Exception as exc:
        last = newest_checkpoint(Path(storage_dir)) if "://" not in storage_dir else None
        raise JobError(
            f"training failed: {type(exc).__name__}: {exc}\n"
            f"last checkpoint: {last or 'none'}" + (f"\nresume with: --resume {last}" if last else "")
        ) from exc
    return JobResult(final[0] if final else None, cfg.tracking.run_id, finished, storage_dir)
