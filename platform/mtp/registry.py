"""The trained model as an MLflow model, and its place in the Model Registry.

A training run logs the final checkpoint as an MLflow ``pyfunc`` model: the
inference files (weights, config, tokenizer; not the optimizer state) plus the
decoding engine, with a signature and an input example. So the runs table shows
the model, ``mlflow.pyfunc.load_model("models:/mtp-tiny@champion").predict(...)``
returns completions, and ``mlflow models serve`` gives a quick local endpoint;
evaluation and Serve still load the checkpoint inside it directly
(``mtp.tracking.resolve_checkpoint``).

Versions are addressed by alias, never by number: every successful run registers
a version and moves ``@newest`` to it; ``@champion`` is what a user promotes (a
sweep's best trial, or ``jobs/promote.py``), and is set by the first version of a
model so that a fresh setup has one. (MLflow reserves the alias ``latest``.)
"""

import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd

from mtp.uris import ModelRef

MODEL_ARTIFACT = "model"  # the logged model's name inside the run
CHECKPOINT_KEY = "checkpoint"  # its artifact holding the mtp checkpoint
NEWEST, CHAMPION = "newest", "champion"
DEFAULT_MAX_TOKENS = 128
INPUT_EXAMPLE = ["def fibonacci(n):\n"]


class MTPCompletions(mlflow.pyfunc.PythonModel):
    """Prompts in (a ``prompt`` column), completions out, decoded by the MTP engine.

    Params (all optional): ``max_tokens``, ``temperature``, ``top_p``, ``seed``,
    ``speculative`` (draft with the extra heads; greedy text is the same either way).
    """

    def load_context(self, context) -> None:
        from mtp.decoding import Engine

        self.engine = Engine.from_checkpoint(context.artifacts[CHECKPOINT_KEY])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        from mtp.decoding import SamplingParams

        params = params or {}
        prompts = model_input["prompt"].tolist() if hasattr(model_input, "columns") else list(model_input)
        sampling = SamplingParams(
            max_new_tokens=int(params.get("max_tokens", DEFAULT_MAX_TOKENS)),
            temperature=float(params.get("temperature", 0.0)),
            top_p=float(params.get("top_p", 1.0)),
            seed=params.get("seed"),
            speculative=bool(params.get("speculative", True)),
        )
        return [g.text for g in self.engine.generate([str(p) for p in prompts], sampling)]


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

    Client API only (MLflow 3's logged model, linked to the run): the fluent
    ``mlflow.pyfunc.log_model`` would change this process's tracking and registry URIs,
    environment variables included, which Ray workers started later would inherit.
    Returns ``models:/<name>/<version>`` for a registered model, else None.
    """
    from mlflow.entities import LoggedModelStatus

    from mtp.checkpoint import TRAIN_STATE

    client = mlflow.MlflowClient(tracking_uri, tracking_uri)
    experiment = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment, name=MODEL_ARTIFACT, source_run_id=run_id, tags=tags)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            inference = Path(tmp) / CHECKPOINT_KEY  # the optimizer state is for resuming, not for the model
            shutil.copytree(checkpoint_dir, inference, ignore=shutil.ignore_patterns(TRAIN_STATE))
            mlflow.pyfunc.save_model(
                path=Path(tmp) / MODEL_ARTIFACT,
                python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # models from code: no pickle
                artifacts={CHECKPOINT_KEY: str(inference)},
                code_paths=[str(Path(__file__).resolve().parent)],  # `mtp`, wherever the model loads
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


def register_run_model(run_id: str, registered_model: str, tracking_uri: str, alias: str = CHAMPION) -> str:
    """Register the model a run logged (a sweep's best trial) and point ``alias`` at the new version."""
    client = mlflow.MlflowClient(tracking_uri, tracking_uri)
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
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        version = MlflowClient(tracking_uri, tracking_uri).get_model_version_by_alias(ref.name, ref.alias).version
    except MlflowException as exc:
        raise ValueError(f"{model_uri}: the registry at {tracking_uri or 'the default store'} "
                         f"has no such alias ({exc.message})") from None
    return str(ModelRef(ref.name, version=str(version)))


def set_alias(model_uri: str, alias: str, tracking_uri: str) -> str:
    """Point ``alias`` at the version ``model_uri`` names (``models:/name/3`` or ``models:/name@other``)."""
    from mlflow import MlflowClient

    pinned = pin_alias(model_uri, tracking_uri)
    ref = ModelRef.parse(pinned)
    if ref is None or ref.version is None or "/" in ref.version:
        raise ValueError(f"{model_uri!r}: expected models:/<name>/<version> or models:/<name>@<alias>")
    MlflowClient(tracking_uri, tracking_uri).set_registered_model_alias(ref.name, alias, ref.version)
    return pinned
