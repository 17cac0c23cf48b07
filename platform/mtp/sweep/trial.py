"""One trial of a sweep: the training run lifecycle of ``mtp.cluster``, nested in the sweep's parent run.

A 1-worker trial trains in the trial's own process, which holds the worker's
CPU/GPU; a multi-worker trial starts a Ray Train run while the trial process holds
only a token bundle (see ``mtp.sweep.resources``). Both report the same metrics to
Tune, through one filter.

Paths and run ids derive from the trial id, which ``Tuner.restore`` keeps, so a trial
restarted after a driver crash resumes its own checkpoints and its own MLflow run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mlflow.tracking import MlflowClient

from mtp.cluster.lifecycle import fit_here, run_tracked
from mtp.config import JobConfig
import mtp.sweep.runs as runs
from mtp.sweep.resources import runs_inline
from mtp.sweep.scorers import ScoreProgress, log_scores
from mtp.sweep.spec import SweepSpec


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs from the driver (sent once, via ``tune.with_parameters``)."""

    spec: SweepSpec
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_dir: str
    source: dict[str, str] = field(default_factory=dict)  # the sweep's command and commit (its driver's)


def trial_config(context: TrialContext, params: dict[str, Any], trial_id: str) -> JobConfig:
    """The training config of one trial: sweep config + sampled params + where to log and save."""
    cfg = context.spec.base(params)
    cfg.tracking.tracking_uri = context.tracking_uri
    cfg.tracking.experiment = context.spec.experiment
    cfg.tracking.run_name = trial_id
    cfg.tracking.registered_model = None  # a sweep registers nothing; promote the best run by hand
    cfg.train.output_dir = str(Path(context.sweep_dir) / "trials")
    if cfg.train.init_from:  # a finetune trains its source's trunk: the run's params show that shape
        from mtp.checkpoint import inherit_source_model
        from mtp.tracking.runs import init_dir

        inherit_source_model(cfg, init_dir(cfg))
    return cfg


def reportable(metrics: dict[str, Any], metric: str, final_step: int) -> bool:
    """Whether an intermediate result goes to Tune (for ASHA).

    Tune rejects a result without the metric it optimises, and the training loop logs
    validation metrics less often than training ones. The last step is left to
    ``run_trial``, which reports every trial's final result exactly once, also when a
    restarted trial finds its training already complete.
    """
    return metric in metrics and metrics.get("step", final_step) < final_step


class TuneReporter:
    """Forwards rank 0's intermediate metrics to Tune, for a trial that trains in its own process."""

    def __init__(self, metric: str, final_step: int):
        self.metric, self.final_step = metric, final_step

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        from ray import tune

        if reportable({**metrics, "step": step}, self.metric, self.final_step):
            tune.report({**metrics, "step": step})


def tune_callback(metric: str, final_step: int):
    """Ray Train's ``TuneReportCallback``, for a trial on Ray Train workers, with the same filter."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class FilteredTuneReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and reportable(metrics[0], metric, final_step):
                super().after_report(run_context, metrics, checkpoint)

    return FilteredTuneReport()


def logged_metrics(client: MlflowClient, run_id: str) -> dict[str, float]:
    """The latest value of each training/evaluation metric of a run (system metrics left out)."""
    return {k: v for k, v in client.get_run(run_id).data.metrics.items() if not k.startswith("system/")}


def run_trial(params: dict[str, Any], context: TrialContext) -> None:
    """The Tune function trainable: the run's lifecycle (evaluating the checkpoint when the sweep
    asks), then the final result, read back from the run so a resumed trial reports the same."""
    from ray import tune

    spec = context.spec
    trial_id = tune.get_context().get_trial_id()
    client = MlflowClient(context.tracking_uri)
    cfg = trial_config(context, params, trial_id)
    cfg.tracking.run_id = runs.find_child(client, context.experiment_id, context.parent_run_id, trial_id)
    resumed = cfg.tracking.run_id is not None
    final = {"step": cfg.train.max_steps}
    if resumed and client.get_run(cfg.tracking.run_id).info.status == "FINISHED":
        # It completed before the driver died, after Tune last saved its state: report, don't retrain.
        tune.report({**logged_metrics(client, cfg.tracking.run_id), **final})
        return

    def fit(cfg: JobConfig):
        if runs_inline(cfg):
            callbacks = [TuneReporter(spec.metric, cfg.train.max_steps)]
            callbacks += [ScoreProgress(client, cfg.tracking.run_id, scorer, cfg.train.max_steps)
                          for scorer in spec.scorers.values() if scorer.progress_limit]  # its metrics over training
            return fit_here(cfg, callbacks, resumed=resumed)
        return _fit_on_workers(cfg, tune_callback(spec.metric, cfg.train.max_steps))

    def after_fit(checkpoint: Path | None) -> None:
        if checkpoint is not None:
            client.set_tag(cfg.tracking.run_id, "checkpoint", str(checkpoint))
        for scorer in spec.scorers.values():  # the final checkpoint's scores, at the last step
            if checkpoint is None:
                raise RuntimeError("the sweep scores each trial, but training left no checkpoint")
            log_scores(client, cfg.tracking.run_id, scorer.evaluate(checkpoint), cfg.train.max_steps)

    tags = None if resumed else runs.child_tags(context.parent_run_id, trial_id, trial_run_name(spec, params, trial_id),
                                         context.source)
    run_tracked(cfg, fit, tags=tags, after_fit=after_fit)
    tune.report({**logged_metrics(client, cfg.tracking.run_id), **final})


@contextlib.contextmanager
def _fit_on_workers(cfg: JobConfig, callback) -> Iterator[Path | None]:
    """Ray Train under the sweep's directory, named after the trial, so a restarted trial resumes it."""
    from mtp.cluster.trainer import fit_on_workers

    with fit_on_workers(cfg, cfg.train.output_dir, controller_callbacks=[callback]) as (directory, _):
        yield directory


def trial_run_name(spec: SweepSpec, params: dict[str, Any], trial_id: str) -> str:
    """``n_future=2 preset=tiny (ab12_00003)``: readable in the MLflow run list."""
    shown = " ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in params.items() if k in spec.searched)
    return f"{shown} ({trial_id})"


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
