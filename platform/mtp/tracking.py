"""MLflow: one run per training job, the model registry, and MLflow URIs -> checkpoints.

The driver (``mtp.cluster.job``) opens the run (``start_run``), logs the full config
as params and the config file as an artifact, and hands the run id to the workers in
``cfg.tracking.run_id``. Rank 0 logs per-step metrics and system metrics into that
run (``MLflowCallback``); the id is also saved in every checkpoint, so a restarted
attempt, or ``--resume``, continues the same run. At the end the driver logs the
final checkpoint and a per-head loss plot, registers the model
(``models:/<name>/<version>``, tagged with n_future and size) and closes the run
(``finish_run``). ``resolve_checkpoint`` turns any MLflow URI into a local
checkpoint directory, for evaluation and serving.

Metric names are the same in every run: ``train/loss_head_<i>``, ``train/loss``,
``val/loss_head_<i>``, ``val/bpb``, ``perf/tokens_per_s``, ...
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from mtp.config import JobConfig, TrackingConfig
from mtp.model import count_parameters

CHECKPOINT_ARTIFACT = "checkpoint"
METRIC_BATCH = 1000  # MLflow's per-request metric limit


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, bad URI, missing model)."""


def tracking_uri(cfg: TrackingConfig) -> str:
    """``tracking.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.

    Relative sqlite paths are made absolute, so workers in other directories write
    to the same store.
    """
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any work, when the store cannot be reached or written."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                if response.status != 200:
                    raise TrackingError(f"MLflow tracking server {uri} answered /health with HTTP {response.status}")
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(f"MLflow tracking server {uri} is unreachable: {exc}") from None
    elif uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///") :]).parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise TrackingError(f"MLflow store {uri}: directory {parent} does not exist or is not writable")
    elif uri.startswith(("file:", "/")) or "://" not in uri:
        raise TrackingError(
            f"tracking URI {uri!r}: MLflow 3 file stores are deprecated; use sqlite:///path/mlflow.db or a server"
        )


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client, name: str, uri: str) -> str:
    """Get or create the experiment, on the driver, with artifacts beside a sqlite store."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).parent / "mlruns").as_uri()
    return client.create_experiment(name, artifact_location=location)


def model_size(cfg: JobConfig) -> str:
    """The size tag: total parameters, e.g. ``1.30B`` or ``0.4M``."""
    total = count_parameters(cfg.model)["total"]
    return f"{total / 1e9:.2f}B" if total >= 1e8 else f"{total / 1e6:.1f}M"


def start_run(cfg: JobConfig, config_file: str | Path | None = None) -> str:
    """Open (or, with ``cfg.tracking.run_id`` set, reopen) the job's run; returns its id.

    Params are the full flattened config. A reopened run keeps its params (MLflow
    params are immutable); changed values are recorded as ``resume.*`` tags.
    """
    uri = tracking_uri(cfg.tracking)
    client = _client(uri)
    params = {k: "" if v is None else str(v) for k, v in cfg.flat().items() if k != "tracking.run_id"}
    if cfg.tracking.run_id:
        run = client.get_run(cfg.tracking.run_id)
        client.update_run(run.info.run_id, status="RUNNING")
        changed = {f"resume.{k}": v for k, v in params.items() if run.data.params.get(k, v) != v}
        for key, value in changed.items():
            client.set_tag(run.info.run_id, key, value)
        return run.info.run_id
    from mlflow.entities import Param

    tags = {"n_future": str(cfg.model.n_future), "preset": cfg.train.preset, "size": model_size(cfg)}
    if cfg.train.init_from:  # lineage of an n -> n' finetune: the run whose weights it starts from
        from mtp.checkpoint import source_run_id

        tags["init_from"] = cfg.train.init_from
        tags["init_from_run_id"] = source_run_id(cfg.train.init_from) or ""
    run = client.create_run(experiment_id(client, cfg.tracking.experiment, uri), run_name=cfg.tracking.run_name, tags=tags)
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


class MLflowCallback:
    """Rank 0's metric logger (``mtp.train.TrainCallback``), with system metrics.

    Uses the client API rather than ``mlflow.start_run`` so that a worker never ends,
    or changes the status of, the driver's run.
    """

    def __init__(self, run_id: str, uri: str, system_metrics: bool = True, resumed: bool = False):
        self.client = _client(uri)
        self.run_id = run_id
        self.monitor = None
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=5, resume_logging=resumed, tracking_uri=uri)
            self.monitor.start()

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

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

    def describe(self) -> str:
        lines = [f"MLflow run {self.run_id} (experiment {self.experiment_id}) in {self.tracking_uri}"]
        if self.tracking_uri.startswith("sqlite:///"):
            lines.append(f"  browse: mlflow ui --backend-store-uri {self.tracking_uri}")
        else:
            lines.append(f"  browse: {self.tracking_uri}/#/experiments/{self.experiment_id}/runs/{self.run_id}")
        if self.model_uri:
            lines.append(f"  model:  {self.model_uri}")
        return "\n".join(lines)


def finish_run(cfg: JobConfig, run_id: str, checkpoint_dir: str | Path | None, failed: bool = False) -> FinishedRun:
    """Log the final checkpoint and the loss plot, register the model, close the run."""
    uri = tracking_uri(cfg.tracking)
    client = _client(uri)
    model_uri = None
    with tempfile.TemporaryDirectory() as tmp:
        client.log_artifact(run_id, str(plot_head_losses(client, run_id, cfg.model.n_future, Path(tmp))), "plots")
    if checkpoint_dir is not None:
        client.log_artifacts(run_id, str(checkpoint_dir), CHECKPOINT_ARTIFACT)
        if cfg.tracking.registered_model and not failed:
            model_uri = register_checkpoint(cfg, run_id)
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
    return FinishedRun(run_id, uri, client.get_run(run_id).info.experiment_id, model_uri)


def register_checkpoint(cfg: JobConfig, run_id: str) -> str:
    """Register the run's ``checkpoint`` artifact as a new version; returns ``models:/name/version``."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri(cfg.tracking))
    name = cfg.tracking.registered_model
    tags = {"n_future": str(cfg.model.n_future), "size": model_size(cfg), "preset": cfg.train.preset}
    try:
        client.create_registered_model(name, description="Multi-token-prediction transformers trained with mtp")
    except MlflowException as exc:
        if "already exists" not in str(exc).lower() and getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=f"runs:/{run_id}/{CHECKPOINT_ARTIFACT}", run_id=run_id, tags=tags)
    return f"models:/{name}/{version.version}"


