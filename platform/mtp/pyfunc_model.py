"""The code of the logged pyfunc model (MLflow "models from code").

MLflow stores this file with the model and runs it to load the model, so nothing
is pickled; the ``mtp`` package travels with the model as its code path.
"""

import mlflow.models

from mtp.registry import MTPCompletions

mlflow.models.set_model(MTPCompletions())
