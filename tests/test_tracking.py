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
from mtp.tracking.registry import resolve_checkpoint
from mtp.tracking.runs import MLflowCallback, finish_run, register_checkpoint, source_tags, start_run
from mtp.tracking.store import TrackingError, check_tracking, tracking_uri
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
    # A restarted worker group replays steps 5 and 6 from its checkpoint, then goes on.
    restarted = MLflowCallback(cfg.tracking.run_id, tracking_uri(cfg.tracking), system_metrics=False, restarted=True)
    for step in (5, 6, 7):
        restarted.on_log(step, {"train/loss_mean": 100.0 + step})
    finished = finish_run(cfg, cfg.tracking.run_id, trained.checkpoint)

    client = MlflowClient(mlflow_server)
    run = client.get_run(finished.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    expected = {k: "" if v is None else str(v) for k, v in cfg.flat().items() if k != "tracking.run_id"}
    assert run.data.params == expected
    for key in ("train/loss_head_0", "train/loss_head_1", "perf/tokens_per_s", "train/lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, 7)), key
    losses = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss_mean"))
    assert [step for step, _ in losses] == list(range(1, 8)) and losses[-1][1] == 107.0  # replays not re-logged
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "restarts")] == [(6, 1.0)]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's "Machine learning"
    assert run.data.tags["mtp.command"].startswith("python ") and run.data.tags["mlflow.source.type"] == "LOCAL"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss_head_1")] == [3, 6]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"checkpoint", "config", "plots"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/head_losses.png"}
    assert "config/config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert "config/source/job.yaml" in {a.path for a in client.list_artifacts(run.info.run_id, "config/source")}

    assert finished.model_uri == "models:/mtp-test/1"
    version = client.get_model_version("mtp-test", "1")
    assert version.tags["n_future"] == "2" and version.tags["size"].endswith("M") and version.run_id == run.info.run_id
    assert set(client.get_registered_model("mtp-test").aliases) == {"newest", "champion"}
    # Finishing again with the same weights (a resume with nothing to train) keeps version 1.
    assert finish_run(cfg, cfg.tracking.run_id, trained.checkpoint).model_uri == "models:/mtp-test/1"
    assert [v.version for v in client.search_model_versions("name = 'mtp-test'")] == ["1"]
    local = resolve_checkpoint("models:/mtp-test@champion", cache_dir=tmp_path / "models")
    model, _, config = load_model(local)
    assert config["tracking"]["run_id"] == run.info.run_id and model.cfg.n_future == 2
    assert load_model(resolve_checkpoint(f"runs:/{run.info.run_id}/checkpoint"))[2]["train"]["max_steps"] == 6
    with monkeypatch.context() as env:  # the store named wins over the environment's (what a Serve replica does)
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
        named = resolve_checkpoint("models:/mtp-test/1", mlflow_server, cache_dir=tmp_path / "named")
    assert load_model(named)[2]["tracking"]["run_id"] == run.info.run_id

    # The registered model is an MLflow pyfunc model: completions straight from the registry,
    # the same greedy text the engine gives for the checkpoint.
    import mlflow.pyfunc
    import pandas as pd

    from mtp.decoding import Engine, SamplingParams

    assert [m.source_run_id for m in client.search_logged_models([run.info.experiment_id])] == [run.info.run_id]
    pyfunc = mlflow.pyfunc.load_model("models:/mtp-test@newest")
    assert pyfunc.metadata.get_input_schema().input_names() == ["prompt"]
    completions = pyfunc.predict(pd.DataFrame({"prompt": ["def add(a, b):", "import"]}), params={"max_tokens": 12})
    engine = Engine.from_checkpoint(str(local))
    assert completions == [g.text for g in engine.generate(["def add(a, b):", "import"], SamplingParams(max_new_tokens=12))]

    # A second run's version moves @newest; @champion stays until someone promotes.
    second = client.create_run(run.info.experiment_id).info.run_id
    assert register_checkpoint(cfg, second, trained.checkpoint) == "models:/mtp-test/2"
    aliases = client.get_registered_model("mtp-test").aliases
    assert aliases == {"newest": "2", "champion": "1"}
    promote = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "jobs" / "promote.py"),
                              "models:/mtp-test@newest", "--tracking-uri", mlflow_server],
                             capture_output=True, text=True, timeout=120)
    assert promote.returncode == 0 and "models:/mtp-test@champion -> models:/mtp-test/2" in promote.stdout, promote.stderr
    assert client.get_registered_model("mtp-test").aliases["champion"] == "2"

    # A sweep's best trial (any run that logged a model) becomes @champion of a registered model.
    from mtp.tracking.registry import register_run_model

    assert register_run_model(run.info.run_id, "mtp-best", mlflow_server) == "models:/mtp-best/1"
    assert client.get_registered_model("mtp-best").aliases == {"champion": "1"}
    with pytest.raises(ValueError, match="logged no model"):
        register_run_model(client.create_run(run.info.experiment_id).info.run_id, "mtp-best", mlflow_server)


def test_source_tags_name_entry_point_commit_and_ray_job(monkeypatch):
    repo = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"metadata": {"job_submission_id": "raysubmit_abc"}}')
    tags = source_tags([str(repo / "jobs" / "train.py"), "--max-steps", "3"])
    assert tags["mlflow.source.name"] == "jobs/train.py" and tags["mlflow.source.git.commit"] == head
    assert tags["mtp.git.dirty"] in ("true", "false") and tags["mtp.command"].endswith("train.py --max-steps 3")
    assert tags["mlflow.source.type"] == "JOB" and tags["mtp.ray_job_id"] == "raysubmit_abc"

    # and, as a Ray job, outputs must not go to the job's temporary working directory
    from mtp.cluster.outputs import OutputError, check_durable

    check_durable("/mnt/shared/runs", "--storage-path")
    check_durable("s3://bucket/runs", "--set train.output_dir")
    with pytest.raises(OutputError, match="train.output_dir='runs' is relative"):
        check_durable("runs", "--set train.output_dir")
    with pytest.raises(OutputError, match="--storage-path is not given"):
        check_durable(None, "--storage-path")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    check_durable("runs", "--set train.output_dir")  # a local run keeps its relative default


def test_unreachable_server_and_unknown_model_fail_clearly(mlflow_server, tmp_path):
    with pytest.raises(TrackingError, match="unreachable"):
        check_tracking(f"http://127.0.0.1:{free_port()}")
    check_tracking(mlflow_server)
    with pytest.raises(TrackingError, match="cannot resolve 'models:/no-such-model/1'"):
        resolve_checkpoint("models:/no-such-model/1", cache_dir=tmp_path, tracking=mlflow_server)


@pytest.mark.parametrize("uri,name,version,alias", [
    ("models:/mtp/3", "mtp", "3", None), ("models:/mtp@champion", "mtp", None, "champion"),
    ("models:/mtp/3/", "mtp", "3", None), ("models:/mtp", "mtp", None, None),
])
def test_model_uris_parse_and_print_back(uri, name, version, alias):
    from mtp.tracking.registry import ModelRef

    ref = ModelRef.parse(uri)
    assert (ref.name, ref.version, ref.alias) == (name, version, alias)
    assert str(ref) == uri.rstrip("/")
    assert ModelRef.parse("runs:/abc/model") is None and ModelRef.parse("/tmp/checkpoint") is None
