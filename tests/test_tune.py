"""Sweeps: sweep-file validation, capacity checks, and a real Tune sweep logged to MLflow.

The Ray tests run real trials (tiny debug models, a few steps) on the shared local
Ray instance and read the results back from a real sqlite MLflow store.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml

from mtp.cluster import ray_env
from mtp.config import JobConfig
from mtp.sweep.resources import TrialDemand, check_feasible, fitting_concurrency
from mtp.sweep.spec import SweepError, load_spec, parse_spec
from mtp.sweep.summary import TrialRow, best_row, figure_points, plot_metric

TINY_TRAIN = {
    "train": {"preset": "debug", "max_steps": 6, "batch_size": 2, "seq_len": 32, "warmup_steps": 2,
              "log_every": 3, "eval_every": 3, "eval_batches": 1, "checkpoint_every": 6},
    "data": {"max_documents": 20, "num_proc": 1},
}


EVAL_BENCHMARK = Path(__file__).parent / "data" / "eval_mbpp.jsonl"
NO_PRESET = {**TINY_TRAIN, "train": {k: v for k, v in TINY_TRAIN["train"].items() if k != "preset"}}


def sweep(**overrides) -> dict:
    """A minimal valid sweep mapping with ``overrides`` applied."""
    data = {"name": "t", "config": TINY_TRAIN, "space": {"model.n_future": {"grid": [1, 2]}}, "metric": "val/bpb"}
    data.update(overrides)
    return data


# ----------------------------------------------------------------------- sweep files


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"space": {"model.nfuture": {"grid": [1, 2]}}}, "space.model.nfuture: unknown config field"),
        ({"space": {"model.n_future": {"grid": []}}}, "space.model.n_future.grid is empty"),
        ({"space": {}}, "space must be a non-empty mapping"),
        ({"space": {"train.lr": {"normal": [0, 1]}}}, "unknown distribution 'normal'"),
        ({"space": {"train.lr": {"loguniform": [0, 1e-2]}}}, "bounds must be positive"),
        ({"space": {"train.lr": {"uniform": [1e-2, 1e-3]}}}, "must be below high"),
        ({"space": {"train.preset": {"choice": ["debug", "huge"]}}, "config": NO_PRESET},
         "train.preset='huge' has a bad config: unknown preset 'huge'"),
        ({"space": {"train.preset": {"grid": ["debug"]}}}, "['train.preset'] appear in both config and space"),
        ({"space": {"model.n_future": {"grid": [1, 0]}}}, "model.n_future=0 must be a positive number"),
        ({"config": {"train": {"lrr": 1.0}}}, "train.lrr: unknown config key"),
        ({"config": {"model.n_future": 2}}, "appear in both config and space"),
        ({"schedule": "asha"}, "schedule: unknown key"),
        ({"scheduler": {"type": "asha", "grace_period": 5, "max_t": 2}}, "grace_period=5 exceeds scheduler.max_t=2"),
        ({"mode": "lowest"}, "mode: expected one of 'min', 'max', got 'lowest'"),
        ({"resources": {"trial": {"CPU": 0}}}, "resources.trial must reserve something"),
        ({"max_concurrent_trials": 0}, "max_concurrent_trials=0"),
        ({"metric": ""}, "metric: must not be empty"),
        ({"evaluation": {"benchmark": str(EVAL_BENCHMARK)}}, "metric 'val/bpb' is not reported by the evaluation; use one of ['eval_mbpp/T0/pass_at_1']"),
        ({"evaluation": {"benchmark": "nope"}}, "evaluation.benchmark='nope': unknown benchmark"),
        ({"evaluation": {"k": [1, 10]}}, "needs n_samples >= 10"),
        ({"evaluation": {"samples": 3}}, "evaluation.samples: unknown key"),
    ],
)
def test_bad_sweep_files_name_the_problem(overrides, expected):
    with pytest.raises(SweepError) as info:
        parse_spec(sweep(**overrides))
    assert expected in str(info.value)


def test_search_space_translates_to_tune():
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform

    spec = parse_spec(sweep(space={
        "model.n_future": {"grid": [1, 2, 4]},
        "train.preset": {"choice": ["debug", "tiny"]},
        "train.lr": {"loguniform": [1e-4, 1e-2]},
        "train.grad_accum": {"uniform": [1, 4]},
    }, config=NO_PRESET, num_samples=2))
    space = spec.param_space()
    assert space["model.n_future"] == {"grid_search": [1, 2, 4]}
    assert isinstance(space["train.preset"], Categorical) and space["train.preset"].categories == ["debug", "tiny"]
    assert isinstance(space["train.lr"], Float) and isinstance(space["train.lr"].sampler, LogUniform)
    assert (space["train.lr"].lower, space["train.lr"].upper) == (1e-4, 1e-2)
    assert isinstance(space["train.grad_accum"], Integer)  # an int field stays an int
    assert spec.grid_size() == 6
    # Every grid point and both ends of each range were built into a valid config.
    assert len(spec.probe_configs()) == 3 * 2 * 2 * 2


def test_a_range_over_an_int_or_none_field_samples_integers():
    """``int | None`` fields (default None) are integers too: a float seq_len would fail every trial."""
    from ray.tune.search.sample import Integer

    ranges = {"train.seq_len": [16.5, 32], "model.ffn_hidden": [64, 128], "data.max_documents": [10, 20]}
    config = {"train": {k: v for k, v in TINY_TRAIN["train"].items() if k != "seq_len"}, "data": {"num_proc": 1}}
    spec = parse_spec(sweep(config=config, space={**{k: {"uniform": v} for k, v in ranges.items()},
                                                  "model.n_kv_heads": {"loguniform": [1, 2]}}))
    assert spec.space["train.seq_len"].probe_values == (17, 32)  # the integers inside the range
    space = spec.param_space()
    assert all(isinstance(space[k], Integer) for k in [*ranges, "model.n_kv_heads"])
    for _ in range(5):
        sampled = {k: d.sample() for k, d in space.items() if k != "model.n_future"}
        assert all(isinstance(v, int) for v in sampled.values()), sampled
        spec.base(sampled)  # a trial's config builds
    with pytest.raises(SweepError, match="space.train.seq_len.uniform: train.seq_len holds integers"):
        parse_spec(sweep(config=config, space={"train.seq_len": {"uniform": [16.2, 16.8]}}))


def test_shipped_sweep_files_are_valid():
    spaces = Path(__file__).resolve().parents[1] / "tune_spaces"
    smoke, paper = load_spec(spaces / "smoke.yaml"), load_spec(spaces / "paper_grid.yaml")
    assert smoke.grid_size() <= 4 and all(c.train.preset == "debug" for c in smoke.probe_configs())
    assert set(paper.space["model.n_future"].values) == {1, 2, 4, 6, 8}
    assert paper.scheduler.type == "asha"
    assert all(c.scaling.use_gpu for c in paper.probe_configs())


def test_grouped_asha_compares_trials_only_within_a_model_size():
    """Big models have lower loss at every step: plain ASHA stops every small one, grouped ASHA
    stops only the worse n_future within each size."""
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from mtp.sweep.scheduler import GroupedASHA

    trials = [SimpleNamespace(trial_id=f"{preset}-{n}", config={"train.preset": preset, "model.n_future": n})
              for preset in ("13B", "debug") for n in (1, 2)]
    loss = {"13B-1": 1.0, "13B-2": 1.1, "debug-1": 3.0, "debug-2": 3.1}
    asha = dict(time_attr="step", max_t=100, grace_period=10, reduction_factor=2)

    def decisions(scheduler) -> dict[str, str]:
        scheduler.set_search_properties("val/bpb", "min")
        for trial in trials:
            scheduler.on_trial_add(None, trial)
        return {t.trial_id: scheduler.on_trial_result(None, t, {"step": 10, "val/bpb": loss[t.trial_id]})
                for t in trials}

    go, stop = TrialScheduler.CONTINUE, TrialScheduler.STOP
    assert decisions(ASHAScheduler(**asha)) == {"13B-1": go, "13B-2": stop, "debug-1": stop, "debug-2": stop}
    assert decisions(GroupedASHA("train.preset", **asha)) == {"13B-1": go, "13B-2": stop, "debug-1": go, "debug-2": stop}


def test_figure_and_best_trial_use_finished_trials_only(tmp_path):
    """One line per size in size order; the best of several trials per point; stopped and
    failed trials neither plotted nor best."""
    def row(trial, preset, n, bpb, status="ok"):
        return TrialRow(trial, status, {"train.preset": preset, "model.n_future": n}, {"val/bpb": bpb})

    rows = [
        row("a", "1.3B", 1, 1.0), row("b", "1.3B", 2, 0.9), row("c", "1.3B", 2, 0.7),  # c: a better lr at n=2
        row("d", "0.3B", 4, 1.4), row("e", "0.3B", 1, 1.5), row("f", "0.3B", 2, 0.1, status="stopped"),
        row("g", "0.3B", 8, 0.2, status="error"),
    ]
    points = figure_points(rows, "val/bpb", "min", "model.n_future", "train.preset")
    assert points == {"0.3B": {1: 1.5, 4: 1.4}, "1.3B": {1: 1.0, 2: 0.7}}
    assert list(points) == ["0.3B", "1.3B"] and list(points["0.3B"]) == [1, 4]
    assert best_row(rows, "val/bpb", "min").trial_id == "c"
    assert best_row(rows, "val/bpb", "max").trial_id == "e"
    png = plot_metric(rows, "val/bpb", "min", "model.n_future", "train.preset", tmp_path / "fig.png")
    assert png.read_bytes().startswith(b"\x89PNG")


# -------------------------------------------------------------------------- capacity


def _demands(spec_overrides: dict) -> list[TrialDemand]:
    spec = parse_spec(sweep(**spec_overrides))
    return [TrialDemand.of(spec, cfg) for cfg in spec.probe_configs()]


def test_one_worker_trials_hold_their_worker_and_two_fit_on_two_cpus():
    demands = _demands({})
    assert demands[0].trial == {"CPU": 1.0} and demands[0].num_workers == 0
    assert fitting_concurrency(demands, {"CPU": 2.0, "memory": 8e9}) == 2


def test_multi_worker_trials_hold_no_cpu_themselves():
    config = {**TINY_TRAIN, "scaling": {"num_workers": 2, "cpus_per_worker": 1}}
    demands = _demands({"config": config})
    assert "CPU" not in demands[0].trial  # the trial process must leave both CPUs to its workers
    assert demands[0].total["CPU"] == 2.0
    assert fitting_concurrency(demands, {"CPU": 2.0, "memory": 8e9}) == 1


@pytest.mark.parametrize(
    "scaling, expected",
    [
        ({"num_workers": 3}, "needs CPU=3"),
        ({"num_workers": 2, "use_gpu": True}, "needs GPU=2"),
        ({"num_workers": 1, "cpus_per_worker": 4}, "needs CPU=4"),
    ],
)
def test_trials_larger_than_the_cluster_are_rejected(scaling, expected):
    demands = _demands({"config": {**TINY_TRAIN, "scaling": scaling}})
    with pytest.raises(SweepError, match=expected):
        check_feasible(demands, {"CPU": 2.0, "memory": 8e9}, [{"CPU": 2.0, "memory": 8e9}])


def test_a_worker_must_fit_on_one_node():
    demands = _demands({"config": {**TINY_TRAIN, "scaling": {"num_workers": 2, "cpus_per_worker": 3}}})
    nodes = [{"CPU": 2.0, "memory": 4e9}] * 4
    with pytest.raises(SweepError, match="no single node can hold one worker"):
        check_feasible(demands, {"CPU": 8.0, "memory": 16e9}, nodes)


# ------------------------------------------------------------------- real sweeps


def _children(client, experiment_id: str, parent_id: str):
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def _artifact(client, run_id: str, name: str) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, tracking_uri=client.tracking_uri))


@pytest.mark.timeout(600)  # 300 s ran out at load 28 on 2 cores, with the trials still progressing
def test_sweep_survives_a_failed_trial_and_a_killed_driver_and_logs_nested_runs_summary_and_best(
    ray_cluster, mlflow_uri, tmp_path
):
    """Four real trials, two of which fail at start-up (vocab smaller than the tokenizer's).

    The driver (jobs/tune.py) is SIGKILLed once a trial has finished; ``--resume``
    completes the same sweep into the same MLflow parent run.
    """
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    from mtp.sweep import run_sweep

    definition = sweep(space={"model.n_future": {"grid": [1, 2]}, "model.vocab_size": {"grid": [260, 64]}})
    space_file = tmp_path / "sweep.yaml"
    space_file.write_text(yaml.safe_dump(definition))
    storage = tmp_path / "sweeps"
    job = Path(__file__).resolve().parents[1] / "jobs" / "tune.py"
    driver = subprocess.Popen(
        [sys.executable, str(job), "--space", str(space_file), "--storage-path", str(storage),
         "--tracking-uri", mlflow_uri, "--address", ray_cluster.get_runtime_context().gcs_address],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    client = MlflowClient(mlflow_uri)

    def trial_runs():
        experiment = client.get_experiment_by_name("mtp-sweeps")
        if experiment is None:
            return []
        return client.search_runs([experiment.experiment_id], filter_string="tags.`mtp.sweep.trial_id` != ''")

    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and driver.poll() is None:
            started = trial_runs()
            if any(r.info.status == "FINISHED" for r in started):
                break
            time.sleep(0.5)
        assert driver.poll() is None, "the sweep ended before the driver could be killed"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    (sweep_dir,) = [p for p in storage.iterdir() if p.is_dir()]  # beside it: its .log

    result = run_sweep(parse_spec(definition), resume=str(sweep_dir), tracking_uri=mlflow_uri)

    # The same sweep: its trials restored, one parent run, one child run per trial.
    assert {r.data.tags["mtp.sweep.trial_id"] for r in started} <= {r.trial_id for r in result.rows}
    parents = client.search_runs([result.experiment_id], filter_string="tags.`mtp.kind` = 'sweep'")
    assert [p.info.run_id for p in parents] == [result.parent_run_id]
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = _children(client, result.experiment_id, result.parent_run_id)
    assert len(children) == 4 and len(result.rows) == 4
    ok = [r for r in children if r.info.status == "FINISHED"]
    failed = [r for r in children if r.info.status == "FAILED"]
    assert len(ok) == 2 and len(failed) == 2
    assert {r.data.params["model.vocab_size"] for r in failed} == {"64"}
    for run in failed:
        assert "vocab_size=64 is smaller than the tokenizer" in run.data.tags["error"]
    # Full config as params; the same metric names in every trial that trained.
    assert all(set(JobConfig().flat()) - {"tracking.run_id"} <= set(r.data.params) for r in children)
    assert {r.data.params["model.n_future"] for r in ok} == {"1", "2"}
    names = [set(r.data.metrics) for r in ok]
    assert "val/bpb" in names[0] and "val/loss_head_0" in names[0]
    assert names[0] - {"val/loss_head_1", "train/loss_head_1"} == names[1] - {"val/loss_head_1", "train/loss_head_1"}

    # The best trial is the finished child with the lowest val/bpb.
    best = min(ok, key=lambda r: r.data.metrics["val/bpb"])
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.tags["best_trial"] == best.data.tags["mtp.sweep.trial_id"]
    assert parent.data.metrics["best_val/bpb"] == pytest.approx(best.data.metrics["val/bpb"])
    assert parent.data.metrics["trials_failed"] == 2

    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"sweep.yaml", "summary.csv", "summary.json", "summary.txt", "val_bpb_vs_model.n_future.png"} <= artifacts
    rows = list(csv.DictReader(io.StringIO(_artifact(client, result.parent_run_id, "summary.csv").read_text())))
    assert len(rows) == 4
    by_run = {r["mlflow_run_id"]: r for r in rows}
    for run in ok:
        assert float(by_run[run.info.run_id]["val/bpb"]) == pytest.approx(run.data.metrics["val/bpb"])
    assert all("vocab_size=64" in by_run[r.info.run_id]["error"] for r in failed)
    table = json.loads(_artifact(client, result.parent_run_id, "summary.json").read_text())
    assert sorted(r["status"] for r in table) == ["error", "error", "ok", "ok"]
    plot = _artifact(client, result.parent_run_id, "val_bpb_vs_model.n_future.png").read_bytes()
    assert plot.startswith(b"\x89PNG") and len(plot) > 5000


@pytest.mark.timeout(240)
def test_a_two_worker_trial_trains_on_ray_train_and_is_scored_by_pass_at_k(ray_cluster, mlflow_uri, tmp_path):
    """The trial process holds no CPU, so its 2 Ray Train workers get both CPUs (no deadlock);
    its final checkpoint is then evaluated in sandboxes and pass@1 is the trial's metric."""
    from mlflow.tracking import MlflowClient

    from mtp.sandbox import STATUSES
    from mtp.sweep import run_sweep

    spec = parse_spec(sweep(
        config={**TINY_TRAIN, "scaling": {"num_workers": 2, "cpus_per_worker": 1}},
        space={"model.n_future": {"grid": [2]}},
        evaluation={"benchmark": str(EVAL_BENCHMARK), "k": [1], "max_new_tokens": 8},
        metric="eval_mbpp/T0/pass_at_1", mode="max",
    ))
    result = run_sweep(spec, storage_path=str(tmp_path / "sweeps"))
    assert result.max_concurrent_trials == 1
    (row,) = result.rows
    assert row.status == "ok", row.error
    client = MlflowClient(mlflow_uri)
    child = client.get_run(row.run_id)
    assert child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == result.parent_run_id
    # Training metrics from rank 0, and the evaluation's, in the same child run and summary row.
    assert child.data.metrics["val/bpb"] == pytest.approx(row.metrics["val/bpb"])
    assert child.data.metrics["eval_mbpp/T0/pass_at_1"] == row.value("eval_mbpp/T0/pass_at_1")
    programs = sum(child.data.metrics[f"eval_mbpp/T0/{status}"] for status in STATUSES)
    assert programs == 4  # one sample for each of the 4 problems, each with a verdict
    assert row.metrics["step"] == TINY_TRAIN["train"]["max_steps"]
    assert "checkpoint" in {a.path for a in client.list_artifacts(row.run_id)}
    assert client.get_run(result.parent_run_id).data.tags["best_run_id"] == row.run_id


def test_impossible_resources_fail_before_any_trial_or_run(ray_cluster, mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    from mtp.sweep import run_sweep

    cpus = int(ray_env.resources()["CPU"])
    spec = parse_spec(sweep(config={**TINY_TRAIN, "scaling": {"num_workers": cpus + 1}}))
    with pytest.raises(SweepError, match=f"needs CPU={cpus + 1}"):
        run_sweep(spec, storage_path=str(tmp_path / "sweeps"))
    assert MlflowClient(mlflow_uri).get_experiment_by_name(spec.experiment) is None
    assert not (tmp_path / "sweeps").exists()


def test_tune_job_rejects_a_bad_sweep_file_without_starting_ray(tmp_path):
    """As users run it; a bad file fails before Ray starts, so within seconds and with no Ray session."""
    import os
    import subprocess
    import sys

    spec_file = tmp_path / "bad.yaml"
    spec_file.write_text(yaml.safe_dump(sweep(space={"model.n_future": {"grid": []}})))
    job = Path(__file__).resolve().parents[1] / "jobs" / "tune.py"
    done = subprocess.run([sys.executable, str(job), "--space", str(spec_file)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "RAY_TMPDIR": str(tmp_path / "ray")})
    assert done.returncode == 2, done.stderr
    assert "space.model.n_future.grid is empty" in done.stderr
    assert not (tmp_path / "ray").exists()  # no Ray session was started


@pytest.mark.timeout(240)
def test_a_task_sweep_logs_the_task_metric_over_training_and_a_summary_with_error_bars(
    ray_cluster, mlflow_uri, tmp_path, monkeypatch
):
    """The reproduction experiments' path (tune_spaces/paper_*.yaml) on a toy star-graph task:
    per-trial task metrics at an intermediate checkpoint and at the end, pooled over seeds
    into the parent's table and figure."""
    from mlflow.tracking import MlflowClient

    from mtp.sweep import run_sweep

    monkeypatch.setenv("MTP_CACHE_DIR", str(tmp_path / "cache"))
    train = {**TINY_TRAIN["train"], "checkpoint_every": 3}
    spec = parse_spec(sweep(
        config={"train": train, "data": {"num_proc": 1}, "model": {"max_seq_len": 64}},
        task={"name": "stargraph", "params": {"degree": 2, "arm_length": 2}, "train_problems": 200,
              "test_problems": 6, "progress_problems": 3},
        space={"model.n_future": {"grid": [1, 2]}, "train.seed": {"grid": [0, 1]}},
        metric="task/in_domain/exact_match", mode="max",
    ))
    result = run_sweep(spec, storage_path=str(tmp_path / "sweeps"))
    assert [row.status for row in result.rows] == ["ok"] * 4, [row.error for row in result.rows]
    client = MlflowClient(mlflow_uri)
    for row in result.rows:
        history = client.get_metric_history(row.run_id, "task/in_domain/token_accuracy")
        assert [m.step for m in history] == [3, 6]  # intermediate (3 problems), final (all 6)
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "task")}
    assert {"task/task_summary.md", "task/task_summary.csv",
            "task/task_in_domain_exact_match_vs_model.n_future.png"} <= artifacts
    table = _artifact(client, result.parent_run_id, "task/task_summary.md").read_text()
    assert "± " in table and "(2)" in table  # mean ± std over the 2 seeds of each n


