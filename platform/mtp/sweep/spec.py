"""Sweep files: one YAML describes a whole Ray Tune experiment over training configs.

A sweep file is validated in full before Ray is touched: every key of the file, every
search dimension, and every config a grid can produce goes through
``mtp.config.build_config``, so an unknown field or an impossible combination fails
with the field's name instead of as an errored trial twenty minutes in.

Schema (all keys except ``space`` and ``metric`` are optional)::

    name: paper-grid                 # Tune experiment + MLflow parent run name
    experiment: mtp-sweeps           # MLflow experiment
    base_config: configs/x.yaml      # a training config file, as for jobs/train.py
    config: {train: {max_steps: 20}} # fixed overrides, nested or dotted
    space:                           # dotted config field -> exactly one distribution
      model.n_future: {grid: [1, 2, 4]}
      train.preset: {choice: [debug, tiny]}
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}
      train.warmup_steps: {uniform: [0, 50]}  # an int field (int | None too) samples integers
    metric: val/bpb                  # head-0 bits per byte: comparable across n_future
    mode: min
    scheduler: {type: asha, time_attr: step, grace_period: 5, max_t: 20, group_by: train.preset}
    num_samples: 1                   # repeats of the grid / draws of the random dims
    resources: {trial: {memory: 1000000}}   # the trial process; workers: scaling.*
    max_concurrent_trials: auto      # or an int
    plot: {x: model.n_future, lines: train.preset}
    evaluation: {benchmark: humaneval, k: [1]}  # optional: pass@k becomes the metric
    task: {name: polynomial}         # optional: train on a synthetic task, score it (mtp.tasks)
    arms: {compute_matched: true, next_token_heads: true}  # optional controls beside each n > 1 (mtp.compare.arms)
    verdict: {margin: 0.05, floor: two_rule_lookup}        # optional: fixed before the run (mtp.compare.table)

The file is built with ``mtp.specs.build``: an unknown key or a wrong type anywhere fails
naming it (``task.params.foo: unknown key``). ``evaluation`` and ``task`` are scorers
(``mtp.sweep.scorers``). Parsing writes and
downloads nothing: a task's corpus path is known from its settings, and the driver
writes it (``Scorer.prepare``) before the first trial.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mtp.compare.arms import ARM, Arm, ArmsSpec, by_label
from mtp.compare.arms import overrides as arm_overrides
from mtp.compare.table import VerdictSpec
from mtp.config import ConfigError, JobConfig, apply_overrides, build_config, flatten_mapping, read_yaml_mapping
from mtp.specs import build, field_hint, is_integer
from mtp.sweep.scorers import SECTIONS

KINDS = ("grid", "choice", "uniform", "loguniform")
MAX_PROBED_CONFIGS = 4096  # beyond this, each dimension is validated on its own


class SweepError(ConfigError):
    """A sweep file is malformed or can never run; raised before any trial starts."""


@dataclass(frozen=True)
class Dimension:
    """One searched config field and its distribution; a range over an int field holds integers."""

    key: str
    kind: str
    values: tuple[Any, ...] = ()  # grid / choice
    low: float = 0.0  # uniform / loguniform
    high: float = 0.0
    integer: bool = False  # the field's type is int (or int | None): the range samples integers

    @classmethod
    def parse(cls, key: str, raw: Any, integer: bool = False) -> "Dimension":
        where = f"space.{key}"
        if not isinstance(raw, dict) or len(raw) != 1:
            raise SweepError(f"{where} must be a mapping with exactly one of {', '.join(KINDS)}, got {raw!r}")
        (kind, arg), = raw.items()
        if kind not in KINDS:
            raise SweepError(f"{where}: unknown distribution {kind!r}; use one of {', '.join(KINDS)}")
        if kind in ("grid", "choice"):
            if not isinstance(arg, list):
                raise SweepError(f"{where}.{kind} must be a list of values, got {arg!r}")
            if not arg:
                raise SweepError(f"{where}.{kind} is empty: a sweep needs at least one value")
            return cls(key, kind, values=tuple(arg))
        if not (isinstance(arg, list) and len(arg) == 2 and all(_is_number(v) for v in arg)):
            raise SweepError(f"{where}.{kind} must be [low, high], got {arg!r}")
        low, high = float(arg[0]), float(arg[1])
        if not low < high:
            raise SweepError(f"{where}.{kind}: low={low} must be below high={high}")
        if kind == "loguniform" and low <= 0:
            raise SweepError(f"{where}.loguniform: bounds must be positive, got [{low}, {high}]")
        if integer and math.ceil(low) > math.floor(high):
            raise SweepError(f"{where}.{kind}: {key} holds integers and [{low}, {high}] contains none")
        return cls(key, kind, low=low, high=high, integer=integer)

    @property
    def probe_values(self) -> tuple[Any, ...]:
        """Values that bracket the dimension: all of a finite set, the ends of a range."""
        if self.values:
            return self.values
        return (math.ceil(self.low), math.floor(self.high)) if self.integer else (self.low, self.high)

    def to_tune(self) -> Any:
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.integer:
            low, high = self.probe_values
            return tune.randint(low, high + 1) if self.kind == "uniform" else tune.lograndint(low, high + 1)
        return tune.uniform(self.low, self.high) if self.kind == "uniform" else tune.loguniform(self.low, self.high)


@dataclass
class SchedulerSpec:
    """FIFO runs every trial to the end; ASHA stops the worse ones early.

    ``group_by`` (a config field, e.g. ``train.preset``) makes trials compete only
    within their group: across model sizes, plain ASHA would stop the small models.
    """

    type: Literal["fifo", "asha"] = "fifo"
    time_attr: str = "training_iteration"
    grace_period: int = 1
    max_t: int = 100
    reduction_factor: float = 2.0
    group_by: str | None = None

    def validate(self) -> None:
        if self.grace_period < 1 or self.max_t < 1:
            raise SweepError("scheduler.grace_period and scheduler.max_t must be >= 1")
        if self.grace_period > self.max_t:
            raise SweepError(f"scheduler.grace_period={self.grace_period} exceeds scheduler.max_t={self.max_t}")
        if self.reduction_factor <= 1:
            raise SweepError(f"scheduler.reduction_factor={self.reduction_factor} must be > 1")
        if self.group_by is not None and self.group_by not in JobConfig().flat():
            raise SweepError(f"scheduler.group_by={self.group_by!r} is not a config field")

    def build(self) -> Any:
        """The Tune scheduler; metric and mode come from ``TuneConfig``."""
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

        if self.type == "fifo":
            return FIFOScheduler()
        asha = dict(time_attr=self.time_attr, max_t=self.max_t, grace_period=self.grace_period,
                    reduction_factor=self.reduction_factor)
        if self.group_by is None:
            return ASHAScheduler(**asha)
        from mtp.sweep.scheduler import GroupedASHA

        return GroupedASHA(self.group_by, **asha)


@dataclass
class PlotSpec:
    """Axes of the summary plot: the paper's Figure 3 puts n_future on x, one line per size."""

    x: str = "model.n_future"
    lines: str = "train.preset"


