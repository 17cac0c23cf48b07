"""n -> n' finetuning (paper §3.6) as two sweeps: pretrain on one task, finetune each model on another.

Stage 1 pretrains with every n of its sweep file (``model.n_future`` grid, several
seeds). Stage 2 is the finetuning sweep file with ``train.init_from`` added to its
space as a grid over stage 1's final checkpoints, so each pretrained model is
finetuned with every n' of that file (``--init-from``: trunk and shared heads kept,
extra heads dropped, new heads initialised, fresh optimizer). Both stages keep
``param_matched: false`` and one ``n_layers``, so every n has the same trunk and
any n -> n' transfer is possible.

The finetuning sweep's parent run is the experiment's: it is tagged with the
pretraining parent, and besides the sweep's own summary it holds the task metrics
pooled by (pretraining n, finetuning n') over seeds (``task_by_pretraining/``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mlflow.tracking import MlflowClient

from mtp.config import read_yaml_mapping
from mtp.sweep.report import write_summary
from mtp.sweep import SweepError, SweepResult, load_spec, run_sweep
from mtp.sweep.spec import parse_spec

PRETRAIN_AXIS = "pretrain.n_future"


@dataclass
class FinetuneResult:
    pretrain: SweepResult
    finetune: SweepResult | None  # None: the pretraining sweep was interrupted
    table: str  # markdown: task metrics by pretraining n (rows) and finetuning n' (columns)

    @property
    def interrupted(self) -> SweepResult | None:
        """The stage that was interrupted (Ctrl-C), if one was."""
        return next((r for r in (self.pretrain, self.finetune) if r is not None and r.interrupted), None)

    @property
    def resume(self) -> list[str]:
        """What ``run_finetune(resume=...)`` takes to continue: each started stage's sweep directory."""
        return [r.sweep_dir for r in (self.pretrain, self.finetune) if r is not None]


def pretrained_checkpoints(client: MlflowClient, result: SweepResult) -> dict[str, int]:
    """Final checkpoint of every finished pretraining trial -> its n_future."""
    found = {}
    for row in result.rows:
        if row.status == "ok" and row.run_id:
            checkpoint = client.get_run(row.run_id).data.tags.get("checkpoint")
            if checkpoint:
                found[checkpoint] = int(row.params["model.n_future"])
    if not found:
        raise SweepError("no pretraining trial finished with a checkpoint; nothing to finetune")
    return found


def run_finetune(pretrain_file: str | Path, finetune_file: str | Path, resume: Sequence[str] = (),
                 **sweep_options) -> FinetuneResult:
    """Run both stages on the connected Ray cluster; ``sweep_options`` go to ``run_sweep``.

    ``resume`` (``FinetuneResult.resume`` of an interrupted run) continues the pretraining
    sweep in its first directory and the finetuning sweep in its second, if it has one.
    An interrupted stage ends the run there (no table)."""
    pre_spec = load_spec(pretrain_file)
    data = read_yaml_mapping(finetune_file, "sweep file", SweepError)
    if "train.init_from" in data.get("space", {}):
        raise SweepError(f"{finetune_file}: train.init_from is filled in from the pretraining sweep; remove it")
    pretrain = run_sweep(pre_spec, sweep_file=Path(pretrain_file), resume=resume[0] if resume else None,
                         **sweep_options)
    if pretrain.interrupted:
        return FinetuneResult(pretrain, None, "")
    client = MlflowClient(pretrain.tracking_uri)
    sources = pretrained_checkpoints(client, pretrain)
    data = {**data, "name": data.get("name", Path(finetune_file).stem),
            "space": {**data["space"], "train.init_from": {"grid": sorted(sources)}}}
    spec = parse_spec(data, where=f"{finetune_file}: ")
    finetune = run_sweep(spec, sweep_file=Path(finetune_file), resume=resume[1] if len(resume) > 1 else None,
                         **{**sweep_options, "tracking_uri": pretrain.tracking_uri})
    if finetune.interrupted:
        return FinetuneResult(pretrain, finetune, "")
    for row in finetune.rows:
        row.params[PRETRAIN_AXIS] = sources.get(row.params.get("train.init_from"))
    client.set_tag(finetune.parent_run_id, "pretrain_parent_run_id", pretrain.parent_run_id)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_summary(finetune.rows, spec.task.metric_names(), spec.plot.x, PRETRAIN_AXIS, Path(tmp),
                              f"{spec.name}: by pretraining n")
        for path in paths:
            client.log_artifact(finetune.parent_run_id, str(path), "task_by_pretraining")
        table = (Path(tmp) / "task_summary.md").read_text()
    return FinetuneResult(pretrain, finetune, table)