@pytest.mark.timeout(600)  # 6 trials; 300 s ran out at load 30
def test_the_finetune_experiment_finetunes_every_pretrained_model_on_its_own_trunk(ray_cluster, mlflow_uri, tmp_path,
                                                                                  monkeypatch):
    """``jobs/reproduce.py finetune`` on toy files: param-matched pretraining (n=2 has a trunk one block
    shallower than n=1) plus the compute-matched n=1, then every checkpoint finetuned on its own trunk
    (``--init-from``: n' changes only the heads), compared by pretraining arm with the confounds; lineage tagged."""
    from mlflow.tracking import MlflowClient

    from mtp.experiments.catalog import EXPERIMENTS, run_experiment

    monkeypatch.setenv("MTP_CACHE_DIR", str(tmp_path / "cache"))
    task = {"name": "polynomial", "params": {"min_ops": 1, "max_ops": 2, "ood_min_ops": 3, "ood_max_ops": 4},
            "train_problems": 200, "test_problems": 4, "progress_problems": 2}
    config = {"train": TINY_TRAIN["train"], "data": {"num_proc": 1}}
    pretrain, finetune = EXPERIMENTS["finetune"]
    (tmp_path / pretrain).write_text(yaml.safe_dump(sweep(
        name="pre", config={**config, "model": {"max_seq_len": 64, "n_layers": 3, "param_matched": True}}, task=task,
        space={"model.n_future": {"grid": [1, 2]}}, arms={"compute_matched": True},
        metric="task/in_domain/exact_match", mode="max")))
    (tmp_path / finetune).write_text(yaml.safe_dump(sweep(  # no model shape: each checkpoint's
        name="ft", config=config, task=task, space={"model.n_future": {"grid": [1]}},
        metric="task/in_domain/exact_match", mode="max")))
    result = run_experiment("finetune", tmp_path, storage_path=str(tmp_path / "sweeps"))
    assert (result.trials, result.failed) == (3 + 3, 0)
    assert "| pretrain.arm | n_future=1 |" in result.table
    assert "| n' | arm | mean ± std (seeds) | difference to n=1 [95% CI] | verdict | confound |" in result.table
    assert "| 1 | n=2 | " in result.table and "pretraining flops x1." in result.table  # same parameters, more FLOPs
    assert "finetuned parameters x0." in result.table  # n=2 -> n'=1 keeps its shallower trunk
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(result.parent_run_id)
    pre_parent = parent.data.tags["pretrain_parent_run_id"]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    pretrained = {r.data.tags["checkpoint"]: r for r in client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{pre_parent}'")}
    assert {r.data.params["train.init_from"] for r in children} == set(pretrained)
    assert {r.data.tags["init_from_run_id"] for r in children} == {r.info.run_id for r in pretrained.values()}
    for run in children:  # the trunk is the source's: 2 blocks after n=1, 1 after param-matched n=2; plus 1 head
        source = pretrained[run.data.params["train.init_from"]].data.params
        assert int(run.data.params["model.n_layers"]) == 3 - int(source["model.n_future"]) + 1
    assert {"task_by_pretraining/task_summary.md", "task_by_pretraining/comparison.md"} <= {
        a.path for a in client.list_artifacts(result.parent_run_id, "task_by_pretraining")}
