"""``--resume``: which checkpoint a job continues from, with which configuration, and where.

A resume continues the checkpoint's own run: its configuration (steps, workers, learning
rate schedule, data, output directory, MLflow run) is the checkpoint's ``config.json``;
only the keys the user sets again (flags, ``--set``, an explicit ``--config`` file) change,
and each change is reported (``ResumePlan.changes``) so the job can print and record it.

Everything here runs in the driver, before any worker starts or any MLflow run is touched:
the path is made absolute (a Ray worker runs in another directory, on another node), and a
path that does not exist or holds no resume state fails here, naming it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtp.checkpoint import CONFIG, TRAIN_STATE, read_config
from mtp.config import ConfigError, JobConfig, apply_overrides, from_dict

# Keys a resume never carries over from the checkpoint: the job sets them itself.
_NOT_COMPARED = ("tracking.run_id",)


class ResumeError(ValueError):
    """``--resume`` names something that cannot be resumed; the message says what and why."""


@dataclass
class ResumePlan:
    """A resumed job: its checkpoint, its configuration, and what the user changed."""

    checkpoint: Path  # absolute local directory
    config: JobConfig
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key -> (checkpoint's value, new value)

    def describe_changes(self) -> list[str]:
        return [f"resume: {key} = {new!r} (the checkpoint's run had {old!r})" for key, (old, new) in self.changes.items()]

    @property
    def step(self) -> int | None:
        """The checkpoint's step, from its directory name (``checkpoint_000100``), if it says."""
        digits = self.checkpoint.name.rsplit("_", 1)[-1]
        return int(digits) if digits.isdigit() else None


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete ``checkpoint_*`` in a Ray Train run directory."""
    found = sorted(p for p in run_dir.glob("checkpoint_*") if (p / CONFIG).is_file())
    return found[-1] if found else None


def find_checkpoint(path_or_uri: str | Path) -> Path:
    """The absolute checkpoint directory behind ``--resume``: a checkpoint, a Ray run
    directory (its newest checkpoint) or an MLflow URI. Raises ResumeError naming the problem."""
    from mtp.tracking.registry import URI_SCHEMES, resolve_checkpoint

    text = str(path_or_uri)
    if text.startswith(URI_SCHEMES):
        directory = resolve_checkpoint(text)
    else:
        path = Path(text).expanduser().resolve()
        if not path.exists():
            raise ResumeError(f"--resume {text}: {path} does not exist")
        if not path.is_dir():
            raise ResumeError(f"--resume {text}: {path} is not a directory")
        directory = path
        if not (path / CONFIG).is_file():
            newest = newest_checkpoint(path)
            if newest is None:
                raise ResumeError(f"--resume {text}: {path} is neither a checkpoint (no {CONFIG}) "
                                  "nor a run directory with checkpoint_* folders")
            directory = newest
    if not (directory / TRAIN_STATE).is_file():
        raise ResumeError(f"--resume {text}: {directory} has no resume state ({TRAIN_STATE}): it is an "
                          "inference-only checkpoint; start a new run from its weights with --init-from instead")
    return directory


def plan_resume(path_or_uri: str | Path, overrides: dict[str, Any] | None = None) -> ResumePlan:
    """The checkpoint's configuration with ``overrides`` (dotted keys) applied on top.

    The run continues where its checkpoints are: a relative ``train.output_dir`` in the
    checkpoint (from a run started elsewhere) is replaced by the folder that holds the
    checkpoint's run directory, so a resume from any working directory lands in the same run.
    """
    checkpoint = find_checkpoint(path_or_uri)
    saved = read_config(checkpoint)
    try:
        original = from_dict(saved)
    except ConfigError as exc:
        raise ResumeError(f"--resume {path_or_uri}: its config.json is not valid here: {exc}") from None
    run_dir = checkpoint.parent
    if not Path(original.train.output_dir).is_absolute() and "://" not in original.train.output_dir \
            and run_dir.name == original.tracking.run_name:
        original.train.output_dir = str(run_dir.parent)
    cfg = apply_overrides(from_dict(original.to_dict()), dict(overrides or {})).validate()
    before, after = original.flat(), cfg.flat()
    changes = {k: (before[k], after[k]) for k in after if k not in _NOT_COMPARED and before.get(k) != after[k]}
    return ResumePlan(checkpoint, cfg, changes)


def storage_name(plan_checkpoint: Path, storage_dir: Path, run_name: str) -> str:
    """The Ray Train run name a resume continues in: the checkpoint's own run directory when the
    checkpoint is that directory's newest (Ray restores its state there), else a new directory,
    since Ray would otherwise continue from the newest checkpoint rather than the one asked for."""
    if newest_checkpoint(storage_dir) in (plan_checkpoint, None):
        return run_name
    return f"{run_name}-from-{plan_checkpoint.name}-{time.strftime('%Y%m%d-%H%M%S')}"
