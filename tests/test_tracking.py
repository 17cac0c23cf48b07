"""MLflow tracking against a real `mlflow server`: params, per-head metrics, artifacts, registry."""

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from _jobs import free_port, tiny_config
from mtp.checkpoint import load_model
from mtp.tracking import (
    MLflowCallback,
    TrackingError,
    check_tracking,
    finish_run,
    resolve_checkpoint,
    start_run,
    tracking_uri,
)
from mtp.train import train


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 with the light settings from the stack notes."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.timeout(300)
def test_run_logs_params_metrics_artifacts_and_registers_the_model(mlflow_server, tmp_path, monkeypatch):
    """The job's tracking sequence (driver opens, rank 0 logs, driver finishes), in one process.

    The same sequence under Ray Train, against a sqlite store, is in test_cluster.
    """
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    config_file = tmp_path / "job.yaml"
    config_file.write_text(yaml.safe_dump({"train": {"max_steps": 6, "eval_every": 3}}))
    cfg = tiny_config(tmp_path, **{"train.max_steps": 6, "train.eval_every": 3, "tracking.registered_model": "mtp-test",
                                   "tracking.run_name": "tracked"})
    check_tracking(tracking_uri(cfg.tracking))
    cfg.tracking.run_id = start_run(cfg, config_file)
    callback = MLflowCallback(cfg.tracking.run_id, tracking_uri(cfg.tracking))
    try:
        trained = train(cfg, callbacks=[callback])
    finally:
        callback.close()
    finished = finish_run(cfg, cfg.tracking.run_id, trained.checkpoint)

    client = MlflowClient(mlflow_server)
    run = client.get_run(finished.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    expected = {k: "" if v is None else str(v) for k, v in cfg.flat().items() if k != "tracking.run_id"}
    assert run.data.params == expected
    for key in ("train/loss_head_0", "train/loss_head_1", "train/loss", "perf/tokens_per_s", "train/lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, 7)), key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss_head_1")] == [3, 6]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"checkpoint", "config", "plots"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/head_losses.png"}
    assert "config/config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert "config/source/job.yaml" in {a.path for a in client.list_artifacts(run.info.run_id, "config/source")}

    assert finished.model_uri == "models:/mtp-test/1"
    version = client.get_model_version("mtp-test", "1")
    assert version.tags["n_future"] == "2" and version.tags["size"].endswith("M") and version.run_id == run.info.run_id
    local = resolve_checkpoint("models:/mtp-test/1", cache_dir=tmp_path / "models")
    model, _, config = load_model(local)
    assert config["tracking"]["run_id"] == run.info.run_id and model.cfg.n_future == 2
    assert load_model(f"runs:/{run.info.run_id}/checkpoint")[2]["train"]["max_steps"] == 6


def test_unreachable_server_and_unknown_model_fail_clearly(mlflow_server, tmp_path):
    with pytest.raises(TrackingError, match="unreachable"):
        check_tracking(f"http://127.0.0.1:{free_port()}")
    check_tracking(mlflow_server)
    with pytest.raises(TrackingError, match="cannot resolve 'models:/no-such-model/1'"):
        resolve_checkpoint("models:/no-such-model/1", cache_dir=tmp_path, tracking=mlflow_server)
