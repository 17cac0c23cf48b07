"""Distributed training: gradient sync, a 2-worker Ray Train job that survives a SIGKILL, resume, bad input."""

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest
import torch
import yaml

from _jobs import run_ranks, step_gradients, tiny_config, train_history
from conftest import REPO, SOURCE_ROOT
from mtp.cluster.job import newest_checkpoint, run_job
from mtp.cluster.trainer import PlacementError, check_placement
from mtp.data import DataError
from mtp.tracking.store import TrackingError


def test_two_ranks_average_gradients_once_per_step(tmp_path):
    """2 ranks x batch 2 (with grad accumulation) == 1 rank x batch 4, synced by one all-reduce."""
    two = tiny_config(tmp_path, **{"train.batch_size": 2, "train.grad_accum": 2, "scaling.num_workers": 2})
    one = tiny_config(tmp_path, **{"train.batch_size": 4, "train.grad_accum": 2})
    reference = step_gradients(one.to_dict())["grads"]
    ranks = run_ranks(step_gradients, 2, two.to_dict())
    for rank in ranks:
        assert rank["all_reduce_calls"] == 1  # not once per head, chunk or micro-batch
        for name, grad in reference.items():
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in reference.values())


def test_bad_input_fails_before_any_worker_starts(ray_cluster, tmp_path):
    cfg = tiny_config(tmp_path, **{"scaling.num_workers": 3})
    with pytest.raises(PlacementError, match="num_workers=3 .* fits 2"):
        check_placement(cfg.scaling)
    with pytest.raises(PlacementError, match="GPU"):
        check_placement(tiny_config(tmp_path, **{"scaling.use_gpu": True}).scaling)
    started = time.time()
    with pytest.raises(DataError, match="does not exist"):
        run_job(tiny_config(tmp_path, **{"data.source": str(tmp_path / "nope")}), track=False)
    with pytest.raises(TrackingError, match="unreachable"):
        run_job(tiny_config(tmp_path, **{"tracking.tracking_uri": "http://127.0.0.1:9"}))
    with pytest.raises(PlacementError):
        run_job(cfg, track=False)
    assert time.time() - started < 20



