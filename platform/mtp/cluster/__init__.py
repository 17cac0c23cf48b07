"""The thin Ray layer: it schedules ``mtp.train`` on Ray Train workers and nothing more.

``trainer`` builds the ``TorchTrainer`` (scaling, failure handling, checkpoint
reporting, placement check); ``job`` is the training job end to end (checks, MLflow
run, fit, registration), which ``jobs/train.py`` wraps with a command line.
"""
