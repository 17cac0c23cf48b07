"""The cluster path as users run it, end to end on this machine.

`scripts/cluster.py up` (= make cluster-up: a real `ray start` head in its own temp dir
with its own ports and token auth, and an `mlflow server`), then, through the CLIs the
README shows: `ray job submit` of a short training job and of an evaluation on the
default backend, `jobs/serve_config.py` + `serve deploy` of the registered model and a
completion over HTTP; `scripts/cluster.py down` must leave none of its processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPT = REPO / "scripts" / "cluster.py"
MODEL = "cluster-path"


def _cluster_script():
    spec = importlib.util.spec_from_file_location("cluster_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("cluster")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    up = subprocess.run([sys.executable, str(SCRIPT), "up", "--state-dir", str(state_dir), "--num-cpus", "2"],
                        env=env, capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr[-3000:]
    state = json.loads((state_dir / "state.json").read_text())
    assert "MLflow server:" in up.stdout and state["env"]["RAY_AUTH_MODE"] == "token"
    wide = _cluster_script().exposed(state)  # bound to 127.0.0.1 (the default --host) where Ray allows it
    assert "dashboard-port" not in wide and "mlflow" not in wide, wide
    try:
        yield {"state": state, "dir": state_dir, "env": {**env, **state["env"], "HF_DATASETS_OFFLINE": "1",
                                                         "HF_HUB_OFFLINE": "1"}}
    finally:
        down = subprocess.run([sys.executable, str(SCRIPT), "down", "--state-dir", str(state_dir)],
                              capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        left = _cluster_script().cluster_processes(state["ray_session"], state["ray_temp_dir"])
        assert left == [], f"processes left after cluster down: {left}"
        assert not Path(f"/proc/{state['mlflow_pgid']}").exists() or "Z" in Path(
            f"/proc/{state['mlflow_pgid']}/stat").read_text().split(") ")[-1][:1]


def submit(cluster, submission_id: str, *entrypoint: str, timeout: float = 420) -> str:
    """`ray job submit --working-dir .` from the repo root, as the README shows; returns the job's output."""
    done = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--submission-id", submission_id, "--working-dir", str(REPO), "--",
         *entrypoint],
        cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=timeout,
    )
    status = subprocess.run([str(BIN / "ray"), "job", "status", submission_id], env=cluster["env"],
                            capture_output=True, text=True, timeout=60)
    assert f"Job '{submission_id}' succeeded" in status.stdout, done.stdout[-4000:] + done.stderr[-2000:]
    return done.stdout


@pytest.mark.timeout(900)
def test_train_evaluate_and_serve_through_the_cluster_clis(cluster, tmp_path):
    from mlflow import MlflowClient

    uri = cluster["state"]["env"]["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri, uri)

    # 1. Training as a job: the venv's python runs it (the head has it first on PATH),
    #    the console shows our progress lines and not Ray Train's report dumps.
    runs = tmp_path / "runs"
    out = submit(cluster, "train-cluster-path", "python", "jobs/train.py", "--max-steps", "4", "--preset", "debug",
                 "--set", "train.eval_every=2", "--set", "train.checkpoint_every=2", "--set", "train.log_every=2",
                 "--set", "train.seq_len=64", "--set", "model.max_seq_len=512", "--set", f"train.output_dir={runs}",
                 "--set", f"tracking.registered_model={MODEL}")
    assert "| loss " in out  # one progress line per log interval
    assert "TrainingReport(" not in out and "PreemptionWatcher" not in out
    version = client.get_model_version_by_alias(MODEL, "champion")
    run = client.get_run(version.run_id)
    assert run.data.tags["mtp.ray_job_id"] == "train-cluster-path" and run.data.tags["mlflow.source.type"] == "JOB"
    assert run.data.tags["mlflow.source.name"] == "jobs/train.py"
    assert run.data.tags["mtp.ray_working_dir"].startswith("gcs://_ray_pkg_")  # the uploaded code, by content hash
    assert any(runs.glob("*/checkpoint_*")), "checkpoints belong under train.output_dir, not the job's working dir"

    # 1b. Resumed as a job with --resume alone (and a longer schedule): the checkpoint's config
    #     holds the absolute output dir, so the command needs no --set train.output_dir.
    run_dir = next(runs.glob("*/checkpoint_*")).parent
    out = submit(cluster, "resume-cluster-path", "python", "jobs/train.py", "--resume", str(run_dir),
                 "--max-steps", "6")
    assert "resume: train.max_steps = 6 (the checkpoint's run had 4)" in out, out[-3000:]
    assert (run_dir / "checkpoint_000006").is_dir() and client.get_run(version.run_id).info.status == "FINISHED"

    # 2. Evaluation as a job, default backend (sandbox workers as Ray actors on the cluster).
    out = submit(cluster, "eval-cluster-path", "python", "jobs/evaluate.py", "--model", f"models:/{MODEL}@champion",
                 "--benchmark", "tests/data/eval_mbpp.jsonl", "--max-new-tokens", "16", "--k", "1")
    evaluation = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.mtp.ray_job_id = 'eval-cluster-path'"
    )
    assert len(evaluation) == 1, out[-3000:]
    assert "eval_mbpp/T0/pass_at_1" in evaluation[0].data.metrics

    # 3. serve deploy of the registered model: everything the app needs is in the config file.
    config = tmp_path / "serve.yaml"
    port = cluster["state"]["ports"]["serve"]
    subprocess.run([sys.executable, str(REPO / "jobs" / "serve_config.py"), "--model", f"models:/{MODEL}@champion",
                    "--port", str(port), "-o", str(config)], env=cluster["env"], check=True, timeout=120)
    subprocess.run([str(BIN / "serve"), "deploy", str(config)], env=cluster["env"], check=True, timeout=120,
                   capture_output=True)
    from mtp.serving.deploy import ServeAdmin

    ServeAdmin(cluster["state"]["env"]["RAY_DASHBOARD_ADDRESS"],
               Path(cluster["state"]["env"]["RAY_AUTH_TOKEN_PATH"]).read_text()).wait_running(300)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        response = requests.post(f"{url}/v1/completions", json={"prompt": "def f(x):", "max_tokens": 8}, timeout=60)
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 8
    card = requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]
    assert card["id"] == MODEL and card["version"] == str(version.version)
