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
- What workers and Ray's actors write to stderr (tracebacks of a failed worker, the Train
  controller's and Ray's own error logs): ``route_worker_logs`` sends every worker line to
  the job's log file and only stdout (the job's progress lines) to the console; the job
  prints one line per failure itself (``mtp.cluster.failures``).
- HF ``datasets`` progress bars (tokenising, packing), and Ray's notice that a local
  instance turned token authentication on (README: "Ray 2.60 and authentication").
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from pathlib import Path

VERBOSE_ENV = "MTP_VERBOSE"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
NOISY_LOGGERS = ("mlflow",)
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
RUN_LINK_ENV = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"  # the job prints its run's link once, in its summary
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
# "Token authentication is enabled for this Ray cluster ..." on every local instance a job starts
AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
MLFLOW_LEVEL_ENV = "MLFLOW_LOGGING_LEVEL"  # read when mlflow is imported, which resets its loggers' level
RAY_PRINT_HANDLER = "ray_print_logs"  # Ray's own handler of worker output on the driver
RAY_DAEMONS = ("raylet", "autoscaler")  # their lines reach the driver as a worker's would
DATASETS_PROGRESS_ENV = "HF_DATASETS_DISABLE_PROGRESS_BARS"


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
           MLFLOW_LEVEL_ENV: "INFO" if verbose() else "WARNING", DATASETS_PROGRESS_ENV: "0" if verbose() else "1"}
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
        os.environ.setdefault(DATASETS_PROGRESS_ENV, "1")
        _disable_datasets_progress()
        os.environ.setdefault(PROGRESS_BAR_ENV, "false")
        os.environ.setdefault(RUN_LINK_ENV, "true")
        os.environ.setdefault(MLFLOW_LEVEL_ENV, "WARNING")
    names = list(NOISY_LOGGERS)
    if not verbose():
        logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
        logging.getLogger(AUTH_NOTICE_LOGGER).setLevel(logging.ERROR)
    names.extend(_ray_train_context_file())
    for name in names:
        logging.getLogger(name).setLevel(level)


def _ray_train_context_file() -> list[str]:
    """The file Ray Train's report logger is named after (see the module docstring), found
    without importing Ray (seconds that a job which never starts Ray, e.g. scoring a sample file,
    must not pay); none where Ray is not installed."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        return []
    return [os.path.join(spec.submodule_search_locations[0], "train", "v2", "_internal", "execution", "context.py")]


def _disable_datasets_progress() -> None:
    """``datasets`` reads its variable once, at import: turn its bars off where it is already imported."""
    import sys

    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


_muted: list[bool] = []


def mute_workers() -> None:
    """From now on worker lines go to the log file only: the job has said how it ended, and
    lines still arriving from workers that Ray is shutting down would follow that summary."""
    _muted.append(True)


def route_worker_logs(log_file: Path | None, console: bool = True) -> Path | None:
    """On the driver: every line Ray forwards from workers goes to ``log_file`` (with its
    worker's name and pid); the console gets only their stdout (none without ``console``:
    a sweep's trials), or everything with ``--verbose``.

    Ray prints worker output through a handler it registers on the driver, and the raylet's
    error messages ("A worker died or was killed ...") through its module function
    ``print_to_stdstream``, looked up at each call: both are replaced. Call after ``ray.init``;
    returns ``log_file``. Without ``log_to_driver`` there is nothing to route.
    """
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    if not any(name == RAY_PRINT_HANDLER for name, _ in dispatcher.handlers):
        return None
    _muted.clear()
    to_console = getattr(ray_worker.print_to_stdstream, "__wrapped__", ray_worker.print_to_stdstream)
    default_ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
    lock = threading.Lock()
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)

    def handle(data: dict, ignore_prefix: bool = default_ignore_prefix) -> None:
        if log_file is not None:
            who = data.get("actor_name") or data.get("task_name") or "worker"
            stamp = time.strftime("%H:%M:%S")
            stream = "stderr" if data.get("is_err") else "stdout"
            with lock, log_file.open("a") as out:
                out.writelines(f"{stamp} ({who} pid={data.get('pid')}) {stream}: {line}\n" for line in data["lines"])
        if verbose() or (console and not _muted and not (data.get("is_err") or data.get("pid") in RAY_DAEMONS)):
            to_console(data, ignore_prefix=ignore_prefix)

    handle.__wrapped__ = to_console
    ray_worker.print_to_stdstream = handle
    dispatcher.remove_handler(RAY_PRINT_HANDLER)
    dispatcher.add_handler(RAY_PRINT_HANDLER, handle)
    return log_file
