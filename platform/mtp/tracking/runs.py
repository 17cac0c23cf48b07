"""MLflow runs: one per training job, with its config, metrics, checkpoint and model.

The driver (``mtp.cluster.job``) opens the run (``start_run``), logs the full config
as params and the config file as an artifact, and hands the run id to the workers in
``cfg.tracking.run_id``. Rank 0 logs per-step metrics and system metrics into that
run (``MLflowCallback``); the id is also saved in every checkpoint, so a restarted
attempt, or ``--resume``, continues the same run. At the end the driver logs the
final checkpoint and a per-head loss plot, logs the MLflow model and registers it
(``mtp.tracking.registry``: ``models:/<name>@newest``, tagged with n_future and size) and
closes the run (``finish_run``). Runs carry their source (``source_tags``), and the
experiment is marked as model training for MLflow 3's UI (``mtp.tracking.store``).

Metric names are the same in every run: ``train/loss_head_<i>``, ``train/loss``,
``val/loss_head_<i>``, ``val/bpb``, ``perf/tokens_per_s``, ...
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from mtp.config import JobConfig
from mtp.tracking.registry import log_model, resolve_checkpoint
from mtp.tracking.store import client as mlflow_client
from mtp.tracking.store import experiment_id, tracking_uri

CHECKPOINT_ARTIFACT = "checkpoint"
METRIC_BATCH = 1000  # MLflow's per-request metric limit
RESTARTS_METRIC = "restarts"


def _git(*args: str, cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _ray_job_config() -> dict:
    """The job config Ray's job manager hands the entrypoint of a submitted job ({} otherwise)."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return {}
    return config if isinstance(config, dict) else {}


def ray_job_id() -> str | None:
    """The submission id (``raysubmit_...``) of the Ray job this process is the driver of, if any."""
    return (_ray_job_config().get("metadata") or {}).get("job_submission_id")


def source_tags(argv: list[str] | None = None) -> dict[str, str]:
    """Where a run came from: entry point, full command line, git commit and dirty flag, Ray job.

    Under ``ray job submit`` the checkout is Ray's copy of the working directory,
    which leaves ``.git`` out (Ray 2.60's default): the run then records the uploaded
    package (its URI is a hash of the content) and, when the submitter passed them in
    the runtime env, ``MTP_GIT_COMMIT`` / ``MTP_GIT_DIRTY``.
    """
    argv = list(sys.argv if argv is None else argv)
    entry = Path(argv[0]).resolve() if argv and argv[0] else None
    tags = {"mtp.command": shlex.join(["python", *argv])}
    job = ray_job_id()
    tags["mlflow.source.type"] = "JOB" if job else "LOCAL"
    if job:
        tags["mtp.ray_job_id"] = job
        package = (_ray_job_config().get("runtime_env") or {}).get("working_dir")
        if package:
            tags["mtp.ray_working_dir"] = str(package)
    if entry is not None and entry.exists():
        root = _git("rev-parse", "--show-toplevel", cwd=entry.parent)
        base = Path(root) if root and entry.is_relative_to(root) else Path.cwd()  # a job's cwd: its code's root
        tags["mlflow.source.name"] = str(entry.relative_to(base)) if entry.is_relative_to(base) else str(entry)
        commit = _git("rev-parse", "HEAD", cwd=entry.parent)
        if commit:
            tags["mlflow.source.git.commit"] = commit
            tags["mtp.git.dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no", cwd=entry.parent))).lower()
    if "mlflow.source.git.commit" not in tags and os.environ.get("MTP_GIT_COMMIT"):
        tags["mlflow.source.git.commit"] = os.environ["MTP_GIT_COMMIT"]
        tags["mtp.git.dirty"] = os.environ.get("MTP_GIT_DIRTY", "unknown")
    return tags


def model_size(cfg: JobConfig) -> str:
    """The size tag: total parameters, e.g. ``1.30B`` or ``0.4M``."""
    from mtp.model import count_parameters  # torch: not on the evaluate --samples path, which imports this module

    total = count_parameters(cfg.model)["total"]
    return f"{total / 1e9:.2f}B" if total >= 1e8 else f"{total / 1e6:.1f}M"


def init_dir(cfg: JobConfig) -> Path | None:
    """The local checkpoint directory ``train.init_from`` names (a path or an MLflow URI), for ``train``."""
    return resolve_checkpoint(cfg.train.init_from, tracking_uri(cfg.tracking)) if cfg.train.init_from else None


