"""One trial of a sweep: a real training run, nested in MLflow under the sweep's parent run.

A 1-worker trial runs ``mtp.train.train`` in the trial's own process, which holds the
worker's CPU/GPU; a multi-worker trial starts a Ray Train run (``mtp.cluster``) and the
trial process itself holds only a token bundle (see ``mtp.sweep.resources``). Both
report the same metric names to Tune and to the trial's MLflow child run.

Paths and run ids derive from the trial id, which ``Tuner.restore`` keeps, so a trial
restarted after a driver crash resumes its own checkpoints and its own MLflow run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from mtp.config import JobConfig
from mtp.sweep import runs
from mtp.sweep.spec import SweepSpec


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs from the driver (sent once, via ``tune.with_parameters``)."""

    spec: SweepSpec
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_dir: str


def trial_config(context: TrialContext, params: dict[str, Any], trial_id: str, run_id: str) -> JobConfig:
    """The training config of one trial: sweep config + sampled params + where to log and save."""
    cfg = context.spec.base(params)
    cfg.tracking.tracking_uri = context.tracking_uri
    cfg.tracking.experiment = context.spec.experiment
    cfg.tracking.run_name = trial_id
    cfg.tracking.run_id = run_id
    cfg.tracking.registered_model = None  # a sweep registers nothing; promote the best run by hand
    cfg.train.output_dir = str(Path(context.sweep_dir) / "trials")
    return cfg


def trial_run_name(spec: SweepSpec, params: dict[str, Any], trial_id: str) -> str:
    """``n_future=2 preset=tiny (ab12_00003)``: readable in the MLflow run list."""
    shown = " ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in params.items() if k in spec.space)
    return f"{shown} ({trial_id})"


class TuneReporter:
    """Forwards training metrics to Tune, only the reports that carry the sweep's metric.

    Tune rejects a result without the metric it optimises, and the training loop logs
    validation metrics less often than training ones.
    """

    def __init__(self, metric: str):
        self.metric = metric

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        from ray import tune

        if self.metric in metrics:
            tune.report({**metrics, "step": step})


class MlflowMetrics:
    """Logs each report of the training loop to the trial's child run."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def run_trial(params: dict[str, Any], context: TrialContext) -> None:
    """The Tune function trainable."""
    from ray import tune

    from mtp.train import train

    trial_id = tune.get_context().get_trial_id()
    client = MlflowClient(context.tracking_uri)
    run_id = runs.child_run(client, context.experiment_id, context.parent_run_id, trial_id,
                            trial_run_name(context.spec, params, trial_id))
    cfg = trial_config(context, params, trial_id, run_id)
    runs.log_config(client, run_id, cfg.flat())
    try:
        result = train(cfg, callbacks=[MlflowMetrics(client, run_id), TuneReporter(context.spec.metric)])
    except BaseException as exc:
        client.set_tag(run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
        raise
    if result.checkpoint is not None:
        client.set_tag(run_id, "checkpoint", str(result.checkpoint))


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
