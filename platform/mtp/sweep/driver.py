"""The sweep driver: validate, reserve, run the Tuner, summarise into the MLflow parent run.

Order matters: everything that can be checked (the sweep file, each config it can
produce, the cluster's capacity, the tracking store) is checked before the first trial,
so a bad sweep costs seconds, not a cluster hour.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from mtp.cluster import logs
from mtp.cluster.trainer import PlacementError, check_placement
from mtp.config import ConfigError
from mtp.data import prepare_data
import mtp.sweep.runs as runs
from mtp.sweep.resources import (
    TrialDemand, check_feasible, cluster_view, fitting_concurrency, runs_inline, trial_bundle,
)
from mtp.sweep.progress import DONE, SweepInterrupted, SweepProgress, finished_in_state, quiet_tune
from mtp.sweep.spec import SweepError, SweepSpec
from mtp.sweep.summary import TrialRow
from mtp.sweep.trial import TrialContext, run_trial
from mtp.tracking.runs import source_tags
from mtp.tracking.store import check_tracking
from mtp.tracking.store import experiment_id as experiment_for
from mtp.tracking.store import tracking_uri as resolve_tracking_uri

DEFAULT_STORAGE = "runs/sweeps"
log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """Where the sweep's results live and what it found."""

    rows: list[TrialRow]
    best: TrialRow | None
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_dir: str
    max_concurrent_trials: int
    trials_total: int = 0
    trials_done: int = 0  # finished or failed; fewer than trials_total: the sweep was interrupted

    @property
    def interrupted(self) -> bool:
        return self.trials_done < self.trials_total