def resolve_checkpoint(uri: str, cache_dir: str | Path | None = None, tracking: str | None = None) -> Path:
    """Download (once) the checkpoint behind an MLflow URI; returns its local directory.

    Accepts ``models:/<name>/<version>``, ``runs:/<run_id>/<path>`` and artifact URIs.
    The tracking store is ``tracking``, else ``MLFLOW_TRACKING_URI``, else the local default.
    """
    import mlflow

    store = tracking or tracking_uri(TrackingConfig())
    root = Path(cache_dir or Path(os.environ.get("MTP_CACHE_DIR", Path.home() / ".cache" / "mtp")) / "models")
    target = root / hashlib.sha256(f"{store}|{uri}".encode()).hexdigest()[:16]
    if not (target / "config.json").is_file():
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(target.with_suffix(".part")), tracking_uri=store, registry_uri=store
            )
        except Exception as exc:  # MLflow raises several types for a missing model/run/artifact
            raise TrackingError(f"cannot resolve {uri!r} in {store}: {exc}") from exc
        local = Path(local)
        if not (local / "config.json").is_file():
            raise TrackingError(f"{uri!r} resolved to {local}, which is not an mtp checkpoint (no config.json)")
        if target.exists():
            import shutil

            shutil.rmtree(target)
        os.replace(local, target)
    return target