def start_run(cfg: JobConfig, config_file: str | Path | None = None, tags: dict[str, str] | None = None) -> str:
    """Open (or, with ``cfg.tracking.run_id`` set, reopen) the job's run; returns its id.

    Params are the full flattened config; ``tags`` are added to a new run (a sweep
    nests its trials this way). A reopened run keeps its params (MLflow params are
    immutable); changed values are recorded as ``resume.*`` tags.
    """
    uri = tracking_uri(cfg.tracking)
    client = mlflow_client(uri)
    params = {k: "" if v is None else str(v) for k, v in cfg.flat().items() if k != "tracking.run_id"}
    if cfg.tracking.run_id:
        run = client.get_run(cfg.tracking.run_id)
        client.update_run(run.info.run_id, status="RUNNING")
        changed = {f"resume.{k}": v for k, v in params.items() if run.data.params.get(k, v) != v}
        for key, value in changed.items():
            client.set_tag(run.info.run_id, key, value)
        return run.info.run_id
    from mlflow.entities import Param

    tags = {"n_future": str(cfg.model.n_future), "preset": cfg.train.preset, "size": model_size(cfg), **source_tags(),
            **(tags or {})}
    if cfg.train.init_from:  # lineage of an n -> n' finetune: the run whose weights it starts from
        from mtp.checkpoint import source_run_id

        tags["init_from"] = cfg.train.init_from
        tags["init_from_run_id"] = source_run_id(init_dir(cfg)) or ""
    name = tags.pop("mlflow.runName", cfg.tracking.run_name)  # a display name other than the run name
    run = client.create_run(experiment_id(client, cfg.tracking.experiment, uri), run_name=name, tags=tags)
    run_id = run.info.run_id
    items = [Param(k, v[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "config.yaml"
        resolved.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        client.log_artifact(run_id, str(resolved), "config")
    if config_file is not None:
        client.log_artifact(run_id, str(config_file), "config/source")
    return run_id


def last_logged_step(client, run_id: str) -> int:
    """The last step any training or validation metric of the run was logged at (-1: none)."""
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith(("train/", "val/"))]
    return max((m.step for k in keys for m in client.get_metric_history(run_id, k)), default=-1)


class MLflowCallback:
    """Rank 0's metric logger (``mtp.train.TrainCallback``), with system metrics.

    Uses the client API rather than ``mlflow.start_run`` so that a worker never ends,
    or changes the status of, the driver's run. A resumed run (a restarted worker
    group, or ``--resume``) logs nothing for steps the run already holds: MLflow
    keeps every point, so a replayed step would appear twice in the charts. A
    restart (``restarted``) adds one to the run's ``restarts`` metric.
    """

    def __init__(self, run_id: str, uri: str, system_metrics: bool = True, resumed: bool = False,
                 restarted: bool = False):
        self.client = mlflow_client(uri)
        self.run_id = run_id
        self.logged_through = last_logged_step(self.client, run_id) if resumed or restarted else -1
        if restarted:
            from mlflow.entities import Metric

            count = len(self.client.get_metric_history(run_id, RESTARTS_METRIC)) + 1
            step = max(self.logged_through, 0)
            self.client.log_batch(run_id, metrics=[Metric(RESTARTS_METRIC, count, int(time.time() * 1000), step)])
        self.monitor = None
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=5, resume_logging=resumed, tracking_uri=uri)
            self.monitor.start()

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if step <= self.logged_through:  # replayed after a restart: the run has these points
            return
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(items), METRIC_BATCH):
            self.client.log_batch(self.run_id, metrics=items[start : start + METRIC_BATCH])

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None


def plot_head_losses(client, run_id: str, n_future: int, directory: Path) -> Path:
    """Training and validation loss per head over steps, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, split in zip(axes, ("train", "val")):
        for i in range(n_future):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, f"{split}/loss_head_{i}"))
            if history:
                ax.plot(*zip(*history), label=f"head {i} (t+{i + 1})")
        ax.set_title(f"{split} loss per head")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_lines():  # no validation yet (a run that failed early): no empty legend, no warning
            ax.legend()
    axes[0].set_ylabel("cross-entropy (nats)")
    fig.tight_layout()
    path = directory / "head_losses.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass
class FinishedRun:
    run_id: str
    tracking_uri: str
    experiment_id: str
    model_uri: str | None  # models:/<name>/<version> when registered

    def describe(self, browse: str | None = None) -> str:
        """The run, where to look at it (``browse``: e.g. ``mtp.hints.mlflow_browse``), its model."""
        lines = [f"MLflow run {self.run_id} (experiment {self.experiment_id}) in {self.tracking_uri}"]
        if browse:
            lines.append(f"  browse: {browse}")
        if self.model_uri:
            lines.append(f"  model:  {self.model_uri}")
        return "\n".join(lines)


def finish_run(
    cfg: JobConfig, run_id: str, checkpoint_dir: str | Path | None, error: BaseException | None = None
) -> FinishedRun:
    """Log the final checkpoint, the MLflow model and the loss plot, register the model, close the run.

    After an ``error`` the run is closed FAILED with the error as its ``error`` tag; it keeps
    its checkpoint (to resume from) but logs no model and moves no alias.
    """
    uri = tracking_uri(cfg.tracking)
    client = mlflow_client(uri)
    model_uri = None
    if error is not None:
        client.set_tag(run_id, "error", f"{type(error).__name__}: {error}"[:5000])
    elif "error" in client.get_run(run_id).data.tags:  # an earlier attempt's: this one finished
        client.delete_tag(run_id, "error")
    with tempfile.TemporaryDirectory() as tmp:
        client.log_artifact(run_id, str(plot_head_losses(client, run_id, cfg.model.n_future, Path(tmp))), "plots")
    if checkpoint_dir is not None:
        client.log_artifacts(run_id, str(checkpoint_dir), CHECKPOINT_ARTIFACT)  # with the optimizer: for --resume
        if error is None:
            model_uri = register_checkpoint(cfg, run_id, checkpoint_dir)
    client.set_terminated(run_id, status="FAILED" if error is not None else "FINISHED")
    return FinishedRun(run_id, uri, client.get_run(run_id).info.experiment_id, model_uri)


def register_checkpoint(cfg: JobConfig, run_id: str, checkpoint_dir: str | Path) -> str | None:
    """Log ``checkpoint_dir`` as the run's MLflow model and, with ``tracking.registered_model``
    set, register it as a new version (moving ``@newest``); returns ``models:/name/version``."""
    tags = {"n_future": str(cfg.model.n_future), "size": model_size(cfg), "preset": cfg.train.preset}
    return log_model(run_id, checkpoint_dir, tracking_uri(cfg.tracking), cfg.tracking.registered_model, tags)
