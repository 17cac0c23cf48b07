"""The five reproduction experiments by name: which sweep file(s) each runs, and running them.

``jobs/reproduce.py NAME`` (or ``all``) is the one command per experiment; each is also
runnable as its sweep file alone (``jobs/tune.py --space tune_spaces/paper_NAME.yaml``),
except ``finetune``, whose second sweep is built from the first one's checkpoints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mtp.sweep import SweepError, SweepResult

EXPERIMENTS: dict[str, tuple[str, ...]] = {
    "algorithmic": ("paper_algorithmic.yaml",),
    "induction": ("paper_induction.yaml",),
    "planning": ("paper_planning.yaml",),
    "speed": ("paper_speed.yaml",),
    "finetune": ("paper_finetune_pretrain.yaml", "paper_finetune.yaml"),
}


@dataclass(frozen=True)
class ExperimentResult:
    name: str
    tracking_uri: str
    parent_run_id: str  # the experiment's parent run (finetune: the finetuning sweep's)
    table: str  # markdown: task metrics, mean ± std over seeds, and the comparison to n=1 with floors and verdicts
    trials: int
    failed: int
    seconds: float
    interrupted: SweepResult | None = None  # the sweep Ctrl-C stopped (its parent run ended KILLED)
    resume: tuple[str, ...] = ()  # the sweep directories ``run_experiment(resume=...)`` continues


def run_experiment(name: str, spaces: Path, resume: Sequence[str] = (), **sweep_options) -> ExperimentResult:
    """Run one experiment (its files in the folder ``spaces``) on the connected Ray cluster;
    ``sweep_options`` go to ``run_sweep``. ``resume`` (an interrupted result's ``resume``)
    continues it; an interrupted experiment has no table."""
    from mtp.experiments.finetune import run_finetune
    from mtp.sweep import load_spec, run_sweep

    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; one of {', '.join(EXPERIMENTS)}")
    files = [spaces / f for f in EXPERIMENTS[name]]
    start = time.monotonic()
    if name == "finetune":
        both = run_finetune(*files, resume=resume, **sweep_options)
        if both.interrupted is not None:
            return _interrupted(name, both.interrupted, tuple(both.resume), start)
        result = both.finetune
        table = "\n".join(["### Pretraining (stage 1)", "", *_tables(both.pretrain),
                           "### Finetuning, by pretraining arm (stage 2)", "", both.table])
        rows = both.pretrain.rows + both.finetune.rows
    else:
        if len(resume) > 1:
            raise SweepError(f"{name} is one sweep: --resume takes one sweep directory, not {len(resume)}")
        result = run_sweep(load_spec(files[0]), sweep_file=files[0], resume=resume[0] if resume else None,
                           **sweep_options)
        if result.interrupted:
            return _interrupted(name, result, (result.sweep_dir,), start)
        rows = result.rows
        table = "\n".join(_tables(result))
    return ExperimentResult(name, result.tracking_uri, result.parent_run_id, table, len(rows),
                            sum(r.status == "error" for r in rows), time.monotonic() - start)


def _tables(result: SweepResult) -> list[str]:
    """The parent run's tables: mean ± std over seeds, and the comparison where the task has floors."""
    import mlflow
    from mlflow.tracking import MlflowClient

    listed = {a.path for a in MlflowClient(result.tracking_uri).list_artifacts(result.parent_run_id, "task")}
    return [Path(mlflow.artifacts.download_artifacts(run_id=result.parent_run_id, artifact_path=f"task/{name}",
                                                     tracking_uri=result.tracking_uri)).read_text()
            for name in ("task_summary.md", "comparison.md", "formation.md") if f"task/{name}" in listed]


def _interrupted(name: str, result: SweepResult, resume: tuple[str, ...], start: float) -> ExperimentResult:
    return ExperimentResult(name, result.tracking_uri, result.parent_run_id, "", result.trials_done,
                            sum(r.status == "error" for r in result.rows), time.monotonic() - start, result, resume)
