"""n -> n' finetuning (paper §3.6) as two sweeps: pretrain on one task, finetune each model on another.

Stage 1 pretrains with the arms of its sweep file, several seeds: param-matched n (the
paper's design: n=4 has 3 trunk blocks fewer than n=1, so both have the same
parameters) and, with ``arms: {compute_matched: true}``, n=1 trained for n=4's FLOPs.
Stage 2 is the finetuning sweep file with ``train.init_from`` added to its space as a
grid over stage 1's final checkpoints; its ``model.n_future`` grid is n'. Everything
else of the model's shape comes from each checkpoint (``inherit_source_model``): the
finetuned model keeps its own pretrained trunk, whatever its depth, and n' changes only
the heads (n'=1 drops the extra heads, n'=4 adds new ones; fresh optimizer). So the
stage-2 file names no model shape, and param-matched pretraining needs nothing else.

The finetuning sweep's parent run is the experiment's: tagged with the pretraining
parent, it holds besides the sweep's own summary ``task_by_pretraining/``: the task
metrics by (pretraining arm, n') over seeds, and per n' each pretraining arm against
n=1 pretraining (difference, bootstrap interval, verdict: ``mtp.compare``) with the
confound column: what else differs from n=1 pretraining with the same n' (parameters
and FLOPs of either stage).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mlflow.tracking import MlflowClient

from mtp.compare.arms import ARM
from mtp.compare.table import arm_of, write_comparison
from mtp.config import JobConfig, read_yaml_mapping
from mtp.sweep.report import write_summary
from mtp.sweep import SweepError, SweepResult, SweepSpec, load_spec, run_sweep
from mtp.sweep.runs import task_floors
from mtp.sweep.spec import parse_spec
from mtp.sweep.summary import TrialRow

PRETRAIN_ARM = "pretrain.arm"  # a finetuning trial's pretraining arm (n=1, n=4, n=1 compute-matched to n=4)
N_PRIME = "n'"  # the finetuning n_future, in the comparison by pretraining arm


@dataclass(frozen=True)
class Pretrained:
    """One finished pretraining trial: its final checkpoint, arm, seed and config."""

    checkpoint: str
    arm: str
    seed: int
    config: JobConfig


@dataclass
class FinetuneResult:
    pretrain: SweepResult
    finetune: SweepResult | None  # None: the pretraining sweep was interrupted
    table: str  # markdown: task metrics by pretraining arm and n', and each arm against n=1 pretraining

    @property
    def interrupted(self) -> SweepResult | None:
        """The stage that was interrupted (Ctrl-C), if one was."""
        return next((r for r in (self.pretrain, self.finetune) if r is not None and r.interrupted), None)

    @property
    def resume(self) -> list[str]:
        """What ``run_finetune(resume=...)`` takes to continue: each started stage's sweep directory."""
        return [r.sweep_dir for r in (self.pretrain, self.finetune) if r is not None]


def pretrained_checkpoints(client: MlflowClient, spec: SweepSpec, result: SweepResult) -> dict[str, Pretrained]:
    """Every finished pretraining trial, by its final checkpoint."""
    found = {}
    for row in result.rows:
        if row.status == "ok" and row.run_id:
            checkpoint = client.get_run(row.run_id).data.tags.get("checkpoint")
            if checkpoint:
                config = spec.base({k: v for k, v in row.params.items() if k in spec.searched})
                found[checkpoint] = Pretrained(checkpoint, arm_of(row.params, ARM), config.train.seed, config)
    if not found:
        raise SweepError("no pretraining trial finished with a checkpoint; nothing to finetune")
    return found


def read_finetune_file(path: str | Path) -> dict[str, Any]:
    """The finetuning sweep file, checked on its own: it names no ``train.init_from`` (stage 1 fills it
    in) and no model shape (each checkpoint's: the finetuned model keeps its own trunk)."""
    data = read_yaml_mapping(path, "sweep file", SweepError)
    if "train.init_from" in data.get("space", {}):
        raise SweepError(f"{path}: train.init_from is filled in from the pretraining sweep; remove it")
    spec = parse_spec({**data, "name": data.get("name", Path(path).stem)}, where=f"{path}: ")
    from mtp.checkpoint import INHERITED

    shaped = sorted(k for k in spec.config if k in {f"model.{name}" for name in (*INHERITED, "n_layers")})
    if shaped:
        raise SweepError(f"{path}: {', '.join(shaped)} come(s) from each pretrained checkpoint (the finetuned "
                         "model keeps its own trunk; n' changes only the heads): remove them")
    return {**data, "name": spec.name}


def finetune_spec(data: dict[str, Any], sources: dict[str, Pretrained], where: str = "") -> SweepSpec:
    """The finetuning sweep: ``data``'s space plus ``train.init_from`` over the checkpoints ``sources``."""
    return parse_spec({**data, "space": {**data["space"], "train.init_from": {"grid": sorted(sources)}}}, where)


