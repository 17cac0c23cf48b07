"""Distributed training: gradient sync, a 2-worker Ray Train job that survives a SIGKILL, resume, bad input.

The lifecycle as a user meets it: a relative ``--resume`` from another working directory
continues the run with its own configuration; a resume that fails leaves the run exactly as
it was; a job whose CPUs are held elsewhere says who holds them; a stopped job ends KILLED.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

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
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:  # a process of the tree exited while it was walked: look again later
        return []
    for proc in children:
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
    console: str


def train_job(*args: str, cwd=REPO, stop_when: str | None = None, timeout: float = 420) -> tuple[int, str]:
    """``python jobs/train.py ARGS`` in its own process and its own local Ray, as a user runs it;
    returns (exit code, console). With ``stop_when``, SIGTERM (what ``ray job stop`` sends) once
    a console line starts with it."""
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(SOURCE_ROOT)}
    job = subprocess.Popen([sys.executable, str(REPO / "jobs" / "train.py"), *args], cwd=cwd, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = []
    deadline = time.monotonic() + timeout
    for line in job.stdout:
        output.append(line)
        if stop_when and stop_when in line:
            job.send_signal(signal.SIGTERM)
            stop_when = None
        if line.startswith("final checkpoint:") or time.monotonic() > deadline:
            break
    try:
        output.append(job.communicate(timeout=60)[0])
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)  # the result is complete; only Ray's own shutdown is slow
        output.append(job.communicate()[0])
    return job.returncode, "".join(output)


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
    code, console = train_job("--config", str(config_file))
    killer.join(timeout=1)
    assert "final checkpoint:" in console, console[-4000:]
    (run,) = MlflowClient(cfg.tracking.tracking_uri).search_runs(
        [MlflowClient(cfg.tracking.tracking_uri).get_experiment_by_name(cfg.tracking.experiment).experiment_id],
        filter_string="attributes.run_name = 'killed'",
    )
    return cfg, KilledJob(run.info.run_id, str(newest_checkpoint(run_dir)), str(run_dir), console), killer, reference


@pytest.mark.timeout(900)  # with the module's killed job, which it starts
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


def test_a_killed_worker_reads_as_one_line_and_the_log_file_keeps_the_tracebacks(killed_job):
    _, result, killer, _ = killed_job
    assert killer.killed_pid is not None
    console = result.console
    failures = [line for line in console.splitlines() if "worker failure 1 of 1 allowed: rank" in line]
    assert failures, console[-3000:]
    assert "Traceback" not in console and "A worker died or was killed" not in console, console[-3000:]
    log = Path(result.storage_dir + ".log").read_text()
    assert "worker failure 1 of 1 allowed" in log and "Traceback" in log  # the details are kept


@pytest.mark.timeout(600)
def test_relative_resume_from_another_directory_continues_the_run_as_it_was(killed_job):
    """``--resume runs/killed`` from the folder holding it (not the job's): the checkpoint's own
    configuration (2 workers, its schedule), only --max-steps changed, printed and recorded."""
    from mlflow import MlflowClient

    cfg, first, _, _ = killed_job
    here = Path(first.storage_dir).parent.parent
    code, console = train_job("--resume", "runs/killed", "--max-steps", "64", cwd=here)
    assert code == 0, console[-4000:]
    assert "resume: train.max_steps = 64 (the checkpoint's run had 60)" in console
    assert sum(line.startswith("resume: ") for line in console.splitlines()) == 1  # nothing else changed
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    assert run.data.tags["resume.changes"] == "train.max_steps: 60 -> 64"
    assert run.data.params["scaling.num_workers"] == "2"
    assert sorted(_last_value_per_step(client, first.run_id, "train/loss_mean"))[-4:] == [61, 62, 63, 64]
    assert (Path(first.storage_dir) / "checkpoint_000064").is_dir()  # the same run directory
    assert f"final checkpoint: {first.storage_dir}/checkpoint_000064" in console


@pytest.mark.timeout(600)
def test_a_failed_resume_leaves_the_run_as_it_was(killed_job):
    """A resume whose workers fail (here: no CUDA) must not turn the FINISHED run FAILED or tag it.

    As a subprocess: after a failed Train run, this process's GCS client was seen to block every
    later call (even Ray's own ``internal_kv_put``), so the session's Ray is kept out of it."""
    from mlflow import MlflowClient

    cfg, first, _, _ = killed_job
    client = MlflowClient(cfg.tracking.tracking_uri)
    before = client.get_run(first.run_id)
    code, console = train_job("--resume", first.storage_dir, "--set", "train.device=cuda")
    assert code == 1, console[-3000:]
    assert "resume: train.device = 'cuda' (the checkpoint's run had 'auto')" in console
    assert re.search(r"training failed:\s+(rank \d: )?ConfigError: train.device", console), console[-3000:]
    assert "resume with: " in console and "Traceback" not in console, console[-3000:]
    after = client.get_run(first.run_id)
    assert after.info.status == "FINISHED"
    assert (after.info.status, after.info.end_time) == (before.info.status, before.info.end_time)
    assert after.data.tags == before.data.tags


def test_a_job_whose_cpus_are_held_says_by_whom(ray_cluster, tmp_path, capsys):
    @ray_cluster.remote(num_cpus=1)
    class ReplicaStandIn:
        def ping(self):
            return True

    holder = ReplicaStandIn.remote()
    ray_cluster.get(holder.ping.remote())
    try:
        cfg = tiny_config(tmp_path, **{"scaling.num_workers": 2})
        started = time.monotonic()
        with pytest.raises(PlacementError, match=r"held by ReplicaStandIn \(CPU 1\)"):
            run_job(cfg, track=False)
        with pytest.raises(PlacementError, match="--wait-for-resources"):
            run_job(cfg, track=False)
        with pytest.raises(PlacementError):
            run_job(cfg, track=False, wait_for_resources_s=2)
        assert time.monotonic() - started < 30
        waiting = [line for line in capsys.readouterr().out.splitlines() if line.startswith("waiting")]
        assert len(waiting) == 1 and "ReplicaStandIn" in waiting[0]
    finally:
        ray_cluster.kill(holder)


@pytest.mark.timeout(600)
def test_a_stopped_job_ends_its_run_killed_and_leaves_no_empty_run_directory(tmp_path):
    """SIGTERM (``ray job stop``) before the first checkpoint: the run ends KILLED, the console
    says so in one line, and the run directory, which holds nothing, is gone."""
    from mlflow import MlflowClient

    cfg = tiny_config(tmp_path, **{"train.max_steps": 2000, "train.checkpoint_every": 1000,
                                   "tracking.run_name": "stopped",
                                   "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    config_file = tmp_path / "stopped.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    code, console = train_job("--config", str(config_file), stop_when="step      2/", cwd=tmp_path)
    assert code == 130, console[-3000:]
    assert "stopped by SIGTERM" in console and "last checkpoint: none" in console, console[-3000:]
    assert "Traceback" not in console, console[-3000:]
    client = MlflowClient(cfg.tracking.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags["stopped"]
    assert not (tmp_path / "runs" / "stopped").exists()