def _space(raw: Any, where: str) -> dict[str, Dimension]:
    if not isinstance(raw, dict) or not raw:
        raise SweepError(f"{where} must be a non-empty mapping of dotted config fields to distributions")
    defaults = JobConfig().flat()
    for key in raw:
        if key not in defaults:
            raise SweepError(f"{where}.{key}: unknown config field; fields look like 'model.n_future', "
                             f"'train.preset', 'train.lr'")
    return {key: Dimension.parse(key, value, is_integer(field_hint(JobConfig, key))) for key, value in raw.items()}


def _fixed_config(raw: Any, where: str) -> dict[str, Any]:
    """``config``: nested sections or dotted keys, checked by name and type, kept dotted."""
    if not isinstance(raw, dict):
        raise SweepError(f"{where} must be a mapping, got {raw!r}")
    nested = {k: v for k, v in raw.items() if isinstance(v, dict)}
    flat = {**flatten_mapping(nested, where=f"{where}: "), **{k: v for k, v in raw.items() if k not in nested}}
    apply_overrides(JobConfig(), flat)  # names and types of the fixed fields, before any trial
    return flat


def _resources(raw: Any, where: str) -> dict[str, dict[str, float]]:
    """``resources.trial``: what the trial's own process reserves (the workers use ``scaling.*``)."""
    if not isinstance(raw, dict) or set(raw) != {"trial"} or not isinstance(raw["trial"], dict):
        raise SweepError(f"{where} must be {{trial: {{CPU: .., GPU: .., memory: ..}}}}, got {raw!r}")
    trial = {}
    for name, amount in raw["trial"].items():
        if not _is_number(amount) or amount < 0:
            raise SweepError(f"{where}.trial.{name}={amount!r} must be a number >= 0")
        trial[_RESOURCE_ALIASES.get(name.lower(), name)] = float(amount)
    if not any(trial.values()):
        # Tune rejects an all-zero bundle; memory-only keeps the trial off the CPUs its workers need.
        raise SweepError(f"{where}.trial must reserve something; use {{memory: 1000000}} to hold no CPU")
    return {"trial": trial}