def run_finetune(pretrain_file: str | Path, finetune_file: str | Path, resume: Sequence[str] = (),
                 **sweep_options) -> FinetuneResult:
    """Run both stages on the connected Ray cluster; ``sweep_options`` go to ``run_sweep``.

    ``resume`` (``FinetuneResult.resume`` of an interrupted run) continues the pretraining
    sweep in its first directory and the finetuning sweep in its second, if it has one.
    An interrupted stage ends the run there (no table)."""
    pre_spec = load_spec(pretrain_file)
    data = read_finetune_file(finetune_file)  # a bad finetuning file fails before any pretraining
    pretrain = run_sweep(pre_spec, sweep_file=Path(pretrain_file), resume=resume[0] if resume else None,
                         **sweep_options)
    if pretrain.interrupted:
        return FinetuneResult(pretrain, None, "")
    client = MlflowClient(pretrain.tracking_uri)
    sources = pretrained_checkpoints(client, pre_spec, pretrain)
    spec = finetune_spec(data, sources, where=f"{finetune_file}: ")
    finetune = run_sweep(spec, sweep_file=Path(finetune_file), resume=resume[1] if len(resume) > 1 else None,
                         **{**sweep_options, "tracking_uri": pretrain.tracking_uri})
    if finetune.interrupted:
        return FinetuneResult(pretrain, finetune, "")
    for row in finetune.rows:
        source = sources.get(row.params.get("train.init_from"))
        row.params[PRETRAIN_ARM] = source.arm if source else None
    client.set_tag(finetune.parent_run_id, "pretrain_parent_run_id", pretrain.parent_run_id)
    floors = task_floors(spec)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_summary(finetune.rows, spec.task.metric_names(), spec.plot.x, PRETRAIN_ARM, Path(tmp),
                              f"{spec.name}: by pretraining arm", floors)
        paths += write_by_pretraining(finetune.rows, sources, spec, floors, Path(tmp))
        for path in paths:
            client.log_artifact(finetune.parent_run_id, str(path), "task_by_pretraining")
        table = "\n".join((Path(tmp) / name).read_text() for name in ("task_summary.md", "comparison.md"))
    return FinetuneResult(pretrain, finetune, table)


def write_by_pretraining(rows: list[TrialRow], sources: dict[str, Pretrained], spec: SweepSpec,
                         floors: dict[str, dict[str, float]], directory: Path) -> list[Path]:
    """``comparison.md`` / ``.csv``: per n', each pretraining arm against n=1 pretraining over the
    pretraining seeds, with the ``floors`` of the finetuning task, ``spec``'s verdict rule and the confounds."""
    by_pretraining = []
    for row in rows:
        source = sources.get(row.params.get("train.init_from"))
        if source is not None:
            params = {N_PRIME: row.params["model.n_future"], PRETRAIN_ARM: source.arm, "train.seed": source.seed}
            by_pretraining.append(TrialRow(row.trial_id, row.status, params, row.metrics, row.run_id, row.error))
    costs = {(n, s.arm): Costs.of(s.config, finetuned_config(spec, s, n))
             for s in sources.values() for n in spec.space["model.n_future"].values}

    def confound(record: dict[str, Any]) -> str | None:
        base = costs.get((record[N_PRIME], "n=1"))
        return None if record["arm"] == "n=1" or base is None else costs[record[N_PRIME], record["arm"]].against(base)

    return write_comparison(by_pretraining, list(floors), floors, spec.verdict, "max", directory, PRETRAIN_ARM,
                            confound)


def finetuned_config(spec: SweepSpec, source: Pretrained, n_future: int) -> JobConfig:
    """The config a finetuning trial of ``source`` with ``n_future`` trains (its trunk is the source's)."""
    from mtp.checkpoint import inherit_source_model

    return inherit_source_model(spec.base({"model.n_future": n_future, "train.init_from": source.checkpoint}),
                                source.checkpoint)


@dataclass(frozen=True)
class Costs:
    """What one (pretraining arm, n') spends: parameters and training FLOPs of each stage."""

    pretraining_parameters: int
    pretraining_flops: float
    finetuned_parameters: int
    finetuning_flops: float

    @classmethod
    def of(cls, pretraining: JobConfig, finetuning: JobConfig) -> "Costs":
        from mtp.compare.arms import training_flops
        from mtp.model import count_parameters

        return cls(count_parameters(pretraining.model)["total"], training_flops(pretraining),
                   count_parameters(finetuning.model)["total"], training_flops(finetuning))

    def against(self, base: "Costs") -> str:
        """The ratios to ``base`` that differ from 1 by more than 1%: the confounds of a comparison."""
        ratios = {name.replace("_", " "): getattr(self, name) / getattr(base, name) for name in self.__dataclass_fields__}
        differ = [f"{name} x{ratio:.2f}" for name, ratio in ratios.items() if abs(ratio - 1) > 0.01]
        return "; ".join(differ) or "none (parameters and FLOPs of both stages within 1%)"
