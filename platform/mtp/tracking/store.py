"""The MLflow store: which one (``tracking_uri``), whether it can be used, a client, an experiment.

Every MLflow call of the platform gets its client here, with its store named explicitly;
``MLFLOW_TRACKING_URI`` is read as a default and never written.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from mtp.config import TrackingConfig


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


def check_tracking(uri: str, timeout: float = 5.0, patience_s: float = 60.0) -> None:
    """Fail fast, before any work, when the store cannot be reached or written.

    A server that refuses the connection (nothing listens) or answers with an error fails at
    once; one that is slow to answer (a busy machine) is asked again with backoff for up to
    ``patience_s``, as MLflow's own client would retry it.
    """
    if uri.startswith(("http://", "https://")):
        deadline, wait = time.monotonic() + patience_s, 1.0
        while True:
            try:
                with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                    if response.status != 200:
                        raise TrackingError(f"MLflow tracking server {uri} answered /health with HTTP {response.status}")
                    return
            except urllib.error.HTTPError as exc:
                raise TrackingError(f"MLflow tracking server {uri} answered /health with HTTP {exc.code}") from None
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                slow = isinstance(reason, (TimeoutError, socket.timeout)) or "timed out" in str(reason)
                if not slow or time.monotonic() + wait > deadline:
                    waited = f" (no answer within {patience_s:g} s)" if slow else ""
                    raise TrackingError(f"MLflow tracking server {uri} is unreachable: {reason}{waited}") from None
                print(f"MLflow tracking server {uri} is slow to answer ({reason}); asking again in {wait:g} s",
                      file=sys.stderr, flush=True)
                time.sleep(wait)
                wait = min(wait * 2, 16.0)
    if uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///") :]).parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise TrackingError(f"MLflow store {uri}: directory {parent} does not exist or is not writable")
    elif uri.startswith(("file:", "/")) or "://" not in uri:
        raise TrackingError(
            f"tracking URI {uri!r}: MLflow 3 file stores are deprecated; use sqlite:///path/mlflow.db or a server"
        )


def client(uri: str):
    """An MLflow client whose tracking and registry store is ``uri``."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# MLflow 3's UI opens an experiment as "GenAI apps & agents" or "Machine learning" by
# this tag (its values in the 3.17 UI bundle: genai_development, custom_model_development,
# finetuning, ...); without it, it infers GenAI from our evaluation runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def experiment_id(client, name: str, uri: str) -> str:
    """Get or create the experiment, on the driver, with artifacts beside a sqlite store,
    marked as model development so that the UI shows its runs as training runs."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).parent / "mlruns").as_uri()
    return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