_RESOURCE_ALIASES = {"cpu": "CPU", "gpu": "GPU", "memory": "memory"}


def _concurrency(raw: Any, where: str) -> int | None:
    if raw in (None, "auto"):
        return None
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 1:
        raise SweepError(f"{where}={raw!r} must be 'auto' or a positive integer")
    return raw


@dataclass
class SweepSpec:
    """A parsed, validated sweep file."""

    space: dict[str, Dimension] = field(metadata={"parse": _space})
    metric: str
    mode: Literal["min", "max"] = "min"
    name: str = "sweep"
    experiment: str = "mtp-sweeps"
    base_config: str | None = None
    config: dict[str, Any] = field(default_factory=dict, metadata={"parse": _fixed_config})  # dotted fixed overrides
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    num_samples: int = 1
    resources: dict[str, dict[str, float]] = field(default_factory=lambda: {"trial": {"memory": 1_000_000}},
                                                   metadata={"parse": _resources})
    max_concurrent_trials: int | None = field(default=None, metadata={"parse": _concurrency})  # None: what fits
    plot: PlotSpec = field(default_factory=PlotSpec)
    # scorers (mtp.sweep.scorers): pass@k of each final checkpoint; a synthetic task or the speed measurement
    evaluation: Any = field(default=None, metadata={"parse": SECTIONS["evaluation"]})
    task: Any = field(default=None, metadata={"parse": SECTIONS["task"]})
    arms: ArmsSpec | None = None  # controls beside param-matched n: the grid's model.n_future becomes ``arm``
    verdict: VerdictSpec = field(default_factory=VerdictSpec, metadata={"parse": VerdictSpec.parse})  # fixed before the run

    @property
    def scorers(self) -> dict[str, Any]:
        """The sweep's ``Scorer``s by section name, in the order trials are scored."""
        return {name: getattr(self, name) for name in SECTIONS if getattr(self, name) is not None}

    @property
    def trial_resources(self) -> dict[str, float]:
        return dict(self.resources["trial"])

    def arm_list(self) -> list[Arm]:
        """The comparison's arms (none without an ``arms`` section)."""
        return self.arms.arms(list(self.space["model.n_future"].values)) if self.arms else []

    @property
    def searched(self) -> dict[str, Dimension]:
        """The dimensions Tune searches: ``space``, with ``arm`` (labels) in place of model.n_future when
        the sweep has arms."""
        if not self.arms:
            return self.space
        labels = tuple(a.label for a in self.arm_list())
        return {ARM: Dimension(ARM, "grid", labels), **{k: d for k, d in self.space.items() if k != "model.n_future"}}

    def base(self, overrides: dict[str, Any] | None = None) -> JobConfig:
        """The training config of one trial: base file <- fixed config <- ``overrides`` (an ``arm``
        label among them becomes its config fields, ``mtp.compare.arms``)."""
        fields = {**self.config, **(overrides or {})}
        label = fields.pop(ARM, None)
        if label is not None:
            arm = by_label(self.arm_list()).get(label)
            if arm is None:
                raise SweepError(f"arm {label!r} is not one of this sweep's arms {list(by_label(self.arm_list()))}")
            fields.update(arm_overrides(arm, lambda extra: build_config(self.base_config, {**fields, **extra})))
        return build_config(self.base_config, fields)

    def param_space(self) -> dict[str, Any]:
        """The Ray Tune ``param_space``: dotted config keys (and ``arm``), as the trial receives them."""
        return {key: dim.to_tune() for key, dim in self.searched.items()}

    def grid_size(self) -> int:
        """Number of trials: every grid point, ``num_samples`` times (random dimensions drawn anew)."""
        finite = [len(d.values) for d in self.searched.values() if d.kind == "grid"]
        return math.prod(finite) * self.num_samples

    def probe_configs(self) -> list[JobConfig]:
        """Build (and so validate) the configs the sweep can produce; raise naming the value."""
        searched = self.searched
        dims = list(searched.values())
        combos = math.prod(len(d.probe_values) for d in dims)
        if combos <= MAX_PROBED_CONFIGS:
            points = [dict(zip(searched, vals)) for vals in itertools.product(*(d.probe_values for d in dims))]
        else:  # too many to enumerate: vary one dimension at a time around the first values
            first = {d.key: d.probe_values[0] for d in dims}
            points = [{**first, d.key: v} for d in dims for v in d.probe_values]
        configs = []
        for point in points:
            try:
                configs.append(self.base(point))
            except ConfigError as exc:
                shown = ", ".join(f"{k}={v!r}" for k, v in point.items())
                raise SweepError(f"sweep {self.name!r}: the trial with {shown} has a bad config: {exc}") from None
        return configs


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read, parse and validate a sweep file (``overrides`` replace top-level keys)."""
    path = Path(path)
    data = {**read_yaml_mapping(path, "sweep file", SweepError), **(overrides or {})}
    data.setdefault("name", path.stem)
    base = data.get("base_config")
    if base is not None and not Path(base).is_absolute() and not Path(base).is_file():
        data["base_config"] = str(path.parent / base)  # relative to the sweep file
    return parse_spec(data, where=f"sweep file {path}: ")


def parse_spec(data: dict[str, Any], where: str = "") -> SweepSpec:
    """Build a SweepSpec from a mapping; every problem is a SweepError naming the key."""
    try:
        spec = build(SweepSpec, data)
        for name, scorer in spec.scorers.items():
            fixed = scorer.training_config()
            for key in sorted(set(fixed) & set(spec.config)):
                raise SweepError(f"the {name} section sets {key} (the trials train with it): remove {key} from config")
            spec.config.update(fixed)
        clash = set(spec.config) & set(spec.space)
        if clash:
            raise SweepError(f"{sorted(clash)} appear in both config and space; keep each field in one")
        for key in ("metric", "name", "experiment"):
            if not getattr(spec, key):
                raise SweepError(f"{key}: must not be empty")
        if spec.num_samples < 1:
            raise SweepError(f"num_samples={spec.num_samples!r} must be a positive integer")
        spec.scheduler.validate()
        defaults = JobConfig().flat()
        for axis in (spec.plot.x, spec.plot.lines):
            if axis not in defaults and not (axis == ARM and spec.arms):
                raise SweepError(f"plot axis {axis!r} is not a config field")
        n_future = spec.space.get("model.n_future")
        if spec.arms and not (n_future and n_future.kind == "grid" and 1 in n_future.values):
            raise SweepError("arms compare with the n=1 baseline: the space needs model.n_future: {grid: [1, ...]}")
        if spec.verdict.floor is not None:
            from mtp.compare.floors import NAMES

            known = NAMES.get(getattr(spec.task, "name", None), ())
            if spec.verdict.floor not in known:
                raise SweepError(f"verdict.floor={spec.verdict.floor!r} is not a floor of this sweep's task; "
                                 f"its floors: {list(known) or 'none'}")
        reported = {name: scorer.metric_names() for name, scorer in spec.scorers.items()}
        if reported and not any(spec.metric in names for names in reported.values()):
            raise SweepError(f"metric {spec.metric!r} is not reported by the {' or the '.join(reported)}; "
                             f"use one of {[n for names in reported.values() for n in names]}")
        spec.probe_configs()
        return spec
    except ConfigError as exc:
        raise SweepError(f"{where}{exc}") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