def run_sweep(
    spec: SweepSpec,
    *,
    sweep_file: Path | None = None,
    storage_path: str | None = None,
    tracking_uri: str | None = None,
    resume: str | None = None,
    check_resources: bool = True,
) -> SweepResult:
    """Run (or, with ``resume`` = a sweep directory, continue) a sweep; needs a connected Ray.

    ``check_resources=False`` skips the capacity check, for autoscaling clusters whose
    nodes appear only once trials ask for them. A sweep stopped by Ctrl-C returns early
    (``SweepResult.interrupted``): its parent run and the runs of the trials it stopped end
    KILLED, with no summary; ``resume`` continues it. Every worker's output goes to
    ``<sweep_dir>.log`` (the console with ``--verbose``); the console gets one line per trial.
    """
    from ray import tune

    configs = spec.probe_configs()
    demands = [TrialDemand.of(spec, cfg) for cfg in configs]
    cluster, nodes = cluster_view()
    if check_resources:
        check_feasible(demands, cluster, nodes)
        for scaling in {repr(c.scaling): c.scaling for c in configs if not runs_inline(c)}.values():
            try:
                check_placement(scaling)  # workers packed onto the nodes as they are
            except PlacementError as exc:
                raise SweepError(f"a trial's Ray Train run cannot be placed: {exc}") from None
    fits = fitting_concurrency(demands, cluster)
    concurrency = spec.max_concurrent_trials or fits
    if concurrency > fits:
        log.warning("max_concurrent_trials=%d but the cluster fits %d such trials now; the rest will queue",
                    concurrency, fits)

    uri = resolve_tracking_uri(replace(configs[0].tracking, tracking_uri=tracking_uri or configs[0].tracking.tracking_uri))
    check_tracking(uri)
    for name, scorer in spec.scorers.items():
        try:
            scorer.prepare()  # e.g. a task's corpus, which data.source names
        except ConfigError as exc:
            raise SweepError(f"sweep {spec.name!r}: {name}: {exc}") from None
    for cfg in {(repr(c.data), c.train.seq_len): c for c in configs}.values():
        prepare_data(cfg.data, cfg.train.seq_len)  # a missing dataset fails here, not in every trial
    client = MlflowClient(uri)
    experiment_id = experiment_for(client, spec.experiment, uri)

    source = source_tags()  # the sweep's own command and commit, for the parent and every trial's run
    if resume:
        sweep_dir = str(Path(resume).resolve())
        if not tune.Tuner.can_restore(sweep_dir):
            raise SweepError(f"--resume {resume!r}: no Tune experiment to restore there")
        parent_id = runs.find_parent(client, experiment_id, sweep_dir)
        if parent_id is None:
            raise SweepError(f"--resume {resume!r}: no MLflow parent run tagged with it in experiment "
                             f"{spec.experiment!r} at {uri}; pass the same --tracking-uri as the first run")
        runs.reopen_parent(client, parent_id)
    else:
        if storage_path and "://" in storage_path:
            raise SweepError(f"--storage-path {storage_path!r}: use a filesystem path (on a multi-node cluster, "
                             "one mounted on every node, e.g. NFS); trials keep checkpoints there")
        storage = Path(storage_path or DEFAULT_STORAGE).resolve()
        # A reused name and storage path would silently resume an old run: make it unique.
        sweep_dir = str(storage / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6:06d}")
        parent_id = runs.start_parent(client, experiment_id, spec, sweep_dir, sweep_file, source)

    logs.route_worker_logs(Path(f"{sweep_dir}.log"), console=False)
    context = TrialContext(spec=spec, tracking_uri=uri, experiment_id=experiment_id,
                           parent_run_id=parent_id, sweep_dir=sweep_dir, source=source)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=context), lambda params: trial_bundle(spec, params)
    )
    total = spec.grid_size()
    progress = SweepProgress(total)
    verbosity = quiet_tune()  # also for a restored sweep, which runs its first session's RunConfig
    if resume:
        # Tuner.restore runs the first session's RunConfig: its (pickled) SweepProgress, not ``progress``
        tuner = tune.Tuner.restore(sweep_dir, trainable, resume_unfinished=True, resume_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=spec.param_space(),
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                scheduler=spec.scheduler.build(),
                max_concurrent_trials=concurrency,
            ),
            run_config=tune.RunConfig(
                name=Path(sweep_dir).name, storage_path=str(Path(sweep_dir).parent),
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                verbose=verbosity, callbacks=[progress],
            ),
        )
    try:
        grid = tuner.fit()
    except BaseException as exc:  # a second Ctrl-C: Tune gives up saving and raises
        runs.interrupt(client, parent_id, None if resume else progress.done, total, sweep_dir)
        if isinstance(exc, KeyboardInterrupt):
            raise SweepInterrupted(sweep_dir, None if resume else progress.done, total) from exc
        raise
    saved = finished_in_state(sweep_dir)  # the trials Tune stopped read TERMINATED in memory only
    done = saved if saved is not None else sum(trial.status in DONE for trial in grid._experiment_analysis.trials)
    rows = [_row(result, spec, client, experiment_id, parent_id) for result in grid if result.metrics]
    rows.sort(key=lambda r: r.trial_id)
    if done < total:  # Ctrl-C: Tune stopped the trials, saved its state and returned
        runs.interrupt(client, parent_id, done, total, sweep_dir, [r.run_id for r in rows if r.run_id])
        return SweepResult(rows, None, uri, experiment_id, parent_id, sweep_dir, concurrency, total, done)
    runs.close_children(client, rows)
    best = runs.finish_parent(client, parent_id, spec, rows)
    return SweepResult(rows, best, uri, experiment_id, parent_id, sweep_dir, concurrency, total, done)


def _row(result, spec: SweepSpec, client: MlflowClient, experiment_id: str, parent_id: str) -> TrialRow:
    """One Tune result as a summary row, linked to the trial's MLflow child run."""
    metrics = {k: float(v) for k, v in result.metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _TUNE_BOOKKEEPING}
    trial_id = str(result.metrics["trial_id"])
    config = dict(result.config or {})
    base = spec.base({k: v for k, v in config.items() if k in spec.searched}).flat()
    shown = [*spec.searched, *(["model.n_future"] if spec.arms else []), spec.plot.x, spec.plot.lines]
    params = {k: config.get(k, base.get(k)) for k in dict.fromkeys(shown)}
    error = None
    if result.error is not None:
        error = f"{type(result.error).__name__}: {result.error}"
    status = "error" if error else "stopped" if metrics.get("step", 0) < base["train.max_steps"] else "ok"
    return TrialRow(
        trial_id=trial_id, status=status, params=params, metrics=metrics,
        run_id=runs.find_child(client, experiment_id, parent_id, trial_id), error=error,
    )


# Auto-filled by Tune; not training metrics.
_TUNE_BOOKKEEPING = {
    "timestamp", "time_this_iter_s", "time_total_s", "pid", "time_since_restore",
    "iterations_since_restore", "done", "checkpoint_dir_name", "should_checkpoint",
}
