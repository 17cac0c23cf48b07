"""A sweep interrupted as a user interrupts one (Ctrl-C), then resumed with the command it printed.

The sweep runs as ``python jobs/tune.py`` in its own process with its own local Ray; SIGINT
arrives after its first trial. It must say how far it got, end its MLflow parent run KILLED
(not FINISHED with an empty summary), print a command that resumes it, and that command,
pasted as printed, must finish the sweep in the same parent run.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO, SOURCE_ROOT

SWEEP = {
    "name": "interrupted",
    "config": {
        "train": {"preset": "debug", "max_steps": 6, "batch_size": 2, "seq_len": 32, "warmup_steps": 2,
                  "log_every": 3, "eval_every": 3, "eval_batches": 1, "checkpoint_every": 3},
        "data": {"max_documents": 20, "num_proc": 1},
    },
    "experiment": "interrupt-test",
    "space": {"model.n_future": {"grid": [1, 2, 3]}},
    "metric": "val/bpb",
    "max_concurrent_trials": 1,
}


def run(command: list[str], cwd, interrupt_after: str | None = None, timeout: float = 600) -> tuple[int, str]:
    """Run a job as a user does; SIGINT (Ctrl-C) once a console line contains ``interrupt_after``."""
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(SOURCE_ROOT)}
    job = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    output, deadline = [], time.monotonic() + timeout
    for line in job.stdout:
        output.append(line)
        if interrupt_after and interrupt_after in line:
            job.send_signal(signal.SIGINT)
            interrupt_after = None
        if time.monotonic() > deadline:
            os.killpg(job.pid, signal.SIGKILL)
            break
    job.wait()
    return job.returncode, "".join(output)


@pytest.mark.timeout(900)
def test_ctrl_c_during_a_sweep_says_so_and_the_printed_command_resumes_it(tmp_path):
    from mlflow import MlflowClient

    space = tmp_path / "sweep.yaml"
    space.write_text(yaml.safe_dump(SWEEP))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code, console = run([sys.executable, str(REPO / "jobs" / "tune.py"), "--space", str(space), "--tracking-uri", uri,
                         "--storage-path", str(tmp_path / "sweeps")], cwd=tmp_path, interrupt_after="trial 1 of 3 done")
    assert code == 130, console[-4000:]
    assert "interrupted: 1 of 3 trials ran" in console or "interrupted: 2 of 3 trials ran" in console, console[-3000:]
    print(console)  # what the user saw (pytest -s)
    assert "Tuner.restore" not in console and "Traceback" not in console, console[-3000:]
    assert "TensorBoard" not in console and "Trial status" not in console and "WARNING" not in console, console[-3000:]
    (hint,) = [line.split("resume with: ", 1)[1] for line in console.splitlines() if line.startswith("resume with: ")]

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("interrupt-test").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`mtp.kind` = 'sweep'")
    assert parent.info.status == "KILLED" and "trials ran" in parent.data.tags["interrupted"]
    assert not client.list_artifacts(parent.info.run_id)[1:]  # the sweep file only: no summary of a partial sweep
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert children and all(c.info.status in ("FINISHED", "KILLED") for c in children)
    for run_ in (parent, *children):  # where it came from: the sweep's command, not Ray's default_worker.py
        assert run_.data.tags["mlflow.source.name"] == "jobs/tune.py", run_.data.tags
        assert "--space" in run_.data.tags["mtp.command"]

    code, console = run(shlex.split(hint), cwd=tmp_path)  # pasted as printed
    print(console)
    assert code == 0, console[-4000:]
    assert "3 trials, 0 failed" in console and "TensorBoard" not in console
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and "interrupted" not in parent.data.tags
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
