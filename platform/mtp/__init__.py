"""mtp: train, evaluate and serve multi-token-prediction language models (Gloeckle et al. 2024).

The names below are the public API. They are imported lazily, on first use, so
``import mtp`` costs nothing and pulls in no torch, Ray, MLflow or ``datasets``: the
core (model, loss, decoding, sandbox, data) must run where the Ray layer is absent.

    import mtp
    cfg = mtp.build_config("configs/tiny.yaml")
    result = mtp.run_job(cfg)                     # on Ray Train (a local Ray if none)
    engine = mtp.Engine.from_checkpoint(result.checkpoint)

(``mtp.train.train`` trains in this process; it is not re-exported here, where the
name ``mtp.train`` must stay the module.)
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING

from mtp.lazy import exports

try:
    __version__ = metadata.version("mtp-platform")
except metadata.PackageNotFoundError:  # a source checkout on PYTHONPATH, not installed
    __version__ = "0+unknown"

# public name -> the module that defines it
_EXPORTS = {
    # configuration
    "ConfigError": "mtp.config",
    "JobConfig": "mtp.config",
    "ModelConfig": "mtp.config",
    "MODEL_PRESETS": "mtp.config",
    "build_config": "mtp.config",
    "model_preset": "mtp.config",
    # the core: model, training, checkpoints, decoding
    "MTPTransformer": "mtp.model",
    "TrainResult": "mtp.train",
    "load_model": "mtp.checkpoint",
    "save_checkpoint": "mtp.checkpoint",
    "Engine": "mtp.decoding",
    "SamplingParams": "mtp.decoding",
    # evaluation
    "evaluate_checkpoint": "mtp.evaluation",
    "load_benchmark": "mtp.evaluation",
    "pass_at_k": "mtp.evaluation",
    # the Ray layer: a training job, a sweep
    "run_job": "mtp.cluster.job",
    "load_spec": "mtp.sweep",
    "run_sweep": "mtp.sweep",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


__getattr__, __dir__ = exports(globals(), _EXPORTS)


if TYPE_CHECKING:  # static checkers and IDEs see the real names
    from mtp.checkpoint import load_model, save_checkpoint
    from mtp.cluster.job import run_job
    from mtp.config import MODEL_PRESETS, ConfigError, JobConfig, ModelConfig, build_config, model_preset
    from mtp.decoding import Engine, SamplingParams
    from mtp.evaluation import evaluate_checkpoint, load_benchmark, pass_at_k
    from mtp.model import MTPTransformer
    from mtp.sweep import load_spec, run_sweep
    from mtp.train import TrainResult
