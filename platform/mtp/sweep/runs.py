"""MLflow layout of a sweep: one parent run, one nested child run per trial.

Everything goes through an explicit ``MlflowClient`` and run ids, never the global
"active run": trials run in other processes, and a resumed driver must find the
runs it created before it crashed (by tags) instead of opening new ones.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from mtp.sweep.spec import SweepSpec
from mtp.sweep.summary import TrialRow, best_row, format_table, plot_metric, write_table

PARENT_TAG = "mlflow.parentRunId"
SWEEP_DIR_TAG = "mtp.sweep.dir"
TRIAL_TAG = "mtp.sweep.trial_id"
BEST_TRIAL_TAG = "best_trial"
BEST_RUN_TAG = "best_run_id"
INTERRUPTED_TAG = "interrupted"


def find_parent(client: MlflowClient, experiment_id: str, sweep_dir: str) -> str | None:
    """The parent run of the sweep stored at ``sweep_dir`` (for ``--resume``), if any."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{SWEEP_DIR_TAG}` = '{_quote(sweep_dir)}'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return runs[0].info.run_id if runs else None


def start_parent(client: MlflowClient, experiment_id: str, spec: SweepSpec, sweep_dir: str, sweep_file: Path | None,
                 source: dict[str, str] | None = None) -> str:
    """Create the parent run: the sweep's definition as params, the sweep file as an artifact,
    ``source`` (the sweep's command and commit, ``mtp.tracking.runs.source_tags``) as tags."""
    run = client.create_run(
        experiment_id, run_name=spec.name,
        tags={**(source or {}), SWEEP_DIR_TAG: sweep_dir, "mtp.kind": "sweep", "metric": spec.metric,
              "mode": spec.mode},
    )
    run_id = run.info.run_id
    params = {
        "metric": spec.metric, "mode": spec.mode, "scheduler": spec.scheduler.type,
        "num_samples": spec.num_samples, "trial_resources": json.dumps(spec.trial_resources),
        **{f"space.{k}": json.dumps({d.kind: list(d.values) or [d.low, d.high]}) for k, d in spec.searched.items()},
        **{f"config.{k}": v for k, v in spec.config.items()},
        "verdict.margin": spec.verdict.margin, "verdict.floor": spec.verdict.floor,
    }
    items = _params(params)
    for start in range(0, len(items), 100):  # MLflow's per-request limit
        client.log_batch(run_id, params=items[start : start + 100])
    if sweep_file is not None:
        client.log_artifact(run_id, str(sweep_file))
    for metric, floors in task_floors(spec).items():  # fixed before any trial, on the trials' test sets
        for floor, value in floors.items():
            client.log_metric(run_id, _metric_key(f"floor/{floor}/{metric}"), value)
    return run_id


def task_floors(spec: SweepSpec) -> dict[str, dict[str, float]]:
    """The sweep's task floors per metric ({} for a sweep without a task that has floors)."""
    floors = getattr(spec.task, "floors", None)
    return floors() if floors is not None else {}


def reopen_parent(client: MlflowClient, run_id: str) -> None:
    """Mark a resumed sweep's parent run as running again."""
    tags = client.get_run(run_id).data.tags
    for key in ("error", INTERRUPTED_TAG):
        if key in tags:
            client.delete_tag(run_id, key)
    client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))


def interrupt(client: MlflowClient, parent_id: str, done: int | None, total: int, sweep_dir: str,
              child_ids: list[str] = ()) -> None:
    """A sweep stopped early (Ctrl-C): its parent and the trial runs it stopped end KILLED, saying so."""
    from mtp.sweep.progress import interrupted_count

    client.set_tag(parent_id, INTERRUPTED_TAG, f"{interrupted_count(done, total)}; continue with --resume {sweep_dir}")
    for run_id in child_ids:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "stopped", "the sweep was interrupted")
            client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.KILLED))
    client.set_terminated(parent_id, status=RunStatus.to_string(RunStatus.KILLED))


