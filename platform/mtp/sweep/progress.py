"""A sweep's console: one line per finished trial with the sweep's overall progress, and
whether the sweep ran to its end (Ctrl-C makes Tune return early, with a normal-looking result).

Tune's own output (per-trial status tables, its TensorBoard hint, its "Resume experiment with:
Tuner.restore(...)" advice) is off unless ``--verbose``: the sweep prints this instead, and the
command that resumes it is the job's own (``--resume SWEEP_DIR``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from ray.tune import Callback

from mtp.cluster import logs

DONE = ("TERMINATED", "ERROR")
# interruption advice, "did not complete", and "Failed to fetch metrics" for a trial stopped before it reported
TUNE_LOGGERS = ("ray.tune.tune", "ray.tune.execution.tune_controller", "ray.tune.analysis.experiment_analysis")


class SweepInterrupted(KeyboardInterrupt):
    """A second Ctrl-C: Tune stopped without finishing its last save; ``sweep_dir`` may still resume."""

    def __init__(self, sweep_dir: str, done: int | None, total: int):
        super().__init__(f"interrupted: {interrupted_count(done, total)}")
        self.sweep_dir, self.done, self.total = sweep_dir, done, total


def finished_in_state(sweep_dir: str) -> int | None:
    """How many trials Tune's saved state (what ``--resume`` restores) holds as finished or failed.

    After Ctrl-C the trials Tune stopped read TERMINATED in memory, but RUNNING in the state it
    saved, and a resume reruns them: the state file is what says how far the sweep got.
    """
    saved = sorted(Path(sweep_dir).glob("experiment_state-*.json"))
    try:
        trials = json.loads(saved[-1].read_text())["trial_data"]
        return sum(json.loads(trial[0])["status"] in DONE for trial in trials)
    except (IndexError, OSError, KeyError, TypeError, ValueError):
        return None


def interrupted_count(done: int | None, total: int) -> str:
    """``2 of 18 trials ran`` (``done`` None: not known)."""
    return f"{done} of {total} trials ran" if done is not None else f"of {total} trials"


def quiet_tune() -> int:
    """Tune's verbosity for ``RunConfig(verbose=...)``; silences its driver loggers unless ``--verbose``.

    Tune's newer console output prints its experiment table and TensorBoard hint even at
    verbosity 0, so its older one (silent at 0) is chosen: ``RAY_AIR_NEW_OUTPUT=0``, read at ``fit``.
    """
    if logs.verbose():
        return 1
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    for name in TUNE_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return 0


def _fmt_minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


class SweepProgress(Callback):
    """``trial 3 of 18 done (ok, a1b2_00002): 2 running, 4.1 min elapsed, about 20.5 min left``."""

    def __init__(self, total: int):
        self.total = total
        self.setup()

    def setup(self, total_num_samples: int | None = None, **info) -> None:
        """Each session's start (``Tuner.restore`` reuses the first session's pickled callback)."""
        self.total = total_num_samples or self.total
        self.started = time.monotonic()
        self.done_before: int | None = None  # trials a resumed sweep had finished before this session
        self.done = 0

    def _done(self, trials, trial) -> int:
        return sum(t.status in DONE or t is trial for t in trials)

    def on_step_begin(self, iteration, trials, **info):
        if self.done_before is None:
            self.done_before = sum(t.status in DONE for t in trials)
            self.done = self.done_before
            if self.done_before:
                print(f"resumed: {self.done_before} of {self.total} trials had finished", flush=True)

    def _report(self, trials, trial, outcome: str) -> None:
        self.done = self._done(trials, trial)
        running = sum(t.status == "RUNNING" and t is not trial for t in trials)
        elapsed = time.monotonic() - self.started
        here = self.done - (self.done_before or 0)
        left = self.total - self.done
        estimate = f", about {_fmt_minutes(elapsed / here * left)} left" if here and left else ""
        print(f"trial {self.done} of {self.total} done ({outcome}, {trial.trial_id}): {running} running, "
              f"{_fmt_minutes(elapsed)} elapsed{estimate}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._report(trials, trial, "ok")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._report(trials, trial, "failed")
