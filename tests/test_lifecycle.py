"""What a user reads around a run's life, without a cluster: resume plans, failure lines,
pasteable hints, and the MLflow server pre-flight (dead fails at once, slow is waited for)."""

from __future__ import annotations

import http.server
import os
import threading
import time
from pathlib import Path

import pytest

from _jobs import tiny_config
from mtp.cluster.resume import ResumeError, plan_resume
from mtp.tracking.store import TrackingError, check_tracking


def _checkpoint(tmp_path: Path, with_state: bool = True, **overrides) -> Path:
    """A real checkpoint of a debug model in ``<output_dir>/<run_name>/checkpoint_000004``."""
    from mtp.checkpoint import save_checkpoint
    from mtp.model import MTPTransformer
    from mtp.tokenizer import ByteTokenizer

    cfg = tiny_config(tmp_path, **{"train.output_dir": "runs", "tracking.run_id": "abc", **overrides})
    directory = tmp_path / "elsewhere" / "runs" / "tiny" / "checkpoint_000004"
    save_checkpoint(directory, MTPTransformer(cfg.model), cfg, ByteTokenizer(), {"step": 4} if with_state else None)
    return directory


def test_a_resume_continues_the_checkpoints_own_config_and_reports_each_change(tmp_path, monkeypatch):
    checkpoint = _checkpoint(tmp_path, **{"train.max_steps": 8, "scaling.num_workers": 2})
    monkeypatch.chdir(tmp_path)
    plan = plan_resume("elsewhere/runs/tiny", {"train.max_steps": 12})  # relative; the run dir: its newest
    assert plan.checkpoint == checkpoint and plan.checkpoint.is_absolute() and plan.step == 4
    assert plan.config.scaling.num_workers == 2 and plan.config.train.max_steps == 12
    assert plan.config.tracking.run_id == "abc"  # the same MLflow run
    # the checkpoint's relative output_dir is where the checkpoint is, not this working directory
    assert plan.config.train.output_dir == str(tmp_path / "elsewhere" / "runs")
    assert plan.changes == {"train.max_steps": (8, 12)}
    assert plan.describe_changes() == ["resume: train.max_steps = 12 (the checkpoint's run had 8)"]
    assert plan_resume(checkpoint).changes == {}  # nothing given: nothing changes


def test_a_resume_that_cannot_work_fails_at_once_naming_why(tmp_path):
    with pytest.raises(ResumeError, match=f"{tmp_path / 'runs' / 'does-not-exist'} does not exist"):
        plan_resume(tmp_path / "runs" / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResumeError, match="neither a checkpoint .* nor a run directory"):
        plan_resume(tmp_path / "empty")
    with pytest.raises(ResumeError, match="inference-only checkpoint; start a new run from its weights with --init"):
        plan_resume(_checkpoint(tmp_path, with_state=False))


def test_failures_read_as_one_line_per_rank():
    from ray.train import WorkerGroupError

    from mtp.cluster.failures import causes, failure_report

    peer = RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:32909: "
                        "Connection reset by peer. This is typically caused by a remote worker hanging.\nmore")
    error = WorkerGroupError("rank 1 failed\n" + "Traceback ...\n" * 30, {1: peer, 0: ValueError("bad value")})
    assert causes(error) == ["rank 0: ValueError: bad value",
                             "rank 1: RuntimeError: Read error [127.0.0.1]:32909: Connection reset by peer."]
    report = failure_report(error, "/runs/x/checkpoint_000010", None).splitlines()
    assert report[:3] == ["training failed:", "  rank 0: ValueError: bad value",
                          "  rank 1: RuntimeError: Read error [127.0.0.1]:32909: Connection reset by peer."]
    assert report[3] == "last checkpoint: /runs/x/checkpoint_000010"
    assert report[4].startswith("resume with: ") and report[4].endswith("--resume /runs/x/checkpoint_000010")


def test_hints_name_programs_the_way_the_shell_finds_them(monkeypatch):
    import sys

    from mtp.hints import mlflow_browse, program

    beside = Path(sys.executable).parent
    if not (beside / "mlflow").exists():
        pytest.skip("no mlflow script beside this interpreter")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.chdir(beside.parent.parent)  # a venv's parent: the repository root, typically
    assert program("mlflow") == os.path.relpath(beside / "mlflow")
    assert mlflow_browse("sqlite:////x/mlflow.db") == f"{os.path.relpath(beside / 'mlflow')} ui --backend-store-uri sqlite:////x/mlflow.db"
    monkeypatch.setenv("PATH", f"{beside}:/usr/bin")
    assert program("mlflow") == "mlflow"
    assert mlflow_browse("http://h:5000", "1", "r") == "http://h:5000/#/experiments/1/runs/r"


class _SlowHealth(http.server.BaseHTTPRequestHandler):
    delays = [3.0, 3.0]  # the first two /health requests take longer than the client waits

    def do_GET(self):
        if self.delays:
            time.sleep(self.delays.pop(0))
        try:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on this one
            pass

    def log_message(self, *args):
        pass


def test_the_mlflow_preflight_fails_fast_on_a_dead_server_and_waits_for_a_slow_one(capsys):
    from _jobs import free_port

    started = time.monotonic()
    with pytest.raises(TrackingError, match="Connection refused"):
        check_tracking(f"http://127.0.0.1:{free_port()}", timeout=1.0)
    assert time.monotonic() - started < 2

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowHealth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_tracking(f"http://127.0.0.1:{server.server_port}", timeout=1.0, patience_s=30)
        assert capsys.readouterr().err.count("slow to answer") == 2
        _SlowHealth.delays[:] = [5.0] * 10
        with pytest.raises(TrackingError, match="no answer within 2 s"):
            check_tracking(f"http://127.0.0.1:{server.server_port}", timeout=0.5, patience_s=2)
    finally:
        server.shutdown()
