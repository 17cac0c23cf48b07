"""One trial of a sweep: a real training run, nested in MLflow under the sweep's parent run.

The trial is the training job of ``mtp.cluster.job`` minus its cluster checks (the
sweep made them once): the same MLflow run layout (``mtp.tracking``: full config as
params, per-step metrics from rank 0, head-loss plot, final checkpoint artifact),
with the run tagged as a child of the sweep's parent run.

A 1-worker trial runs ``mtp.train.train`` in the trial's own process, which holds
the worker's CPU/GPU; a multi-worker trial starts a Ray Train run
(``mtp.cluster.trainer``) while the trial process holds only a token bundle (see
``mtp.sweep.resources``). Both report the same metric names to Tune.

Paths and run ids derive from the trial id, which ``Tuner.restore`` keeps, so a trial
restarted after a driver crash resumes its own checkpoints and its own MLflow run.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mlflow.tracking import MlflowClient

from mtp.config import JobConfig
from mtp.sweep import runs
from mtp.sweep.evaluation import EvalSpec, evaluate_checkpoint
from mtp.sweep.resources import runs_inline
from mtp.sweep.spec import SweepSpec
from mtp.tracking import MLflowCallback, finish_run, start_run


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs from the driver (sent once, via ``tune.with_parameters``)."""

    spec: SweepSpec
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_dir: str


def trial_config(context: TrialContext, params: dict[str, Any], trial_id: str) -> JobConfig:
    """The training config of one trial: sweep config + sampled params + where to log and save."""
    cfg = context.spec.base(params)
    cfg.tracking.tracking_uri = context.tracking_uri
    cfg.tracking.experiment = context.spec.experiment
    cfg.tracking.run_name = trial_id
    cfg.tracking.registered_model = None  # a sweep registers nothing; promote the best run by hand
    cfg.train.output_dir = str(Path(context.sweep_dir) / "trials")
    return cfg


def trial_run_name(spec: SweepSpec, params: dict[str, Any], trial_id: str) -> str:
    """``n_future=2 preset=tiny (ab12_00003)``: readable in the MLflow run list."""
    shown = " ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in params.items() if k in spec.space)
    return f"{shown} ({trial_id})"


class TuneReporter:
    """Forwards rank 0's intermediate metrics to Tune (for ASHA), if they carry the sweep's metric.

    Tune rejects a result without the metric it optimises, and the training loop logs
    validation metrics less often than training ones. The last step is left to
    ``run_trial``, which reports every trial's final result exactly once, also when a
    restarted trial finds its training already complete.
    """

    def __init__(self, metric: str, final_step: int):
        self.metric, self.final_step = metric, final_step

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        from ray import tune

        if self.metric in metrics and step < self.final_step:
            tune.report({**metrics, "step": step})


def tune_callback(metric: str, final_step: int):
    """Ray Train's ``TuneReportCallback`` with ``TuneReporter``'s filter."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class FilteredTuneReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metric in metrics[0] and metrics[0].get("step", final_step) < final_step:
                super().after_report(run_context, metrics, checkpoint)

    return FilteredTuneReport()


def logged_metrics(client: MlflowClient, run_id: str) -> dict[str, float]:
    """The latest value of each training/evaluation metric of a run (system metrics left out)."""
    return {k: v for k, v in client.get_run(run_id).data.metrics.items() if not k.startswith("system/")}


@contextlib.contextmanager
def train_inline(cfg: JobConfig, metric: str, resumed: bool) -> Iterator[Path | None]:
    """Train in this process; yields the final checkpoint directory.

    Checkpoints go to ``<output_dir>/<trial id>``, where a restarted trial finds them.
    """
    from mtp.train import LocalCheckpoints, train

    logger = MLflowCallback(cfg.tracking.run_id, cfg.tracking.tracking_uri, resumed=resumed)
    try:
        result = train(cfg, callbacks=[logger, TuneReporter(metric, cfg.train.max_steps)])
    finally:
        logger.close()
    if result.checkpoint is not None:
        yield result.checkpoint
        return
    # Restarted after its last step (killed while closing its run): nothing new was saved.
    with LocalCheckpoints(Path(cfg.train.output_dir) / cfg.tracking.run_name).latest() as latest:
        yield latest


@contextlib.contextmanager
def train_on_workers(cfg: JobConfig, metric: str) -> Iterator[Path | None]:
    """Train on ``scaling.num_workers`` Ray Train workers; yields the final checkpoint directory.

    The Train run is named after the trial under the sweep's directory, so a restarted
    trial resumes it from its last reported checkpoint.
    """
    from mtp.cluster.trainer import build_trainer

    trainer = build_trainer(cfg, cfg.train.output_dir)
    trainer.run_config.callbacks.append(tune_callback(metric, cfg.train.max_steps))
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        yield None
        return
    with result.checkpoint.as_directory() as directory:
        yield Path(directory)


def log_evaluation(client: MlflowClient, cfg: JobConfig, spec: Any, checkpoint: Path | None) -> None:
    """Score the final checkpoint (pass@k and verdict counts, or a task's metrics); log them at the last step."""
    from mlflow.entities import Metric

    if checkpoint is None:
        raise RuntimeError("the sweep evaluates each trial, but training left no checkpoint")
    scores = evaluate_checkpoint(checkpoint, spec) if isinstance(spec, EvalSpec) else spec.evaluate(checkpoint)
    now = int(time.time() * 1000)
    client.log_batch(cfg.tracking.run_id,
                     metrics=[Metric(k, float(v), now, cfg.train.max_steps) for k, v in scores.items()])


def run_trial(params: dict[str, Any], context: TrialContext) -> None:
    """The Tune function trainable: open (or reopen) the child run, train, evaluate, close the run,
    then report the final result (read back from the run, so a resumed trial reports the same)."""
    from ray import tune

    spec = context.spec
    trial_id = tune.get_context().get_trial_id()
    client = MlflowClient(context.tracking_uri)
    cfg = trial_config(context, params, trial_id)
    cfg.tracking.run_id = runs.find_child(client, context.experiment_id, context.parent_run_id, trial_id)
    resumed = cfg.tracking.run_id is not None
    if resumed and client.get_run(cfg.tracking.run_id).info.status == "FINISHED":
        # It completed before the driver died, after Tune last saved its state: report, don't retrain.
        tune.report({**logged_metrics(client, cfg.tracking.run_id), "step": cfg.train.max_steps})
        return
    cfg.tracking.run_id = start_run(cfg)
    if not resumed:
        runs.tag_child(client, cfg.tracking.run_id, context.parent_run_id, trial_id,
                       trial_run_name(spec, params, trial_id))
    training = train_inline(cfg, spec.metric, resumed) if runs_inline(cfg) else train_on_workers(cfg, spec.metric)
    try:
        with training as checkpoint:
            if checkpoint is not None:
                client.set_tag(cfg.tracking.run_id, "checkpoint", str(checkpoint))
            for scorer in (spec.evaluation, spec.task):
                if scorer is not None:
                    log_evaluation(client, cfg, scorer, checkpoint)
            finish_run(cfg, cfg.tracking.run_id, checkpoint)
    except Exception as exc:
        client.set_tag(cfg.tracking.run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
        finish_run(cfg, cfg.tracking.run_id, None, failed=True)
        raise
    tune.report({**logged_metrics(client, cfg.tracking.run_id), "step": cfg.train.max_steps})


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
