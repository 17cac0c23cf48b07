"""One training run's life, shared by a training job and a sweep trial.

Open (or reopen) its MLflow run, fit, then finish: the loss plot and the final
checkpoint as artifacts, and the model registered (an ``error`` tag of an earlier failed
attempt goes: the run now finished). A fit that raises closes the run
FAILED with the error as a tag; one stopped by Ctrl-C or SIGTERM (``ray job stop``)
closes it KILLED at once (Ray kills a stopped job 3 s after its SIGTERM); the error
propagates. A reopened run (``--resume``) whose attempt fails before logging a new step
is put back exactly as it was: status, end time and tags (``RunGuard``). How the fit runs
(Ray Train workers, or this process) is the caller's choice; ``fit_here`` is the second.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Sequence

from mtp.config import JobConfig
from mtp.tracking import store
from mtp.tracking.runs import FinishedRun, MLflowCallback, finish_run, init_dir, last_logged_step, start_run
from mtp.tracking.store import tracking_uri
from mtp.train import TrainCallback

# Trains ``cfg`` (whose ``tracking.run_id`` is set when tracked); yields the final checkpoint directory.
Fit = Callable[[JobConfig], ContextManager[Path | None]]
STOPPED_TAG = "stopped"


class Stopped(KeyboardInterrupt):
    """The job was told to stop (SIGTERM: ``ray job stop``, a scheduler, ``kill``)."""


_received: list[str] = []  # the stop signal's name: Ray's get() re-raises it as a bare KeyboardInterrupt


def stop_reason(exc: BaseException) -> str:
    """``SIGTERM``, or ``Ctrl-C``: what stopped the job."""
    return str(exc) or (_received[-1] if _received else "Ctrl-C")


def stop_on_sigterm() -> None:
    """Turn SIGTERM into ``Stopped`` in this (main) thread, so a stopped job ends its run KILLED.

    Call it again after ``ray.init``, which installs its own handler (``sys.exit``).
    """

    def handler(signum, frame):
        _received.append(signal.Signals(signum).name)
        raise Stopped(_received[-1])

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


class RunGuard:
    """Remembers a run before a resumed attempt reopens it, to put it back if the attempt fails
    before it logs a new step: a failed resume must not turn a FINISHED run FAILED, nor tag it."""

    def __init__(self, uri: str, run_id: str):
        self.client, self.run_id = store.client(uri), run_id
        run = self.client.get_run(run_id)
        self.status, self.end_time = run.info.status, run.info.end_time
        self.tags = dict(run.data.tags)
        self.last_step = last_logged_step(self.client, run_id)

    def progressed(self) -> bool:
        return last_logged_step(self.client, self.run_id) > self.last_step

    def restore(self) -> None:
        tags = self.client.get_run(self.run_id).data.tags
        for key in set(tags) - set(self.tags):
            self.client.delete_tag(self.run_id, key)
        for key, value in self.tags.items():
            if tags.get(key) != value:
                self.client.set_tag(self.run_id, key, value)
        if self.status == "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.client.set_terminated(self.run_id, status=self.status, end_time=self.end_time)


def end_stopped(uri: str, run_id: str, reason: BaseException) -> None:
    """Close a run whose job was stopped (Ctrl-C, SIGTERM): KILLED, with when and why, quickly."""
    client = store.client(uri)
    client.set_tag(run_id, STOPPED_TAG, f"by {stop_reason(reason)} at {time.strftime('%Y-%m-%d %H:%M:%S')}")
    client.set_terminated(run_id, status="KILLED")


def run_tracked(
    cfg: JobConfig,
    fit: Fit,
    *,
    track: bool = True,
    config_file: str | Path | None = None,
    tags: dict[str, str] | None = None,
    after_fit: Callable[[Path | None], None] | None = None,
) -> FinishedRun | None:
    """Open or reopen ``cfg``'s run (``cfg.tracking.run_id``), fit, ``after_fit(checkpoint)``, finish.

    ``cfg`` is updated in place with the run's id. Without ``track`` nothing is logged.
    """
    guard = RunGuard(tracking_uri(cfg.tracking), cfg.tracking.run_id) if track and cfg.tracking.run_id else None
    cfg.tracking.run_id = start_run(cfg, config_file, tags) if track else None
    try:
        with fit(cfg) as checkpoint:
            if after_fit is not None:
                after_fit(checkpoint)
            return finish_run(cfg, cfg.tracking.run_id, checkpoint) if track else None
    except BaseException as exc:
        if not track:
            raise
        if guard is not None and not guard.progressed():
            guard.restore()
        elif isinstance(exc, Exception):
            finish_run(cfg, cfg.tracking.run_id, None, error=exc)
        else:
            end_stopped(tracking_uri(cfg.tracking), cfg.tracking.run_id, exc)
        raise


@contextlib.contextmanager
def fit_here(cfg: JobConfig, callbacks: Sequence[TrainCallback] = (), resumed: bool = False) -> Iterator[Path | None]:
    """Train in this process, logging to ``cfg``'s MLflow run; yields the final checkpoint directory.

    Checkpoints go to ``<output_dir>/<run_name>``, where a rerun of the same run resumes.
    """
    from mtp.train import train

    if not cfg.tracking.run_id:
        yield train(cfg, callbacks=callbacks, init_dir=init_dir(cfg)).checkpoint
        return
    logger = MLflowCallback(cfg.tracking.run_id, cfg.tracking.tracking_uri, resumed=resumed)
    try:
        result = train(cfg, callbacks=[logger, *callbacks], init_dir=init_dir(cfg))
    finally:
        logger.close()
    yield result.checkpoint
