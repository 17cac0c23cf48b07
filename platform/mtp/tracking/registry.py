"""The trained model as an MLflow model, its place in the Model Registry, and URIs -> checkpoints.

A training run logs the final checkpoint as an MLflow ``pyfunc`` model: the
inference files (weights, config, tokenizer; not the optimizer state) plus the
decoding engine, with a signature and an input example. So the runs table shows
the model, ``mlflow.pyfunc.load_model("models:/mtp-tiny@champion").predict(...)``
returns completions, and ``mlflow models serve`` gives a quick local endpoint;
evaluation and Serve still load the checkpoint inside it directly: ``resolve_checkpoint``
is the one place an MLflow URI becomes a local checkpoint directory (the core,
``mtp.checkpoint`` and ``mtp.decoding``, takes directories only). The decoding engine
behind the model is in ``mtp.tracking.pyfunc``.

Versions are addressed by alias, never by number: every successful run registers
a version and moves ``@newest`` to it; ``@champion`` is what a user promotes (a
sweep's best trial, or ``jobs/promote.py``), and is set by the first version of a
model so that a fresh setup has one. (MLflow reserves the alias ``latest``.)

MLflow and pandas are imported where they are used: ``ModelRef`` and ``URI_SCHEMES``
are read by the serving config and the model card, which stay light.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mtp.config import TrackingConfig
from mtp.config import cache_dir as mtp_cache_dir
from mtp.tracking import store

MODELS = "models:/"
URI_SCHEMES = (MODELS, "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "dbfs:/")  # what resolve_checkpoint downloads


@dataclass(frozen=True)
class ModelRef:
    """A registered model's URI, parsed: ``models:/<name>/<version>`` or ``models:/<name>@<alias>``."""

    name: str
    version: str | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, uri: str) -> "ModelRef | None":
        """None for anything that is not a ``models:/`` URI."""
        if not uri.startswith(MODELS):
            return None
        rest = uri[len(MODELS):].rstrip("/")
        if "@" in rest:
            name, _, alias = rest.partition("@")
            return cls(name, alias=alias)
        name, _, version = rest.partition("/")
        return cls(name, version=version or None)

    def __str__(self) -> str:
        if self.alias:
            return f"{MODELS}{self.name}@{self.alias}"
        return f"{MODELS}{self.name}/{self.version}" if self.version else f"{MODELS}{self.name}"


MODEL_ARTIFACT = "model"  # the logged model's name inside the run
CHECKPOINT_KEY = "checkpoint"  # its artifact holding the mtp checkpoint
NEWEST, CHAMPION = "newest", "champion"
WEIGHTS_DIGEST = "weights_sha256"  # a logged model's tag: the same weights are not logged twice by a run
DEFAULT_MAX_TOKENS = 128
INPUT_EXAMPLE = ["def fibonacci(n):\n"]


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([
            ParamSpec("max_tokens", "long", DEFAULT_MAX_TOKENS),
            ParamSpec("temperature", "double", 0.0),
            ParamSpec("top_p", "double", 1.0),
            ParamSpec("seed", "long", 0),
            ParamSpec("speculative", "boolean", True),
        ]),
    )


def log_model(run_id: str, checkpoint_dir: str | Path, tracking_uri: str, registered_model: str | None = None,
              tags: dict[str, str] | None = None) -> str | None:
    """Log the checkpoint as the run's pyfunc model; with ``registered_model``, register it
    as a new version tagged ``tags`` and move ``@newest`` to it (and ``@champion``, if unset).

    Weights this run already logged (a resume that had nothing to train) keep their logged
    model and version: nothing is logged again, no alias moves.

    Client API only (MLflow 3's logged model, linked to the run): the fluent
    ``mlflow.pyfunc.log_model`` would change this process's tracking and registry URIs,
    environment variables included, which Ray workers started later would inherit.
    Returns ``models:/<name>/<version>`` for a registered model, else None.
    """
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.entities import LoggedModelStatus

    from mtp.checkpoint import TRAIN_STATE

    client = store.client(tracking_uri)
    experiment = client.get_run(run_id).info.experiment_id
    tags = {**(tags or {}), WEIGHTS_DIGEST: weights_digest(checkpoint_dir)}
    for earlier in client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'"):
        if earlier.tags.get(WEIGHTS_DIGEST) == tags[WEIGHTS_DIGEST] and earlier.status == LoggedModelStatus.READY:
            return _version_of(client, earlier, run_id, registered_model) if registered_model else None
    logged = client.create_logged_model(experiment, name=MODEL_ARTIFACT, source_run_id=run_id, tags=tags)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            inference = Path(tmp) / CHECKPOINT_KEY  # the optimizer state is for resuming, not for the model
            shutil.copytree(checkpoint_dir, inference, ignore=shutil.ignore_patterns(TRAIN_STATE))
            mlflow.pyfunc.save_model(
                path=Path(tmp) / MODEL_ARTIFACT,
                python_model=str(Path(__file__).with_name("pyfunc.py")),  # models from code: no pickle
                artifacts={CHECKPOINT_KEY: str(inference)},
                code_paths=[str(Path(__file__).resolve().parents[1])],  # `mtp`, wherever the model loads
                signature=signature(),
                input_example=(pd.DataFrame({"prompt": INPUT_EXAMPLE}), {"max_tokens": 16}),
                pip_requirements=_requirements(),
            )
            client.log_model_artifacts(logged.model_id, str(Path(tmp) / MODEL_ARTIFACT))
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    if registered_model is None:
        return None
    return _register(client, logged, run_id, registered_model, tags, NEWEST)


