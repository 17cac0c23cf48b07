"""Quiet by default: a job prints its own progress lines and summary; Ray stays at warnings.

``MTP_VERBOSE=1`` (the jobs' ``--verbose``) brings Ray's and MLflow's INFO lines
back. The setting travels to every worker in the job's ``runtime_env`` (see
``mtp.cluster.ray_env.runtime_env``), since Ray workers do not inherit the
driver's environment.

What it silences, and why each needs its own switch:
- Ray Train's per-report ``Reporting training result N: TrainingReport(...)`` and
  per-checkpoint lines: ``ray.train.LoggingConfig`` filters loggers named
  ``ray.train.*`` only, and the report line comes from a logger Ray names after its
  source file path, so that logger is set to WARNING in each worker as well.
- Train's preemption watcher (``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER``): on these
  clusters its only output was an error-level line about its own constructor
  arguments (ray-project/ray#53727); it only observes spot-instance preemption.
  Set the variable to 1 in the job's environment where that matters.
- Train's placement-group cleaner, a detached actor that polls the State API every few
  seconds: without a dashboard (a local instance, which starts without one) every poll
  fails with a warning that changes nothing. It is set to ERROR in every Ray worker by
  ``quiet_process``, which ``runtime_env`` installs as the workers' setup hook.
- MLflow's INFO lines (system-metrics monitor start/stop, model logging and
  registration), its run links (the job prints its own summary) and download progress bars.
"""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "MTP_VERBOSE"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
NOISY_LOGGERS = ("mlflow",)
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
RUN_LINK_ENV = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"  # the job prints its run's link once, in its summary
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
MLFLOW_LEVEL_ENV = "MLFLOW_LOGGING_LEVEL"  # read when mlflow is imported, which resets its loggers' level


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def set_verbose(on: bool) -> None:
    """What ``--verbose`` does, for this process and (through ``runtime_env``) its workers."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
    quiet_process()


def ray_log_level() -> int:
    return logging.INFO if verbose() else logging.WARNING


def worker_env_vars() -> dict[str, str]:
    """Environment for every worker of the job (merged into its ``runtime_env``)."""
    env = {VERBOSE_ENV: "1" if verbose() else "0", PROGRESS_BAR_ENV: "true" if verbose() else "false",
           MLFLOW_LEVEL_ENV: "INFO" if verbose() else "WARNING"}
    if PREEMPTION_WATCHER_ENV in os.environ:  # the user's explicit choice wins
        env[PREEMPTION_WATCHER_ENV] = os.environ[PREEMPTION_WATCHER_ENV]
    elif not verbose():
        env[PREEMPTION_WATCHER_ENV] = "0"
    return env


def train_logging_config():
    """``RunConfig.logging_config`` for Ray Train's controller and workers."""
    import ray.train

    return ray.train.LoggingConfig(log_level=logging.getLevelName(ray_log_level()))


def quiet_process() -> None:
    """Call once in each process (driver or worker) that should follow the verbosity setting."""
    level = ray_log_level()
    if not verbose():
        os.environ.setdefault(PROGRESS_BAR_ENV, "false")
        os.environ.setdefault(RUN_LINK_ENV, "true")
        os.environ.setdefault(MLFLOW_LEVEL_ENV, "WARNING")
    names = list(NOISY_LOGGERS)
    if not verbose():
        logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
    try:  # Ray names this logger after its file (see the module docstring)
        from ray.train.v2._internal.execution import context

        names.append(context.__file__)
    except ImportError:
        pass
    for name in names:
        logging.getLogger(name).setLevel(level)
