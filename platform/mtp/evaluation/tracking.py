"""Record an evaluation in MLflow: pass@k per benchmark and temperature, per-problem tables.

The evaluation run is linked to the training run that produced the checkpoint (from a
``runs:/`` URI or the checkpoint config's ``tracking.run_id``): tag
``mtp.training_run_id`` here, and ``mtp.evaluation_run_id`` there when that run is in
the same store.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtp.evaluation.benchmarks import write_jsonl
from mtp.evaluation.scoring import EvaluationResult, result_rows
from mtp.tracking.runs import source_tags
from mtp.tracking.store import experiment_id as experiment_for


@dataclass
class ScoredRun:
    """One (benchmark, temperature) evaluation; temperature None for scored sample files."""

    result: EvaluationResult
    temperature: float | None = None
    generation: list[dict] | None = None  # generated samples with prompt_truncated / clipped flags

    def context_metrics(self) -> dict[str, int]:
        """Prompts cut at the start and samples allowed fewer than max_new_tokens (0 when all fit)."""
        if not self.generation:
            return {}
        return {"truncated_prompts": len({r["task_id"] for r in self.generation if r.get("prompt_truncated")}),
                "clipped_generations": sum(1 for r in self.generation if r.get("clipped"))}

    @property
    def prefix(self) -> str:
        return metric_prefix(self.result.benchmark, self.temperature)

    @property
    def slug(self) -> str:
        return self.prefix.replace("/", "_")


def metric_prefix(benchmark: str, temperature: float | None) -> str:
    """``<benchmark>[/T<temperature>]``: the prefix of an evaluation's metric names."""
    name = re.sub(r"[^\w.\-/ ]", "_", benchmark)
    return name if temperature is None else f"{name}/T{temperature:g}"


def training_run_id(model: str) -> str | None:
    """The run that trained ``model`` (a checkpoint path or MLflow URI), when it says.

    Resolving the checkpoint here also checks it before any generation starts.
    """
    from mtp.checkpoint import read_config
    from mtp.tracking.registry import resolve_checkpoint

    config = read_config(resolve_checkpoint(model))
    match = re.match(r"runs:/([^/]+)/", model)
    return (config.get("tracking") or {}).get("run_id") or (match.group(1) if match else None)


def metrics(runs: Sequence[ScoredRun]) -> dict[str, float]:
    out: dict[str, float] = {}
    for run in runs:
        for name, value in run.result.pass_at_k.items():
            out[f"{run.prefix}/{name.replace('@', '_at_')}"] = value
        for status, count in run.result.status_counts().items():
            out[f"{run.prefix}/{status}"] = count
        for name, count in run.context_metrics().items():
            out[f"{run.prefix}/{name}"] = count
    return out


@dataclass
class Store:
    """An MLflow client for ``uri`` and the id of the experiment evaluation runs go to."""

    client: Any
    uri: str
    experiment_id: str


def open_store(uri: str, experiment: str = "mtp-eval") -> Future[Store]:
    """Open the store on a background thread: the caller scores meanwhile and asks ``.result()`` to log.

    Importing MLflow and opening its store take seconds (a new sqlite store also runs every
    schema migration, each committed to disk); started before scoring, they overlap it
    instead of following it. An error is raised by ``.result()``.
    """
    pool = ThreadPoolExecutor(1, thread_name_prefix="mlflow-open")
    try:
        return pool.submit(_open, uri, experiment)
    finally:
        pool.shutdown(wait=False)  # the thread ends with its one task


def _open(uri: str, experiment: str) -> Store:
    from mtp.tracking.store import client

    mlflow = client(uri)
    return Store(mlflow, uri, experiment_for(mlflow, experiment, uri))


def log_evaluation(
    runs: Sequence[ScoredRun],
    params: dict[str, Any],
    store: Store,
    training_run: str | None = None,
    run_name: str | None = None,
) -> str:
    """Log one evaluation run to ``store`` (see ``open_store``); returns its id.

    Params and metrics go in one batch, each artifact in one call: a call per metric cost
    a store transaction each.
    """
    from mlflow.entities import Metric

    client = store.client
    tags = {"mtp.kind": "evaluation", **source_tags()}
    if training_run:
        tags["mtp.training_run_id"] = training_run
    run = client.create_run(store.experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        client.log_batch(run_id, params=[_param(k, v) for k, v in params.items()],
                         metrics=[Metric(name, value, now, 0) for name, value in metrics(runs).items()])
        with tempfile.TemporaryDirectory() as tmp:
            for scored in runs:
                table = scored.result.per_problem()
                columns = {key: [row.get(key) for row in table] for key in table[0]}
                client.log_table(run_id, data=columns, artifact_file=f"{scored.slug}_per_problem.json")
                samples = write_jsonl(Path(tmp) / f"{scored.slug}_samples.jsonl", result_rows(scored.result))
                client.log_artifact(run_id, str(samples))
                if scored.generation:  # per sample: was the prompt cut, was the generation clipped
                    generation = write_jsonl(Path(tmp) / f"{scored.slug}_generation.jsonl",
                                             ({k: v for k, v in row.items() if k != "completion"} for row in scored.generation))
                    client.log_artifact(run_id, str(generation))
        if training_run:
            _link_back(client, training_run, run_id)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def _param(key: str, value: Any):
    from mlflow.entities import Param

    return Param(key, str(value)[:6000])


def _link_back(client, training_run: str, run_id: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.set_tag(training_run, "mtp.evaluation_run_id", run_id)
    except MlflowException:
        pass  # the training run lives in another store: the tag on the evaluation run stays