def weights_digest(checkpoint_dir: str | Path) -> str:
    """SHA-256 of a checkpoint's weights file: which weights a logged model holds."""
    from mtp.checkpoint import WEIGHTS

    digest = hashlib.sha256()
    with open(Path(checkpoint_dir) / WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _version_of(client, logged, run_id: str, name: str) -> str:
    """The version of ``name`` registered from ``logged`` (registered now if there is none)."""
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if version.source == logged.artifact_location:  # what _register gives (model_id is not kept)
            return str(ModelRef(name, version=str(version.version)))
    return _register(client, logged, run_id, name, dict(logged.tags), NEWEST)


def register_run_model(run_id: str, registered_model: str, tracking_uri: str, alias: str = CHAMPION) -> str:
    """Register the model a run logged (a sweep's best trial) and point ``alias`` at the new version."""
    client = store.client(tracking_uri)
    experiment = client.get_run(run_id).info.experiment_id
    found = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
    if not found:
        raise ValueError(f"run {run_id} logged no model (did it finish with a checkpoint?)")
    return _register(client, found[0], run_id, registered_model, dict(found[0].tags), alias)


def _register(client, logged, run_id: str, name: str, tags: dict[str, str] | None, alias: str) -> str:
    """A new version of ``name`` from a logged model; ``alias`` moves to it, ``@champion`` too if unset."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Multi-token-prediction transformers trained with mtp")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # the artifact location, not models:/<model id>: MLflow resolves that one in the default store
    version = str(client.create_model_version(name, source=logged.artifact_location, run_id=run_id, tags=tags,
                                              model_id=logged.model_id).version)
    client.set_registered_model_alias(name, alias, version)
    if CHAMPION not in client.get_registered_model(name).aliases:
        client.set_registered_model_alias(name, CHAMPION, version)
    return str(ModelRef(name, version=version))


def _requirements() -> list[str]:
    """What the model needs to load elsewhere (this environment's versions)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "safetensors", "numpy", "pandas", "mlflow")]


def pin_alias(model_uri: str, tracking_uri: str | None) -> str:
    """``models:/name@alias`` -> ``models:/name/<version it names now>``; other URIs unchanged.

    Raises ValueError naming the alias when the registry does not know it.
    """
    ref = ModelRef.parse(model_uri)
    if ref is None or ref.alias is None:
        return model_uri
    from mlflow.exceptions import MlflowException

    try:
        version = store.client(tracking_uri).get_model_version_by_alias(ref.name, ref.alias).version
    except MlflowException as exc:
        raise ValueError(f"{model_uri}: the registry at {tracking_uri or 'the default store'} "
                         f"has no such alias ({exc.message})") from None
    return str(ModelRef(ref.name, version=str(version)))


def set_alias(model_uri: str, alias: str, tracking_uri: str) -> str:
    """Point ``alias`` at the version ``model_uri`` names (``models:/name/3`` or ``models:/name@other``)."""
    pinned = pin_alias(model_uri, tracking_uri)
    ref = ModelRef.parse(pinned)
    if ref is None or ref.version is None or "/" in ref.version:
        raise ValueError(f"{model_uri!r}: expected models:/<name>/<version> or models:/<name>@<alias>")
    store.client(tracking_uri).set_registered_model_alias(ref.name, alias, ref.version)
    return pinned


def resolve_checkpoint(path_or_uri: str | Path, tracking: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """The local checkpoint directory for a path or an MLflow URI: what callers hand the core.

    A URI's checkpoint is downloaded once: ``models:/<name>/<version>``, ``models:/<name>@<alias>``,
    ``runs:/<run_id>/<path>`` and artifact URIs; a registered MLflow model yields the checkpoint
    inside it. The tracking store is ``tracking``, else ``MLFLOW_TRACKING_URI``, else the local default.
    """
    from mtp.checkpoint import CONFIG

    text = str(path_or_uri)
    if not text.startswith(URI_SCHEMES):
        path = Path(text).expanduser()
        if not (path / CONFIG).is_file():
            raise FileNotFoundError(f"{text!r} is not a checkpoint directory (no {CONFIG} in it)")
        return path
    import mlflow

    source = tracking or store.tracking_uri(TrackingConfig())
    uri = pin_alias(text, source)  # cache by version: an alias moves
    root = Path(cache_dir) / "models" if cache_dir else mtp_cache_dir("models")
    target = root / hashlib.sha256(f"{source}|{uri}".encode()).hexdigest()[:16]
    if not (target / CONFIG).is_file():
        ref = ModelRef.parse(uri)
        try:
            # MLflow 3.17 looks models:/ URIs up in its default registry whatever registry_uri
            # says: ask the named store for the version's artifacts instead
            artifacts = store.client(source).get_model_version_download_uri(ref.name, ref.version) if ref and ref.version else uri
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=artifacts, dst_path=str(target.with_suffix(".part")), tracking_uri=source,
                registry_uri=source,
            )
        except Exception as exc:  # MLflow raises several types for a missing model/run/artifact
            raise store.TrackingError(f"cannot resolve {uri!r} in {source}: {exc}") from exc
        local = Path(local)
        if (local / "MLmodel").is_file():  # an MLflow model (log_model): the checkpoint is inside
            local = local / "artifacts" / "checkpoint"
        if not (local / CONFIG).is_file():
            raise store.TrackingError(f"{uri!r} resolved to {local}, which is not an mtp checkpoint (no {CONFIG})")
        if target.exists():
            shutil.rmtree(target)
        os.replace(local, target)
        shutil.rmtree(target.with_suffix(".part"), ignore_errors=True)
    return target