def _train_worker_processes():
    """Ray Train worker processes descending from this test process (the job and its Ray)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


class Killer(threading.Thread):
    """SIGKILLs one training worker as soon as ``trigger`` appears in the run's storage.

    A checkpoint's folder appears before the Train controller registers it (it learns
    of reports when it polls the workers), so the trigger is the controller's
    checkpoint-manager snapshot, written once a checkpoint is registered.
    """

    def __init__(self, run_dir, trigger: str, timeout: float = 240):
        super().__init__(daemon=True)
        self.run_dir, self.trigger, self.timeout = run_dir, trigger, timeout
        self.killed_pid = None

    def run(self):
        deadline = time.time() + self.timeout
        while time.time() < deadline and self.killed_pid is None:
            if (self.run_dir / self.trigger).exists():
                workers = _train_worker_processes()
                if workers:
                    workers[-1].kill()
                    self.killed_pid = workers[-1].pid
                    return
            time.sleep(0.01)


def _last_value_per_step(client, run_id, key):
    values = {}
    for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
        values.setdefault(m.step, []).append(m.value)
    return values


@dataclass
class KilledJob:
    run_id: str
    checkpoint: str
    storage_dir: str


@pytest.fixture(scope="module")
def killed_job(ray_cluster, tmp_path_factory):
    """A 2-worker gloo job, one of whose workers is SIGKILLed mid-run (after one checkpoint).

    The job runs as users run it, ``python jobs/train.py --config ...``, in its own
    process with its own local Ray: after a worker is SIGKILLed, that driver's GCS state
    accessor was seen to block forever, and it must not be the test session's driver.
    """
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("killed")
    cfg = tiny_config(tmp, **{
        "train.max_steps": 60, "train.checkpoint_every": 10, "train.eval_every": 20,
        "scaling.num_workers": 2, "scaling.max_failures": 1, "tracking.run_name": "killed",
        "tracking.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "tracking.registered_model": "killed-model",
    })
    # the uninterrupted reference first, so nothing the killed job leaves behind can disturb it
    reference = {h["step"]: h["train/loss_mean"] for h in run_ranks(train_history, 2, cfg.to_dict())[0]}
    config_file = tmp / "killed.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    run_dir = tmp / "runs" / "killed"
    killer = Killer(run_dir, "checkpoint_manager_snapshot.json")
    killer.start()
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(SOURCE_ROOT)}
    job = subprocess.Popen([sys.executable, str(REPO / "jobs" / "train.py"), "--config", str(config_file)],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = []
    for line in job.stdout:  # the job reports its final checkpoint, then Ray shuts down
        output.append(line)
        if line.startswith("final checkpoint:"):
            break
    try:
        job.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)  # the result is complete; only Ray's own shutdown is slow
    killer.join(timeout=1)
    assert any(line.startswith("final checkpoint:") for line in output), "".join(output[-40:])
    (run,) = MlflowClient(cfg.tracking.tracking_uri).search_runs(
        [MlflowClient(cfg.tracking.tracking_uri).get_experiment_by_name(cfg.tracking.experiment).experiment_id],
        filter_string="attributes.run_name = 'killed'",
    )
    return cfg, KilledJob(run.info.run_id, str(newest_checkpoint(run_dir)), str(run_dir)), killer, reference


@pytest.mark.timeout(300)
def test_killed_worker_restarts_from_its_checkpoint_and_matches_an_uninterrupted_run(killed_job):
    from mlflow import MlflowClient

    cfg, result, killer, reference = killed_job
    assert killer.killed_pid is not None, "the run finished before a worker could be killed"
    client = MlflowClient(cfg.tracking.tracking_uri)
    logged = _last_value_per_step(client, result.run_id, "train/loss_mean")
    assert sorted(logged) == list(range(1, 61))
    # killed after a checkpoint was registered: the restart resumes from it, not from step 0
    assert all(len(logged[s]) == 1 for s in range(1, 11)), "steps before the checkpoint must not be redone"
    # steps replayed after the restart are not logged twice; the restart itself is counted
    assert all(len(logged[s]) == 1 for s in range(1, 61)), {s: v for s, v in logged.items() if len(v) > 1}
    assert [m.value for m in client.get_metric_history(result.run_id, "restarts")] == [1.0]

    for step in range(1, 61):
        assert logged[step][-1] == pytest.approx(reference[step], rel=1e-5), step
    assert result.checkpoint.endswith("checkpoint_000060")
    assert client.get_run(result.run_id).info.status == "FINISHED"


@pytest.mark.timeout(300)
def test_resume_continues_a_finished_run_in_the_same_mlflow_run(killed_job, tmp_path):
    from mlflow import MlflowClient

    cfg, first, _, _ = killed_job
    longer = tiny_config(tmp_path, **{
        "train.max_steps": 64, "train.checkpoint_every": 10, "train.eval_every": 20,
        "tracking.tracking_uri": cfg.tracking.tracking_uri, "tracking.run_name": "resumed", "data.source": cfg.data.source,
        "data.cache_dir": cfg.data.cache_dir,
    })
    result = run_job(longer, resume=first.storage_dir)
    assert result.run_id == first.run_id
    client = MlflowClient(cfg.tracking.tracking_uri)
    assert sorted(_last_value_per_step(client, result.run_id, "train/loss_mean"))[-4:] == [61, 62, 63, 64]
    assert client.get_run(result.run_id).data.tags.get("resume.train.max_steps") == "64"


def test_fsdp_trains_like_ddp_and_resumes_from_sharded_checkpoints(tmp_path):
    from _jobs import ddp_fsdp_and_resumed_runs, losses

    from mtp.checkpoint import load_model

    cfg = tiny_config(tmp_path, **{"train.batch_size": 2, "train.grad_accum": 2, "train.max_steps": 8})
    result = run_ranks(ddp_fsdp_and_resumed_runs, 2, cfg.to_dict())[0]
    ddp, fsdp, resumed = losses(result["ddp"]), losses(result["fsdp"]), losses(result["resumed"])
    assert list(fsdp) == list(range(1, 9)) and list(resumed) == [5, 6, 7, 8]
    for step, value in ddp.items():
        assert fsdp[step] == pytest.approx(value, rel=1e-4), step
    for step, value in resumed.items():
        assert value == pytest.approx(fsdp[step], rel=1e-5), step
    final = result["checkpoint"]
    assert sorted(p.name for p in (final / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    model, _, config = load_model(final)  # full weights for inference, gathered from the shards
    assert config["scaling"]["strategy"] == "fsdp" and model.cfg.n_future == 2
