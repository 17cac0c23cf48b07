"""ASHA within groups: trials compete only with trials of the same model size.

Plain ASHA compares every trial at the same step, so in an n_future x size grid it
would stop the small models (whose loss is higher at any step) instead of the worse
n_future at each size, and the paper's question, which n is best *at which size*,
would go unanswered. ``GroupedASHA`` keeps one ASHA per value of a config field.
"""

from __future__ import annotations

from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler


class GroupedASHA(FIFOScheduler):
    """One ``ASHAScheduler`` per value of ``trial.config[group_by]``."""

    def __init__(self, group_by: str, **asha: Any):
        super().__init__()
        self._metric: str | None = None
        self._mode: str | None = None
        self._group_by = group_by
        self._asha_kwargs = asha
        self._groups: dict[str, ASHAScheduler] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return all(g.set_search_properties(metric, mode, **spec) for g in self._groups.values())

    def _asha(self, trial: Trial) -> ASHAScheduler:
        key = str(trial.config.get(self._group_by))
        if key not in self._groups:
            scheduler = ASHAScheduler(**self._asha_kwargs)
            scheduler.set_search_properties(self._metric, self._mode)
            self._groups[key] = scheduler
        return self._groups[key]

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self._asha(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        return self._asha(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._asha(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._asha(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{self._group_by}={k}: {g.debug_string()}" for k, g in self._groups.items())
