"""MLflow, the only layer that knows it: the core (model, training, checkpoints, decoding) does not.

``store``: which tracking store, a client for it, experiments. ``runs``: a training job's
run (params, metrics, checkpoint, model). ``registry``: the MLflow model, registered
versions and aliases, ``models:/`` URIs, and ``resolve_checkpoint``, the one function that
turns a path or an MLflow URI into the local checkpoint directory the core loads.
``pyfunc``: the engine as an MLflow pyfunc model (loaded by MLflow only).
"""