def find_child(client: MlflowClient, experiment_id: str, parent_id: str, trial_id: str) -> str | None:
    """The run a trial logged under the parent, if it got as far as creating one."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{TRIAL_TAG}` = '{_quote(trial_id)}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def child_tags(parent_id: str, trial_id: str, name: str, source: dict[str, str] | None = None) -> dict[str, str]:
    """Tags that nest a trial's training run under the sweep's parent run, with the sweep's
    ``source`` (a trial process's own command line is Ray's ``default_worker.py``)."""
    return {**(source or {}), PARENT_TAG: parent_id, TRIAL_TAG: trial_id, "mlflow.runName": name}


_CHILD_STATUS = {"ok": RunStatus.FINISHED, "stopped": RunStatus.KILLED, "error": RunStatus.FAILED}


def close_children(client: MlflowClient, rows: list[TrialRow]) -> None:
    """End child runs their trial left open: trials stopped early by ASHA (KILLED), or crashed."""
    for row in rows:
        if row.run_id is None or client.get_run(row.run_id).info.status != "RUNNING":
            continue
        if row.error:
            client.set_tag(row.run_id, "error", row.error[:5000])
        if row.status == "stopped":
            client.set_tag(row.run_id, "stopped_early", f"by the scheduler at step {row.metrics.get('step', 0):g}")
        client.set_terminated(row.run_id, status=RunStatus.to_string(_CHILD_STATUS[row.status]))


def finish_parent(
    client: MlflowClient, parent_id: str, spec: SweepSpec, rows: list[TrialRow]
) -> TrialRow | None:
    """Attach the summary table, the plot and the best-trial tags; end the parent run."""
    best = best_row(rows, spec.metric, spec.mode)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        csv_path, json_path = write_table(rows, spec.metric, directory)
        plot = plot_metric(rows, spec.metric, spec.mode, spec.plot.x, spec.plot.lines,
                           directory / f"{spec.metric.replace('/', '_')}_vs_{spec.plot.x}.png", title=spec.name)
        (directory / "summary.txt").write_text(format_table(rows, spec.metric, list(spec.searched)) + "\n")
        for path in (csv_path, json_path, plot, directory / "summary.txt"):
            client.log_artifact(parent_id, str(path))
        if spec.task is not None:  # mean ± std over seeds of every task metric, table and figures
            from mtp.sweep.report import write_summary

            from mtp.compare.table import write_comparison

            floors = task_floors(spec)
            for path in write_summary(rows, spec.task.metric_names(), spec.plot.x, spec.plot.lines,
                                      directory / "task", spec.name, floors):
                client.log_artifact(parent_id, str(path), "task")
            if floors:  # per setting and arm: interval to n=1 and the verdict (task metrics: higher is better)
                for path in write_comparison(rows, list(floors), floors, spec.verdict, "max", directory / "task"):
                    client.log_artifact(parent_id, str(path), "task")
            if spec.verdict.formed_at is not None:
                from mtp.compare.table import formation

                histories = {r.trial_id: [(m.step, m.value) for m in client.get_metric_history(r.run_id, spec.metric)]
                             for r in rows if r.run_id}
                path = directory / "task" / "formation.md"
                path.write_text(formation(rows, histories, spec.metric, spec.verdict.formed_at))
                client.log_artifact(parent_id, str(path), "task")
    metrics = {"trials": len(rows), "trials_failed": sum(r.status == "error" for r in rows),
               "trials_stopped": sum(r.status == "stopped" for r in rows)}
    if best is not None:
        client.set_tag(parent_id, BEST_TRIAL_TAG, best.trial_id)
        if best.run_id:
            client.set_tag(parent_id, BEST_RUN_TAG, best.run_id)
        metrics[f"best_{spec.metric}"] = best.value(spec.metric)
    for key, value in metrics.items():
        client.log_metric(parent_id, _metric_key(key), float(value))
    failed = bool(rows) and all(r.status == "error" for r in rows)
    client.set_terminated(parent_id, status=RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED))
    return best


def _params(values: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in values.items()]


def _metric_key(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def _quote(text: str) -> str:
    return text.replace("'", "\\'")
