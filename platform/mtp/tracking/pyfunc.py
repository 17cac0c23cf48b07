"""The logged pyfunc model: prompts in, completions out, decoded by the MTP engine.

MLflow "models from code": ``log_model`` stores this file with the model and MLflow
runs it to load the model, so nothing is pickled; the ``mtp`` package travels with
the model as its code path. Only MLflow loads this module (it calls ``set_model``).
"""

from typing import Any

import mlflow.models
import mlflow.pyfunc
import pandas as pd

from mtp.tracking.registry import CHECKPOINT_KEY, DEFAULT_MAX_TOKENS


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


mlflow.models.set_model(MTPCompletions())
