"""The training job end to end: check everything, then the run's lifecycle on Ray Train workers.

Every check that can fail on bad input (config, data source, tracking server,
cluster size) runs before a worker starts, so mistakes cost seconds, not a queue
slot. A failed fit still closes its MLflow run as FAILED and names the last
checkpoint, which ``--resume`` continues from; the console gets one line per failure
(``mtp.cluster.failures``), the tracebacks go to the job's log file (``<run directory>.log``)
and, with ``--verbose``, to the console too.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mtp.checkpoint import inherit_source_model, read_config
from mtp.cluster import logs
from mtp.cluster.failures import JobStopped, failure_reporter, failure_report
from mtp.cluster.lifecycle import run_tracked, stop_on_sigterm
from mtp.cluster.ray_env import connect
from mtp.cluster.resume import find_checkpoint, newest_checkpoint, storage_name
from mtp.cluster.trainer import check_placement, fit_on_workers, wait_for_placement
from mtp.config import JobConfig
from mtp.data import prepare_data
from mtp.tracking import store
from mtp.tracking.runs import FinishedRun, init_dir
from mtp.tracking.store import check_tracking, tracking_uri
from mtp.train import default_run_name


def job_log(storage_dir: str, run_name: str) -> Path:
    """The job's log file (every worker's output, tracebacks included): beside its run directory,
    so that a run directory removed after a failed start takes no log with it."""
    if "://" in storage_dir:  # object storage: keep the log on this machine
        return Path(tempfile.gettempdir()) / "mtp-logs" / f"{run_name}.log"
    return Path(f"{storage_dir.rstrip('/')}.log")


class JobError(RuntimeError):
    """Training failed; the message names the last checkpoint to resume from."""


@dataclass
class JobResult:
    checkpoint: str | None  # the final checkpoint in Ray's storage (a local path on one machine)
    run_id: str | None
    tracking: FinishedRun | None
    storage_dir: str  # Ray Train's run directory (a path, or a URI such as s3://...)


def record_resume(cfg: JobConfig, checkpoint: Path, changes: dict[str, tuple]) -> None:
    """Tags on the reopened run: where this attempt resumed from and what it changed."""
    client = store.client(cfg.tracking.tracking_uri)
    client.set_tag(cfg.tracking.run_id, "resume.from", str(checkpoint))
    client.set_tag(cfg.tracking.run_id, "resume.changes",
                   "; ".join(f"{k}: {old} -> {new}" for k, (old, new) in changes.items()) or "none")


def run_job(
    cfg: JobConfig,
    *,
    config_file: str | Path | None = None,
    resume: str | Path | None = None,
    track: bool = True,
    wait_for_resources_s: float = 0.0,
    changes: dict[str, tuple] | None = None,
) -> JobResult:
    """Train ``cfg`` on the Ray cluster (local if none), tracked in MLflow unless ``track=False``.

    ``resume`` (a checkpoint, Ray run directory or MLflow URI; see ``mtp.cluster.resume``)
    continues that checkpoint's MLflow run; ``cfg`` should then be ``plan_resume(...).config``.
    ``changes`` (the plan's: key -> (old, new)) are recorded on the run as ``resume.changes``.
    ``wait_for_resources_s`` waits that long for the workers' CPUs/GPUs to be free.
    """
    cfg = copy.deepcopy(cfg).validate()
    if cfg.train.init_from:  # as train() does, here too, so that the run's params show the real shape
        inherit_source_model(cfg, init_dir(cfg))
    cfg.tracking.run_name = cfg.tracking.run_name or default_run_name(cfg)
    resume_dir = find_checkpoint(resume) if resume is not None else None
    if resume_dir is not None and not cfg.tracking.run_id:
        cfg.tracking.run_id = read_config(resume_dir).get("tracking", {}).get("run_id")

    if track:
        cfg.tracking.tracking_uri = tracking_uri(cfg.tracking)
        check_tracking(cfg.tracking.tracking_uri)
    prepare_data(cfg.data, cfg.train.seq_len)  # a missing dataset fails here; workers then hit the cache
    connect()
    stop_on_sigterm()  # over ray.init's own handler: a stopped job ends its run KILLED, not FAILED
    check_placement(cfg.scaling)
    wait_for_placement(cfg.scaling, wait_for_resources_s)

    storage = cfg.train.output_dir  # Ray Train storage: shared by all nodes on a multi-node cluster
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    cfg.train.output_dir = storage  # absolute in the checkpoints' config: a resume finds the same place
    if resume_dir is not None and "://" not in storage:
        cfg.tracking.run_name = storage_name(resume_dir, Path(storage) / cfg.tracking.run_name, cfg.tracking.run_name)
    storage_dir = f"{storage.rstrip('/')}/{cfg.tracking.run_name}"
    created = "://" not in storage_dir and not Path(storage_dir).exists()
    final: list[str] = []  # the final checkpoint's path in Ray's storage
    log = logs.route_worker_logs(job_log(storage_dir, cfg.tracking.run_name))

    @contextlib.contextmanager
    def fit(cfg: JobConfig) -> Iterator[Path | None]:
        if track and resume_dir is not None:
            record_resume(cfg, resume_dir, changes or {})
        reporter = failure_reporter(cfg.scaling.max_failures)
        with fit_on_workers(cfg, storage, resume_dir, controller_callbacks=[reporter]) as (directory, result):
            final.extend([result.checkpoint.path] if result.checkpoint else [])
            yield directory

    try:
        finished = run_tracked(cfg, fit, track=track, config_file=config_file)
        logs.mute_workers()
    except BaseException as exc:
        logs.mute_workers()
        last = newest_checkpoint(Path(storage_dir)) if "://" not in storage_dir else None
        if created and last is None:  # nothing worth keeping: no empty run directory left behind
            shutil.rmtree(storage_dir, ignore_errors=True)
        if isinstance(exc, KeyboardInterrupt):
            raise JobStopped(failure_report(exc, last or resume_dir, log)) from exc
        raise JobError(failure_report(exc, last or resume_dir, log)) from exc
    return JobResult(final[0] if final else (str(resume_dir) if resume_dir else None), cfg.tracking.run_id,
                     finished, storage_dir)
