"""One training run's life, shared by a training job and a sweep trial.

Open (or reopen) its MLflow run, fit, then finish: the loss plot and the final
checkpoint as artifacts, and the model registered. A fit that raises closes the run
FAILED with the error as a tag, and the error propagates. How the fit runs (Ray
Train workers, or this process) is the caller's choice; ``fit_here`` is the second.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Sequence

from mtp.config import JobConfig
from mtp.tracking.runs import FinishedRun, MLflowCallback, finish_run, init_dir, start_run
from mtp.train import TrainCallback

# Trains ``cfg`` (whose ``tracking.run_id`` is set when tracked); yields the final checkpoint directory.
Fit = Callable[[JobConfig], ContextManager[Path | None]]


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
    cfg.tracking.run_id = start_run(cfg, config_file, tags) if track else None
    try:
        with fit(cfg) as checkpoint:
            if after_fit is not None:
                after_fit(checkpoint)
            return finish_run(cfg, cfg.tracking.run_id, checkpoint) if track else None
    except Exception as exc:
        if track:
            finish_run(cfg, cfg.tracking.run_id, None, error=exc)
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
