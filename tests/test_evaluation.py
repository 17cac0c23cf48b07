"""pass@k evaluation end to end: benchmarks, the Ray fan-out, worker crashes, the evaluate job, MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from mtp.cluster import ray_env
from mtp.evaluation import (
    BenchmarkError, Program, RunnerConfig, load_benchmark, open_scorer, parse_samples, score, score_samples,
)
from mtp.evaluation.benchmarks import HUMANEVAL_STOP, humaneval, load_jsonl
from mtp.evaluation.generation import GenerationConfig, generate_samples
from mtp.sandbox import Limits, isolation_problem

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
LOCAL = RunnerConfig(backend="local", workers=2)
pytestmark = pytest.mark.skipif(isolation_problem() is not None, reason=str(isolation_problem()))


def _canonical(bench):
    return [(p.task_id, p.canonical_solution) for p in bench.problems]


def test_humaneval_canonical_pass_and_stubs_fail_on_ray(ray_cluster):
    bench = humaneval()
    assert len(bench.problems) == 164
    solved = score_samples(bench, _canonical(bench), ks=[1], progress=False)
    assert solved.pass_at_k == {"pass@1": 1.0}, [s for s in solved.samples if not s.passed][:3]
    stubs = score_samples(bench, [(p.task_id, "    pass\n") for p in bench.problems], ks=[1], progress=False)
    assert stubs.pass_at_k == {"pass@1": 0.0}
    assert stubs.status_counts()["failed"] == 164


def _sandbox_worker_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and Path(f"/proc/{entry}/cmdline").read_bytes().startswith(b"ray::SandboxWorker"):
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def test_a_killed_worker_is_replaced_and_no_result_is_lost(ray_cluster):
    bench = humaneval()
    programs = [Program(p.task_id, p.program(p.canonical_solution)) for p in bench.problems[:48]]
    arrived: list[str] = []
    killed: list[int] = []

    def on_result(key, verdict):
        arrived.append(key)
        if len(arrived) == 8:
            victim = _sandbox_worker_pids()[0]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    verdicts = score(programs, Limits(timeout_s=5), RunnerConfig(batch_size=4, workers=2), on_result)
    assert killed, "no worker was killed"
    assert sorted(arrived) == sorted(p.key for p in programs), "a result was lost or reported twice"
    assert all(v.passed for v in verdicts.values())


def test_more_workers_than_cluster_cpus_is_refused(ray_cluster):
    cpus = int(ray_env.resources()["CPU"])
    with pytest.raises(ValueError, match=f"workers={cpus + 1} exceeds the cluster's {cpus} CPUs"):
        open_scorer(RunnerConfig(workers=cpus + 1))


def test_an_interrupt_stops_a_local_pool_at_the_programs_already_running():
    """Ctrl-C while scoring: the programs already running finish, none of those queued starts."""
    scorer = open_scorer(LOCAL)
    started = []
    run_one = scorer._run_one
    scorer._run_one = lambda program, limits: (started.append(program.key), run_one(program, limits))[1]

    def interrupt(key, verdict):
        raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            scorer.score([Program(f"p{i}", "print(1)") for i in range(40)], Limits(), interrupt)
    finally:
        scorer.close()
    assert 1 <= len(started) <= 2 * LOCAL.workers, started


def test_mbpp_local_file_prompt_and_program():
    bench = load_jsonl(DATA / "eval_mbpp.jsonl", shots_path=DATA / "eval_mbpp_prompt.jsonl")
    assert bench.stop == ["[DONE]"]
    problem = bench.by_id["901"]
    assert problem.prompt.startswith("You are an expert Python programmer, and here is your task: Write a function to add")
    assert "def add(a, b):\n    return a + b\n[DONE]\n" in problem.prompt  # the few-shot example, solved
    assert problem.prompt.endswith(
        "sum of the squares of a list of integers. Your code should pass these tests:\n\n"
        "assert sum_squares([1, 2, 3]) == 14\nassert sum_squares([]) == 0\nassert sum_squares([-2]) == 4\n[BEGIN]\n"
    )
    wrong = "def sum_squares(xs):\n    return 0\ndef reverse_words(s): return s\ndef count_vowels(s): return 0\ndef max_gap(xs): return 7"
    samples = _canonical(bench) + [(p.task_id, wrong) for p in bench.problems]
    result = score_samples(bench, samples, ks=[1, 2, 3], runner=LOCAL, progress=False)
    assert result.pass_at_k == {"pass@1": 0.5, "pass@2": 1.0}  # n=2 per problem: k=3 is left out
    rows = {row["task_id"]: row for row in result.per_problem()}
    assert rows["904"]["correct"] == 1  # its tests use test_setup_code's VALUES


def test_jsonl_in_humaneval_shape_builds_human_evals_program(tmp_path):
    row = {"task_id": "T/0", "prompt": "def inc(x):\n", "test": "def check(f):\n    assert f(1) == 2", "entry_point": "inc",
           "canonical_solution": "    return x + 1\n"}
    path = tmp_path / "tiny.jsonl"
    path.write_text(json.dumps(row) + "\n")
    bench = load_benchmark(str(path))
    assert bench.name == "tiny" and bench.stop == HUMANEVAL_STOP
    program = bench.by_id["T/0"].program(row["canonical_solution"])
    assert program.startswith(row["prompt"] + row["canonical_solution"] + "\n" + row["test"] + "\n" + "check(inc)")
    assert score_samples(bench, _canonical(bench), ks=[1], runner=LOCAL, progress=False).pass_at_k["pass@1"] == 1.0


def test_bad_inputs_are_named(tmp_path):
    bench = load_jsonl(DATA / "eval_mbpp.jsonl")
    with pytest.raises(BenchmarkError, match="sample 1: task_id 'HumanEval/0' is not in benchmark 'eval_mbpp'"):
        parse_samples([{"task_id": "HumanEval/0", "completion": ""}], bench)
    with pytest.raises(BenchmarkError, match="sample 1: needs 'task_id' and 'completion'"):
        parse_samples([{"task_id": "901"}], bench)
    with pytest.raises(BenchmarkError, match="3 of 4 problems have no samples"):
        parse_samples([{"task_id": "901", "completion": "x"}], bench)
    assert parse_samples([{"task_id": "901", "completion": "x"}], bench, ignore_incomplete=True) == [("901", "x")]
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"question": "?"}\n')
    with pytest.raises(BenchmarkError, match="expected HumanEval's"):
        load_benchmark(str(odd))
    with pytest.raises(BenchmarkError, match="unknown benchmark 'nope'"):
        load_benchmark("nope")
    with pytest.raises(BenchmarkError, match="could not load MBPP 'mbpp'"):  # the suite runs with HF offline
        load_benchmark("mbpp")


def _evaluate(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / "evaluate.py"), *args, "--backend", "local", "--workers", "2"],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}, cwd=REPO,
    )


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_evaluate_samples_is_a_drop_in_and_logs_to_mlflow(tmp_path, mlflow_uri):
    samples = tmp_path / "samples.jsonl"
    rows = [{"task_id": 901 + i, "completion": c} for i in range(4) for c in ("def f(): pass", "import sys; sys.exit(0)")]
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = _evaluate("--samples", str(samples), "--benchmark", str(DATA / "eval_mbpp.jsonl"), "--k", "1,2")
    assert done.returncode == 0, done.stderr
    assert 'eval_mbpp: {"pass@1": 0.0, "pass@2": 0.0}' in done.stdout
    results = [json.loads(line) for line in Path(f"{samples}_results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in results[:2]] == ["failed", "failed"]
    assert "NameError" in results[0]["detail"] and "SystemExit" in results[1]["detail"]
    assert results[1]["result"].startswith("failed: SystemExit")
    (run,) = _client(mlflow_uri).search_runs([_client(mlflow_uri).get_experiment_by_name("mtp-eval").experiment_id])
    assert run.data.metrics["eval_mbpp/pass_at_1"] == 0.0 and run.data.metrics["eval_mbpp/failed"] == 8
    artifacts = {a.path for a in _client(mlflow_uri).list_artifacts(run.info.run_id)}
    assert {"eval_mbpp_per_problem.json", "eval_mbpp_samples.jsonl"} <= artifacts


def test_evaluate_rejects_bad_samples_clearly(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"task_id": "nope", "completion": ""}) + "\n")
    done = _evaluate("--samples", str(samples), "--benchmark", str(DATA / "eval_mbpp.jsonl"), "--no-mlflow")
    assert done.returncode == 2 and "task_id 'nope' is not in benchmark" in done.stderr


def _tiny_checkpoint(directory: Path, training_run_id: str | None = None) -> Path:
    import torch

    from mtp.checkpoint import save_checkpoint
    from mtp.config import build_config
    from mtp.model import MTPTransformer
    from mtp.tokenizer import ByteTokenizer

    cfg = build_config(overrides={"train.preset": "debug", "model.n_future": 2, "tracking.run_id": training_run_id,
                                  "model.max_seq_len": 512})  # holds the MBPP prompts (~270 bytes) + new tokens
    torch.manual_seed(0)
    return save_checkpoint(directory, MTPTransformer(cfg.model), cfg, ByteTokenizer())


def test_generation_on_ray_matches_local_and_is_seeded(ray_cluster, tmp_path):
    checkpoint = str(_tiny_checkpoint(tmp_path / "ck"))
    bench = load_jsonl(DATA / "eval_mbpp.jsonl")
    config = GenerationConfig(n_samples=2, temperature=1.0, max_new_tokens=6, backend="ray")
    on_ray = generate_samples(checkpoint, bench, config)
    assert [(r["task_id"], r["sample_index"]) for r in on_ray] == [(p.task_id, i) for p in bench.problems for i in (0, 1)]
    assert on_ray == generate_samples(checkpoint, bench, replace(config, backend="local"))  # same seeds, same samples
    assert on_ray[0]["completion"] != on_ray[1]["completion"]  # each sample has its own seed
    with pytest.raises(ValueError, match="identical greedy samples"):
        generate_samples(checkpoint, bench, replace(config, temperature=0.0))


def test_evaluate_model_generates_scores_and_links_the_training_run(tmp_path, mlflow_uri):
    client = _client(mlflow_uri)
    training = client.create_run(client.create_experiment("mtp-train", artifact_location=(tmp_path / "a").as_uri()))
    _tiny_checkpoint(tmp_path / "ck", training.info.run_id)
    done = _evaluate("--model", str(tmp_path / "ck"), "--benchmark", str(DATA / "eval_mbpp.jsonl"), "--n-samples", "2",
                     "--temperature", "0.8", "--max-new-tokens", "8", "--k", "1,2", "--output", str(tmp_path / "out"),
                     "--stop", "[DONE]", "--stop", "\nassert")
    assert done.returncode == 0, done.stderr
    assert "generated 8 samples for eval_mbpp at T=0.8" in done.stdout
    results = [json.loads(line) for line in (tmp_path / "out" / "eval_mbpp_T0.8_results.jsonl").read_text().splitlines()]
    assert len(results) == 8 and {r["sample_index"] for r in results} == {0, 1}
    (run,) = client.search_runs([client.get_experiment_by_name("mtp-eval").experiment_id])
    assert run.data.tags["mtp.training_run_id"] == training.info.run_id
    assert client.get_run(training.info.run_id).data.tags["mtp.evaluation_run_id"] == run.info.run_id
    assert {"eval_mbpp/T0.8/pass_at_1", "eval_mbpp/T0.8/pass_at_2"} <= set(run.data.metrics)
    assert run.data.params["generation.n_samples"] == "2"
    assert run.data.params["generation.stop"] == str(("[DONE]", "\nassert"))


def test_evaluate_model_on_the_default_ray_backend(tmp_path):
    """As users run it: no --backend, so generation and scoring go to a Ray the job starts itself."""
    _tiny_checkpoint(tmp_path / "ck")
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "evaluate.py"), "--model", str(tmp_path / "ck"), "--benchmark",
         str(DATA / "eval_mbpp.jsonl"), "--max-new-tokens", "4", "--k", "1", "--workers", "1", "--no-mlflow",
         "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "RAY_ADDRESS": "local"},  # its own local Ray, not one running on this machine
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "generated 4 samples for eval_mbpp at T=0" in done.stdout
    assert len((tmp_path / "out" / "eval_mbpp_T0_results.jsonl").read_text().splitlines()) == 4
